//! The only place with raw syscalls and ioctls.

pub mod mem;
pub mod os;
pub mod shm;
pub mod signal;
pub mod uffd;

//! The shared cache's file: its layout, and making, checking and mapping it.
//!
//! ```text
//! [ header: one page ][ entry records: slots × 64 B ][ chunk words: chunks × 8 B ][ data ]
//! ```
//! Every offset is a whole number of pages; the data starts at a multiple of the chunk size.
//! The header's first fields are written once, before the file gets its name (it is made under
//! a temporary name, filled in, then linked: `link(2)` fails if the name exists, and nobody can
//! open a half-made file). Everything written later is an atomic, so any process may read it at
//! any time. Only the data is registered with userfaultfd; the rest is mapped plainly.

use std::mem::size_of;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::error::Error;
use crate::sys::mem::PAGE;
use crate::sys::shm;

/// "LZFSHRD" and a NUL, read as a little-endian word.
pub const MAGIC: u64 = u64::from_le_bytes(*b"LZFSHRD\0");
/// Bumped whenever the layout changes: a file of another version is refused.
pub const VERSION: u32 = 1;
/// Processes that can have the cache open at once (one bit each in an entry's pin mask).
pub const MAX_PROCS: usize = 63;

/// A process slot.
#[repr(C)]
pub struct Proc {
    /// The owner's pid; 0: free; [`REAPING`] | pid: being cleared by that process.
    pub pid: AtomicU32,
    /// Bumped each time the slot is freed: with the slot, the mark its next owner writes into
    /// state words (`state::MARK`), unlike the marks any earlier owner left.
    pub gen: AtomicU32,
    /// The owner's start time (`sys::shm::start_time`); 0 while being set.
    pub start: AtomicU64,
}

/// `Proc::pid` of a slot a live process is clearing after its owner died.
pub const REAPING: u32 = 1 << 31;

#[repr(C)]
pub struct Header {
    pub magic: u64,
    pub version: u32,
    pub page: u32,
    pub chunk: u64,
    pub capacity: u64,
    pub slots: u64,
    pub file_len: u64,
    pub entries_off: u64,
    pub chunks_off: u64,
    pub data_off: u64,
    /// Resident bytes above which the cache purges itself.
    pub budget: AtomicU64,
    /// The data offset where the next entry's span starts (spans are never reused).
    pub next_data: AtomicU64,
    /// Chunks present (rebuilt and not punched since).
    pub present: AtomicU64,
    /// Chunks rebuilt by a regenerate callback, in all processes.
    pub fills: AtomicU64,
    /// Chunks whose callback failed.
    pub failures: AtomicU64,
    /// Chunks punched by purges.
    pub purged: AtomicU64,
    /// Purges run.
    pub purges: AtomicU64,
    /// Entries made.
    pub entries: AtomicU64,
    /// The recency clock: bumped by each use of an entry.
    pub tick: AtomicU64,
    /// Pressure events (PSI triggers that fired) a process purged for.
    pub pressure_events: AtomicU64,
    /// The PSI trigger every process watches: stall and window in microseconds (0: none).
    pub psi_stall_us: u64,
    pub psi_window_us: u64,
    /// The pid namespace of the process that made it (`sys::shm::pid_namespace`): liveness
    /// checks use pids, so every process must share it.
    pub pid_ns: u64,
    /// 1 + the mark of the process purging now; 0: nobody.
    pub purger: AtomicU32,
    pub _pad: u32,
    pub procs: [Proc; MAX_PROCS],
}

const _: () = assert!(size_of::<Header>() <= PAGE);

/// One entry's record.
#[repr(C)]
pub struct Record {
    /// [`EMPTY`], [`READY`], or [`CLAIMED`] | the mark of the process making it.
    pub state: AtomicU32,
    pub _pad0: u32,
    pub key: AtomicU64,
    /// Start of the span, from the data's start.
    pub offset: AtomicU64,
    pub len: AtomicU64,
    /// Bit `s` set: the process in slot `s` holds a pin.
    pub pins: AtomicU64,
    /// `Header::tick` at the entry's last use.
    pub used: AtomicU64,
    /// The entry's chunks rebuilt, in all processes.
    pub fills: AtomicU64,
    pub _pad: u64,
}

const _: () = assert!(size_of::<Record>() == 64);

pub const EMPTY: u32 = 0;
pub const READY: u32 = 1;
pub const CLAIMED: u32 = 1 << 31;

/// One chunk's words.
#[repr(C)]
pub struct ChunkWord {
    /// See `state.rs` for the states.
    pub state: AtomicU32,
    /// 1 + the record slot of the entry whose span holds the chunk; 0: none.
    pub owner: AtomicU32,
}

/// The sizes a file is made with.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    /// The file's page size: 4 KiB, or a hugetlbfs file's huge page size.
    pub page: usize,
    pub chunk: usize,
    pub capacity: usize,
    pub slots: usize,
}

/// Largest data area: 1 TiB of address space (the data is sparse: only present chunks use memory).
pub const MAX_CAPACITY: usize = 1 << 40;
pub const MAX_CHUNK: usize = 64 << 20;
/// At most 2^20 records (64 MiB of them).
pub const MAX_SLOTS: usize = 1 << 20;
/// At most 2^22 chunks (32 MiB of chunk words): a reap scans them all.
pub const MAX_CHUNKS: usize = 1 << 22;

impl Geometry {
    pub fn check(&self) -> Result<(), Error> {
        let bad = |s: String| Err(Error::InvalidConfig(s));
        if !self.page.is_power_of_two() || self.page < PAGE || self.page > MAX_CHUNK {
            return bad(format!(
                "page size {} is not one lazyfree can use",
                self.page
            ));
        }
        if self.chunk < self.page || self.chunk > MAX_CHUNK || !self.chunk.is_power_of_two() {
            return bad(format!(
                "chunk {} must be a power of two from the page size ({}) to 64 MiB",
                self.chunk, self.page
            ));
        }
        if self.capacity == 0 || self.capacity > MAX_CAPACITY || self.capacity % self.chunk != 0 {
            return bad(format!(
                "capacity {} must be a non-zero multiple of the chunk ({}) up to 1 TiB",
                self.capacity, self.chunk
            ));
        }
        if self.capacity / self.chunk > MAX_CHUNKS {
            return bad(format!(
                "capacity {} in chunks of {} makes more than {MAX_CHUNKS} chunks: raise the chunk",
                self.capacity, self.chunk
            ));
        }
        if self.slots == 0 || self.slots > MAX_SLOTS || !self.slots.is_power_of_two() {
            return bad(format!(
                "entry records {} must be a power of two from 1 to {MAX_SLOTS}",
                self.slots
            ));
        }
        Ok(())
    }

    fn chunks(&self) -> usize {
        self.capacity / self.chunk
    }

    /// (entries_off, chunks_off, data_off, file_len)
    fn offsets(&self) -> (usize, usize, usize, usize) {
        let up = |n: usize, to: usize| n.div_ceil(to) * to;
        let entries_off = self.page;
        let chunks_off = up(entries_off + self.slots * size_of::<Record>(), self.page);
        let data_off = up(
            chunks_off + self.chunks() * size_of::<ChunkWord>(),
            self.chunk,
        );
        (entries_off, chunks_off, data_off, data_off + self.capacity)
    }
}

/// This process's mappings of the file.
pub struct File {
    pub fd: OwnedFd,
    /// The path it was opened or made at.
    pub path: String,
    meta: *mut u8,
    meta_len: usize,
    /// The data, registered with userfaultfd by the caller.
    pub data: *mut u8,
    pub capacity: usize,
    pub chunk: usize,
    /// The file's page size (a hugetlbfs file's is its huge page size).
    pub page: usize,
    pub slots: usize,
    pub data_off: usize,
    entries_off: usize,
    chunks_off: usize,
}

// SAFETY: the pointers are to shared mappings that live as long as the File; everything reached
// through them is atomics or fields written once before the file was named.
unsafe impl Send for File {}
// SAFETY: as above.
unsafe impl Sync for File {}

fn shm_err(op: &'static str) -> impl Fn(std::io::Error) -> Error {
    move |e| Error::kernel(op, e)
}

/// Checks a cache's name.
fn check_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if !ok {
        return Err(Error::InvalidConfig(format!(
            "shared cache name {name:?}: use 1 to 200 of A-Z a-z 0-9 . _ -, not starting with '.'"
        )));
    }
    Ok(())
}

/// The path of the cache named `name` in `/dev/shm`, after checking the name.
pub fn path_of(name: &str) -> Result<String, Error> {
    in_dir(shm::SHM_DIR, name)
}

fn in_dir(dir: &str, name: &str) -> Result<String, Error> {
    check_name(name)?;
    Ok(format!("{dir}/lazyfree.{name}"))
}

/// Every path the cache named `name` may have: `/dev/shm`, then each hugetlbfs mount.
pub fn paths_of(name: &str) -> Result<Vec<String>, Error> {
    let mut v = vec![path_of(name)?];
    for (dir, _) in shm::hugetlbfs_mounts() {
        v.push(in_dir(&dir, name)?);
    }
    Ok(v)
}

/// Where a new cache with huge pages goes: the first hugetlbfs mount, with its page size.
pub fn huge_dir() -> Result<(String, usize), Error> {
    shm::hugetlbfs_mounts().into_iter().next().ok_or_else(|| {
        Error::InvalidConfig(
            "huge pages: no hugetlbfs is mounted. Reserve huge pages (sysctl vm.nr_hugepages) \
             and mount one (mount -t hugetlbfs none /dev/hugepages), or use 4 KiB pages"
                .into(),
        )
    })
}

/// Makes the file of a new cache in `dir` (`/dev/shm` or a hugetlbfs mount) and names it;
/// `Error::SharedExists` if the name is taken there or anywhere `open` looks.
pub fn create(
    dir: &str,
    name: &str,
    g: Geometry,
    budget: usize,
    psi: (u64, u64),
) -> Result<File, Error> {
    g.check()?;
    let path = in_dir(dir, name)?;
    for other in paths_of(name)? {
        if std::path::Path::new(&other).exists() {
            return Err(Error::SharedExists(other));
        }
    }
    let tmp = format!(
        "{path}.{}.{}.making",
        std::process::id(),
        crate::sys::os::random_u64()
    );
    let fd = shm::create_new(&tmp).map_err(shm_err("creating the shared cache file"))?;
    let made = (|| {
        let f = init(fd, &path, g, budget, psi)?;
        match shm::link(&tmp, &path) {
            Ok(()) => Ok(f),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Err(Error::SharedExists(path)),
            Err(e) => Err(Error::kernel("naming the shared cache file (link)", e)),
        }
    })();
    let _ = shm::unlink(&tmp);
    made
}

/// Sizes and fills in a new file nobody else can see yet.
fn init(
    fd: OwnedFd,
    path: &str,
    g: Geometry,
    budget: usize,
    psi: (u64, u64),
) -> Result<File, Error> {
    let (entries_off, chunks_off, data_off, file_len) = g.offsets();
    shm::set_len(fd.as_raw_fd(), file_len).map_err(shm_err("ftruncate"))?;
    let f = map(fd, path, g, entries_off, chunks_off, data_off)?;
    let h = f.header_mut_init();
    h.version = VERSION;
    h.page = g.page as u32;
    h.chunk = g.chunk as u64;
    h.capacity = g.capacity as u64;
    h.slots = g.slots as u64;
    h.file_len = file_len as u64;
    h.entries_off = entries_off as u64;
    h.chunks_off = chunks_off as u64;
    h.data_off = data_off as u64;
    h.budget.store(budget as u64, Ordering::Relaxed);
    (h.psi_stall_us, h.psi_window_us) = psi;
    h.pid_ns = shm::pid_namespace();
    h.magic = MAGIC;
    Ok(f)
}

/// Makes the file of a new cache without a name (a memfd): other processes get it by fd.
pub fn create_anonymous(g: Geometry, budget: usize, psi: (u64, u64)) -> Result<File, Error> {
    g.check()?;
    let fd = shm::memfd("lazyfree-shared").map_err(shm_err("memfd_create"))?;
    init(fd, "(memfd)", g, budget, psi)
}

/// Opens and checks the file of the cache named `name`, in `/dev/shm` or a hugetlbfs mount.
pub fn open(name: &str) -> Result<File, Error> {
    let mut found = None;
    for path in paths_of(name)? {
        match shm::open(&path) {
            Ok(fd) => {
                found = Some((path, fd));
                break;
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(Error::kernel("opening the shared cache file", e)),
        }
    }
    let Some((path, fd)) = found else {
        return Err(Error::SharedNotFound(path_of(name)?));
    };
    open_fd(fd, &path)
}

/// Checks and maps the cache file open at `fd` (`path` names it in errors).
pub fn open_fd(fd: OwnedFd, path: &str) -> Result<File, Error> {
    let path = path.to_string();
    let bad = |why: String| Error::BadSharedFile {
        path: path.clone(),
        why,
    };
    let len = shm::len(fd.as_raw_fd()).map_err(shm_err("fstat"))?;
    if len < size_of::<Header>() {
        return Err(bad(format!("{len} bytes: shorter than its header")));
    }
    // Read the header with pread, not a mapping: a hugetlbfs file maps only in huge pages.
    let mut head_buf = vec![0u64; size_of::<Header>().div_ceil(8)];
    shm::read_at(fd.as_raw_fd(), 0, bytemuck_u8(&mut head_buf)).map_err(shm_err("pread"))?;
    let head = head_buf.as_ptr() as *mut u8;
    // SAFETY: the buffer holds a Header's bytes, 8-aligned; only plain fields are copied out.
    let (psi_stall, psi_window, pid_ns) = unsafe {
        let h = &*(head as *const Header);
        (h.psi_stall_us, h.psi_window_us, h.pid_ns)
    };
    // SAFETY: as above.
    let (magic, version, page, chunk, capacity, slots, file_len, eo, co, dof) = unsafe {
        let h = &*(head as *const Header);
        (
            h.magic,
            h.version,
            h.page,
            h.chunk as usize,
            h.capacity as usize,
            h.slots as usize,
            h.file_len as usize,
            h.entries_off as usize,
            h.chunks_off as usize,
            h.data_off as usize,
        )
    };
    if magic != MAGIC {
        return Err(bad("not a lazyfree shared cache (wrong magic)".into()));
    }
    if version != VERSION {
        return Err(bad(format!(
            "layout version {version}, this build reads {VERSION}: open it with the same \
             lazyfree version that made it, or make a new cache"
        )));
    }
    let g = Geometry {
        page: page as usize,
        chunk,
        capacity,
        slots,
    };
    g.check()
        .map_err(|e| bad(format!("its header is damaged: {e}")))?;
    if g.offsets() != (eo, co, dof, file_len) {
        return Err(bad(
            "its header is damaged: the offsets do not match its sizes".into(),
        ));
    }
    let here = shm::pid_namespace();
    if pid_ns != 0 && here != 0 && pid_ns != here {
        return Err(bad(
            "it was made in another pid namespace (another container): its processes tell \
             live peers by pid, so every process sharing it must see the others' pids"
                .into(),
        ));
    }
    if psi_window != 0 && (psi_stall == 0 || psi_stall >= psi_window) {
        return Err(bad(
            "its header is damaged: the pressure trigger is out of range".into(),
        ));
    }
    if len != file_len {
        return Err(bad(format!(
            "{len} bytes where its header says {file_len}: truncated or resized"
        )));
    }
    map(fd, &path, g, eo, co, dof)
}

fn map(
    fd: OwnedFd,
    path: &str,
    g: Geometry,
    eo: usize,
    co: usize,
    dof: usize,
) -> Result<File, Error> {
    let meta = shm::map_shared(fd.as_raw_fd(), 0, dof).map_err(shm_err("mmap"))?;
    let data = match shm::map_shared(fd.as_raw_fd(), dof, g.capacity) {
        Ok(d) => d,
        Err(e) => {
            // SAFETY: meta was mapped just above and nothing refers to it.
            unsafe { crate::sys::mem::unmap(meta, dof) };
            return Err(Error::kernel("mmap", e));
        }
    };
    Ok(File {
        fd,
        path: path.to_string(),
        meta,
        meta_len: dof,
        data,
        capacity: g.capacity,
        chunk: g.chunk,
        page: g.page,
        slots: g.slots,
        data_off: dof,
        entries_off: eo,
        chunks_off: co,
    })
}

impl File {
    /// The header, mutably, while the file has no name yet (nobody else can see it).
    #[allow(clippy::mut_from_ref)] // only called by `create` before the file is linked
    fn header_mut_init(&self) -> &mut Header {
        // SAFETY: the meta mapping starts with a header page; the file is not named yet, so no
        // other process maps it, and no other reference to the header exists.
        unsafe { &mut *(self.meta as *mut Header) }
    }

    pub fn header(&self) -> &Header {
        // SAFETY: the meta mapping starts with the header page and lives as long as self.
        unsafe { &*(self.meta as *const Header) }
    }

    pub fn record(&self, i: usize) -> &Record {
        assert!(i < self.slots);
        // SAFETY: slot i lies in the record table, inside the meta mapping.
        unsafe { &*(self.meta.add(self.entries_off + i * size_of::<Record>()) as *const Record) }
    }

    pub fn chunks(&self) -> usize {
        self.capacity / self.chunk
    }

    pub fn chunk_word(&self, c: usize) -> &ChunkWord {
        assert!(c < self.chunks());
        // SAFETY: chunk word c lies in the chunk table, inside the meta mapping.
        unsafe {
            &*(self.meta.add(self.chunks_off + c * size_of::<ChunkWord>()) as *const ChunkWord)
        }
    }

    /// The address of chunk `c` in this process.
    pub fn chunk_addr(&self, c: usize) -> usize {
        self.data as usize + c * self.chunk
    }

    /// The chunk holding address `addr` of this process's data mapping.
    pub fn chunk_at(&self, addr: usize) -> Option<usize> {
        let d = self.data as usize;
        (addr >= d && addr < d + self.capacity).then(|| (addr - d) / self.chunk)
    }
}

impl Drop for File {
    fn drop(&mut self) {
        // SAFETY: both mappings are ours and, by the owner's drop order, nobody uses them now.
        unsafe {
            crate::sys::mem::unmap(self.data, self.capacity);
            crate::sys::mem::unmap(self.meta, self.meta_len);
        }
    }
}

/// A u64 buffer as bytes.
fn bytemuck_u8(v: &mut [u64]) -> &mut [u8] {
    // SAFETY: any bytes are valid u64s and u8s; the length covers exactly the same memory.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast(), v.len() * 8) }
}

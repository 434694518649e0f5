//! SIGBUS actions: reading, setting and raising, for the SIGBUS mode's handler. All of it is
//! async-signal-safe.

use std::ffi::c_void;

pub use libc::{c_int, siginfo_t};

/// A signal action (`struct sigaction`).
pub type Action = libc::sigaction;

/// A three-argument (SA_SIGINFO) handler.
pub type InfoHandler = extern "C" fn(c_int, *mut siginfo_t, *mut c_void);

/// The action installed for `sig` now.
pub fn current(sig: c_int) -> std::io::Result<Action> {
    // SAFETY: all-zero is a valid sigaction (SIG_DFL, empty mask, no flags).
    let mut old: Action = unsafe { std::mem::zeroed() };
    // SAFETY: a query (null new action) into a valid out-pointer.
    if unsafe { libc::sigaction(sig, std::ptr::null(), &mut old) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(old)
}

/// Installs `act` for `sig`.
pub fn set(sig: c_int, act: &Action) -> std::io::Result<()> {
    // SAFETY: a valid action.
    if unsafe { libc::sigaction(sig, act, std::ptr::null_mut()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// An action calling `handler` with `flags` and an empty mask.
pub fn info_action(handler: InfoHandler, flags: c_int) -> Action {
    // SAFETY: all-zero is a valid sigaction; the fields are set below.
    let mut act: Action = unsafe { std::mem::zeroed() };
    act.sa_sigaction = handler as libc::sighandler_t;
    act.sa_flags = libc::SA_SIGINFO | flags;
    // SAFETY: a valid sigset_t to clear: no other signal is blocked while the handler runs.
    unsafe { libc::sigemptyset(&mut act.sa_mask) };
    act
}

/// The default action (SIG_DFL, no flags).
pub fn default_action() -> Action {
    // SAFETY: all-zero is SIG_DFL with no flags.
    unsafe { std::mem::zeroed() }
}

/// Whether `act` is SIG_DFL or SIG_IGN (and which: true for SIG_IGN).
pub fn builtin(act: &Action) -> Option<bool> {
    match act.sa_sigaction {
        libc::SIG_DFL => Some(false),
        libc::SIG_IGN => Some(true),
        _ => None,
    }
}

/// Whether `act` calls `handler`.
pub fn calls(act: &Action, handler: InfoHandler) -> bool {
    act.sa_sigaction == handler as libc::sighandler_t
}

/// Calls the handler of `act` as the kernel would (one or three arguments, by SA_SIGINFO).
///
/// # Safety
/// `act` must hold a handler (not SIG_DFL or SIG_IGN); the arguments must be the kernel's, from
/// inside a handler of `sig`.
pub unsafe fn call(act: &Action, sig: c_int, info: *mut siginfo_t, ctx: *mut c_void) {
    let h = act.sa_sigaction;
    if act.sa_flags & libc::SA_SIGINFO != 0 {
        // SAFETY: with SA_SIGINFO the action holds a three-argument handler.
        let f: InfoHandler = unsafe { std::mem::transmute(h) };
        f(sig, info, ctx)
    } else {
        // SAFETY: without SA_SIGINFO the action holds a one-argument handler.
        let f: extern "C" fn(c_int) = unsafe { std::mem::transmute(h) };
        f(sig)
    }
}

/// Raises `sig` in this thread.
pub fn raise(sig: c_int) {
    // SAFETY: raise is async-signal-safe.
    unsafe { libc::raise(sig) };
}

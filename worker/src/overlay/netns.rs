//! Named network namespaces the way `ip netns add` makes them, with syscalls only: a
//! short-lived thread unshares a new network namespace and bind-mounts its
//! `/proc/thread-self/ns/net` on `<dir>/<name>`, so the namespace outlives the thread and can be
//! joined by path (runc's `linux.namespaces[].path`). Removing unmounts and unlinks; processes
//! still inside keep the namespace alive, as with `ip netns delete`.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} contains a NUL byte", p.display()),
        )
    })
}

/// Refuses names that could escape `dir` or are not file names.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

/// Creates `<dir>/<name>` as a new, empty network namespace (loopback only, down). A stale
/// file of that name (a crash between create and remove) is removed first.
pub fn create(dir: &Path, name: &str) -> io::Result<PathBuf> {
    if !valid_name(name) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not usable as a network namespace name"),
        ));
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| io::Error::new(e.kind(), format!("create {}: {e}", dir.display())))?;
    let path = dir.join(name);
    remove(&path)?;
    // The mount point: an empty file, as iproute2 makes it.
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| io::Error::new(e.kind(), format!("create {}: {e}", path.display())))?;
    let target = cstr(&path)?;
    let r = std::thread::Builder::new()
        .name("overlay-netns".into())
        .spawn(move || -> io::Result<()> {
            // SAFETY: unshare with a constant flag; it changes only this thread (network
            // namespaces are per thread), which ends right after.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::other(format!(
                    "unshare(CLONE_NEWNET): {}",
                    io::Error::last_os_error()
                )));
            }
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() };
            let src = CString::new(format!("/proc/self/task/{tid}/ns/net"))
                .map_err(|_| io::Error::other("NUL in a proc path"))?;
            // SAFETY: both paths are valid C strings; a bind mount takes no data.
            let rc = unsafe {
                libc::mount(
                    src.as_ptr(),
                    target.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                )
            };
            if rc != 0 {
                return Err(io::Error::other(format!(
                    "bind-mount the new network namespace: {}",
                    io::Error::last_os_error()
                )));
            }
            Ok(())
        })?
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("netns thread panicked")));
    if let Err(e) = r {
        let _ = std::fs::remove_file(&path);
        return Err(e);
    }
    Ok(path)
}

/// Unmounts and deletes a named namespace; a missing one is fine (idempotent).
pub fn remove(path: &Path) -> io::Result<()> {
    let c = cstr(path)?;
    // SAFETY: c is a valid C string. MNT_DETACH: a process entering it right now does not block
    // the removal (iproute2 does the same).
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        let e = io::Error::last_os_error();
        // EINVAL: not a mount point (a leftover empty file); ENOENT: already gone.
        if !matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOENT)) {
            return Err(io::Error::new(
                e.kind(),
                format!("unmount {}: {e}", path.display()),
            ));
        }
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("remove {}: {e}", path.display()),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_escape_are_refused() {
        for bad in ["", ".", "..", "a/b", "../x", "a b", "x\0y"] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        assert!(valid_name("shop.prod.api.prod.instance.0"));
    }
}

//! Thin safe wrappers over the Linux calls the tree needs (the `*at` family,
//! file handles, fallocate, SEEK_DATA/SEEK_HOLE, xattrs). Every call returns
//! `io::Result`; nothing here panics on a failed syscall.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

pub(crate) fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn cvt64(r: i64) -> io::Result<i64> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A name as a C string; names never contain NUL (validated earlier).
pub fn cstr(name: &[u8]) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Open with `O_NOATIME` where it applies (not `O_PATH`): the server's own
/// reads (hashing, fetches, scans, listings) must not overwrite the atimes
/// clients set. The kernel refuses it (EPERM) on files the server neither
/// owns nor may override: then without.
fn no_atime(flags: i32, open: impl Fn(i32) -> libc::c_int) -> io::Result<libc::c_int> {
    if flags & libc::O_PATH != 0 {
        return cvt(open(flags));
    }
    match cvt(open(flags | libc::O_NOATIME)) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => cvt(open(flags)),
        r => r,
    }
}

/// `openat(2)` (with `O_NOATIME` where allowed).
pub fn openat(dir: BorrowedFd, name: &[u8], flags: i32, mode: u32) -> io::Result<OwnedFd> {
    let c = cstr(name)?;
    let fd = no_atime(flags | libc::O_CLOEXEC, |f| unsafe { libc::openat(dir.as_raw_fd(), c.as_ptr(), f, mode) })?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Open a directory by path (the export root).
pub fn open_dir_path(path: &std::path::Path) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let c = cstr(path.as_os_str().as_bytes())?;
    let fd = no_atime(libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC, |f| unsafe { libc::open(c.as_ptr(), f) })?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

const MAX_HANDLE_SZ: usize = 128;

#[repr(C)]
struct FileHandle {
    bytes: u32,
    ty: i32,
    data: [u8; MAX_HANDLE_SZ],
}

/// `name_to_handle_at(2)`: type (4 bytes LE) ‖ handle bytes. Does not follow
/// a final symlink.
pub fn name_to_handle(dir: BorrowedFd, name: &[u8]) -> io::Result<Vec<u8>> {
    let c = cstr(name)?;
    let mut fh = FileHandle { bytes: MAX_HANDLE_SZ as u32, ty: 0, data: [0; MAX_HANDLE_SZ] };
    let mut mount_id: libc::c_int = 0;
    let flags = if name.is_empty() { libc::AT_EMPTY_PATH } else { 0 };
    cvt(unsafe {
        libc::syscall(
            libc::SYS_name_to_handle_at,
            dir.as_raw_fd(),
            c.as_ptr(),
            &mut fh as *mut FileHandle,
            &mut mount_id as *mut libc::c_int,
            flags,
        ) as libc::c_int
    })?;
    let n = (fh.bytes as usize).min(MAX_HANDLE_SZ);
    let mut out = fh.ty.to_le_bytes().to_vec();
    out.extend_from_slice(&fh.data[..n]);
    Ok(out)
}

/// `open_by_handle_at(2)` relative to the export's mount (needs CAP_DAC_READ_SEARCH).
pub fn open_by_handle(mount: BorrowedFd, handle: &[u8], flags: i32) -> io::Result<OwnedFd> {
    if handle.len() < 4 || handle.len() - 4 > MAX_HANDLE_SZ {
        return Err(io::Error::from_raw_os_error(libc::ESTALE));
    }
    let mut fh = FileHandle { bytes: (handle.len() - 4) as u32, ty: 0, data: [0; MAX_HANDLE_SZ] };
    fh.ty = i32::from_le_bytes([handle[0], handle[1], handle[2], handle[3]]);
    fh.data[..handle.len() - 4].copy_from_slice(&handle[4..]);
    let fh = &mut fh as *mut FileHandle;
    let fd = no_atime(flags | libc::O_CLOEXEC, |f| unsafe {
        libc::syscall(libc::SYS_open_by_handle_at, mount.as_raw_fd(), fh, f) as libc::c_int
    })?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `mkdirat(2)`.
pub fn mkdirat(dir: BorrowedFd, name: &[u8], mode: u32) -> io::Result<()> {
    let c = cstr(name)?;
    cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), mode) }).map(drop)
}

/// `mknodat(2)` for fifos, sockets and device nodes (`rdev`: 0 unless a device).
pub fn mknodat(dir: BorrowedFd, name: &[u8], mode: u32, rdev: u32) -> io::Result<()> {
    let c = cstr(name)?;
    cvt(unsafe { libc::mknodat(dir.as_raw_fd(), c.as_ptr(), mode, libc::dev_t::from(rdev)) }).map(drop)
}

/// `symlinkat(2)`.
pub fn symlinkat(target: &[u8], dir: BorrowedFd, name: &[u8]) -> io::Result<()> {
    let (t, c) = (cstr(target)?, cstr(name)?);
    cvt(unsafe { libc::symlinkat(t.as_ptr(), dir.as_raw_fd(), c.as_ptr()) }).map(drop)
}

/// `renameat2(2)` with raw flags (RENAME_NOREPLACE / RENAME_EXCHANGE).
pub fn renameat2(d1: BorrowedFd, n1: &[u8], d2: BorrowedFd, n2: &[u8], flags: u32) -> io::Result<()> {
    let (a, b) = (cstr(n1)?, cstr(n2)?);
    cvt(unsafe { libc::renameat2(d1.as_raw_fd(), a.as_ptr(), d2.as_raw_fd(), b.as_ptr(), flags) }).map(drop)
}

/// Link an open inode under a new name (`linkat` with AT_EMPTY_PATH).
pub fn link_fd(fd: BorrowedFd, dir: BorrowedFd, name: &[u8]) -> io::Result<()> {
    let c = cstr(name)?;
    let empty = cstr(b"")?;
    cvt(unsafe { libc::linkat(fd.as_raw_fd(), empty.as_ptr(), dir.as_raw_fd(), c.as_ptr(), libc::AT_EMPTY_PATH) })
        .map(drop)
}

/// `unlinkat(2)`; `dir` selects AT_REMOVEDIR.
pub fn unlinkat(d: BorrowedFd, name: &[u8], dir: bool) -> io::Result<()> {
    let c = cstr(name)?;
    let f = if dir { libc::AT_REMOVEDIR } else { 0 };
    cvt(unsafe { libc::unlinkat(d.as_raw_fd(), c.as_ptr(), f) }).map(drop)
}

/// `fstatat(2)` without following a final symlink; empty name = the fd itself.
pub fn fstatat(d: BorrowedFd, name: &[u8]) -> io::Result<libc::stat> {
    let c = cstr(name)?;
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    let f = libc::AT_SYMLINK_NOFOLLOW | if name.is_empty() { libc::AT_EMPTY_PATH } else { 0 };
    cvt(unsafe { libc::fstatat(d.as_raw_fd(), c.as_ptr(), &mut st, f) })?;
    Ok(st)
}

fn ts(t: Option<(i64, u32)>) -> libc::timespec {
    match t {
        Some((s, n)) => libc::timespec { tv_sec: s, tv_nsec: n as i64 },
        None => libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT },
    }
}

/// Set the mtime of `name` in `d` (or of `d` itself when `name` is empty),
/// never following a symlink.
pub fn set_mtime_at(d: BorrowedFd, name: &[u8], mtime: (i64, u32)) -> io::Result<()> {
    let times = [ts(None), ts(Some(mtime))];
    let c = cstr(name)?;
    let f = libc::AT_SYMLINK_NOFOLLOW | if name.is_empty() { libc::AT_EMPTY_PATH } else { 0 };
    cvt(unsafe { libc::utimensat(d.as_raw_fd(), c.as_ptr(), times.as_ptr(), f) }).map(drop)
}

/// Set the atime and mtime (each if given) of `name` in `d` (or of `d`
/// itself when `name` is empty), never following a symlink.
pub fn set_times_at(
    d: BorrowedFd,
    name: &[u8],
    atime: Option<(i64, u32)>,
    mtime: Option<(i64, u32)>,
) -> io::Result<()> {
    let times = [ts(atime), ts(mtime)];
    let c = cstr(name)?;
    let f = libc::AT_SYMLINK_NOFOLLOW | if name.is_empty() { libc::AT_EMPTY_PATH } else { 0 };
    cvt(unsafe { libc::utimensat(d.as_raw_fd(), c.as_ptr(), times.as_ptr(), f) }).map(drop)
}

/// `fchmodat` of `name` in `d`.
pub fn chmod_at(d: BorrowedFd, name: &[u8], mode: u32) -> io::Result<()> {
    let c = cstr(name)?;
    cvt(unsafe { libc::fchmodat(d.as_raw_fd(), c.as_ptr(), mode, 0) }).map(drop)
}

/// `fchownat` without following symlinks; empty name = the fd itself.
pub fn chown_at(d: BorrowedFd, name: &[u8], uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
    let c = cstr(name)?;
    let f = libc::AT_SYMLINK_NOFOLLOW | if name.is_empty() { libc::AT_EMPTY_PATH } else { 0 };
    let (u, g) = (uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX));
    cvt(unsafe { libc::fchownat(d.as_raw_fd(), c.as_ptr(), u, g, f) }).map(drop)
}

/// `fchmod(2)`.
pub fn fchmod(fd: BorrowedFd, mode: u32) -> io::Result<()> {
    cvt(unsafe { libc::fchmod(fd.as_raw_fd(), mode) }).map(drop)
}

/// `pwrite(2)` of the whole buffer.
pub fn pwrite_all(fd: BorrowedFd, mut buf: &[u8], mut off: u64) -> io::Result<()> {
    while !buf.is_empty() {
        let n = cvt64(unsafe { libc::pwrite(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), off as i64) as i64 })?;
        if n == 0 {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        buf = &buf[n as usize..];
        off += n as u64;
    }
    Ok(())
}

/// `pread(2)` filling as much of `buf` as the file has; returns bytes read.
pub fn pread(fd: BorrowedFd, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        let n = cvt64(unsafe {
            libc::pread(fd.as_raw_fd(), buf[got..].as_mut_ptr().cast(), buf.len() - got, (off + got as u64) as i64)
                as i64
        })?;
        if n == 0 {
            break;
        }
        got += n as usize;
    }
    Ok(got)
}

/// `ftruncate(2)`.
pub fn ftruncate(fd: BorrowedFd, size: u64) -> io::Result<()> {
    cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), size as i64) }).map(drop)
}

/// `fallocate(2)` with raw mode flags.
pub fn fallocate(fd: BorrowedFd, mode: i32, off: u64, len: u64) -> io::Result<()> {
    cvt(unsafe { libc::fallocate(fd.as_raw_fd(), mode, off as i64, len as i64) }).map(drop)
}

/// `lseek` with SEEK_DATA / SEEK_HOLE; `None` when past the last data (ENXIO).
pub fn seek(fd: BorrowedFd, off: u64, whence: i32) -> io::Result<Option<u64>> {
    let r = unsafe { libc::lseek(fd.as_raw_fd(), off as i64, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r as u64))
}

/// `fsetxattr(2)`.
pub fn fsetxattr(fd: BorrowedFd, name: &[u8], value: &[u8]) -> io::Result<()> {
    let c = cstr(name)?;
    cvt(unsafe { libc::fsetxattr(fd.as_raw_fd(), c.as_ptr(), value.as_ptr().cast(), value.len(), 0) }).map(drop)
}

/// `fremovexattr(2)`.
pub fn fremovexattr(fd: BorrowedFd, name: &[u8]) -> io::Result<()> {
    let c = cstr(name)?;
    cvt(unsafe { libc::fremovexattr(fd.as_raw_fd(), c.as_ptr()) }).map(drop)
}

/// `fsync(2)`.
pub fn fsync(fd: BorrowedFd) -> io::Result<()> {
    cvt(unsafe { libc::fsync(fd.as_raw_fd()) }).map(drop)
}

/// Start writeback of a range without waiting (`sync_file_range` WRITE), so
/// a later fdatasync finds most of it on disk already.
pub fn start_writeback(fd: BorrowedFd, off: u64, len: u64) -> io::Result<()> {
    cvt(unsafe { libc::sync_file_range(fd.as_raw_fd(), off as i64, len as i64, libc::SYNC_FILE_RANGE_WRITE) }).map(drop)
}

/// `fdatasync(2)`.
pub fn fdatasync(fd: BorrowedFd) -> io::Result<()> {
    cvt(unsafe { libc::fdatasync(fd.as_raw_fd()) }).map(drop)
}

/// `syncfs(2)` on the file system holding `fd`.
pub fn syncfs(fd: BorrowedFd) -> io::Result<()> {
    cvt(unsafe { libc::syncfs(fd.as_raw_fd()) }).map(drop)
}

/// Path of an fd under /proc, to reach inodes only an O_PATH fd can hold.
pub fn proc_path(fd: RawFd) -> Vec<u8> {
    format!("/proc/self/fd/{fd}").into_bytes()
}

/// The current boot's id: a process crash keeps it, a machine crash does not.
pub fn boot_id() -> [u8; 16] {
    let s = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    uuid_bytes(s.trim())
}

fn uuid_bytes(s: &str) -> [u8; 16] {
    let hex: Vec<u8> = s.bytes().filter(|b| b.is_ascii_hexdigit()).collect();
    let mut out = [0u8; 16];
    for (i, pair) in hex.chunks(2).take(16).enumerate() {
        let h = std::str::from_utf8(pair).ok().and_then(|p| u8::from_str_radix(p, 16).ok());
        out[i] = h.unwrap_or(0);
    }
    out
}

/// Keepalive and a user timeout on a TCP socket, so a peer that vanished
/// without closing (link down, machine gone) is noticed: keepalive probes
/// after `idle_s` seconds of quiet, every `intvl_s`, `count` times; unacked
/// data gives up after `user_timeout_ms`.
pub fn tune_tcp(fd: BorrowedFd, idle_s: i32, intvl_s: i32, count: i32, user_timeout_ms: u32) -> io::Result<()> {
    let set = |level: i32, opt: i32, v: i32| -> io::Result<()> {
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                level,
                opt,
                (&v as *const i32).cast(),
                std::mem::size_of::<i32>() as libc::socklen_t,
            )
        };
        cvt(r).map(drop)
    };
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, idle_s)?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, intvl_s)?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, count)?;
    set(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, user_timeout_ms as i32)
}

/// Read back an integer socket option (for tests and diagnostics).
pub fn sockopt(fd: BorrowedFd, level: i32, opt: i32) -> io::Result<i32> {
    let mut v: i32 = 0;
    let mut len = std::mem::size_of::<i32>() as libc::socklen_t;
    cvt(unsafe { libc::getsockopt(fd.as_raw_fd(), level, opt, (&mut v as *mut i32).cast(), &mut len) })?;
    Ok(v)
}

/// `readlinkat(2)` of `name` in `d`.
pub fn readlinkat(d: BorrowedFd, name: &[u8]) -> io::Result<Vec<u8>> {
    let c = cstr(name)?;
    let mut buf = vec![0u8; 4097];
    // SAFETY: buf is valid for writes of its length.
    let n = unsafe { libc::readlinkat(d.as_raw_fd(), c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    let n = cvt64(n as i64)? as usize;
    buf.truncate(n);
    Ok(buf)
}

/// Names in a directory (without `.` and `..`), in no particular order.
pub fn read_dir_names(d: BorrowedFd) -> io::Result<Vec<Vec<u8>>> {
    // fdopendir takes the fd over; give it a fresh one at offset 0.
    let fd = openat(d, b".", libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    // SAFETY: fd is a valid directory fd whose ownership passes to the DIR.
    let dir = unsafe { libc::fdopendir(fd.as_raw_fd()) };
    if dir.is_null() {
        return Err(io::Error::last_os_error());
    }
    std::mem::forget(fd);
    let mut out = Vec::new();
    let result = loop {
        // SAFETY: errno is thread-local; readdir's entry stays valid until the next call.
        unsafe { *libc::__errno_location() = 0 };
        let ent = unsafe { libc::readdir64(dir) };
        if ent.is_null() {
            let e = io::Error::last_os_error();
            break if e.raw_os_error().unwrap_or(0) == 0 { Ok(()) } else { Err(e) };
        }
        // SAFETY: d_name is NUL-terminated within the entry.
        let name = unsafe { std::ffi::CStr::from_ptr((*ent).d_name.as_ptr()) }.to_bytes();
        if name != b"." && name != b".." {
            out.push(name.to_vec());
        }
    };
    // SAFETY: dir came from fdopendir and is closed once.
    unsafe { libc::closedir(dir) };
    result.map(|_| out)
}

/// Names of the extended attributes of an open file (`flistxattr(2)`).
pub fn flistxattr(fd: BorrowedFd) -> io::Result<Vec<Vec<u8>>> {
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: buf is valid for writes of its length.
        let n = unsafe { libc::flistxattr(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            buf.truncate(n as usize);
            return Ok(buf.split(|&b| b == 0).filter(|n| !n.is_empty()).map(<[u8]>::to_vec).collect());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ERANGE) || buf.len() >= 1 << 20 {
            return Err(e);
        }
        buf.resize(buf.len() * 4, 0);
    }
}

/// Value of an extended attribute of an open file (`fgetxattr(2)`).
pub fn fgetxattr(fd: BorrowedFd, name: &[u8]) -> io::Result<Vec<u8>> {
    let c = cstr(name)?;
    let mut buf = vec![0u8; 65536];
    // SAFETY: buf is valid for writes of its length.
    let n = unsafe { libc::fgetxattr(fd.as_raw_fd(), c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    buf.truncate(cvt64(n as i64)? as usize);
    Ok(buf)
}

/// The inode a handle or path named no longer exists (removed by another
/// program).
pub fn gone(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ESTALE) | Some(libc::ENOENT))
}

/// The op error for a failed export access: a full file system is
/// `NoSpace` (the client retries once space is freed), anything else `Io`.
pub(crate) fn op_io(what: &str, e: std::io::Error) -> izo_proto::OpError {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => izo_proto::OpError::NoSpace(format!("{what}: {e}")),
        _ => izo_proto::OpError::Io(format!("{what}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn tcp_sockets_get_keepalive_and_a_user_timeout() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let s = std::net::TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        tune_tcp(s.as_fd(), 5, 2, 3, 10_000).expect("tune");
        assert_eq!(sockopt(s.as_fd(), libc::SOL_SOCKET, libc::SO_KEEPALIVE).expect("get"), 1);
        assert_eq!(sockopt(s.as_fd(), libc::IPPROTO_TCP, libc::TCP_KEEPIDLE).expect("get"), 5);
        assert_eq!(sockopt(s.as_fd(), libc::IPPROTO_TCP, libc::TCP_KEEPCNT).expect("get"), 3);
        assert_eq!(sockopt(s.as_fd(), libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT).expect("get"), 10_000);
    }
}

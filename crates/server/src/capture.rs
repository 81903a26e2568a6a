//! Out-of-band capture: a fanotify filesystem mark that reports, for every
//! change on the export's file system, the directory handle and name it
//! touched and the handle of the object itself. A thread reads the events,
//! drops the server's own (by pid) and hands the rest to the volume actor,
//! which maps handles to objects (events outside the export name no known
//! handle and are dropped there) and journals what changed.

use crate::sys::cvt;
use izo_journal::Handle;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// What one event reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// fanotify mask bits (`FAN_*`).
    pub mask: u64,
    /// The object the event is about, when reported.
    pub object: Option<Handle>,
    /// Directory entries the event touched: (directory handle, name). A
    /// rename lists the old entry, then the new one.
    pub names: Vec<(Handle, Vec<u8>)>,
}

impl Event {
    /// The kernel dropped events: what changed must be found by a scan.
    pub fn overflow(&self) -> bool {
        self.mask & libc::FAN_Q_OVERFLOW != 0
    }

    /// The content of a file changed (written, or written and closed).
    pub fn content(&self) -> bool {
        self.mask & (libc::FAN_MODIFY | libc::FAN_CLOSE_WRITE) != 0
    }

    /// A writer closed the file: its content is settled.
    pub fn closed(&self) -> bool {
        self.mask & libc::FAN_CLOSE_WRITE != 0
    }
}

/// Events the mark asks for: entry changes (create, delete, rename), content
/// (modify, close-write) and attributes, on files and directories.
const MASK: u64 = libc::FAN_CREATE
    | libc::FAN_DELETE
    | libc::FAN_RENAME
    | libc::FAN_MODIFY
    | libc::FAN_CLOSE_WRITE
    | libc::FAN_ATTRIB
    | libc::FAN_ONDIR;

/// A fanotify group with a filesystem mark on the export's file system.
pub struct Fanotify {
    fd: OwnedFd,
}

impl Fanotify {
    /// Mark the file system holding `export` (needs CAP_SYS_ADMIN and a file
    /// system that can encode file handles).
    pub fn new(export: BorrowedFd) -> io::Result<Fanotify> {
        let flags = libc::FAN_CLASS_NOTIF
            | libc::FAN_CLOEXEC
            | libc::FAN_NONBLOCK
            | libc::FAN_REPORT_DFID_NAME
            | libc::FAN_REPORT_FID
            | libc::FAN_REPORT_TARGET_FID;
        // SAFETY: plain syscall; the result is a new fd we own.
        let fd = cvt(unsafe { libc::fanotify_init(flags, (libc::O_RDONLY | libc::O_LARGEFILE) as u32) })?;
        // SAFETY: fd was just returned by fanotify_init.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: a null path with a dir fd marks the object of the fd.
        cvt(unsafe {
            libc::fanotify_mark(
                fd.as_raw_fd(),
                libc::FAN_MARK_ADD | libc::FAN_MARK_FILESYSTEM,
                MASK,
                export.as_raw_fd(),
                std::ptr::null(),
            )
        })?;
        Ok(Fanotify { fd })
    }

    /// Ask the kernel not to report events in (and of the entries of)
    /// directory `dir`: the server's staging directory, whose only writer
    /// is the server, so its events would be read only to be dropped.
    pub fn ignore(&self, dir: BorrowedFd) -> io::Result<()> {
        // SAFETY: a null path with a dir fd marks the object of the fd.
        cvt(unsafe {
            libc::fanotify_mark(
                self.fd.as_raw_fd(),
                libc::FAN_MARK_ADD | libc::FAN_MARK_IGNORE_SURV,
                MASK | libc::FAN_EVENT_ON_CHILD,
                dir.as_raw_fd(),
                std::ptr::null(),
            )
        })
        .map(drop)
    }

    /// Read what is queued without blocking; `None` when nothing is.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<Option<Vec<Event>>> {
        // SAFETY: buf is valid for writes of its length.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(None),
                _ => Err(e),
            };
        }
        Ok(Some(parse(&buf[..n as usize], std::process::id() as i32)))
    }
}

impl AsFd for Fanotify {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Parse a buffer of events, leaving out those of process `own` (the
/// server's own changes, already journaled).
pub fn parse(buf: &[u8], own: i32) -> Vec<Event> {
    let mut out = Vec::new();
    let mut at = 0usize;
    // struct fanotify_event_metadata: event_len u32, vers u8, reserved u8,
    // metadata_len u16, mask u64, fd i32, pid i32.
    while let (Some(len), Some(meta_len)) = (u32_at(buf, at), u16_at(buf, at + 6)) {
        let (len, meta_len) = (len as usize, meta_len as usize);
        if len < 24 || meta_len < 24 || at + len > buf.len() {
            break;
        }
        let ev = &buf[at..at + len];
        at += len;
        let mask = u64_at(ev, 8).unwrap_or(0);
        let pid = u32_at(ev, 20).unwrap_or(0) as i32;
        if pid == own && mask & libc::FAN_Q_OVERFLOW == 0 {
            continue;
        }
        let mut e = Event { mask, ..Event::default() };
        let mut off = meta_len;
        // Info records: hdr (type u8, pad u8, len u16), fsid (8 bytes),
        // struct file_handle (bytes u32, type i32, f_handle), then for the
        // *_NAME kinds a NUL-terminated name.
        while let (Some(&kind), Some(ilen)) = (ev.get(off), u16_at(ev, off + 2)) {
            let ilen = ilen as usize;
            if ilen < 4 || off + ilen > ev.len() {
                break;
            }
            let info = &ev[off..off + ilen];
            off += ilen;
            let Some(hbytes) = u32_at(info, 12).map(|n| n as usize) else { continue };
            let Some(htype) = info.get(16..20) else { continue };
            let Some(hdata) = info.get(20..20 + hbytes) else { continue };
            let mut handle = htype.to_vec();
            handle.extend_from_slice(hdata);
            let rest = &info[20 + hbytes..];
            let name = rest.split(|&b| b == 0).next().unwrap_or_default().to_vec();
            match kind {
                libc::FAN_EVENT_INFO_TYPE_FID => e.object = Some(handle),
                libc::FAN_EVENT_INFO_TYPE_DFID => e.object = e.object.or(Some(handle)),
                libc::FAN_EVENT_INFO_TYPE_DFID_NAME
                | libc::FAN_EVENT_INFO_TYPE_OLD_DFID_NAME
                | libc::FAN_EVENT_INFO_TYPE_NEW_DFID_NAME => {
                    if name.is_empty() || name == b"." {
                        e.object = e.object.or(Some(handle));
                    } else {
                        e.names.push((handle, name));
                    }
                }
                _ => {}
            }
        }
        out.push(e);
    }
    out
}

/// A running capture: the group and its reader thread.
pub struct Capture {
    /// The fanotify group (also read directly before a batch and at a stop).
    pub fan: Arc<Fanotify>,
    stop: Arc<AtomicBool>,
    waker: Waker,
    join: std::thread::JoinHandle<()>,
}

impl Capture {
    /// Stop the reader thread and wait for it.
    pub fn stop_reader(self) -> Arc<Fanotify> {
        self.stop.store(true, Ordering::Release);
        self.waker.wake();
        let _ = self.join.join();
        self.fan
    }
}

/// Start the reader thread: it blocks in `poll` until events or a stop, and
/// hands batches to `sink` (until `sink` returns false). `stall` (tests
/// only) holds off reading until that file exists, to make the kernel
/// queue overflow.
pub fn spawn(
    fan: Arc<Fanotify>,
    stall: Option<std::path::PathBuf>,
    mut sink: impl FnMut(Vec<Event>) -> bool + Send + 'static,
) -> io::Result<Capture> {
    let stop = Arc::new(AtomicBool::new(false));
    let waker = Waker::new()?;
    let (stop2, waker2, fan2) = (stop.clone(), waker.clone(), fan.clone());
    let join = std::thread::Builder::new().name("izo-capture".into()).spawn(move || {
        let fan = fan2;
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let mut fds = [
                libc::pollfd { fd: fan.as_fd().as_raw_fd(), events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: waker2.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            ];
            // SAFETY: fds is a valid array of two pollfds.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if stop2.load(Ordering::Acquire) {
                return;
            }
            if r < 0 {
                continue;
            }
            if let Some(until) = &stall {
                while !until.exists() && !stop2.load(Ordering::Acquire) {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            }
            // Hand over each read at once (the actor may be waiting to
            // validate a batch against these changes).
            match fan.read(&mut buf) {
                Ok(Some(events)) if !events.is_empty() => {
                    if !sink(events) {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    // events may be lost: have the actor rescan, and retry
                    tracing::error!("reading fanotify events failed: {e}; rescanning");
                    if !sink(vec![Event { mask: libc::FAN_Q_OVERFLOW, ..Event::default() }]) {
                        return;
                    }
                    std::thread::sleep(std::time::Duration::from_secs(1));
                }
            }
        }
    })?;
    Ok(Capture { fan, stop, waker, join })
}

/// An eventfd that wakes the reader thread (to stop it).
#[derive(Clone)]
struct Waker {
    fd: Arc<OwnedFd>,
}

impl Waker {
    fn new() -> io::Result<Waker> {
        // SAFETY: plain syscall; the result is a new fd we own.
        let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
        // SAFETY: fd was just returned by eventfd.
        Ok(Waker { fd: Arc::new(unsafe { OwnedFd::from_raw_fd(fd) }) })
    }

    /// Wake the thread.
    fn wake(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a valid buffer.
        let _ = unsafe { libc::write(self.fd.as_raw_fd(), one.as_ptr().cast(), 8) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(kind: u8, handle: &[u8], htype: i32, name: &[u8]) -> Vec<u8> {
        let mut b = vec![kind, 0, 0, 0];
        b.extend_from_slice(&[7u8; 8]);
        b.extend_from_slice(&(handle.len() as u32).to_ne_bytes());
        b.extend_from_slice(&htype.to_ne_bytes());
        b.extend_from_slice(handle);
        if !name.is_empty() {
            b.extend_from_slice(name);
            b.push(0);
        }
        while b.len() % 4 != 0 {
            b.push(0);
        }
        let len = b.len() as u16;
        b[2..4].copy_from_slice(&len.to_ne_bytes());
        b
    }

    fn event(mask: u64, pid: i32, infos: &[Vec<u8>]) -> Vec<u8> {
        let body: Vec<u8> = infos.concat();
        let mut b = ((24 + body.len()) as u32).to_ne_bytes().to_vec();
        b.extend_from_slice(&[3, 0]);
        b.extend_from_slice(&24u16.to_ne_bytes());
        b.extend_from_slice(&mask.to_ne_bytes());
        b.extend_from_slice(&(-1i32).to_ne_bytes());
        b.extend_from_slice(&pid.to_ne_bytes());
        b.extend_from_slice(&body);
        b
    }

    #[test]
    fn parses_rename_own_pid_and_truncated_buffers() {
        let mut buf = event(
            libc::FAN_RENAME,
            42,
            &[
                info(libc::FAN_EVENT_INFO_TYPE_OLD_DFID_NAME, &[1, 2, 3, 4], 1, b"old"),
                info(libc::FAN_EVENT_INFO_TYPE_NEW_DFID_NAME, &[5, 6, 7, 8], 1, b"new"),
                info(libc::FAN_EVENT_INFO_TYPE_FID, &[9; 8], 1, b""),
            ],
        );
        buf.extend(event(libc::FAN_MODIFY, 7, &[info(libc::FAN_EVENT_INFO_TYPE_FID, &[1; 8], 1, b"")]));
        buf.extend(event(libc::FAN_ATTRIB | libc::FAN_ONDIR, 42, &[info(2, &[3; 8], 1, b".")]));
        let got = parse(&buf, 7);
        assert_eq!(got.len(), 2, "the event of the own pid is left out");
        let h = |b: &[u8]| [1i32.to_ne_bytes().to_vec(), b.to_vec()].concat();
        assert_eq!(got[0].names, vec![(h(&[1, 2, 3, 4]), b"old".to_vec()), (h(&[5, 6, 7, 8]), b"new".to_vec())]);
        assert_eq!(got[0].object, Some(h(&[9; 8])));
        assert_eq!(got[1].object, Some(h(&[3; 8])), "a directory's own event names it by '.'");
        assert!(got[1].names.is_empty());
        // Any cut of the buffer parses without panicking, to whole events only.
        for cut in 0..buf.len() {
            let part = parse(&buf[..cut], 7);
            assert!(part.len() <= 2);
        }
    }
}

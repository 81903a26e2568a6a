//! The FUSE mount: a thin adapter from fuser callbacks to the client's
//! replica API (by inode number), errno mapping, and the one thread that
//! sends kernel cache invalidations (never from inside a request, never
//! holding a lock).

use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, SessionACL,
    TimeOrNow, WriteFlags,
};
use izo_client::cache::Cached;
use izo_client::replica::{Inval, OpCounters, Replica, ReplicaError};
use izo_proto::{FileKind, RenameMode, SetAttrs, Timestamp};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{mpsc, Arc};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long the kernel may keep attributes and entries (remote changes
/// invalidate them sooner).
const TTL: Duration = Duration::from_secs(1);

/// A listing taken at opendir: (inode, kind, name) of ".", "..", entries.
type Listing = Vec<(u64, FileType, Vec<u8>)>;

/// How a file handle reads and writes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Read-only, served by the kernel from the cache file (passthrough).
    Passthrough,
    /// Read-only through the daemon (a writable open was there first).
    Cached,
    /// Writable.
    Writable,
    /// Writable, beside passthrough readers: the kernel requires every
    /// open of an inode with a passthrough open to be passthrough, so its
    /// writes go to the cache file without the daemon seeing them; at its
    /// release the whole file counts as written.
    PassthroughWritable,
}

/// Opens of one inode, and its backing file while passthrough opens last.
#[derive(Default)]
struct Opens {
    passthrough: u32,
    cached: u32,
    writable: u32,
    pt_writable: u32,
    backing: Option<Arc<fuser::BackingId>>,
}

/// The file system the kernel talks to.
pub struct IzoFs {
    /// Opens per inode (passthrough is granted only to read-only opens of
    /// an inode with no writable or daemon-served open, one backing id per
    /// inode, dropped at the last passthrough release).
    opens: std::sync::Mutex<std::collections::HashMap<u64, Opens>>,
    /// Mode of each open handle.
    modes: std::sync::Mutex<std::collections::HashMap<u64, (u64, Mode)>>,
    /// The kernel accepted passthrough at init (and has not refused it).
    passthrough: std::sync::atomic::AtomicBool,
    r: Arc<Replica>,
    /// Directory listings by handle: offsets index a snapshot taken at
    /// opendir, so a directory changing mid-listing (the stream applies
    /// changes at any time) never skips or repeats an entry, and seekdir
    /// back to an earlier offset works.
    dirs: std::sync::Mutex<std::collections::HashMap<u64, Arc<Listing>>>,
    /// File handles opened with O_APPEND (their writes go to the end the
    /// replica knows, not the kernel's possibly stale size).
    append: std::sync::Mutex<std::collections::HashSet<u64>>,
    next_fh: std::sync::atomic::AtomicU64,
}

/// The errno of a replica error: the one place it is chosen, from the
/// variant alone.
pub fn errno(e: &ReplicaError) -> Errno {
    match e {
        ReplicaError::NotFound => Errno::ENOENT,
        ReplicaError::Exists => Errno::EEXIST,
        ReplicaError::NotEmpty => Errno::ENOTEMPTY,
        ReplicaError::NotDir => Errno::ENOTDIR,
        ReplicaError::IsDir => Errno::EISDIR,
        ReplicaError::NotPermitted => Errno::EPERM,
        ReplicaError::NameTooLong => Errno::ENAMETOOLONG,
        ReplicaError::FileTooBig(_) => Errno::EFBIG,
        ReplicaError::NoSpace(_) => Errno::ENOSPC,
        ReplicaError::Invalid(_) => Errno::EINVAL,
        ReplicaError::Denied(_) => Errno::EACCES,
        ReplicaError::ReadOnly(_) => Errno::EROFS,
        ReplicaError::NotConnected => Errno::ENOTCONN,
        ReplicaError::Conflict(_) | ReplicaError::Unreachable(_) | ReplicaError::Transient(_) => {
            tracing::warn!("{e}");
            Errno::EIO
        }
        ReplicaError::Cache(izo_client::cache::CacheError::Io { err, .. }) => match err.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => Errno::ENOSPC,
            // a size past what the cache's file system holds
            Some(libc::EFBIG) => Errno::EFBIG,
            _ => {
                tracing::warn!("{e}");
                Errno::EIO
            }
        },
        ReplicaError::Cache(izo_client::cache::CacheError::DbFull { .. }) => Errno::ENOSPC,
        ReplicaError::Cache(_) => {
            tracing::warn!("{e}");
            Errno::EIO
        }
        ReplicaError::Unsupported => Errno::EOPNOTSUPP,
        ReplicaError::NoData => Errno::ENXIO,
    }
}

fn time(t: Timestamp) -> SystemTime {
    if t.secs >= 0 {
        UNIX_EPOCH + Duration::new(t.secs as u64, t.nsec)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.secs.unsigned_abs())
    }
}

fn kind(k: FileKind) -> FileType {
    match k {
        FileKind::File => FileType::RegularFile,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
        FileKind::BlockDev => FileType::BlockDevice,
        FileKind::CharDev => FileType::CharDevice,
    }
}

/// What `stat` shows of an object. `blocks`: 512-byte blocks allocated
/// (of the cache file, for a file: holes take none).
fn attr(c: &Cached, blocks: u64) -> FileAttr {
    let a = &c.attr;
    let mtime = time(a.mtime);
    FileAttr {
        ino: INodeNo(c.ino),
        size: a.size,
        blocks,
        // (atime: creation or an explicit utimens; reads do not move it)
        atime: time(a.atime),
        mtime,
        // (ctime: kept by this replica, see Cached::ctime)
        ctime: time(c.ctime),
        crtime: mtime,
        kind: kind(a.kind),
        perm: (a.mode & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: 4096,
        flags: 0,
    }
}

const GEN: Generation = Generation(0);

impl IzoFs {
    /// A new file handle on `ino` (counted open; O_APPEND remembered).
    fn handle(&self, ino: u64, flags: i32) -> FileHandle {
        let fh = self.next_fh.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if flags & libc::O_APPEND != 0 {
            self.append.lock().unwrap_or_else(|p| p.into_inner()).insert(fh);
        }
        self.r.opened(ino);
        FileHandle(fh)
    }

    /// Count an open of `ino` in `mode` under handle `fh`.
    fn count_open(&self, o: &mut Opens, ino: u64, fh: u64, mode: Mode) {
        match mode {
            Mode::Passthrough => o.passthrough += 1,
            Mode::Cached => o.cached += 1,
            Mode::Writable => o.writable += 1,
            Mode::PassthroughWritable => o.pt_writable += 1,
        }
        self.modes.lock().unwrap_or_else(|p| p.into_inner()).insert(fh, (ino, mode));
    }

    /// A handle closed: uncount it; the last passthrough release drops the
    /// backing id.
    fn count_release(&self, fh: u64) {
        let Some((ino, mode)) = self.modes.lock().unwrap_or_else(|p| p.into_inner()).remove(&fh) else { return };
        {
            let mut opens = self.opens.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(o) = opens.get_mut(&ino) {
                match mode {
                    Mode::Passthrough => o.passthrough = o.passthrough.saturating_sub(1),
                    Mode::Cached => o.cached = o.cached.saturating_sub(1),
                    Mode::Writable => o.writable = o.writable.saturating_sub(1),
                    Mode::PassthroughWritable => o.pt_writable = o.pt_writable.saturating_sub(1),
                }
                if o.passthrough == 0 && o.pt_writable == 0 {
                    o.backing = None;
                }
                if o.passthrough == 0 && o.cached == 0 && o.writable == 0 && o.pt_writable == 0 {
                    opens.remove(&ino);
                }
            }
        }
        if mode == Mode::PassthroughWritable {
            // what it wrote went straight to the cache file
            if let Err(e) = self.r.writer_released(ino) {
                tracing::warn!("inode {ino}: taking the writes of a passthrough open: {e}");
            }
        }
    }

    /// Is a passthrough writer open on the inode (its size and mtime are
    /// then the cache file's)?
    fn pt_writing(&self, ino: u64) -> bool {
        self.opens.lock().unwrap_or_else(|p| p.into_inner()).get(&ino).is_some_and(|o| o.pt_writable > 0)
    }

    /// Attributes of `c` for the kernel: a file's blocks are those its
    /// cache file has allocated (sparse files are sparse here too, for `du`).
    fn attr(&self, c: &Cached) -> FileAttr {
        use std::os::unix::fs::MetadataExt;
        let blocks = match c.attr.kind {
            FileKind::File => std::fs::symlink_metadata(self.r.cache.data_path(c.attr.id))
                .map(|m| m.blocks())
                .unwrap_or_else(|_| c.attr.size.div_ceil(512)),
            _ => c.attr.size.div_ceil(512),
        };
        attr(c, blocks)
    }

    fn entry(&self, r: Result<Cached, ReplicaError>, reply: ReplyEntry) {
        match r {
            Ok(c) => reply.entry(&TTL, &self.attr(&c), GEN),
            Err(e) => reply.error(errno(&e)),
        }
    }
}

fn stamp(t: TimeOrNow) -> Timestamp {
    let st = match t {
        TimeOrNow::SpecificTime(s) => s,
        TimeOrNow::Now => SystemTime::now(),
    };
    match st.duration_since(UNIX_EPOCH) {
        Ok(d) => Timestamp { secs: d.as_secs() as i64, nsec: d.subsec_nanos() },
        Err(e) => {
            let d = e.duration();
            Timestamp { secs: -(d.as_secs() as i64), nsec: 0 }
        }
    }
}

impl Filesystem for IzoFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        OpCounters::bump(&self.r.ops.lookup);
        self.entry(self.r.lookup(parent.0, name.as_bytes()), reply)
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        OpCounters::bump(&self.r.ops.getattr);
        match self.r.get(ino.0) {
            Ok((_, c)) => {
                let mut a = self.attr(&c);
                if self.pt_writing(ino.0) {
                    // a passthrough writer: size and mtime as it left them
                    if let Ok(m) = self
                        .r
                        .data_file(ino.0)
                        .and_then(|f| f.metadata().map_err(|e| ReplicaError::Invalid(e.to_string())))
                    {
                        a.size = m.len();
                        a.blocks = std::os::unix::fs::MetadataExt::blocks(&m);
                        a.mtime = m.modified().unwrap_or(a.mtime);
                    }
                }
                reply.attr(&TTL, &a)
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // The mount clears set-id bits, not the kernel (FUSE_HANDLE_KILLPRIV,
        // see init): on a chown (a chown to -1:-1 arrives with its ctime
        // only), a truncate by an unprivileged caller, and a request with
        // nothing to set, which is what the kernel sends when it would have
        // cleared them itself (a write by a caller without CAP_FSETID,
        // through the daemon or passed through, fallocate, copy_file_range);
        // the reply carries the new mode to the kernel
        let empty =
            mode.is_none() && uid.is_none() && gid.is_none() && size.is_none() && atime.is_none() && mtime.is_none();
        let kill = uid.is_some() || gid.is_some() || (size.is_some() && req.uid() != 0) || empty;
        let attrs =
            SetAttrs { mode: mode.map(|m| m & 0o7777), uid, gid, mtime: mtime.map(stamp), atime: atime.map(stamp) };
        match self.r.setattr(ino.0, size, attrs, kill) {
            Ok(c) => reply.attr(&TTL, &self.attr(&c)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.r.get(ino.0) {
            Ok((_, c)) => match c.target {
                Some(t) => reply.data(&t),
                None => reply.error(Errno::EINVAL),
            },
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn mknod(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, rdev: u32, reply: ReplyEntry) {
        let k = match mode & libc::S_IFMT {
            libc::S_IFIFO => FileKind::Fifo,
            libc::S_IFSOCK => FileKind::Socket,
            libc::S_IFREG => FileKind::File,
            libc::S_IFBLK => FileKind::BlockDev,
            libc::S_IFCHR => FileKind::CharDev,
            _ => return reply.error(Errno::EINVAL),
        };
        let perm = mode & 0o7777 & !umask;
        let (name, uid, gid) = (name.as_bytes(), req.uid(), req.gid());
        let made = match k {
            FileKind::File => self.r.create(parent.0, name, k, perm, uid, gid, None),
            _ => self.r.mknod(parent.0, name, k, perm, uid, gid, rdev),
        };
        self.entry(made, reply)
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let perm = mode & 0o7777 & !umask;
        self.entry(self.r.create(parent.0, name.as_bytes(), FileKind::Dir, perm, req.uid(), req.gid(), None), reply)
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.r.remove(parent.0, name.as_bytes(), false) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.r.remove(parent.0, name.as_bytes(), true) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let t = target.as_os_str().as_bytes();
        let r = self.r.create(parent.0, link_name.as_bytes(), FileKind::Symlink, 0o777, req.uid(), req.gid(), Some(t));
        self.entry(r, reply)
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mode = if flags.is_empty() {
            RenameMode::Replace
        } else if flags == RenameFlags::RENAME_NOREPLACE {
            RenameMode::NoReplace
        } else if flags == RenameFlags::RENAME_EXCHANGE {
            RenameMode::Exchange
        } else {
            return reply.error(Errno::EINVAL);
        };
        match self.r.rename(parent.0, name.as_bytes(), newparent.0, newname.as_bytes(), mode) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        self.entry(self.r.link(ino.0, newparent.0, newname.as_bytes()), reply)
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let c = match self.r.get(ino.0) {
            Ok((_, c)) => c,
            Err(e) => return reply.error(errno(&e)),
        };
        let read_only = flags.0 & libc::O_ACCMODE == libc::O_RDONLY && flags.0 & libc::O_TRUNC == 0;
        let mut opens = self.opens.lock().unwrap_or_else(|p| p.into_inner());
        let o = opens.entry(ino.0).or_default();
        // A read-only open of a file (fully cached: replicate mode) with no
        // writable or daemon-served open: the kernel reads the cache file
        // itself. One backing id per inode while such opens last.
        // An inode with a passthrough open takes only passthrough opens
        // (the kernel's rule): a writer then writes the cache file directly.
        if let (Some(b), false) = (o.backing.clone(), read_only) {
            if let Err(e) = self.r.writer_opened(ino.0) {
                return reply.error(errno(&e));
            }
            let fh = self.handle(ino.0, flags.0);
            self.count_open(o, ino.0, fh.0, Mode::PassthroughWritable);
            OpCounters::bump(&self.r.ops.passthrough_opens);
            return reply.opened_passthrough(fh, FopenFlags::empty(), &b);
        }
        if read_only
            && c.attr.kind == FileKind::File
            && o.writable == 0
            && o.cached == 0
            && self.passthrough.load(std::sync::atomic::Ordering::Relaxed)
        {
            let backing = match &o.backing {
                Some(b) => Some(b.clone()),
                // (read-write: a writer may join it, see above)
                None => match self.r.data_file(ino.0) {
                    Err(_) => None, // (this open goes through the daemon)
                    Ok(f) => match reply.open_backing(&f) {
                        Ok(b) => {
                            let b = Arc::new(b);
                            o.backing = Some(b.clone());
                            Some(b)
                        }
                        Err(e) => {
                            // refused (an old kernel, a stacked cache file
                            // system): no passthrough from now on, silently
                            tracing::info!("FUSE passthrough unavailable ({e}); reads go through the daemon");
                            self.passthrough.store(false, std::sync::atomic::Ordering::Relaxed);
                            None
                        }
                    },
                },
            };
            if let Some(b) = backing {
                let fh = self.handle(ino.0, flags.0);
                self.count_open(o, ino.0, fh.0, Mode::Passthrough);
                OpCounters::bump(&self.r.ops.passthrough_opens);
                return reply.opened_passthrough(fh, FopenFlags::empty(), &b);
            }
        }
        let fh = self.handle(ino.0, flags.0);
        if read_only {
            self.count_open(o, ino.0, fh.0, Mode::Cached);
            // the page cache stays across opens: remote changes drop it
            // (the notifier thread), local ones go through it
            return reply.opened(fh, FopenFlags::FOPEN_KEEP_CACHE);
        }
        // Writable: through the daemon and the page cache (shared-writable
        // mmap works, as linkers need).
        self.count_open(o, ino.0, fh.0, Mode::Writable);
        reply.opened(fh, FopenFlags::FOPEN_KEEP_CACHE)
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.append.lock().unwrap_or_else(|p| p.into_inner()).remove(&fh.0);
        self.count_release(fh.0);
        self.r.released(ino.0);
        reply.ok();
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        OpCounters::bump(&self.r.ops.read);
        let f = match self.r.data_file(ino.0) {
            Ok(f) => f,
            Err(e) => return reply.error(errno(&e)),
        };
        let mut buf = vec![0u8; size as usize];
        let mut got = 0;
        while got < buf.len() {
            match f.read_at(&mut buf[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return reply.error(Errno::from(e)),
            }
        }
        reply.data(&buf[..got]);
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        OpCounters::bump(&self.r.ops.write);
        let append = self.append.lock().unwrap_or_else(|p| p.into_inner()).contains(&fh.0);
        let r = if append { self.r.append(ino.0, data) } else { self.r.write(ino.0, offset, data) };
        match r {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _lock: fuser::LockOwner, reply: ReplyEmpty) {
        // (close waits for this: the file's writes are sealed before
        // anything the closer does next, so other replicas see changes in
        // the order they were made: `echo x > f.tmp; mv f.tmp f` never shows
        // an empty f. RELEASE would be too late: the kernel sends it in the
        // background)
        match self.r.flush(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        match self.r.fsync(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        match self.r.fsync(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let entries = match self.r.readdir(ino.0) {
            Ok(e) => e,
            Err(e) => return reply.error(errno(&e)),
        };
        let up = self.r.parent_ino(ino.0).unwrap_or(ino.0);
        let mut all: Listing =
            vec![(ino.0, FileType::Directory, b".".to_vec()), (up, FileType::Directory, b"..".to_vec())];
        all.extend(entries.into_iter().map(|(n, c)| (c.ino, kind(c.attr.kind), n)));
        let fh = self.next_fh.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.dirs.lock().unwrap_or_else(|p| p.into_inner()).insert(fh, Arc::new(all));
        reply.opened(FileHandle(fh), FopenFlags::empty());
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.dirs.lock().unwrap_or_else(|p| p.into_inner()).remove(&fh.0);
        reply.ok();
    }

    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // listings carry attributes (`ls -l`, `find`, rsync: no lookup per
        // entry); the kernel picks readdir or readdirplus as it sees fit
        let _ = config.add_capabilities(InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO);
        // set-id bits are cleared by the mount (see setattr): otherwise the
        // kernel asks for fresh attributes before every chown, a GETATTR
        // round trip per file tar extracts
        if config.add_capabilities(InitFlags::FUSE_HANDLE_KILLPRIV).is_err() {
            tracing::info!("the kernel does not let the mount clear set-id bits itself");
        }
        // read-only opens of cached files go straight to the cache file
        // (kernel >= 6.9); the cache sits on an ordinary file system, one
        // level below this one
        let pt = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok() && config.set_max_stack_depth(1).is_ok();
        if !pt {
            tracing::info!("the kernel offers no FUSE passthrough; reads go through the daemon");
        }
        self.passthrough.store(pt, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    fn readdirplus(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        OpCounters::bump(&self.r.ops.readdirplus);
        let Some(all) = self.dirs.lock().unwrap_or_else(|p| p.into_inner()).get(&fh.0).cloned() else {
            return reply.error(Errno::EBADF);
        };
        for (i, (e_ino, _, name)) in all.iter().enumerate().skip(offset as usize) {
            // "." and ".." take no lookup reference; the others are current
            // attributes (an entry removed since the listing is skipped)
            let a = match self.r.get(if i < 2 { ino.0 } else { *e_ino }) {
                Ok((_, c)) => self.attr(&c),
                Err(_) => continue,
            };
            let a = FileAttr { ino: INodeNo(*e_ino), ..a };
            if reply.add(INodeNo(*e_ino), i as u64 + 1, OsStr::from_bytes(name), &TTL, &a, GEN) {
                break;
            }
        }
        reply.ok();
    }

    fn readdir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        OpCounters::bump(&self.r.ops.readdir);
        let Some(all) = self.dirs.lock().unwrap_or_else(|p| p.into_inner()).get(&fh.0).cloned() else {
            return reply.error(Errno::EBADF);
        };
        // each entry's offset is where the next listing resumes
        for (i, (e_ino, k, name)) in all.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*e_ino), i as u64 + 1, *k, OsStr::from_bytes(name)) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // local numbers only: statfs must never wait for the network
        // SAFETY: statvfs is plain data; zeroes are a valid value.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        let dir = std::ffi::CString::new(self.r.cache.data_dir().as_os_str().as_bytes()).unwrap_or_default();
        // SAFETY: dir is NUL-terminated and s a valid out-pointer.
        if unsafe { libc::statvfs(dir.as_ptr(), &mut s) } != 0 {
            return reply.statfs(0, 0, 0, 0, 0, 4096, 255, 4096);
        }
        reply.statfs(s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree, s.f_bsize as u32, 255, s.f_frsize as u32)
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let exists = match self.r.get(ino.0) {
            Ok((_, c)) => c.xattrs.iter().any(|(n, _)| n.as_slice() == name.as_bytes()),
            Err(e) => return reply.error(errno(&e)),
        };
        if flags & libc::XATTR_CREATE != 0 && exists {
            return reply.error(Errno::EEXIST);
        }
        if flags & libc::XATTR_REPLACE != 0 && !exists {
            return reply.error(Errno::NO_XATTR);
        }
        match self.r.set_xattr(ino.0, name.as_bytes(), Some(value)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let c = match self.r.get(ino.0) {
            Ok((_, c)) => c,
            Err(e) => return reply.error(errno(&e)),
        };
        match c.xattrs.iter().find(|(n, _)| n.as_slice() == name.as_bytes()) {
            None => reply.error(Errno::NO_XATTR),
            Some((_, v)) if size == 0 => reply.size(v.len() as u32),
            Some((_, v)) if v.len() > size as usize => reply.error(Errno::ERANGE),
            Some((_, v)) => reply.data(v),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let c = match self.r.get(ino.0) {
            Ok((_, c)) => c,
            Err(e) => return reply.error(errno(&e)),
        };
        let mut list = Vec::new();
        for (n, _) in &c.xattrs {
            list.extend_from_slice(n);
            list.push(0);
        }
        if size == 0 {
            reply.size(list.len() as u32)
        } else if list.len() > size as usize {
            reply.error(Errno::ERANGE)
        } else {
            reply.data(&list)
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.r.set_xattr(ino.0, name.as_bytes(), None) {
            Ok(()) => reply.ok(),
            Err(ReplicaError::NotFound) => reply.error(Errno::NO_XATTR),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        match self.r.allocate(ino.0, offset, length, mode) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn lseek(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: i64, whence: i32, reply: fuser::ReplyLseek) {
        match self.r.seek(ino.0, offset, whence) {
            Ok(o) => reply.offset(o),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let perm = mode & 0o7777 & !umask;
        // O_EXCL (a lock file): the server's answer decides while connected
        let made = if flags & libc::O_EXCL != 0 {
            self.r.create_excl(parent.0, name.as_bytes(), perm, req.uid(), req.gid())
        } else {
            self.r.create(parent.0, name.as_bytes(), FileKind::File, perm, req.uid(), req.gid(), None)
        };
        match made {
            Ok(c) => {
                let fh = self.handle(c.ino, flags);
                let mut opens = self.opens.lock().unwrap_or_else(|p| p.into_inner());
                self.count_open(opens.entry(c.ino).or_default(), c.ino, fh.0, Mode::Writable);
                reply.created(&TTL, &self.attr(&c), GEN, fh, FopenFlags::empty())
            }
            Err(e) => reply.error(errno(&e)),
        }
    }
}

/// A mounted replica.
pub struct Mounted {
    session: Option<BackgroundSession>,
    mountpoint: std::path::PathBuf,
}

impl Mounted {
    /// Unmount and wait for the session to end. A mount still in use
    /// (a shell's cwd, an open file) is retried, then detached lazily and
    /// served until its last user leaves: never left dead (ENOTCONN).
    pub fn unmount(mut self) -> std::io::Result<()> {
        let Some(session) = self.session.take() else { return Ok(()) };
        let mp = std::ffi::CString::new(self.mountpoint.as_os_str().as_bytes())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let mut done = false;
        for _ in 0..5 {
            // SAFETY: mp is a valid C string.
            if unsafe { libc::umount2(mp.as_ptr(), 0) } == 0 {
                done = true;
                break;
            }
            if std::io::Error::last_os_error().raw_os_error() != Some(libc::EBUSY) {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        if !done {
            tracing::warn!(
                "{} is busy: detaching it; it is served until its last user leaves",
                self.mountpoint.display()
            );
            // SAFETY: mp is a valid C string.
            if unsafe { libc::umount2(mp.as_ptr(), libc::MNT_DETACH) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        session.join()
    }
}

/// Kernel mount flags a user may ask for; both off by default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MountFlags {
    /// Device nodes on the mount open their devices (`dev`; default `nodev`).
    pub dev: bool,
    /// Set-user-ID and set-group-ID bits take effect on exec (`suid`;
    /// default `nosuid`).
    pub suid: bool,
}

/// The options `mount` passes to the kernel.
fn mount_options(flags: MountFlags) -> Vec<MountOption> {
    vec![
        // the daemon's pid in the source tells a stale mount from a live one
        MountOption::FSName(format!("izo:{}", std::process::id())),
        MountOption::CUSTOM("subtype=izo".into()),
        MountOption::DefaultPermissions,
        if flags.suid { MountOption::Suid } else { MountOption::NoSuid },
        if flags.dev { MountOption::Dev } else { MountOption::NoDev },
    ]
}

/// Mount `replica` at `mountpoint` (allow_other, default_permissions,
/// nosuid and nodev unless `flags` ask otherwise; read-only when the token
/// is) and start the invalidation thread.
pub fn mount(replica: Arc<Replica>, mountpoint: &Path, flags: MountFlags) -> std::io::Result<Mounted> {
    let mut cfg = Config::default();
    cfg.mount_options = mount_options(flags);
    if !replica.client.writable() {
        // the kernel refuses every change (EROFS) before it reaches us
        cfg.mount_options.push(MountOption::RO);
    }
    cfg.acl = SessionACL::All;
    cfg.n_threads = Some(4);
    cfg.clone_fd = true;
    let (tx, rx) = mpsc::channel::<Inval>();
    replica.set_invalidator(tx);
    let fs = IzoFs {
        opens: Default::default(),
        modes: Default::default(),
        passthrough: Default::default(),
        r: replica,
        dirs: Default::default(),
        append: Default::default(),
        next_fh: std::sync::atomic::AtomicU64::new(1),
    };
    let session = fuser::spawn_mount(fs, mountpoint, &cfg)?;
    let notifier = session.notifier();
    std::thread::Builder::new().name("izo-invalidate".into()).spawn(move || {
        // one thread, no locks held, never inside a request
        while let Ok(w) = rx.recv() {
            let r = match &w {
                Inval::Inode(ino) => notifier.inval_inode(INodeNo(*ino), 0, 0),
                // (a negative offset: attributes only, the page cache stays)
                Inval::Attr(ino) => notifier.inval_inode(INodeNo(*ino), -1, 0),
                Inval::Entry(parent, name) => notifier.inval_entry(INodeNo(*parent), OsStr::from_bytes(name)),
            };
            if let Err(e) = r {
                tracing::debug!("invalidating {w:?}: {e}");
            }
        }
    })?;
    Ok(Mounted { session: Some(session), mountpoint: mountpoint.to_path_buf() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use izo_proto::{ConflictKind, OpError};

    fn via_server(e: OpError) -> Errno {
        errno(&ReplicaError::from(izo_client::ClientError::Op(e)))
    }

    #[test]
    fn server_refusals_get_their_errno_from_the_variant() {
        let s = || "reworded message".to_string();
        assert_eq!(via_server(OpError::conflict(ConflictKind::NameExists, None)), Errno::EEXIST);
        assert_eq!(via_server(OpError::NotDir(s())), Errno::ENOTDIR);
        assert_eq!(via_server(OpError::IsDir(s())), Errno::EISDIR);
        assert_eq!(via_server(OpError::NameTooLong), Errno::ENAMETOOLONG);
        assert_eq!(via_server(OpError::FileTooBig { max: 1 }), Errno::EFBIG);
        assert_eq!(via_server(OpError::NoSpace(s())), Errno::ENOSPC);
        assert_eq!(via_server(OpError::NotPermitted(s())), Errno::EPERM);
        assert_eq!(via_server(OpError::Unsupported(s())), Errno::EOPNOTSUPP);
        assert_eq!(via_server(OpError::BadName(s())), Errno::EINVAL);
        assert_eq!(via_server(OpError::ReadOnly(s())), Errno::EROFS);
        assert_eq!(via_server(OpError::Denied(s())), Errno::EACCES);
        assert_eq!(via_server(OpError::conflict(ConflictKind::DataMoved, None)), Errno::EIO);
    }

    #[test]
    fn a_lost_connection_is_enotconn_and_a_full_or_too_small_cache_disk_says_so() {
        assert_eq!(errno(&ReplicaError::from(izo_client::ClientError::Disconnected)), Errno::ENOTCONN);
        let disk = |code| {
            ReplicaError::Cache(izo_client::cache::CacheError::Io {
                path: "/cache/x".into(),
                err: std::io::Error::from_raw_os_error(code),
            })
        };
        assert_eq!(errno(&disk(libc::ENOSPC)), Errno::ENOSPC);
        assert_eq!(errno(&disk(libc::EFBIG)), Errno::EFBIG);
        assert_eq!(errno(&disk(libc::EIO)), Errno::EIO);
        let full = ReplicaError::Cache(izo_client::cache::CacheError::DbFull { path: "/cache/cache.redb".into() });
        assert_eq!(errno(&full), Errno::ENOSPC, "a database that cannot grow is a full disk too");
    }
}

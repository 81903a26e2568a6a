//! The exported tree: staging new inodes before the commit and applying
//! committed records in place. Every step checks the tree's state first, so
//! the same code serves normal apply and crash replay: an op whose pre-state
//! holds is applied, one whose post-state holds is skipped, anything else is
//! an inconsistency that turns the volume read-only.

use crate::sys;
use izo_journal::{Handle, StoredRecord};
use izo_proto::*;
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

/// Name of the staging directory at the export root; clients cannot use it.
pub const STAGE_DIR: &[u8] = b".izo-stage";

/// Why a record could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A system call failed.
    #[error("{what}: {err}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        err: io::Error,
    },
    /// The tree is neither in the op's pre-state nor in its post-state.
    #[error("tree inconsistent with the journal at seq {seq}: {why}")]
    Inconsistent {
        /// Record seq.
        seq: Seq,
        /// What did not match.
        why: String,
    },
}

/// Whether a record changed the tree or found it already applied.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Outcome {
    /// The op was carried out now.
    Applied,
    /// The tree already showed the op's effect.
    Skipped,
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> ApplyError {
    let what = what.into();
    move |err| ApplyError::Io { what, err }
}

/// Stage name of a new object.
pub fn stage_name(id: ObjectId) -> Vec<u8> {
    format!("o-{:032x}", id.0).into_bytes()
}

/// Intent name of a direct write to an object.
pub fn intent_name(id: ObjectId) -> Vec<u8> {
    format!("d-{:032x}", id.0).into_bytes()
}

/// Stage name of a large write's payload.
pub fn write_stage_name(origin: Origin, seq: Seq) -> Vec<u8> {
    match origin {
        Origin::Replica(r, cseq) => format!("w-{:032x}-{cseq}", r.0).into_bytes(),
        Origin::Local => format!("w-local-{seq}").into_bytes(),
    }
}

fn pair(t: Timestamp) -> (i64, u32) {
    (t.secs, t.nsec)
}

/// Open handles onto the export.
pub struct Tree {
    root: OwnedFd,
    stage: OwnedFd,
    fds: HashMap<Handle, Arc<OwnedFd>>,
    /// The process umask (new inodes are created through it).
    umask: u32,
    /// Owner of inodes this process creates.
    owner: (u32, u32),
}

impl Tree {
    /// Open the export at `path`, creating its staging directory.
    pub fn open(path: &Path) -> io::Result<Tree> {
        let root = sys::open_dir_path(path)?;
        match sys::mkdirat(root.as_fd(), STAGE_DIR, 0o700) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let stage = sys::openat(root.as_fd(), STAGE_DIR, libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW, 0)?;
        // SAFETY: umask only swaps the process mask; it is put back at once.
        let umask = unsafe {
            let old = libc::umask(0o022);
            libc::umask(old);
            old
        };
        let owner = unsafe { (libc::geteuid(), libc::getegid()) };
        Ok(Tree { root, stage, fds: HashMap::new(), umask, owner })
    }

    /// The export root (the mount fd for handles).
    pub fn root(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }

    /// The staging directory.
    pub fn stage(&self) -> BorrowedFd<'_> {
        self.stage.as_fd()
    }

    /// Handle of the export root.
    pub fn root_handle(&self) -> io::Result<Handle> {
        sys::name_to_handle(self.root.as_fd(), b"")
    }

    /// Open an inode by handle (cached); regular files read-write, others read-only.
    fn fd(&mut self, h: &Handle, kind: FileKind) -> Result<Arc<OwnedFd>, ApplyError> {
        if let Some(fd) = self.fds.get(h) {
            return Ok(fd.clone());
        }
        if self.fds.len() >= 1024 {
            self.fds.clear();
        }
        let flags = match kind {
            FileKind::File => libc::O_RDWR,
            FileKind::Dir => libc::O_RDONLY | libc::O_DIRECTORY,
            _ => libc::O_PATH,
        };
        let fd = sys::open_by_handle(self.root.as_fd(), h, flags).map_err(io_err("open by handle"))?;
        let fd = Arc::new(fd);
        self.fds.insert(h.clone(), fd.clone());
        Ok(fd)
    }

    /// Forget cached fds of an inode that lost its last name.
    fn forget(&mut self, h: &Handle) {
        self.fds.remove(h);
    }

    fn handle_at(&self, dir: BorrowedFd, name: &[u8]) -> Result<Option<Handle>, ApplyError> {
        match sys::name_to_handle(dir, name) {
            Ok(h) => Ok(Some(h)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(ApplyError::Io { what: "name_to_handle_at".into(), err: e }),
        }
    }

    /// Create the inode of a new object in the stage directory, with its final
    /// mode, owner and mtime; returns its handle. Done before the commit so
    /// every record names its inode by handle.
    pub fn stage_new(&self, op: &Op, time: Timestamp) -> io::Result<Option<Handle>> {
        let (id, uid, gid) = match op {
            Op::Create { id, uid, gid, .. }
            | Op::Mkdir { id, uid, gid, .. }
            | Op::Symlink { id, uid, gid, .. }
            | Op::Mknod { id, uid, gid, .. } => (*id, *uid, *gid),
            _ => return Ok(None),
        };
        let name = stage_name(id);
        let st = self.stage.as_fd();
        if let Op::Create { mode, .. } = op {
            return self.stage_file(&name, *mode, uid, gid, time).map(Some);
        }
        let mode = match op {
            Op::Mkdir { mode, .. } => {
                sys::mkdirat(st, &name, 0o700)?;
                Some(*mode)
            }
            Op::Symlink { target, .. } => {
                sys::symlinkat(target, st, &name)?;
                None
            }
            Op::Mknod { kind, mode, rdev, .. } => {
                let (ty, rdev) = match kind {
                    FileKind::Fifo => (libc::S_IFIFO, 0),
                    FileKind::BlockDev => (libc::S_IFBLK, *rdev),
                    FileKind::CharDev => (libc::S_IFCHR, *rdev),
                    // validation lets nothing else through
                    _ => (libc::S_IFSOCK, 0),
                };
                sys::mknodat(st, &name, ty | 0o600, rdev)?;
                Some(*mode)
            }
            _ => None,
        };
        sys::chown_at(st, &name, Some(uid), Some(gid))?;
        if let Some(m) = mode {
            sys::chmod_at(st, &name, m & 0o7777)?;
        }
        sys::set_mtime_at(st, &name, pair(time))?;
        sys::name_to_handle(st, &name).map(Some)
    }

    /// The common case, kept to as few calls as possible: open with the final
    /// mode when the umask leaves it whole, chown only to another owner, and
    /// work on the fd rather than the name.
    fn stage_file(&self, name: &[u8], mode: u32, uid: u32, gid: u32, time: Timestamp) -> io::Result<Handle> {
        let mode = mode & 0o7777;
        let fd = sys::openat(self.stage.as_fd(), name, libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY, mode & 0o777)?;
        let fdb = fd.as_fd();
        if (uid, gid) != self.owner {
            sys::chown_at(fdb, b"", Some(uid), Some(gid))?;
        }
        if mode & 0o7000 != 0 || mode & self.umask != 0 || (uid, gid) != self.owner {
            sys::fchmod(fdb, mode)?;
        }
        sys::set_mtime_at(fdb, b"", pair(time))?;
        sys::name_to_handle(fdb, b"")
    }

    /// Remove a staged inode whose op was refused.
    pub fn unstage(&self, op: &Op) {
        if let Some(id) = op.new_object() {
            self.unstage_id(id);
        }
    }

    /// Remove the staged inode of a new object (file or directory).
    pub fn unstage_id(&self, id: ObjectId) {
        let name = stage_name(id);
        if sys::unlinkat(self.stage.as_fd(), &name, false).is_err() {
            let _ = sys::unlinkat(self.stage.as_fd(), &name, true);
        }
    }

    /// Stage a large write's payload durably (fsynced) before the commit.
    pub fn stage_write(&self, name: &[u8], data: &[u8]) -> io::Result<()> {
        let fd = sys::openat(self.stage.as_fd(), name, libc::O_CREAT | libc::O_TRUNC | libc::O_WRONLY, 0o600)?;
        sys::pwrite_all(fd.as_fd(), data, 0)?;
        sys::fsync(fd.as_fd())
    }

    /// Open a file for appending straight into it (beyond its committed
    /// end) before the commit. An intent file `d-<id>` in the stage says the
    /// file may hold uncommitted bytes past its committed size; it is made
    /// before any write, so after any crash it is there if the bytes are.
    pub fn direct_fd(&mut self, id: ObjectId, handle: &Handle) -> io::Result<Arc<OwnedFd>> {
        sys::openat(self.stage.as_fd(), &intent_name(id), libc::O_CREAT | libc::O_WRONLY, 0o600)?;
        self.fd(handle, FileKind::File).map_err(|e| match e {
            ApplyError::Io { err, .. } => err,
            other => io::Error::other(other.to_string()),
        })
    }

    /// Append through an fd from [`Tree::direct_fd`].
    pub fn direct_write(&self, fd: &OwnedFd, offset: u64, data: &[u8]) -> io::Result<()> {
        sys::pwrite_all(fd.as_fd(), data, offset)?;
        // Overlap the disk with receiving the next writes; the commit's
        // fdatasync then waits for little.
        let _ = sys::start_writeback(fd.as_fd(), offset, data.len() as u64);
        Ok(())
    }

    /// Drop the intent of a direct write once its record is committed.
    pub fn clear_intent(&self, id: ObjectId) {
        let _ = sys::unlinkat(self.stage.as_fd(), &intent_name(id), false);
    }

    /// Objects whose files may hold uncommitted appended bytes.
    pub fn intents(&self) -> io::Result<Vec<ObjectId>> {
        let mut out = Vec::new();
        for name in self.stage_names()? {
            let hex = name.strip_prefix(b"d-").and_then(|h| std::str::from_utf8(h).ok());
            if let Some(id) = hex.and_then(|h| u128::from_str_radix(h, 16).ok()) {
                out.push(ObjectId(id));
            }
        }
        Ok(out)
    }

    /// Cut a file back to its committed size and mtime if a direct write
    /// left more.
    pub fn cut_to(&mut self, handle: &Handle, size: u64, mtime: Timestamp) -> io::Result<()> {
        let fd = sys::open_by_handle(self.root.as_fd(), handle, libc::O_RDWR)?;
        if sys::fstatat(fd.as_fd(), b"")?.st_size as u64 > size {
            sys::ftruncate(fd.as_fd(), size)?;
            sys::set_mtime_at(fd.as_fd(), b"", pair(mtime))?;
        }
        Ok(())
    }

    fn stage_names(&self) -> io::Result<Vec<Vec<u8>>> {
        use std::os::unix::ffi::OsStrExt;
        let path = sys::proc_path(self.stage.as_raw_fd());
        let path = std::path::PathBuf::from(String::from_utf8_lossy(&path).into_owned());
        let mut out = Vec::new();
        for e in std::fs::read_dir(path)? {
            out.push(e?.file_name().as_bytes().to_vec());
        }
        Ok(out)
    }

    /// The largest size a file on the export may have: found by truncating
    /// a scratch file in the stage (sparse, so free) and halving on EFBIG.
    pub fn probe_max_file_size(&self) -> io::Result<u64> {
        let name = b"probe-size";
        let fd = sys::openat(self.stage.as_fd(), name, libc::O_CREAT | libc::O_RDWR | libc::O_TRUNC, 0o600)?;
        let (mut lo, mut hi) = (0u64, i64::MAX as u64);
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            match sys::ftruncate(fd.as_fd(), mid) {
                Ok(()) => lo = mid,
                Err(e) if e.raw_os_error() == Some(libc::EFBIG) || e.raw_os_error() == Some(libc::EINVAL) => {
                    hi = mid - 1
                }
                Err(e) => return Err(e),
            }
        }
        sys::unlinkat(self.stage.as_fd(), name, false)?;
        Ok(lo)
    }

    /// How many bytes of extended attributes one inode holds: the largest
    /// single value a scratch file takes, plus its name and entry overhead.
    pub fn probe_xattr_room(&self) -> io::Result<u64> {
        let name = b"probe-xattr";
        let fd = sys::openat(self.stage.as_fd(), name, libc::O_CREAT | libc::O_RDWR | libc::O_TRUNC, 0o600)?;
        let key = b"user.izo-probe";
        let buf = vec![0u8; 65536];
        let (mut lo, mut hi) = (0usize, buf.len());
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            match sys::fsetxattr(fd.as_fd(), key, &buf[..mid]) {
                Ok(()) => lo = mid,
                Err(_) => hi = mid - 1,
            }
        }
        drop(fd);
        sys::unlinkat(self.stage.as_fd(), name, false)?;
        Ok((lo + key.len() + 24) as u64)
    }

    /// Bytes of new data the export can take now, keeping a margin of 1% of
    /// the file system (at least 64 MiB) for metadata and other writers.
    pub fn space_available(&self) -> io::Result<u64> {
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstatvfs(self.root.as_raw_fd(), &mut st) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let unit = st.f_frsize as u64;
        let free = st.f_bavail as u64 * unit;
        let margin = (st.f_blocks as u64 * unit / 100).max(64 << 20);
        Ok(free.saturating_sub(margin))
    }

    /// Remove every leftover in the stage directory (after replay).
    pub fn clear_stage(&self) -> io::Result<usize> {
        let mut n = 0;
        let path = sys::proc_path(self.stage.as_raw_fd());
        let path = std::path::PathBuf::from(String::from_utf8_lossy(&path).into_owned());
        for e in std::fs::read_dir(path)? {
            let e = e?;
            use std::os::unix::ffi::OsStrExt;
            let name = e.file_name().as_bytes().to_vec();
            if crate::hint::is_marker(&name) || name == crate::lock::LOCK_FILE.as_bytes() {
                continue;
            }
            let dir = e.file_type()?.is_dir();
            sys::unlinkat(self.stage.as_fd(), &name, dir)?;
            n += 1;
        }
        Ok(n)
    }

    /// An apply failed while capture is on: another program may have put
    /// something where the op needs a name to be free (or to lead to the
    /// inode it expects). Move that aside in the same directory, as
    /// `NAME.izo-local-SEQ`, and return where it went (to be journaled as a
    /// local change); the op is then retried and nothing is lost.
    pub fn move_aside(&mut self, rec: &StoredRecord) -> Result<Vec<(ObjectId, Vec<u8>)>, ApplyError> {
        let r = &rec.record;
        let (dir, name, want) = match &r.op {
            Op::Create { parent, name, id, .. }
            | Op::Mkdir { parent, name, id, .. }
            | Op::Symlink { parent, name, id, .. }
            | Op::Mknod { parent, name, id, .. }
            | Op::Link { parent, name, id } => (*parent, name, *id),
            Op::Unlink { parent, name, expect } | Op::Rmdir { parent, name, expect } => (*parent, name, expect.id),
            Op::Rename { new_parent, new_name, expect, .. } => (*new_parent, new_name, expect.id),
            _ => return Ok(Vec::new()),
        };
        let want = self.handle(rec, want)?.clone();
        let p = self.dir(rec, dir)?;
        let expected_target = match &r.op {
            Op::Rename { target: Some(t), .. } => Some(self.handle(rec, t.id)?.clone()),
            _ => None,
        };
        match self.handle_at(p.as_fd(), name)? {
            Some(cur) if cur != want && Some(&cur) != expected_target.as_ref() => {
                let mut aside = name.clone();
                let suffix = format!(".izo-local-{}", r.seq).into_bytes();
                aside.truncate(255 - suffix.len());
                aside.extend_from_slice(&suffix);
                sys::renameat2(p.as_fd(), name, p.as_fd(), &aside, libc::RENAME_NOREPLACE)
                    .map_err(io_err("moving a local change aside"))?;
                Ok(vec![(dir, aside)])
            }
            _ => Ok(Vec::new()),
        }
    }

    fn handle<'r>(&self, rec: &'r StoredRecord, id: ObjectId) -> Result<&'r Handle, ApplyError> {
        rec.handle(id).filter(|h| !h.is_empty()).ok_or_else(|| ApplyError::Inconsistent {
            seq: rec.record.seq,
            why: format!("record has no handle for {id}"),
        })
    }

    fn dir(&mut self, rec: &StoredRecord, id: ObjectId) -> Result<Arc<OwnedFd>, ApplyError> {
        let h = self.handle(rec, id)?.clone();
        self.fd(&h, FileKind::Dir)
    }

    fn touch(&self, dir: &OwnedFd, t: Timestamp) -> Result<(), ApplyError> {
        sys::set_mtime_at(dir.as_fd(), b"", pair(t)).map_err(io_err("set directory mtime"))
    }
}

mod apply;
pub use apply::Mode;

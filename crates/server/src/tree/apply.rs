//! Applying one committed record to the tree, checking state first.

use super::*;
use izo_journal::Payload;

fn incons(seq: Seq, why: impl Into<String>) -> ApplyError {
    ApplyError::Inconsistent { seq, why: why.into() }
}

/// How sure we are of the tree's state when applying a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Live apply: the tree is exactly at the record's pre-state.
    Normal,
    /// Replay after the applied marker: the tree is at the record's
    /// pre-state, or (for the record in flight at the crash) at its
    /// post-state, which is then only completed (mtimes). Anything else is
    /// an inconsistency.
    Exact,
    /// Redo of a data record already covered by the marker: content only,
    /// and a vanished inode (removed by a later record) is skipped.
    RedoData,
}

impl Tree {
    /// Apply `rec`, checking the tree's state first (see [`Mode`]).
    pub fn apply(&mut self, rec: &StoredRecord, mode: Mode) -> Result<Outcome, ApplyError> {
        // A change found in the export is journaled after it happened there.
        if rec.record.origin == Origin::Local {
            // cached fds would keep a removed inode (and its space) alive
            if matches!(rec.record.op, Op::Unlink { .. } | Op::Rmdir { .. } | Op::Rename { .. }) {
                for (_, h) in &rec.handles {
                    self.forget(h);
                }
            }
            return Ok(Outcome::Skipped);
        }
        match self.apply_inner(rec, mode) {
            Err(ApplyError::Io { err, .. }) if mode == Mode::RedoData && err.raw_os_error() == Some(libc::ESTALE) => {
                Ok(Outcome::Skipped)
            }
            other => other,
        }
    }

    fn apply_inner(&mut self, rec: &StoredRecord, mode: Mode) -> Result<Outcome, ApplyError> {
        let r = &rec.record;
        let seq = r.seq;
        let mut t = r.time;
        if mode == Mode::RedoData {
            // The kernel stamps writes with the current time; a redo must
            // leave the mtime the tree already has (it is metadata, ordered
            // with the marker, and may come from a later record).
            if let Some(id) = r.op.data_target() {
                let fd = self.fd(&self.handle(rec, id)?.clone(), FileKind::File)?;
                let st = sys::fstatat(fd.as_fd(), b"").map_err(io_err("stat before redo"))?;
                t = Timestamp { secs: st.st_mtime, nsec: st.st_mtime_nsec as u32 };
            }
        }
        // the mtimes the record gives: the replica's stamps, which every
        // copy keeps (a directory's from the record's dirs, an object's from
        // its attributes); a redo keeps what the tree has
        let rec_t = t;
        let dir_t = |id: ObjectId| r.dirs.iter().find(|a| a.id == id).map(|a| a.mtime).unwrap_or(rec_t);
        if mode != Mode::RedoData {
            if let (Some(a), Some(_)) = (&r.attr, r.op.data_target()) {
                t = a.mtime;
            }
        }
        let exact = mode == Mode::Exact;
        let mut outcome = Outcome::Applied;
        match &r.op {
            Op::Create { parent, name, id, .. }
            | Op::Mkdir { parent, name, id, .. }
            | Op::Symlink { parent, name, id, .. }
            | Op::Mknod { parent, name, id, .. } => {
                let p = self.dir(rec, *parent)?;
                let staged = stage_name(*id);
                let want = self.handle(rec, *id)?.clone();
                // Live, the staged inode is ours for sure; in replay, check it.
                let staged_ok =
                    mode == Mode::Normal || self.handle_at(self.stage.as_fd(), &staged)?.as_ref() == Some(&want);
                if staged_ok {
                    sys::renameat2(self.stage.as_fd(), &staged, p.as_fd(), name, libc::RENAME_NOREPLACE)
                        .map_err(io_err("move new inode into place"))?;
                } else if exact && self.handle_at(p.as_fd(), name)?.as_ref() == Some(&want) {
                    outcome = Outcome::Skipped;
                } else {
                    return Err(incons(seq, "new inode neither staged nor in place"));
                }
                self.touch(&p, dir_t(*parent))?;
            }
            Op::Link { id, parent, name } => {
                let p = self.dir(rec, *parent)?;
                let h = self.handle(rec, *id)?.clone();
                match self.handle_at(p.as_fd(), name)? {
                    None => {
                        let kind = r.attr.as_ref().map(|a| a.kind).unwrap_or(FileKind::File);
                        let fd = match kind {
                            FileKind::File => self.fd(&h, kind)?,
                            _ => Arc::new(
                                sys::open_by_handle(self.root.as_fd(), &h, libc::O_PATH)
                                    .map_err(io_err("open by handle"))?,
                            ),
                        };
                        sys::link_fd(fd.as_fd(), p.as_fd(), name).map_err(io_err("link"))?;
                    }
                    Some(cur) if exact && cur == h => outcome = Outcome::Skipped,
                    Some(_) => return Err(incons(seq, "link name taken")),
                }
                self.touch(&p, dir_t(*parent))?;
            }
            Op::Unlink { parent, name, expect } | Op::Rmdir { parent, name, expect } => {
                let p = self.dir(rec, *parent)?;
                let h = self.handle(rec, expect.id)?.clone();
                match self.handle_at(p.as_fd(), name)? {
                    Some(cur) if cur == h => {
                        let is_dir = matches!(r.op, Op::Rmdir { .. });
                        sys::unlinkat(p.as_fd(), name, is_dir).map_err(io_err("unlink"))?;
                    }
                    None if exact => outcome = Outcome::Skipped,
                    _ => return Err(incons(seq, "name does not point to the expected inode")),
                }
                if r.attr.is_none() {
                    self.forget(&h);
                }
                self.touch(&p, dir_t(*parent))?;
            }
            Op::Rename { parent, name, expect, new_parent, new_name, target, mode: rm } => {
                let p = self.dir(rec, *parent)?;
                let np = self.dir(rec, *new_parent)?;
                let hs = self.handle(rec, expect.id)?.clone();
                let ht = match target {
                    Some(e) => Some(self.handle(rec, e.id)?.clone()),
                    None => None,
                };
                let src_now = self.handle_at(p.as_fd(), name)?;
                let dst_now = self.handle_at(np.as_fd(), new_name)?;
                let pre = src_now.as_ref() == Some(&hs) && dst_now == ht;
                let post = dst_now.as_ref() == Some(&hs)
                    && if *rm == RenameMode::Exchange {
                        src_now == ht
                    } else {
                        src_now.is_none() || src_now == Some(hs.clone())
                    };
                if pre {
                    let flags = match rm {
                        RenameMode::Replace => 0,
                        RenameMode::NoReplace => libc::RENAME_NOREPLACE,
                        RenameMode::Exchange => libc::RENAME_EXCHANGE,
                    };
                    sys::renameat2(p.as_fd(), name, np.as_fd(), new_name, flags).map_err(io_err("rename"))?;
                    // a replaced target may have lost its last name: drop our fd
                    if let (RenameMode::Replace, Some(t)) = (rm, &ht) {
                        if t != &hs {
                            self.forget(t);
                        }
                    }
                } else if exact && post {
                    outcome = Outcome::Skipped;
                } else {
                    return Err(incons(seq, "rename source or target not as recorded"));
                }
                self.touch(&p, dir_t(*parent))?;
                self.touch(&np, dir_t(*new_parent))?;
            }
            Op::Write { id, offset, data, .. } => {
                let fd = self.fd(&self.handle(rec, *id)?.clone(), FileKind::File)?;
                if let Payload::Direct(_) = rec.payload {
                    // The bytes were appended and fdatasynced before the commit.
                } else if let Payload::Staged(_) = rec.payload {
                    let sname = write_stage_name(r.origin, seq);
                    let sfd = sys::openat(self.stage.as_fd(), &sname, libc::O_RDONLY, 0)
                        .map_err(io_err("open staged write"))?;
                    let st = sys::fstatat(sfd.as_fd(), b"").map_err(io_err("stat staged write"))?;
                    let mut buf = vec![0u8; st.st_size as usize];
                    sys::pread(sfd.as_fd(), &mut buf, 0).map_err(io_err("read staged write"))?;
                    sys::pwrite_all(fd.as_fd(), &buf, *offset).map_err(io_err("write"))?;
                } else {
                    sys::pwrite_all(fd.as_fd(), data, *offset).map_err(io_err("write"))?;
                }
                self.touch_data(&fd, t, mode)?;
            }
            Op::Truncate { id, size, .. } => {
                let fd = self.fd(&self.handle(rec, *id)?.clone(), FileKind::File)?;
                sys::ftruncate(fd.as_fd(), *size).map_err(io_err("truncate"))?;
                self.touch_data(&fd, t, mode)?;
            }
            Op::Allocate { id, offset, len, .. } | Op::PunchHole { id, offset, len, .. } => {
                let fd = self.fd(&self.handle(rec, *id)?.clone(), FileKind::File)?;
                let fmode = match r.op {
                    Op::PunchHole { .. } => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    _ => 0,
                };
                sys::fallocate(fd.as_fd(), fmode, *offset, *len).map_err(io_err("fallocate"))?;
                self.touch_data(&fd, t, mode)?;
            }
            Op::SetAttr { id, attrs, .. } => {
                let Some(attr) = &r.attr else { return Err(incons(seq, "setattr record without attributes")) };
                let fd = self.fd(&self.handle(rec, *id)?.clone(), attr.kind)?;
                self.set_attrs(&fd, attr, attrs)?;
            }
            Op::SetXattr { id, name, value, .. } => {
                let kind = r.attr.as_ref().map(|a| a.kind).unwrap_or(FileKind::File);
                let fd = self.fd(&self.handle(rec, *id)?.clone(), kind)?;
                sys::fsetxattr(fd.as_fd(), name, value).map_err(io_err("setxattr"))?;
            }
            Op::RemoveXattr { id, name, .. } => {
                let kind = r.attr.as_ref().map(|a| a.kind).unwrap_or(FileKind::File);
                let fd = self.fd(&self.handle(rec, *id)?.clone(), kind)?;
                match sys::fremovexattr(fd.as_fd(), name) {
                    Ok(()) => {}
                    Err(e) if exact && e.raw_os_error() == Some(libc::ENODATA) => outcome = Outcome::Skipped,
                    Err(e) => return Err(ApplyError::Io { what: "removexattr".into(), err: e }),
                }
            }
            Op::Append { .. } => {
                let err = io::Error::new(io::ErrorKind::InvalidData, "an append is recorded as the write it became");
                return Err(ApplyError::Io { what: "applying a record".into(), err });
            }
        }
        Ok(outcome)
    }

    /// A data op stamps the file's mtime (on a redo: the mtime it had).
    fn touch_data(&self, fd: &OwnedFd, t: Timestamp, _mode: Mode) -> Result<(), ApplyError> {
        self.touch(fd, t)
    }

    fn set_attrs(&self, fd: &OwnedFd, attr: &Attr, a: &SetAttrs) -> Result<(), ApplyError> {
        let fdb = fd.as_fd();
        if a.uid.is_some() || a.gid.is_some() {
            sys::chown_at(fdb, b"", a.uid, a.gid).map_err(io_err("chown"))?;
        }
        // chown clears setuid/setgid even for root: restore the recorded mode.
        if attr.kind != FileKind::Symlink && (a.mode.is_some() || a.uid.is_some() || a.gid.is_some()) {
            match attr.kind {
                FileKind::File | FileKind::Dir => sys::fchmod(fdb, attr.mode),
                _ => {
                    let at = unsafe { BorrowedFd::borrow_raw(libc::AT_FDCWD) };
                    sys::chmod_at(at, &sys::proc_path(fd.as_raw_fd()), attr.mode)
                }
            }
            .map_err(io_err("chmod"))?;
        }
        if a.mtime.is_some() || a.atime.is_some() {
            sys::set_times_at(fdb, b"", a.atime.map(pair), a.mtime.map(pair)).map_err(io_err("set times"))?;
        }
        Ok(())
    }
}

//! Applying one committed record to the tree, checking state first.

use super::*;

fn incons(seq: Seq, why: impl Into<String>) -> ApplyError {
    ApplyError::Inconsistent { seq, why: why.into() }
}

impl Tree {
    /// Apply `rec`. In `replay` mode an op whose effect is already present is
    /// skipped; outside replay that would be an inconsistency.
    pub fn apply(&mut self, rec: &StoredRecord, replay: bool) -> Result<Outcome, ApplyError> {
        let r = &rec.record;
        let seq = r.seq;
        let t = r.time;
        match &r.op {
            Op::Create { parent, name, id, .. }
            | Op::Mkdir { parent, name, id, .. }
            | Op::Symlink { parent, name, id, .. }
            | Op::Mknod { parent, name, id, .. } => {
                let p = self.dir(rec, *parent)?;
                let staged = stage_name(*id);
                let want = self.handle(rec, *id)?.clone();
                if self.handle_at(self.stage.as_fd(), &staged)?.as_ref() != Some(&want) {
                    if replay && self.handle_at(p.as_fd(), name)?.is_some() || replay {
                        return Ok(Outcome::Skipped);
                    }
                    return Err(incons(seq, "staged inode missing"));
                }
                sys::renameat2(self.stage.as_fd(), &staged, p.as_fd(), name, libc::RENAME_NOREPLACE)
                    .map_err(io_err("move new inode into place"))?;
                self.touch(&p, t)?;
            }
            Op::Link { id, parent, name } => {
                let p = self.dir(rec, *parent)?;
                let h = self.handle(rec, *id)?.clone();
                match self.handle_at(p.as_fd(), name)? {
                    Some(cur) if cur == h => return Ok(Outcome::Skipped),
                    Some(_) => return Err(incons(seq, "link name taken by another inode")),
                    None => {}
                }
                let kind = r.attr.as_ref().map(|a| a.kind).unwrap_or(FileKind::File);
                let fd = match kind {
                    FileKind::File => self.fd(&h, kind)?,
                    _ => Arc::new(
                        sys::open_by_handle(self.root.as_fd(), &h, libc::O_PATH).map_err(io_err("open by handle"))?,
                    ),
                };
                sys::link_fd(fd.as_fd(), p.as_fd(), name).map_err(io_err("link"))?;
                self.touch(&p, t)?;
            }
            Op::Unlink { parent, name, expect } | Op::Rmdir { parent, name, expect } => {
                let p = self.dir(rec, *parent)?;
                let h = self.handle(rec, expect.id)?.clone();
                match self.handle_at(p.as_fd(), name)? {
                    Some(cur) if cur == h => {}
                    None if replay => return Ok(Outcome::Skipped),
                    _ => return Err(incons(seq, "name does not point to the expected inode")),
                }
                let is_dir = matches!(r.op, Op::Rmdir { .. });
                sys::unlinkat(p.as_fd(), name, is_dir).map_err(io_err("unlink"))?;
                if r.attr.is_none() {
                    self.forget(&h);
                }
                self.touch(&p, t)?;
            }
            Op::Rename { parent, name, expect, new_parent, new_name, target, mode } => {
                let p = self.dir(rec, *parent)?;
                let np = self.dir(rec, *new_parent)?;
                let hs = self.handle(rec, expect.id)?.clone();
                let ht = match target {
                    Some(e) => Some(self.handle(rec, e.id)?.clone()),
                    None => None,
                };
                let src_now = self.handle_at(p.as_fd(), name)?;
                let dst_now = self.handle_at(np.as_fd(), new_name)?;
                let pre = src_now.as_ref() == Some(&hs)
                    && (dst_now == ht || (dst_now.is_none() && *mode != RenameMode::Exchange));
                if !pre {
                    let post = dst_now.as_ref() == Some(&hs) && (*mode != RenameMode::Exchange || src_now == ht);
                    if replay && post {
                        return Ok(Outcome::Skipped);
                    }
                    return Err(incons(seq, "rename source or target not as recorded"));
                }
                let flags = match mode {
                    RenameMode::Replace => 0,
                    RenameMode::NoReplace => libc::RENAME_NOREPLACE,
                    RenameMode::Exchange => libc::RENAME_EXCHANGE,
                };
                sys::renameat2(p.as_fd(), name, np.as_fd(), new_name, flags).map_err(io_err("rename"))?;
                self.touch(&p, t)?;
                self.touch(&np, t)?;
            }
            Op::Write { id, offset, data, .. } => {
                let fd = self.fd(&self.handle(rec, *id)?.clone(), FileKind::File)?;
                if rec.staged.is_some() {
                    let sname = write_stage_name(r.origin, seq);
                    let sfd = sys::openat(self.stage.as_fd(), &sname, libc::O_RDONLY, 0);
                    let sfd = match sfd {
                        Ok(f) => f,
                        // Stage files go only after a checkpoint covering the write.
                        Err(e) => return Err(ApplyError::Io { what: "open staged write".into(), err: e }),
                    };
                    let st = sys::fstatat(sfd.as_fd(), b"").map_err(io_err("stat staged write"))?;
                    let mut buf = vec![0u8; st.st_size as usize];
                    sys::pread(sfd.as_fd(), &mut buf, 0).map_err(io_err("read staged write"))?;
                    sys::pwrite_all(fd.as_fd(), &buf, *offset).map_err(io_err("write"))?;
                } else {
                    sys::pwrite_all(fd.as_fd(), data, *offset).map_err(io_err("write"))?;
                }
                self.touch(&fd, t)?;
            }
            Op::Truncate { id, size, .. } => {
                let fd = self.fd(&self.handle(rec, *id)?.clone(), FileKind::File)?;
                sys::ftruncate(fd.as_fd(), *size).map_err(io_err("truncate"))?;
                self.touch(&fd, t)?;
            }
            Op::Allocate { id, offset, len, .. } | Op::PunchHole { id, offset, len, .. } => {
                let fd = self.fd(&self.handle(rec, *id)?.clone(), FileKind::File)?;
                let mode = match r.op {
                    Op::PunchHole { .. } => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    _ => 0,
                };
                sys::fallocate(fd.as_fd(), mode, *offset, *len).map_err(io_err("fallocate"))?;
                self.touch(&fd, t)?;
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
                    Err(e) if replay && e.raw_os_error() == Some(libc::ENODATA) => return Ok(Outcome::Skipped),
                    Err(e) => return Err(ApplyError::Io { what: "removexattr".into(), err: e }),
                }
            }
        }
        Ok(Outcome::Applied)
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
        if let Some(m) = a.mtime {
            sys::set_mtime_at(fdb, b"", pair(m)).map_err(io_err("set mtime"))?;
        }
        Ok(())
    }
}

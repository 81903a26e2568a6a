//! Local operations: each checks the POSIX rules against the view, plans
//! the cache edits, and queues its op (or cancels, joins, seals). The shell
//! does the data-file part and logs the edits (see [`Local`]).

use super::{Engine, Local, Now, ReplicaError, View, R};
use crate::cache::{Cached, Edit};
use izo_proto::rules::{self, Namespace, RenameCase};
use izo_proto::*;

/// What became of a waited op that got no answer in time.
#[derive(Debug, PartialEq, Eq)]
pub enum Withdraw {
    /// Not sent yet: taken out of the queue (it never happens).
    Withdrawn,
    /// Already sent: it will be applied (or parked) like any other.
    Sent,
    /// Answered meanwhile (the answer went nowhere): treat as sent.
    Gone,
}

/// The engine's view as the namespace rules see it (`izo_proto::rules`:
/// the same rules the server's journal applies).
struct Ns<'a>(&'a dyn View);

impl Namespace for Ns<'_> {
    type Error = ReplicaError;
    fn lookup(&self, parent: ObjectId, name: &[u8]) -> R<Option<ObjectId>> {
        Ok(self.0.lookup(parent, name)?)
    }
    fn node(&self, id: ObjectId) -> R<Option<rules::Node>> {
        Ok(self.0.get(id)?.map(|c| rules::Node { kind: c.attr.kind, nlink: c.attr.nlink }))
    }
    fn is_empty(&self, dir: ObjectId) -> R<bool> {
        Ok(self.0.children(dir)?.is_empty())
    }
    fn parent_of(&self, dir: ObjectId) -> R<Option<ObjectId>> {
        Ok(self.0.parent_of(dir)?)
    }
}

fn cached(view: &dyn View, id: ObjectId) -> R<Cached> {
    view.get(id)?.ok_or(ReplicaError::NotFound)
}

fn dir(view: &dyn View, id: ObjectId) -> R<Cached> {
    let c = cached(view, id)?;
    if c.attr.kind != FileKind::Dir {
        return Err(ReplicaError::NotDir);
    }
    Ok(c)
}

fn touch(view: &dyn View, dir: ObjectId, nlink: i32, now: Timestamp) -> R<Edit> {
    let mut a = cached(view, dir)?.attr;
    a.mtime = Engine::stamp_after(a.mtime, now);
    a.nlink = (a.nlink as i64 + nlink as i64).max(0) as u32;
    Ok(Edit::attr(a))
}

/// What to make (see [`Engine::make`]).
#[derive(Clone, Debug)]
pub struct Make<'a> {
    /// The directory.
    pub parent: ObjectId,
    /// The new name.
    pub name: &'a [u8],
    /// Its kind.
    pub kind: FileKind,
    /// Mode bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// A symlink's target.
    pub target: Option<&'a [u8]>,
    /// A device node's number.
    pub rdev: u32,
    /// Whether the server allows device nodes (`None`: not known yet,
    /// the server decides when the change is sent).
    pub trusted: Option<bool>,
}

impl Engine {
    /// Create a file, directory, symlink, fifo, socket or device node with
    /// the new id `id`. The shell creates a file's (empty) data file.
    pub fn make(&mut self, view: &dyn View, m: Make<'_>, id: ObjectId, now: Now) -> R<Local> {
        let (edits, op) = Self::plan_make(view, m, id, now)?;
        self.commit(view, edits, Some(op), None, now, Local::default())
    }

    /// The local effect of a create the server applied first (an O_EXCL
    /// create while connected: sent, then made here with the server's
    /// attributes). `None` if the cache has it already (its record came
    /// first).
    pub fn made_remotely(
        &mut self,
        view: &dyn View,
        m: Make<'_>,
        id: ObjectId,
        applied: Option<&Applied>,
        now: Now,
    ) -> R<Option<Local>> {
        if view.get(id)?.is_some() {
            return Ok(None);
        }
        let parent = m.parent;
        let (mut edits, _) = Self::plan_make(view, m, id, now)?;
        if let (Some(Edit::Put { attr, .. }), Some(a)) = (edits.first_mut(), applied.and_then(|a| a.attr.as_ref())) {
            *attr = a.clone();
        }
        // (the directory's mtime as the server set it: asked for once idle,
        // as its answer carries only the new file's attributes)
        self.refresh_again(parent, false);
        self.commit(view, edits, None, None, now, Local::default()).map(Some)
    }

    /// What a create changes here, and the op it sends.
    pub fn plan_make(view: &dyn View, m: Make<'_>, id: ObjectId, now: Now) -> R<(Vec<Edit>, Op)> {
        rules::create(&Ns(view), m.parent, m.name)?;
        match m.kind {
            FileKind::Symlink => rules::symlink_target(m.target.unwrap_or_default())?,
            FileKind::File | FileKind::Dir => {}
            // (before any handshake the server decides when it is sent)
            k => rules::mknod_kind(k, m.trusted.unwrap_or(true))?,
        }
        let pobj = dir(view, m.parent)?;
        let pid = m.parent;
        // a setgid directory passes on its group, and to a subdirectory its
        // setgid bit too, as local file systems do
        let (mode, gid) = match (pobj.attr.mode & libc::S_ISGID != 0, m.kind) {
            (true, FileKind::Dir) => (m.mode | libc::S_ISGID, pobj.attr.gid),
            (true, _) => (m.mode, pobj.attr.gid),
            (false, _) => (m.mode, m.gid),
        };
        let (kind, uid) = (m.kind, m.uid);
        let name = m.name.to_vec();
        let target = m.target.map(|t| t.to_vec());
        let attr = Attr {
            id,
            kind,
            mode: if kind == FileKind::Symlink { 0o777 } else { mode & 0o7777 },
            uid,
            gid,
            size: target.as_ref().map(|t| t.len() as u64).unwrap_or(0),
            mtime: now.wall,
            atime: now.wall,
            nlink: if kind == FileKind::Dir { 2 } else { 1 },
            versions: Versions::default(),
            rdev: if kind.is_device() { m.rdev } else { 0 },
        };
        let op = match kind {
            FileKind::File => Op::Create { parent: pid, name: name.clone(), id, mode, uid, gid },
            FileKind::Dir => Op::Mkdir { parent: pid, name: name.clone(), id, mode, uid, gid },
            FileKind::Symlink => Op::Symlink {
                parent: pid,
                name: name.clone(),
                id,
                target: target.clone().unwrap_or_default(),
                uid,
                gid,
            },
            k => Op::Mknod { parent: pid, name: name.clone(), id, kind: k, mode, uid, gid, rdev: attr.rdev },
        };
        let edits = vec![
            Edit::Put { attr, target, xattrs: Some(Vec::new()) },
            Edit::Link { parent: pid, name, id },
            touch(view, pid, if kind == FileKind::Dir { 1 } else { 0 }, now.wall)?,
        ];
        Ok((edits, op))
    }

    /// Remove a name (a directory with `is_dir`). A file whose every op is
    /// still unsent goes without a trace (its ops are cancelled).
    pub fn remove(&mut self, view: &dyn View, pid: ObjectId, name: &[u8], is_dir: bool, now: Now) -> R<Local> {
        rules::parent_dir(&Ns(view), pid)?;
        let id = view.lookup(pid, name)?.ok_or(ReplicaError::NotFound)?;
        rules::removable(&Ns(view), id, is_dir, name)?;
        let obj = cached(view, id)?;
        let name = name.to_vec();
        let mut edits = vec![Edit::UnlinkIf { parent: pid, name: name.clone(), id }];
        let mut a = obj.attr.clone();
        a.nlink = if is_dir { 0 } else { a.nlink.saturating_sub(1) };
        let last = a.nlink == 0;
        edits.push(Edit::attr(a));
        if last {
            edits.push(Edit::Forget { id });
        }
        edits.push(touch(view, pid, if is_dir { -1 } else { 0 }, now.wall)?);
        let cancel = if last && !is_dir { self.cancellable(id) } else { None };
        let op = match cancel {
            Some(lsns) => {
                for l in lsns {
                    self.c.q.remove(&l);
                    self.c.release(l);
                    edits.push(Edit::CmlDone(l));
                }
                // the directory's server mtime, once it is idle (flagged
                // with this change: a crash after the next fold keeps it)
                self.c.refresh.push((pid, false));
                edits.push(super::refresh_flag(pid, true));
                None
            }
            None => {
                // (the base now: the object may be gone from the cache by
                // the time this is sent)
                let expect = Expect { id, base: obj.attr.versions };
                Some(if is_dir {
                    Op::Rmdir { parent: pid, name, expect }
                } else {
                    Op::Unlink { parent: pid, name, expect }
                })
            }
        };
        if last && self.c.dirty.remove(&id).is_some() {
            edits.push(Edit::Sealed { id }); // nobody will read those bytes
        }
        let l = Local { gone: last.then_some((id, obj.ino)), ..Local::default() };
        self.commit(view, edits, op, None, now, l)
    }

    /// The lsns a last unlink of `id` may cancel (see `Cml::cancellable`),
    /// or with the test switch on, also ops already sent.
    pub(super) fn cancellable(&self, id: ObjectId) -> Option<Vec<u64>> {
        if self.opts.break_never_cancel_sent {
            return self.c.cancellable_ignoring_sent(id);
        }
        self.c.cancellable(id)
    }

    /// Rename (`mode`: replace, no-replace or exchange).
    #[allow(clippy::too_many_arguments)]
    pub fn rename(
        &mut self,
        view: &dyn View,
        pid: ObjectId,
        name: &[u8],
        npid: ObjectId,
        new_name: &[u8],
        mode: RenameMode,
        now: Now,
    ) -> R<Local> {
        let r = rules::rename(&Ns(view), (pid, name), (npid, new_name), mode)?;
        let id = r.src;
        let obj = cached(view, id)?;
        let tobj = match r.case {
            RenameCase::Same => return Ok(Local::default()), // two names of one object: nothing
            RenameCase::Move => None,
            RenameCase::Replace(t) | RenameCase::Exchange(t) => Some(cached(view, t)?),
        };
        let is_dir = obj.attr.kind == FileKind::Dir;
        let (name, new_name) = (name.to_vec(), new_name.to_vec());
        let mut edits = Vec::new();
        let mut last = None;
        let mut dn: i32 = 0; // subdirectory count change of the old parent
        let mut ndn: i32 = 0; // and of the new one
        match (&tobj, mode) {
            (Some(t), RenameMode::Exchange) => {
                edits.push(Edit::Link { parent: pid, name: name.clone(), id: t.attr.id });
                let tdir = t.attr.kind == FileKind::Dir;
                if tdir != is_dir && pid != npid {
                    let d = if is_dir { 1 } else { -1 };
                    dn -= d;
                    ndn += d;
                }
            }
            _ => {
                edits.push(Edit::UnlinkIf { parent: pid, name: name.clone(), id });
                if is_dir && pid != npid {
                    dn -= 1;
                    ndn += 1;
                }
                if let Some(t) = &tobj {
                    let mut a = t.attr.clone();
                    a.nlink = if a.kind == FileKind::Dir { 0 } else { a.nlink.saturating_sub(1) };
                    if a.kind == FileKind::Dir {
                        ndn -= 1;
                    }
                    if a.nlink == 0 {
                        last = Some((a.id, t.ino));
                    }
                    edits.push(Edit::attr(a));
                    if let Some((tid, _)) = last {
                        edits.push(Edit::Forget { id: tid });
                    }
                }
            }
        }
        edits.push(Edit::Link { parent: npid, name: new_name.clone(), id });
        if pid == npid {
            edits.push(touch(view, pid, dn + ndn, now.wall)?);
        } else {
            edits.push(touch(view, pid, dn, now.wall)?);
            edits.push(touch(view, npid, ndn, now.wall)?);
        }
        let op = Op::Rename {
            parent: pid,
            name,
            expect: Expect { id, base: obj.attr.versions },
            new_parent: npid,
            new_name,
            target: tobj.as_ref().map(|t| Expect { id: t.attr.id, base: t.attr.versions }),
            mode,
        };
        if let Some((tid, _)) = last {
            if self.c.dirty.remove(&tid).is_some() {
                edits.push(Edit::Sealed { id: tid });
            }
        }
        let mut l = Local { gone: last, ..Local::default() };
        // writes to what moves reach the server before the move (write,
        // rename, then close: other replicas never see the new name
        // without the bytes)
        l.queued.extend(self.seal_into(view, id, &mut edits));
        if let (RenameMode::Exchange, Some(t)) = (mode, &tobj) {
            l.queued.extend(self.seal_into(view, t.attr.id, &mut edits));
        }
        self.commit(view, edits, Some(op), None, now, l)
    }

    /// A new name for a non-directory.
    pub fn link(&mut self, view: &dyn View, id: ObjectId, npid: ObjectId, new_name: &[u8], now: Now) -> R<Local> {
        rules::link(&Ns(view), id, npid, new_name)?;
        let obj = cached(view, id)?;
        let mut a = obj.attr.clone();
        a.nlink += 1;
        let mut edits = vec![
            Edit::attr(a),
            Edit::Link { parent: npid, name: new_name.to_vec(), id },
            touch(view, npid, 0, now.wall)?,
        ];
        let op = Op::Link { id, parent: npid, name: new_name.to_vec() };
        let mut l = Local::default();
        l.queued.extend(self.seal_into(view, id, &mut edits));
        self.commit(view, edits, Some(op), None, now, l)
    }

    /// Bytes were written to a file's data file at `offset` (and the range
    /// logged): they are sent later, sealed into entries. A file removed
    /// while open keeps them local.
    pub fn wrote(&mut self, view: &dyn View, id: ObjectId, offset: u64, len: u64, now: Now) -> R<Local> {
        let obj = cached(view, id)?;
        rules::data_target(id, obj.attr.kind)?;
        let mut a = obj.attr.clone();
        a.size = a.size.max(offset + len);
        a.mtime = Self::stamp_after(a.mtime, now.wall);
        if obj.attr.nlink > 0 {
            self.c.dirty(id, offset, len);
        }
        self.commit(view, vec![Edit::attr(a)], None, None, now, Local::default())
    }

    /// An O_APPEND write of `data`, already in the data file at `at` (the
    /// local end of file): queued at once, online or not, as one
    /// [`Op::Append`] carrying its bytes (a `write(2)` is never split),
    /// behind the object's unsealed writes (so the server's end of file is
    /// where this replica's was). The server places it at `at` when
    /// nothing moved there, else at its own end of file; the replica then
    /// takes the file from the server once its changes are through (the
    /// foreign records held back while it was busy mark it stale).
    pub fn append(&mut self, view: &dyn View, id: ObjectId, at: u64, data: Vec<u8>, now: Now) -> R<Local> {
        let obj = cached(view, id)?;
        rules::data_target(id, obj.attr.kind)?;
        let len = data.len() as u64;
        let mut a = obj.attr.clone();
        a.size = a.size.max(at + len);
        a.mtime = Self::stamp_after(a.mtime, now.wall);
        if obj.attr.nlink == 0 {
            // open but removed: nobody else will see these bytes
            return self.commit(view, vec![Edit::attr(a)], None, None, now, Local::default());
        }
        let mut l = Local::default();
        let mut edits = Vec::new();
        l.queued.extend(self.seal_into(view, id, &mut edits));
        edits.push(Edit::attr(a));
        let op = Op::Append { id, base: 0, local_offset: at, data };
        let mut l = self.commit(view, edits, Some(op), None, now, l)?;
        // (its bytes count in the backlog; they are in the op, not read
        // from the data file when sent)
        if let Some(&lsn) = l.queued.last() {
            if let Some((e, _)) = self.c.q.get_mut(&lsn) {
                e.len = len;
            }
            for edit in l.edits.iter_mut().rev() {
                if let Edit::Cml(n, e) = edit {
                    if *n == lsn {
                        e.len = len;
                        break;
                    }
                }
            }
        }
        Ok(l)
    }

    /// Does a write to this object need its range logged (it has names)?
    pub fn write_is_shared(view: &dyn View, id: ObjectId) -> R<bool> {
        let obj = cached(view, id)?;
        rules::data_target(id, obj.attr.kind)?;
        Ok(obj.attr.nlink > 0)
    }

    /// A file was written behind the daemon's back (a passthrough open):
    /// its whole content (`size` bytes now, its range logged by the shell)
    /// counts as written; a shorter file is truncated on the server first.
    pub fn rewritten(&mut self, view: &dyn View, id: ObjectId, size: u64, now: Now) -> R<Option<Local>> {
        let obj = cached(view, id)?;
        if obj.attr.kind != FileKind::File {
            return Ok(None);
        }
        let mut a = obj.attr.clone();
        a.size = size;
        a.mtime = Self::stamp_after(a.mtime, now.wall);
        if obj.attr.nlink == 0 {
            return self.commit(view, vec![Edit::attr(a)], None, None, now, Local::default()).map(Some);
        }
        let mut l = Local::default();
        let mut edits = Vec::new();
        if size < obj.attr.size {
            // (shorter: the server must shrink it too)
            l.queued.extend(self.seal_into(view, id, &mut edits));
            let e = Self::entry(view, Op::Truncate { id, base: 0, size }, 0, &edits);
            let lsn = self.c.push(e.clone());
            edits.push(Edit::Cml(lsn, e));
            l.queued.push(lsn);
        }
        if size > 0 {
            self.c.dirty(id, 0, size);
        }
        edits.push(Edit::attr(a));
        l.queued.extend(self.seal_into(view, id, &mut edits));
        self.commit(view, edits, None, None, now, l).map(Some)
    }

    /// fallocate(2) done on the data file: `punch` deallocates (keeping the
    /// size), else `offset..offset+len` is allocated (the size may grow).
    pub fn allocated(
        &mut self,
        view: &dyn View,
        id: ObjectId,
        offset: u64,
        len: u64,
        punch: bool,
        now: Now,
    ) -> R<Local> {
        let obj = cached(view, id)?;
        let mut a = obj.attr.clone();
        let op = if punch {
            Op::PunchHole { id, base: 0, offset, len }
        } else {
            a.size = a.size.max(offset + len);
            Op::Allocate { id, base: 0, offset, len }
        };
        a.mtime = Self::stamp_after(a.mtime, now.wall);
        let mut l = Local::default();
        let mut edits = Vec::new();
        l.queued.extend(self.seal_into(view, id, &mut edits));
        edits.push(Edit::attr(a));
        let op = (obj.attr.nlink > 0).then_some(op);
        self.commit(view, edits, op, None, now, l)
    }

    /// Change attributes; `size` truncates (the shell sets the data file's
    /// length). `attrs` is what the caller asks, set-id clearing included.
    pub fn setattr(
        &mut self,
        view: &dyn View,
        id: ObjectId,
        size: Option<u64>,
        attrs: SetAttrs,
        trusted: bool,
        now: Now,
    ) -> R<Local> {
        let obj = cached(view, id)?;
        // what the server will store (a symlink has no mode; an untrusted
        // volume keeps no set-id bits)
        let attrs = rules::setattr(obj.attr.kind, &attrs, trusted)?;
        if size.is_none() && attrs == SetAttrs::default() {
            // nothing to set (a chown to -1:-1): the status still changed
            return Ok(Local { edits: vec![Edit::Ctime { id, time: now.wall }], ..Local::default() });
        }
        let mut a = obj.attr.clone();
        let mut ops = Vec::new();
        if let Some(size) = size {
            rules::data_target(id, a.kind)?;
            a.size = size;
            a.mtime = Self::stamp_after(a.mtime, now.wall);
            ops.push(Op::Truncate { id, base: 0, size });
        }
        if attrs != SetAttrs::default() {
            if let Some(m) = attrs.mode {
                a.mode = m & 0o7777;
            }
            if let Some(u) = attrs.uid {
                a.uid = u;
            }
            if let Some(g) = attrs.gid {
                a.gid = g;
            }
            if let Some(t) = attrs.mtime {
                a.mtime = t;
            }
            if let Some(t) = attrs.atime {
                a.atime = t;
            }
            ops.push(Op::SetAttr { id, base: 0, attrs });
        }
        let mut l = Local::default();
        let mut edits = Vec::new();
        // writes before this reach the server before it (an explicit mtime
        // after a write must stay, as tar and rsync set it)
        l.queued.extend(self.seal_into(view, id, &mut edits));
        edits.push(Edit::attr(a));
        if obj.attr.nlink == 0 && obj.attr.kind == FileKind::File {
            ops.clear(); // open but removed: local only
        }
        let mut last = ops.pop();
        for op in ops {
            let e = Self::entry(view, op, 0, &edits);
            let lsn = self.c.push(e.clone());
            edits.push(Edit::Cml(lsn, e));
            l.queued.push(lsn);
        }
        // tar sets times, owner and mode one call after another: a SetAttr
        // right behind an unsent SetAttr of the same object joins it (the
        // later values win), one op for the server instead of three
        if let Some(Op::SetAttr { attrs: next, .. }) = &last {
            let joined = if self.opts.break_never_cancel_sent {
                self.c.merge_setattr_ignoring_sent(id, next)
            } else {
                self.c.merge_setattr(id, next)
            };
            if let Some((lsn, e)) = joined {
                edits.push(Edit::Cml(lsn, e.clone()));
                l.merged = Some((lsn, e));
                last = None;
            }
        }
        self.commit(view, edits, last, None, now, l)
    }

    /// Set (`value`) or remove an extended attribute: in the cache at once,
    /// online or not, and queued. Refused here as the server would refuse
    /// it, by the volume's `rules` as last known (`None`: never connected;
    /// the names and values are still checked as on a trusted volume, and
    /// the server decides the rest when the change is sent). An access ACL
    /// sets the mode bits it implies, as the server does.
    pub fn set_xattr(
        &mut self,
        view: &dyn View,
        id: ObjectId,
        name: &[u8],
        value: Option<&[u8]>,
        rules: Option<&VolumeRules>,
        now: Now,
    ) -> R<Local> {
        let obj = cached(view, id)?;
        if value.is_none() && !obj.xattrs.iter().any(|(n, _)| n == name) {
            return Err(ReplicaError::NotFound);
        }
        rules::xattr::check(name, value, obj.attr.kind, rules.is_none_or(|r| r.trusted))?;
        if let (Some(v), Some(r)) = (value, rules) {
            let others = obj.xattrs.iter().map(|(n, v)| (n.as_slice(), v.len()));
            rules::xattr::fits(rules::xattr::room_taken(others, name, v.len()), r.xattr_room, id)?;
        }
        let mut x = obj.xattrs.clone();
        x.retain(|(n, _)| n != name);
        if let Some(v) = value {
            x.push((name.to_vec(), v.to_vec()));
            x.sort();
        }
        let mut a = obj.attr.clone();
        if let (Some(v), true) = (value, rules::xattr::is_access_acl(name)) {
            a.mode = (a.mode & 0o7000) | rules::xattr::acl_mode(v);
        }
        let edits = vec![Edit::Put { attr: a, target: None, xattrs: Some(x) }];
        if obj.attr.nlink == 0 && obj.attr.kind == FileKind::File {
            // open but removed: local only
            return self.commit(view, edits, None, None, now, Local::default());
        }
        let op = match value {
            Some(v) => Op::SetXattr { id, base: 0, name: name.to_vec(), value: v.to_vec() },
            None => Op::RemoveXattr { id, base: 0, name: name.to_vec() },
        };
        self.commit(view, edits, Some(op), None, now, Local::default())
    }

    /// A write or truncate to `end` bytes, by the volume's largest file size
    /// as last known (refused here as the server would: EFBIG).
    pub fn size_allowed(end: u64, rules: Option<&VolumeRules>) -> R<()> {
        match rules {
            Some(r) if end > r.max_file_size => Err(OpError::FileTooBig { max: r.max_file_size }.into()),
            _ => Ok(()),
        }
    }

    /// Queue an op whose result the caller waits for (an append, an
    /// xattr change: their local effect comes with the answer), behind
    /// everything queued. A data op is stamped now.
    pub fn queue_wait(&mut self, view: &dyn View, op: Op, now: Now) -> R<Local> {
        let stamp = match (op.data_target(), op.new_object()) {
            (Some(id), _) => Some(Self::stamp_after(cached(view, id)?.attr.mtime, now.wall)),
            // a create waited for (O_EXCL): made here afterwards at `now`
            // (`Engine::made_remotely`), the time its directory takes too
            (None, Some(_)) => Some(now.wall),
            (None, None) => None,
        };
        let l = self.commit(view, Vec::new(), Some(op), stamp, now, Local::default())?;
        self.waiting.extend(l.queued.iter().copied());
        Ok(l)
    }

    /// A waited op got no answer in time (or the connection is gone).
    pub fn withdraw(&mut self, lsn: u64) -> Withdraw {
        self.waiting.remove(&lsn);
        match self.c.q.get(&lsn) {
            Some((_, false)) => {
                self.c.q.remove(&lsn);
                self.c.release(lsn);
                self.c.done.push(lsn);
                Withdraw::Withdrawn
            }
            Some((_, true)) => Withdraw::Sent,
            None => Withdraw::Gone,
        }
    }

    /// The local effect of an answered append of `len` bytes at `at`: the
    /// server's attributes (its mtime), unless the stream already brought
    /// newer ones.
    pub fn appended(view: &dyn View, id: ObjectId, at: u64, len: u64, applied: Option<&Applied>) -> R<Edit> {
        let mut a = cached(view, id)?.attr;
        match applied.and_then(|a| a.attr.clone()) {
            Some(s) if s.versions.data >= a.versions.data => a = s,
            _ => a.size = a.size.max(at + len),
        }
        Ok(Edit::attr(a))
    }
}

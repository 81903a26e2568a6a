//! Mutations through the mount: applied to the cache at once and queued in
//! the client modification log (see `cml.rs`), then sent in order by one
//! sender task, pipelined. A `write(2)` returns once its bytes are in the
//! data file and its range in the append-only log (durable against a
//! SIGKILL of the daemon); `fsync` and `izo sync` wait for the server.

use crate::cache::{with_ctime, Cached, CmlEntry, Edit, Parked, ROOT_INO};
use crate::cml::{objs, Cml};
use crate::replica::{io, open_data, punch_fd, Replica, ReplicaError};
use crate::{ClientError, Pending};
use izo_proto::*;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant};

type R<T> = Result<T, ReplicaError>;

/// How long a call waits for the server without any answer arriving.
const NO_PROGRESS: Duration = Duration::from_secs(1);
/// Longest a call waits for a connected server that answers heartbeats but
/// not yet this op (a backlog of queued changes ahead of it, a loaded
/// machine); a server that is away is noticed within 1 s instead.
const BUSY_SERVER_WAIT: Duration = Duration::from_secs(10);
/// How long `fsync` waits for the server's ack while connected.
const FSYNC_WAIT: Duration = Duration::from_secs(1);
/// Unsealed writes are sealed into log entries this often.
const SEAL_EVERY: Duration = Duration::from_millis(500);
/// The log of local changes is folded into a durable commit this often.
const FOLD_EVERY: Duration = Duration::from_secs(1);

/// `mode` without the bits a chown or an unprivileged write clears
/// (set-user-ID; set-group-ID when group-executable, as the kernel does),
/// if any of them is set.
pub fn killed_mode(mode: u32) -> Option<u32> {
    let mut m = mode & !libc::S_ISUID;
    let sgid_x = libc::S_ISGID | libc::S_IXGRP;
    if mode & sgid_x == sgid_x {
        m &= !libc::S_ISGID;
    }
    (m != mode).then_some(m)
}

fn lock<T>(m: &std::sync::Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn valid(name: &[u8]) -> R<()> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(OpError::bad_name(name).into())
    }
}

impl Replica {
    /// Load the modification log left by an earlier run (a SIGKILL's log
    /// replayed, unsealed writes sealed) and number new ops after it.
    pub(crate) fn recover_cml(&self) -> R<()> {
        let (dirty, touched) = self.cache.replay_log()?;
        let entries = self.cache.cml()?;
        let g = lock(&self.apply);
        let mut c = lock(&self.cml);
        // (after every queued and every parked entry: a parked one's key
        // is never reused)
        let parked_next = self.cache.parked()?.last().map(|(l, _)| l + 1).unwrap_or(0);
        c.next_lsn =
            self.client.next_cseq().max(entries.last().map(|(l, _)| l + 1).unwrap_or(0)).max(parked_next).max(1);
        // (counted as sent: any of them may have reached the server before
        // the restart, so none may be cancelled or joined any more; the
        // sender sends them all again in order, the server's reply cache
        // answers those it applied)
        for (lsn, e) in entries {
            c.hold(lsn, objs(&e.op));
            c.q.insert(lsn, (e, true));
        }
        c.dirty = dirty;
        c.refresh = touched.into_iter().map(|id| (id, false)).collect();
        let ids: Vec<ObjectId> = c.dirty.keys().copied().collect();
        let mut edits = Vec::new();
        for id in ids {
            self.seal_into(&mut c, id, &mut edits);
        }
        if !edits.is_empty() {
            self.cache.local(&edits)?;
        }
        if !c.q.is_empty() {
            tracing::info!("{} changes made before the restart are still to be sent", c.q.len());
        }
        drop(c);
        drop(g);
        // files a killed daemon had open beside passthrough readers: what
        // was written to them went to the data file unseen
        // (each marker is dropped only once its file is taken: a kill
        // meanwhile leaves it for the next start)
        for (id, opens) in self.cache.open_writers() {
            if let Some(obj) = self.cache.get(id)? {
                self.rewritten(obj.ino)?;
            }
            for _ in 0..opens {
                self.cache.log_writer(id, false)?;
            }
        }
        Ok(())
    }

    /// A writable open beside passthrough readers began: its writes reach
    /// the data file without the daemon seeing them, so the open is logged
    /// first (a SIGKILL before its release must not lose them).
    pub fn writer_opened(&self, ino: u64) -> R<()> {
        self.check_writable()?;
        let (id, _) = self.get(ino)?;
        Ok(self.cache.log_writer(id, true)?)
    }

    /// Such an open was released: its writes are taken as one rewrite.
    pub fn writer_released(&self, ino: u64) -> R<()> {
        self.rewritten(ino)?;
        let (id, _) = self.get(ino)?;
        Ok(self.cache.log_writer(id, false)?)
    }

    /// Turn an object's unsealed write ranges into log entries (each at
    /// most [`MAX_DATA`] bytes), in `edits`.
    fn seal_into(&self, c: &mut Cml, id: ObjectId, edits: &mut Vec<Edit>) {
        let Some(ranges) = c.dirty.remove(&id) else { return };
        for (off, len) in ranges {
            let mut at = off;
            while at < off + len {
                let n = (off + len - at).min(MAX_DATA as u64);
                let e = self.entry(Op::Write { id, base: 0, offset: at, data: Vec::new() }, n, edits);
                let lsn = c.push(e.clone());
                edits.push(Edit::Cml(lsn, e));
                at += n;
            }
        }
        edits.push(Edit::Sealed { id });
    }

    /// Apply `edits` locally and queue `op` after them (if any). Every
    /// object they change gets a new ctime.
    fn commit_local(&self, c: &mut Cml, edits: Vec<Edit>, op: Option<Op>) -> R<Option<u64>> {
        self.commit_local_at(c, edits, op, None)
    }

    /// [`Replica::commit_local`] with the op's stamp given (a change whose
    /// local effect comes only after the server's answer).
    fn commit_local_at(
        &self,
        c: &mut Cml,
        edits: Vec<Edit>,
        op: Option<Op>,
        stamp: Option<Timestamp>,
    ) -> R<Option<u64>> {
        let mut edits = with_ctime(edits, Timestamp::now());
        // (answers ride along: they need not survive a crash)
        edits.extend(c.done.drain(..).map(Edit::CmlDone));
        // server attributes of objects that went idle come first: this
        // change's own edits win over them
        let mut ready = Vec::new();
        for a in std::mem::take(&mut c.ready) {
            if self.cache.get(a.id)?.is_some() {
                ready.push(Edit::attr(a));
            }
        }
        if !ready.is_empty() {
            ready.append(&mut edits);
            edits = ready;
        }
        let lsn = op.map(|op| {
            let mut e = self.entry(op, 0, &edits);
            if stamp.is_some() {
                e.time = stamp;
            }
            let lsn = c.push(e.clone());
            edits.push(Edit::Cml(lsn, e));
            lsn
        });
        if let Err(e) = self.cache.local(&edits) {
            // not applied: forget the queued op too
            if let Some(l) = lsn {
                c.q.remove(&l);
                c.release(l);
            }
            return Err(e.into());
        }
        self.cml_wake.notify_one();
        Ok(lsn)
    }

    fn now(&self) -> Timestamp {
        Timestamp::now()
    }

    /// An implicit mtime for an object whose mtime is `current`: now, or
    /// just after `current` if that is later (an implicit stamp never goes
    /// backwards; the server applies the same rule).
    fn stamp_after(&self, current: Timestamp, now: Timestamp) -> Timestamp {
        if now > current {
            return now;
        }
        match current.nsec {
            n if n >= 999_999_999 => Timestamp { secs: current.secs + 1, nsec: 0 },
            n => Timestamp { secs: current.secs, nsec: n + 1 },
        }
    }

    /// When `op` was made here: the implicit mtime it gave the object it
    /// writes or makes, or the directory whose entries it changes, as
    /// `edits` (about to be applied) or else the cache hold it. `None` for
    /// attribute and xattr changes, which set no implicit mtime.
    fn stamp(&self, op: &Op, edits: &[Edit]) -> Option<Timestamp> {
        let target = match op {
            Op::Create { id, .. } | Op::Mkdir { id, .. } | Op::Symlink { id, .. } | Op::Mknod { id, .. } => *id,
            Op::Write { id, .. } | Op::Truncate { id, .. } | Op::Allocate { id, .. } | Op::PunchHole { id, .. } => *id,
            Op::Link { parent, .. } | Op::Unlink { parent, .. } | Op::Rmdir { parent, .. } => *parent,
            Op::Rename { new_parent, .. } => *new_parent,
            Op::SetAttr { .. } | Op::SetXattr { .. } | Op::RemoveXattr { .. } => return None,
        };
        let queued = edits.iter().rev().find_map(|e| match e {
            Edit::Put { attr, .. } if attr.id == target => Some(attr.mtime),
            _ => None,
        });
        queued.or_else(|| self.cache.get(target).ok().flatten().map(|c| c.attr.mtime))
    }

    /// A CML entry for `op` (of `len` bytes for a write), stamped.
    fn entry(&self, op: Op, len: u64, edits: &[Edit]) -> CmlEntry {
        let time = self.stamp(&op, edits);
        CmlEntry { op, len, time }
    }

    fn touch(&self, dir: ObjectId, nlink: i32, now: Timestamp) -> R<Edit> {
        let mut a = self.cached(dir)?.attr;
        a.mtime = self.stamp_after(a.mtime, now);
        a.nlink = (a.nlink as i64 + nlink as i64).max(0) as u32;
        Ok(Edit::attr(a))
    }

    fn dir(&self, ino: u64) -> R<(ObjectId, Cached)> {
        let (id, c) = self.get(ino)?;
        if c.attr.kind != FileKind::Dir {
            return Err(ReplicaError::NotDir);
        }
        Ok((id, c))
    }

    /// Create a file, directory, symlink, fifo or socket.
    #[allow(clippy::too_many_arguments)]
    pub fn create(
        &self,
        parent: u64,
        name: &[u8],
        kind: FileKind,
        mode: u32,
        uid: u32,
        gid: u32,
        target: Option<&[u8]>,
    ) -> R<Cached> {
        self.make(parent, name, kind, mode, uid, gid, target, 0)
    }

    /// Create a fifo, socket or device node (`rdev`: its device number). A
    /// device node only on a trusted volume, as the server would refuse it;
    /// it has no data file: opening it opens the device on this machine.
    #[allow(clippy::too_many_arguments)]
    pub fn mknod(
        &self,
        parent: u64,
        name: &[u8],
        kind: FileKind,
        mode: u32,
        uid: u32,
        gid: u32,
        rdev: u32,
    ) -> R<Cached> {
        self.make(parent, name, kind, mode, uid, gid, None, rdev)
    }

    #[allow(clippy::too_many_arguments)]
    fn make(
        &self,
        parent: u64,
        name: &[u8],
        kind: FileKind,
        mode: u32,
        uid: u32,
        gid: u32,
        target: Option<&[u8]>,
        rdev: u32,
    ) -> R<Cached> {
        self.check_writable()?;
        valid(name)?;
        // what the server decides, known from the handshake (offline before
        // any handshake the server decides when the change is sent)
        if kind.is_device() && self.client.welcome().is_some_and(|w| !w.trusted) {
            return Err(ReplicaError::NotPermitted);
        }
        let _g = lock(&self.apply);
        let (pid, pobj) = self.dir(parent)?;
        if self.cache.lookup(pid, name)?.is_some() {
            return Err(ReplicaError::Exists);
        }
        // a setgid directory passes on its group, and to a subdirectory its
        // setgid bit too, as local file systems do
        let (mode, gid) = match (pobj.attr.mode & libc::S_ISGID != 0, kind) {
            (true, FileKind::Dir) => (mode | libc::S_ISGID, pobj.attr.gid),
            (true, _) => (mode, pobj.attr.gid),
            (false, _) => (mode, gid),
        };
        let id = ObjectId::new();
        let name = name.to_vec();
        let target = target.map(|t| t.to_vec());
        let now = self.now();
        let attr = Attr {
            id,
            kind,
            mode: if kind == FileKind::Symlink { 0o777 } else { mode & 0o7777 },
            uid,
            gid,
            size: target.as_ref().map(|t| t.len() as u64).unwrap_or(0),
            mtime: now,
            atime: now,
            nlink: if kind == FileKind::Dir { 2 } else { 1 },
            versions: Versions::default(),
            rdev: if kind.is_device() { rdev } else { 0 },
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
        if kind == FileKind::File {
            let path = self.cache.data_path(id);
            File::create(&path).map_err(io(&path))?;
        }
        let edits = vec![
            Edit::Put { attr, target, xattrs: Some(Vec::new()) },
            Edit::Link { parent: pid, name, id },
            self.touch(pid, if kind == FileKind::Dir { 1 } else { 0 }, now)?,
        ];
        let mut c = lock(&self.cml);
        self.commit_local(&mut c, edits, Some(op))?;
        drop(c);
        self.cached(id)
    }

    /// Remove a name (a directory with `dir`).
    pub fn remove(&self, parent: u64, name: &[u8], dir: bool) -> R<()> {
        self.check_writable()?;
        let gone = {
            let _g = lock(&self.apply);
            let (pid, _) = self.dir(parent)?;
            let id = self.cache.lookup(pid, name)?.ok_or(ReplicaError::NotFound)?;
            let obj = self.cached(id)?;
            if dir != (obj.attr.kind == FileKind::Dir) {
                return Err(if dir { ReplicaError::NotDir } else { ReplicaError::IsDir });
            }
            if dir && !self.cache.children(id)?.is_empty() {
                return Err(ReplicaError::NotEmpty);
            }
            let name = name.to_vec();
            let mut edits = vec![Edit::UnlinkIf { parent: pid, name: name.clone(), id }];
            let mut a = obj.attr.clone();
            a.nlink = if dir { 0 } else { a.nlink.saturating_sub(1) };
            let last = a.nlink == 0;
            edits.push(Edit::attr(a));
            if last {
                edits.push(Edit::Forget { id });
            }
            edits.push(self.touch(pid, if dir { -1 } else { 0 }, self.now())?);
            let mut c = lock(&self.cml);
            // a file whose every op is still unsent goes without a trace
            let cancel = if last && !dir { c.cancellable(id) } else { None };
            let op = match cancel {
                Some(lsns) => {
                    for l in lsns {
                        c.q.remove(&l);
                        c.release(l);
                        edits.push(Edit::CmlDone(l));
                    }
                    // the directory's server mtime, once it is idle
                    c.refresh.push((pid, false));
                    None
                }
                None => {
                    // (the base now: the object may be gone from the cache
                    // by the time this is sent)
                    let expect = Expect { id, base: obj.attr.versions };
                    Some(if dir {
                        Op::Rmdir { parent: pid, name, expect }
                    } else {
                        Op::Unlink { parent: pid, name, expect }
                    })
                }
            };
            if last && c.dirty.remove(&id).is_some() {
                edits.push(Edit::Sealed { id }); // nobody will read those bytes
            }
            self.commit_local(&mut c, edits, op)?;
            last.then_some((id, obj.ino))
        };
        if let Some((id, ino)) = gone {
            if !self.is_open(ino) {
                self.purge(id)?;
            }
        }
        Ok(())
    }

    /// Rename (`mode`: replace, no-replace or exchange).
    pub fn rename(&self, parent: u64, name: &[u8], new_parent: u64, new_name: &[u8], mode: RenameMode) -> R<()> {
        self.check_writable()?;
        valid(new_name)?;
        let gone = {
            let _g = lock(&self.apply);
            let (pid, _) = self.dir(parent)?;
            let (npid, _) = self.dir(new_parent)?;
            let id = self.cache.lookup(pid, name)?.ok_or(ReplicaError::NotFound)?;
            let obj = self.cached(id)?;
            let target = self.cache.lookup(npid, new_name)?;
            if mode == RenameMode::Exchange && target.is_none() {
                return Err(ReplicaError::NotFound);
            }
            if mode == RenameMode::NoReplace && target.is_some() {
                return Err(ReplicaError::Exists);
            }
            if target == Some(id) {
                return Ok(()); // two names of one object: rename(2) does nothing
            }
            let tobj = match target {
                Some(t) => Some(self.cached(t)?),
                None => None,
            };
            let is_dir = obj.attr.kind == FileKind::Dir;
            if let (Some(t), RenameMode::Replace | RenameMode::NoReplace) = (&tobj, mode) {
                let tdir = t.attr.kind == FileKind::Dir;
                if tdir && !is_dir {
                    return Err(ReplicaError::IsDir);
                }
                if !tdir && is_dir {
                    return Err(ReplicaError::NotDir);
                }
                if tdir && !self.cache.children(t.attr.id)?.is_empty() {
                    return Err(ReplicaError::NotEmpty);
                }
            }
            // a directory never moves under itself (nor, exchanged, does
            // the other one)
            let mut moved = vec![(id, npid)];
            if let (Some(t), RenameMode::Exchange) = (&tobj, mode) {
                moved.push((t.attr.id, pid));
            }
            for (d, into) in moved {
                let mut at = Some(into);
                let mut steps = 0;
                while let Some(p) = at {
                    if p == d {
                        return Err(ReplicaError::Invalid("a directory cannot move under itself".into()));
                    }
                    if p == ObjectId::ROOT || steps > 4096 {
                        break;
                    }
                    at = self.cache.parent_of(p)?;
                    steps += 1;
                }
            }
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
            let now = self.now();
            if pid == npid {
                edits.push(self.touch(pid, dn + ndn, now)?);
            } else {
                edits.push(self.touch(pid, dn, now)?);
                edits.push(self.touch(npid, ndn, now)?);
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
            let mut c = lock(&self.cml);
            if let Some((tid, _)) = last {
                if c.dirty.remove(&tid).is_some() {
                    edits.push(Edit::Sealed { id: tid });
                }
            }
            // writes to what moves reach the server before the move (write,
            // rename, then close: other replicas never see the new name
            // without the bytes)
            self.seal_into(&mut c, id, &mut edits);
            if let (RenameMode::Exchange, Some(t)) = (mode, &tobj) {
                self.seal_into(&mut c, t.attr.id, &mut edits);
            }
            self.commit_local(&mut c, edits, Some(op))?;
            last
        };
        if let Some((id, ino)) = gone {
            if !self.is_open(ino) {
                self.purge(id)?;
            }
        }
        Ok(())
    }

    /// A new name for a non-directory.
    pub fn link(&self, ino: u64, new_parent: u64, new_name: &[u8]) -> R<Cached> {
        self.check_writable()?;
        valid(new_name)?;
        let _g = lock(&self.apply);
        let (id, obj) = self.get(ino)?;
        let (npid, _) = self.dir(new_parent)?;
        if obj.attr.kind == FileKind::Dir {
            return Err(ReplicaError::NotPermitted);
        }
        if obj.attr.nlink == 0 {
            return Err(ReplicaError::NotFound);
        }
        if self.cache.lookup(npid, new_name)?.is_some() {
            return Err(ReplicaError::Exists);
        }
        let mut a = obj.attr.clone();
        a.nlink += 1;
        let mut edits = vec![
            Edit::attr(a),
            Edit::Link { parent: npid, name: new_name.to_vec(), id },
            self.touch(npid, 0, self.now())?,
        ];
        let op = Op::Link { id, parent: npid, name: new_name.to_vec() };
        let mut c = lock(&self.cml);
        self.seal_into(&mut c, id, &mut edits);
        self.commit_local(&mut c, edits, Some(op))?;
        drop(c);
        self.cached(id)
    }

    /// Write bytes: into the data file and the log; sent later.
    pub fn write(&self, ino: u64, offset: u64, data: &[u8]) -> R<usize> {
        self.check_writable()?;
        let _g = lock(&self.apply);
        let (id, obj) = self.get(ino)?;
        if obj.attr.kind != FileKind::File {
            return Err(ReplicaError::IsDir);
        }
        let path = self.cache.data_path(id);
        let f = self.writer(ino, id)?;
        f.write_all_at(data, offset).map_err(io(&path))?;
        let mut a = obj.attr.clone();
        a.size = a.size.max(offset + data.len() as u64);
        a.mtime = self.stamp_after(a.mtime, self.now());
        if obj.attr.nlink == 0 {
            // removed while open: nobody else will see these bytes
            self.cache.local(&with_ctime(vec![Edit::attr(a)], Timestamp::now()))?;
            return Ok(data.len());
        }
        let mut c = lock(&self.cml);
        self.cache.log_dirty(id, offset, data.len() as u64)?;
        c.dirty(id, offset, data.len() as u64);
        self.commit_local(&mut c, vec![Edit::attr(a)], None)?;
        Ok(data.len())
    }

    /// The data file of an open inode, opened for writing once while
    /// handles are open (dropped at the last close).
    fn writer(&self, ino: u64, id: ObjectId) -> R<Arc<File>> {
        if let Some(f) = lock(&self.writers).get(&ino) {
            return Ok(f.clone());
        }
        let path = self.cache.data_path(id);
        let f = Arc::new(open_data(&path)?);
        if self.is_open(ino) {
            lock(&self.writers).insert(ino, f.clone());
        }
        Ok(f)
    }

    /// Append at the end of the file as the server has it: sent at once
    /// (after what is queued before it) and answered before returning; if
    /// another replica appended first, catch up and try again.
    pub fn append(&self, ino: u64, data: &[u8]) -> R<usize> {
        self.check_writable()?;
        for _ in 0..5 {
            let (id, obj) = self.get(ino)?;
            if obj.attr.nlink == 0 {
                return self.write(ino, obj.attr.size, data);
            }
            let mut done = 0;
            let mut refused = None;
            for chunk in data.chunks(MAX_DATA) {
                let at = self.cached(id)?.attr.size;
                let op = Op::Write { id, base: 0, offset: at, data: chunk.to_vec() };
                match self.queue_and_wait(op) {
                    Ok(applied) => {
                        let _g = lock(&self.apply);
                        let path = self.cache.data_path(id);
                        open_data(&path)?.write_all_at(chunk, at).map_err(io(&path))?;
                        // the server's attributes (its mtime), unless the
                        // stream already brought newer ones
                        let mut a = self.cached(id)?.attr;
                        match applied.and_then(|a| a.attr) {
                            Some(s) if s.versions.data >= a.versions.data => a = s,
                            _ => a.size = a.size.max(at + chunk.len() as u64),
                        }
                        self.cache.local(&with_ctime(vec![Edit::attr(a)], Timestamp::now()))?;
                        done += chunk.len();
                    }
                    Err(ReplicaError::Conflict(m)) => {
                        refused = Some(m);
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
            match refused {
                None => return Ok(done),
                Some(_) if done > 0 => return Ok(done),
                Some(_) => {
                    self.rt.block_on(self.sync())?;
                }
            }
        }
        Err(ReplicaError::Transient("the file kept changing under the append".into()))
    }

    /// Queue an op behind everything queued and wait for its answer (ops
    /// whose result the caller needs). Never waits more than 1 s without
    /// an answer arriving: then, or when disconnected, an op not sent yet
    /// is withdrawn (an error: it never happens later), and one already
    /// sent is `Ok(None)` (it will be applied: the caller applies its local
    /// effect; a refusal then is parked like any other).
    fn queue_and_wait(&self, op: Op) -> R<Option<Applied>> {
        if !self.client.is_connected() {
            return Err(ReplicaError::NotConnected);
        }
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let lsn = {
            let _g = lock(&self.apply);
            // a data op (an append) is stamped now: its local effect comes
            // with the answer, so the cache's mtime is still the old one
            let stamp = match op.data_target() {
                Some(id) => Some(self.stamp_after(self.cached(id)?.attr.mtime, self.now())),
                None => None,
            };
            let mut c = lock(&self.cml);
            let lsn = c.next_lsn;
            lock(&self.waiting).insert(lsn, tx);
            if let Err(e) = self.commit_local_at(&mut c, Vec::new(), Some(op), stamp) {
                lock(&self.waiting).remove(&lsn);
                return Err(e);
            }
            lsn
        };
        let mut progress = self.cml_answered.subscribe();
        let waited = Instant::now();
        loop {
            enum Step {
                Answer(Result<Applied, OpError>),
                Progress,
                Stuck,
                // the answer went elsewhere (the entry was settled meanwhile)
                Gone,
            }
            let step = self.rt.block_on(async {
                tokio::select! {
                    r = &mut rx => match r {
                        Ok(r) => Step::Answer(r),
                        Err(_) => Step::Gone,
                    },
                    _ = tokio::time::sleep(NO_PROGRESS) => Step::Stuck,
                    _ = progress.changed() => Step::Progress,
                }
            });
            match step {
                Step::Answer(r) => return r.map(Some).map_err(ReplicaError::from),
                Step::Progress if self.client.is_connected() => continue, // answers are arriving
                // a connected server answers heartbeats (the connection drops
                // after 750 ms of silence): it is busy with a backlog, not
                // away, so the call waits, up to a bound
                Step::Stuck if self.client.is_connected() && waited.elapsed() < BUSY_SERVER_WAIT => continue,
                _ => {}
            }
            // no progress (or no connection): withdraw it if still unsent
            let _g = lock(&self.apply);
            let mut c = lock(&self.cml);
            lock(&self.waiting).remove(&lsn);
            match c.q.get(&lsn) {
                Some((_, false)) => {
                    c.q.remove(&lsn);
                    c.release(lsn);
                    c.done.push(lsn);
                    return Err(ReplicaError::Unreachable("the server did not answer within 1 s".into()));
                }
                Some((_, true)) => return Ok(None),
                None => {
                    // answered meanwhile: the answer went nowhere; treat as sent
                    return Ok(None);
                }
            }
        }
    }

    /// fallocate(2): mode 0 allocates (and may grow the file), punch-hole
    /// with keep-size deallocates; other modes are not supported.
    pub fn allocate(&self, ino: u64, offset: u64, len: u64, mode: i32) -> R<()> {
        self.check_writable()?;
        let _g = lock(&self.apply);
        let (id, obj) = self.get(ino)?;
        let path = self.cache.data_path(id);
        let f = open_data(&path)?;
        let mut a = obj.attr.clone();
        let op = match mode {
            0 => {
                use std::os::fd::AsRawFd;
                // SAFETY: plain syscall on an open fd.
                if unsafe { libc::fallocate(f.as_raw_fd(), 0, offset as i64, len as i64) } != 0 {
                    return Err(io(&path)(std::io::Error::last_os_error()));
                }
                a.size = a.size.max(offset + len);
                Op::Allocate { id, base: 0, offset, len }
            }
            m if m == libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE => {
                punch_fd(&f, offset, len).map_err(io(&path))?;
                Op::PunchHole { id, base: 0, offset, len }
            }
            _ => return Err(ReplicaError::Unsupported),
        };
        a.mtime = self.stamp_after(a.mtime, self.now());
        let mut edits = Vec::new();
        let mut c = lock(&self.cml);
        self.seal_into(&mut c, id, &mut edits);
        edits.push(Edit::attr(a));
        let op = (obj.attr.nlink > 0).then_some(op);
        self.commit_local(&mut c, edits, op).map(drop)
    }

    /// Change attributes; `size` truncates. With `kill_privs` (a chown, or
    /// an unprivileged write or truncate: the mount clears set-id bits, not
    /// the kernel) the set-id bits of a non-directory are cleared too,
    /// unless `attrs` sets the mode.
    pub fn setattr(&self, ino: u64, size: Option<u64>, mut attrs: SetAttrs, kill_privs: bool) -> R<Cached> {
        self.check_writable()?;
        let _g = lock(&self.apply);
        let (id, obj) = self.get(ino)?;
        if kill_privs && attrs.mode.is_none() && obj.attr.kind != FileKind::Dir {
            attrs.mode = killed_mode(obj.attr.mode);
        }
        if size.is_none() && attrs == SetAttrs::default() {
            // nothing to set (a chown to -1:-1): the status still changed
            self.cache.local(&[Edit::Ctime { id, time: Timestamp::now() }])?;
            return self.cached(id);
        }
        let mut a = obj.attr.clone();
        let mut ops = Vec::new();
        if let Some(size) = size {
            if a.kind != FileKind::File {
                return Err(ReplicaError::IsDir);
            }
            let path = self.cache.data_path(id);
            let f = open_data(&path)?;
            f.set_len(size).map_err(io(&path))?;
            a.size = size;
            a.mtime = self.stamp_after(a.mtime, self.now());
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
        let mut edits = Vec::new();
        let mut c = lock(&self.cml);
        // writes before this reach the server before it (an explicit mtime
        // after a write must stay, as tar and rsync set it)
        self.seal_into(&mut c, id, &mut edits);
        edits.push(Edit::attr(a));
        if obj.attr.nlink == 0 && obj.attr.kind == FileKind::File {
            ops.clear(); // open but removed: local only
        }
        let mut last = ops.pop();
        for op in ops {
            let e = self.entry(op, 0, &edits);
            let lsn = c.push(e.clone());
            edits.push(Edit::Cml(lsn, e));
        }
        // tar sets times, owner and mode one call after another: a SetAttr
        // right behind an unsent SetAttr of the same object joins it (the
        // later values win), one op for the server instead of three
        let mut merged = None;
        if let Some(Op::SetAttr { attrs: next, .. }) = &last {
            if let Some((lsn, e)) = c.merge_setattr(id, next) {
                edits.push(Edit::Cml(lsn, e.clone()));
                merged = Some((lsn, e));
                last = None;
            }
        }
        self.commit_local(&mut c, edits, last)?;
        // (queued as joined only once the log has it)
        if let Some((lsn, e)) = merged {
            if let Some((q, _)) = c.q.get_mut(&lsn) {
                *q = e;
            }
        }
        drop(c);
        self.cached(id)
    }

    /// Set or remove an extended attribute (answered by the server before
    /// it returns: the server decides which names a volume replicates).
    pub fn set_xattr(&self, ino: u64, name: &[u8], value: Option<&[u8]>) -> R<()> {
        self.check_writable()?;
        let (id, obj) = self.get(ino)?;
        let op = match value {
            Some(v) => Op::SetXattr { id, base: 0, name: name.to_vec(), value: v.to_vec() },
            None => {
                if !obj.xattrs.iter().any(|(n, _)| n == name) {
                    return Err(ReplicaError::NotFound);
                }
                Op::RemoveXattr { id, base: 0, name: name.to_vec() }
            }
        };
        self.queue_and_wait(op)?;
        let _g = lock(&self.apply);
        let obj = self.cached(id)?;
        let mut x = obj.xattrs.clone();
        x.retain(|(n, _)| n != name);
        if let Some(v) = value {
            x.push((name.to_vec(), v.to_vec()));
            x.sort();
        }
        let put = Edit::Put { attr: obj.attr, target: None, xattrs: Some(x) };
        self.cache.local(&with_ctime(vec![put], Timestamp::now()))?;
        Ok(())
    }

    /// A file was written behind the daemon's back (a passthrough open:
    /// the kernel wrote the cache file): its whole content counts as
    /// written, its size and mtime are the cache file's.
    pub fn rewritten(&self, ino: u64) -> R<()> {
        let _g = lock(&self.apply);
        let (id, obj) = self.get(ino)?;
        if obj.attr.kind != FileKind::File {
            return Ok(());
        }
        let path = self.cache.data_path(id);
        let size = std::fs::metadata(&path).map_err(io(&path))?.len();
        let mut a = obj.attr.clone();
        a.size = size;
        a.mtime = self.stamp_after(a.mtime, self.now());
        if obj.attr.nlink == 0 {
            self.cache.local(&with_ctime(vec![Edit::attr(a)], Timestamp::now()))?;
            return Ok(());
        }
        let mut c = lock(&self.cml);
        let mut edits = Vec::new();
        if size < obj.attr.size {
            // (shorter: the server must shrink it too)
            self.seal_into(&mut c, id, &mut edits);
            let e = self.entry(Op::Truncate { id, base: 0, size }, 0, &edits);
            let lsn = c.push(e.clone());
            edits.push(Edit::Cml(lsn, e));
        }
        if size > 0 {
            self.cache.log_dirty(id, 0, size)?;
            c.dirty(id, 0, size);
        }
        edits.push(Edit::attr(a));
        self.seal_into(&mut c, id, &mut edits);
        self.commit_local(&mut c, edits, None).map(drop)
    }

    /// A handle was flushed or released: seal the file's writes (with
    /// `--sync-close`, also wait for the server as fsync does).
    pub fn flush(&self, ino: u64) -> R<()> {
        if self.sync_close.load(std::sync::atomic::Ordering::Relaxed) {
            return self.fsync(ino);
        }
        self.seal(ino)
    }

    fn seal(&self, ino: u64) -> R<()> {
        let _g = lock(&self.apply);
        let Some((id, _)) = self.cache.by_ino(ino)? else { return Ok(()) };
        let mut c = lock(&self.cml);
        if !c.dirty.contains_key(&id) {
            return Ok(());
        }
        let mut edits = Vec::new();
        self.seal_into(&mut c, id, &mut edits);
        self.commit_local(&mut c, edits, None).map(drop)
    }

    /// fsync(2): durable here always; while connected, also waits (up to
    /// 1 s) until the server answered everything queued so far.
    pub fn fsync(&self, ino: u64) -> R<()> {
        self.seal(ino)?;
        if let Ok((id, _)) = self.get(ino) {
            let path = self.cache.data_path(id);
            if let Ok(f) = File::open(&path) {
                f.sync_data().map_err(io(&path))?;
            }
        }
        self.fold()?;
        if self.client.is_connected() {
            let upto = lock(&self.cml).next_lsn;
            let _ = self.rt.block_on(self.answered_before(upto, FSYNC_WAIT));
        }
        Ok(())
    }

    /// Make every local change durable (one commit; the log emptied).
    pub fn fold(&self) -> R<()> {
        let g = lock(&self.apply);
        let (done, ready) = {
            let mut c = lock(&self.cml);
            (c.done.drain(..).map(Edit::CmlDone).collect::<Vec<_>>(), std::mem::take(&mut c.ready))
        };
        let mut edits = Vec::new();
        for a in ready {
            if self.cache.get(a.id)?.is_some() {
                edits.push(Edit::attr(a));
            }
        }
        edits.extend(done);
        self.cache.local(&edits)?;
        drop(g);
        self.cache.fold()?;
        Ok(())
    }

    /// The server's attributes of objects that went idle (stashed from
    /// their echoes) into the cache.
    pub(crate) fn apply_ready(&self) -> R<()> {
        let _g = lock(&self.apply);
        let mut c = lock(&self.cml);
        if c.ready.is_empty() {
            return Ok(());
        }
        let mut edits = Vec::new();
        let mut inval = Vec::new();
        for a in std::mem::take(&mut c.ready) {
            if let Some(cur) = self.cache.get(a.id)? {
                if crate::replica::visible_change(&cur.attr, &a) {
                    inval.push(crate::replica::Inval::Attr(cur.ino));
                }
                edits.push(Edit::attr(a));
            }
        }
        self.cache.local(&edits)?;
        self.invalidate(inval);
        Ok(())
    }

    /// Seal every unsealed write.
    pub(crate) fn seal_all(&self) -> R<()> {
        let _g = lock(&self.apply);
        let mut c = lock(&self.cml);
        let ids: Vec<ObjectId> = c.dirty.keys().copied().collect();
        if ids.is_empty() {
            return Ok(());
        }
        let mut edits = Vec::new();
        for id in ids {
            self.seal_into(&mut c, id, &mut edits);
        }
        self.commit_local(&mut c, edits, None).map(drop)
    }

    /// Wait until no entry below `upto` is queued (or `limit` passes).
    pub(crate) async fn answered_before(&self, upto: u64, limit: Duration) -> bool {
        let mut rx = self.cml_answered.subscribe();
        let done = |c: &Cml| c.q.range(..upto).next().is_none();
        let wait = async {
            loop {
                if done(&lock(&self.cml)) {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        };
        tokio::time::timeout(limit, wait).await.is_ok()
    }

    /// Changes made here and not answered yet: (ops, bytes), and ops
    /// answered / refused for good / retried since start.
    pub fn cml_stats(&self) -> ((u64, u64), u64, u64, u64) {
        let c = lock(&self.cml);
        (c.backlog(), c.sent, c.parked, c.retried)
    }

    /// The op as sent: bytes of a write read from the data file now (the
    /// newest; `None` if nothing is left to send: the file is gone or
    /// shorter), bases from the versions the cache has from the server (or
    /// those taken when queued, for an object no longer in the cache).
    fn build(&self, e: CmlEntry) -> std::io::Result<Option<Op>> {
        let cached = |id: ObjectId| self.cache.get(id).ok().flatten().map(|c| c.attr.versions);
        let mut op = e.op;
        match &mut op {
            Op::Write { id, base: b, offset, data } => {
                if let Some(v) = cached(*id) {
                    *b = v.data;
                }
                if e.len > 0 {
                    let f = match File::open(self.cache.data_path(*id)) {
                        Ok(f) => f,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None), // removed since
                        Err(e) => return Err(e),
                    };
                    let mut buf = vec![0u8; e.len as usize];
                    let mut got = 0;
                    while got < buf.len() {
                        match f.read_at(&mut buf[got..], *offset + got as u64) {
                            Ok(0) => break, // truncated since: the truncate follows
                            Ok(n) => got += n,
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                            Err(e) => return Err(e),
                        }
                    }
                    if got == 0 {
                        return Ok(None);
                    }
                    buf.truncate(got);
                    *data = buf;
                }
            }
            Op::Truncate { id, base: b, .. } | Op::Allocate { id, base: b, .. } | Op::PunchHole { id, base: b, .. } => {
                if let Some(v) = cached(*id) {
                    *b = v.data;
                }
            }
            Op::SetAttr { id, base: b, .. }
            | Op::SetXattr { id, base: b, .. }
            | Op::RemoveXattr { id, base: b, .. } => {
                if let Some(v) = cached(*id) {
                    *b = v.meta;
                }
            }
            Op::Unlink { expect, .. } | Op::Rmdir { expect, .. } => {
                expect.base = cached(expect.id).unwrap_or(expect.base);
            }
            Op::Rename { expect, target, .. } => {
                expect.base = cached(expect.id).unwrap_or(expect.base);
                if let Some(t) = target {
                    t.base = cached(t.id).unwrap_or(t.base);
                }
            }
            _ => {}
        }
        Ok(Some(op))
    }

    /// Send the log's entries in order, pipelined, forever; seal writes and
    /// fold the log on a timer.
    pub async fn send(self: Arc<Self>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<(u64, Pending)>();
        tokio::spawn(self.clone().replies(rx));
        let mut cursor = 0u64;
        let mut sealed = Instant::now();
        let mut folded = Instant::now();
        loop {
            if sealed.elapsed() >= SEAL_EVERY {
                sealed = Instant::now();
                if let Err(e) = self.seal_all() {
                    tracing::warn!("sealing writes: {e}");
                }
                if let Err(e) = self.apply_ready() {
                    tracing::warn!("taking the server's attributes: {e}");
                }
            }
            if folded.elapsed() >= FOLD_EVERY {
                folded = Instant::now();
                if self.cache.unsynced() {
                    if let Err(e) = self.fold() {
                        tracing::warn!("folding the log of local changes: {e}");
                    }
                }
            }
            // while disconnected nothing is handed over: an op once sent is
            // never cancelled, and what waits here still coalesces
            let paused = {
                let mut c = lock(&self.cml);
                match c.pause_until {
                    Some(t) if t > Instant::now() => true,
                    Some(_) => {
                        c.pause_until = None;
                        false
                    }
                    None => false,
                }
            };
            let next = if paused || !self.client.is_connected() {
                None
            } else {
                let mut c = lock(&self.cml);
                let n = c.q.range_mut(cursor + 1..).next().map(|(l, (e, sent))| {
                    let was = std::mem::replace(sent, true);
                    (*l, e.clone(), was)
                });
                n
            };
            let Some((lsn, e, was_sent)) = next else {
                let pause = if self.client.is_connected() && !paused { SEAL_EVERY } else { Duration::from_millis(50) };
                tokio::select! {
                    _ = self.cml_wake.notified() => {}
                    _ = tokio::time::sleep(pause) => {}
                }
                continue;
            };
            let stamp = e.time;
            match self.build(e) {
                Err(err) => {
                    // not sent: again shortly (never dropped; an entry
                    // reloaded at start stays counted as sent)
                    tracing::warn!("reading change {lsn} from the cache: {err}; retrying");
                    if let Some((_, sent)) = lock(&self.cml).q.get_mut(&lsn) {
                        *sent = was_sent;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                Ok(None) => {
                    cursor = lsn;
                    self.answered(lsn, Ok(None))
                }
                Ok(Some(op)) => match self.client.submit_stamped(lsn, op, stamp).await {
                    Ok(p) => {
                        cursor = lsn;
                        let _ = tx.send((lsn, p));
                    }
                    Err(e) => {
                        tracing::warn!(
                            "the connection is closed; {lsn} and later changes wait for the next start: {e}"
                        );
                        return;
                    }
                },
            }
        }
    }

    async fn replies(self: Arc<Self>, mut rx: tokio::sync::mpsc::UnboundedReceiver<(u64, Pending)>) {
        while let Some((lsn, p)) = rx.recv().await {
            match p.wait().await {
                Ok(a) => self.answered(lsn, Ok(Some(a))),
                Err(ClientError::Op(e)) => self.answered(lsn, Err(e)),
                Err(e) => {
                    tracing::warn!("change {lsn} has no answer ({e}); it is sent again at the next start");
                    return;
                }
            }
        }
    }

    /// The server answered entry `lsn` (`Ok(None)`: nothing was left to send).
    fn answered(&self, lsn: u64, r: Result<Option<Applied>, OpError>) {
        let waiter = lock(&self.waiting).remove(&lsn);
        let mut edits = Vec::new();
        {
            let mut c = lock(&self.cml);
            let Some((e, _)) = c.q.remove(&lsn) else { return };
            match &r {
                Ok(Some(a)) => {
                    c.sent += 1;
                    c.streak = 0;
                    if a.seq <= self.applied_seq() {
                        c.release(lsn);
                    } else {
                        c.acked_at.push((a.seq, lsn));
                    }
                    edits.push(Edit::CmlDone(lsn));
                }
                Ok(None) | Err(OpError::ReplyExpired(_)) => {
                    // (expired: applied in an earlier run, its record seen or coming)
                    c.release(lsn);
                    edits.push(Edit::CmlDone(lsn));
                }
                Err(err) if waiter.is_some() => {
                    tracing::debug!("change {lsn} refused: {err}");
                    c.release(lsn);
                    edits.push(Edit::CmlDone(lsn));
                }
                Err(why) if why.is_transient() => {
                    // not applied: again, as a new op after the others,
                    // after a pause that grows while refusals go on
                    c.streak = (c.streak + 1).min(6);
                    let pause = Duration::from_millis(100 << c.streak);
                    c.pause_until = Some(Instant::now() + pause);
                    tracing::warn!("the server could not apply a change now ({why}); retrying it in {pause:?}");
                    c.retried += 1;
                    c.release(lsn);
                    edits.push(Edit::CmlDone(lsn));
                    let again = c.push(e.clone());
                    edits.push(Edit::Cml(again, e.clone()));
                    self.cml_wake.notify_one();
                }
                Err(err) => {
                    let mut op = e.op.clone();
                    if let (Op::Write { id, offset, data, .. }, true) = (&mut op, e.len > 0) {
                        let mut buf = vec![0u8; e.len as usize];
                        let f = File::open(self.cache.data_path(*id));
                        let n = f.and_then(|f| f.read_at(&mut buf, *offset)).unwrap_or(0);
                        buf.truncate(n);
                        *data = buf;
                    }
                    tracing::error!(
                        "the server refused a change made here ({err}): {:?} on {:?}; it is kept in the cache's \
                         parked list (izo status) and this replica resyncs from the server",
                        std::mem::discriminant(&e.op),
                        e.op.changed_object().or_else(|| objs(&e.op).get(1).copied()),
                    );
                    c.parked += 1;
                    c.resync = true;
                    c.release(lsn);
                    edits.push(Edit::Park(lsn, Parked { op, error: err.clone(), kept: None }));
                }
            }
        }
        // parked and retried entries are recorded now; plain answers ride
        // with the next commit
        let (now, later): (Vec<Edit>, Vec<Edit>) = edits.into_iter().partition(|e| !matches!(e, Edit::CmlDone(_)));
        {
            let mut c = lock(&self.cml);
            c.done.extend(later.into_iter().filter_map(|e| if let Edit::CmlDone(l) = e { Some(l) } else { None }));
        }
        if !now.is_empty() {
            let mut c = lock(&self.cml);
            let mut now = now;
            now.extend(c.done.drain(..).map(Edit::CmlDone));
            if let Err(e) = self.cache.local_quiet(&now) {
                tracing::warn!("recording the answer to change {lsn}: {e}");
            }
        }
        if let Some(w) = waiter {
            let _ = w.send(match r {
                Ok(Some(a)) => Ok(a),
                Ok(None) | Err(OpError::ReplyExpired(_)) => Ok(Applied { seq: 0, time: Timestamp::now(), attr: None }),
                Err(e) => Err(e),
            });
        }
        if !lock(&self.cml).ready.is_empty() {
            if let Err(e) = self.apply_ready() {
                tracing::warn!("taking the server's attributes: {e}");
            }
        }
        self.cml_answered.send_modify(|n| *n += 1);
    }

    /// Changes the server refused for good, kept in the cache: one line
    /// each (op, object, bytes kept, reason).
    pub fn parked(&self) -> R<Vec<String>> {
        Ok(self
            .cache
            .parked()?
            .into_iter()
            .map(|(lsn, p)| {
                let bytes = match &p.op {
                    Op::Write { data, .. } => data.len(),
                    _ => 0,
                };
                let what = format!("{:?}", p.op);
                let what = what.split([' ', '{']).next().unwrap_or("op").to_string();
                let obj = p.op.changed_object().or_else(|| objs(&p.op).get(1).copied());
                format!(
                    "change {lsn}: {what} on {} ({bytes} bytes kept): {}",
                    obj.map(|o| o.to_string()).unwrap_or_default(),
                    p.error
                )
            })
            .collect())
    }

    /// The root's inode number (for callers that only know the API).
    pub fn root(&self) -> u64 {
        ROOT_INO
    }
}

#[cfg(test)]
mod kill_tests {
    use super::killed_mode;

    /// Against the kernel's rule, over every mode: set-user-ID always goes,
    /// set-group-ID only with group-execute, nothing else changes, and
    /// nothing is returned when nothing would change.
    #[test]
    fn killed_mode_clears_what_the_kernel_clears() {
        for mode in 0..=0o7777u32 {
            let suid = mode & 0o4000 != 0;
            let sgid_x = mode & 0o2010 == 0o2010;
            let want = mode & !0o4000 & if sgid_x { !0o2000 } else { !0 };
            match killed_mode(mode) {
                Some(m) => {
                    assert!(suid || sgid_x, "{mode:o} had nothing to clear");
                    assert_eq!(m, want, "{mode:o}");
                }
                None => assert!(!suid && !sgid_x, "{mode:o} keeps its set-id bits"),
            }
        }
    }
}

//! Mutations through the mount (the shell around the engine's local rules,
//! `engine/local.rs`): the engine plans each change, this file does its
//! data-file part and logs it; one sender task sends the queue in order,
//! pipelined. A `write(2)` returns once its bytes are in the
//! data file and its range in the append-only log (durable against a
//! SIGKILL of the daemon); `fsync` and `izo sync` wait for the server.

use crate::cache::{Cached, CmlEntry, Edit, Parked, ROOT_INO};
use crate::engine::{objs, Engine, Local, Make, Next, Now, Withdraw, SEAL_EVERY};
use crate::replica::{io, open_data, Replica, ReplicaError};
use crate::{ClientError, Pending};
use izo_proto::*;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant};

type R<T> = Result<T, ReplicaError>;

/// How long a call waits for the server without any answer arriving.
const NO_PROGRESS: Duration = Duration::from_secs(1);
/// Longest a call waits for the server's answer (an O_EXCL create behind a
/// backlog of queued changes, a loaded machine): then it goes on without
/// it, as with a server that is away.
const PATIENCE: Duration = Duration::from_secs(1);
/// How long `fsync` waits for the server's ack while connected.
const FSYNC_WAIT: Duration = Duration::from_secs(1);
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

impl Replica {
    /// The time now, for the engine.
    pub(crate) fn now(&self) -> Now {
        Now { mono: self.started.elapsed(), wall: Timestamp::now() }
    }

    /// The engine (taken after `apply` where both are held).
    pub(crate) fn engine(&self) -> MutexGuard<'_, Engine> {
        lock(&self.engine)
    }

    /// Log a planned change (one record), then acknowledge it to the
    /// engine; if the log fails, nothing of it happened. Returns the object
    /// whose last name it removed, if any.
    fn log_local(&self, e: &mut Engine, l: Local) -> R<Option<(ObjectId, u64)>> {
        match self.cache.local(&l.edits) {
            Ok(()) => {
                e.advance(&l);
                if !l.queued.is_empty() {
                    self.cml_wake.notify_one();
                }
                Ok(l.gone)
            }
            Err(err) => {
                e.abandon(&l);
                Err(err.into())
            }
        }
    }

    /// Load the modification log left by an earlier run (a SIGKILL's log
    /// replayed, unsealed writes sealed) and number new ops after it.
    pub(crate) fn recover_cml(&self) -> R<()> {
        let (dirty, mut touched) = self.cache.replay_log()?;
        touched.extend(self.cache.flagged_refreshes()?);
        let entries = self.cache.cml()?;
        let g = lock(&self.apply);
        let mut e = self.engine();
        // (after every queued and every parked entry: a parked one's key
        // is never reused)
        let parked_next = self.cache.parked()?.last().map(|(l, _)| l + 1).unwrap_or(0);
        let floor = self.client.next_cseq().max(parked_next);
        // (a cache from before lsns were tracked cannot tell: never a gap)
        let before = match self.cache.meta(crate::engine::TRACKED)? {
            1 => self.cache.meta(crate::engine::LOGGED)?,
            _ => u64::MAX,
        };
        self.logged_before.store(before, std::sync::atomic::Ordering::Release);
        let logged = self.cache.logged_lsn(floor)?;
        let edits = e.recover(&self.cache, entries, dirty, touched, floor, logged);
        if self.cache.meta(crate::engine::RESYNC)? == 1 {
            e.resync_due();
        }
        if !edits.is_empty() {
            self.cache.local(&edits)?;
        }
        if e.queued() > 0 {
            tracing::info!("{} changes made before the restart are still to be sent", e.queued());
        }
        drop(e);
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
        let trusted = self.trusted();
        let _g = lock(&self.apply);
        let (pid, _) = self.get(parent)?;
        let id = ObjectId::new();
        let mut e = self.engine();
        let m = Make { parent: pid, name, kind, mode, uid, gid, target, rdev, trusted };
        let l = e.make(&self.cache, m, id, self.now())?;
        if kind == FileKind::File {
            if let Err(err) = self.cache.data_create(id) {
                e.abandon(&l);
                return Err(err.into());
            }
        }
        self.log_local(&mut e, l)?;
        drop(e);
        self.cached(id)
    }

    /// Whether the volume keeps device nodes and set-id bits: from the
    /// handshake, or the rules kept for offline use (`None` before any:
    /// the server decides when the change is sent).
    fn trusted(&self) -> Option<bool> {
        self.client.welcome().map(|w| w.trusted).or_else(|| self.rules().map(|r| r.trusted))
    }

    /// An O_EXCL create (a lock file: git's `index.lock`): while connected,
    /// the server makes it first and another replica's file of that name
    /// is EEXIST here too; with the server away (no answer within 1 s, or
    /// no connection) it is made here, as any create, and a name taken
    /// meanwhile elsewhere is a conflict found when it is sent.
    pub fn create_excl(&self, parent: u64, name: &[u8], mode: u32, uid: u32, gid: u32) -> R<Cached> {
        self.check_writable()?;
        if !self.client.is_connected() || !self.checked.load(std::sync::atomic::Ordering::Acquire) {
            return self.make(parent, name, FileKind::File, mode, uid, gid, None, 0);
        }
        let id = ObjectId::new();
        let now = self.now();
        let op = {
            let _g = lock(&self.apply);
            let (pid, pobj) = self.get(parent)?;
            // a directory made here that the server has not confirmed yet
            // holds no name of another replica (tar creates every file with
            // O_EXCL, mostly in directories it just made: those stay local)
            if pobj.attr.versions == Versions::default() && pid != ObjectId::ROOT {
                drop(_g);
                return self.make(parent, name, FileKind::File, mode, uid, gid, None, 0);
            }
            let m =
                Make { parent: pid, name, kind: FileKind::File, mode, uid, gid, target: None, rdev: 0, trusted: None };
            Engine::plan_make(&self.cache, m, id, now)?.1
        };
        let pid = match &op {
            Op::Create { parent, .. } => *parent,
            _ => return Err(ReplicaError::Invalid("an O_EXCL create plans a create".into())),
        };
        let applied = match self.queue_and_wait(op, now) {
            Ok(a) => a,
            // (not sent: made here, sent when the server answers again)
            Err(ReplicaError::NotConnected | ReplicaError::Unreachable(_)) => {
                return self.make(parent, name, FileKind::File, mode, uid, gid, None, 0);
            }
            Err(e) => return Err(e),
        };
        let _g = lock(&self.apply);
        let mut e = self.engine();
        let m = Make { parent: pid, name, kind: FileKind::File, mode, uid, gid, target: None, rdev: 0, trusted: None };
        // (the same time the op was stamped with: the server keeps it for
        // the file and its directory, and so does this replica)
        if let Some(l) = e.made_remotely(&self.cache, m, id, applied.as_ref(), now)? {
            self.cache.data_create(id)?;
            self.log_local(&mut e, l)?;
        }
        drop(e);
        self.cached(id)
    }

    /// Drop an object's data once no handle holds it (its last name went).
    fn gone(&self, gone: Option<(ObjectId, u64)>) -> R<()> {
        if let Some((id, ino)) = gone {
            if !self.is_open(ino) {
                self.purge(id)?;
            }
        }
        Ok(())
    }

    /// Remove a name (a directory with `dir`).
    pub fn remove(&self, parent: u64, name: &[u8], dir: bool) -> R<()> {
        self.check_writable()?;
        let gone = self.freeing(|| {
            let _g = lock(&self.apply);
            let (pid, _) = self.get(parent)?;
            let mut e = self.engine();
            let l = e.remove(&self.cache, pid, name, dir, self.now())?;
            self.log_local(&mut e, l)
        })?;
        self.gone(gone)
    }

    /// A change that frees space (a delete, a truncate): on a full cache
    /// disk it may use the reserve held back for it (given up, then taken
    /// again once there is room).
    fn freeing<T>(&self, f: impl Fn() -> R<T>) -> R<T> {
        match f() {
            Err(e) if crate::replica::is_full(&e) => {
                tracing::warn!("the cache's disk is full: giving up its reserve for a delete");
                self.reserve_held.store(false, std::sync::atomic::Ordering::Relaxed);
                self.cache.reserve(false)?;
                f()
            }
            r => r,
        }
    }

    /// Hold the reserve on the cache's disk again if it was given up and
    /// there is room.
    pub(crate) fn keep_reserve(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        if !self.reserve_held.load(Relaxed) {
            match self.cache.reserve(true) {
                Ok(held) => self.reserve_held.store(held, Relaxed),
                Err(e) => tracing::debug!("keeping a reserve on the cache's disk: {e}"),
            }
        }
    }

    /// Rename (`mode`: replace, no-replace or exchange).
    pub fn rename(&self, parent: u64, name: &[u8], new_parent: u64, new_name: &[u8], mode: RenameMode) -> R<()> {
        self.check_writable()?;
        let gone = {
            let _g = lock(&self.apply);
            let (pid, _) = self.get(parent)?;
            let (npid, _) = self.get(new_parent)?;
            let mut e = self.engine();
            let l = e.rename(&self.cache, pid, name, npid, new_name, mode, self.now())?;
            self.log_local(&mut e, l)?
        };
        self.gone(gone)
    }

    /// A new name for a non-directory.
    pub fn link(&self, ino: u64, new_parent: u64, new_name: &[u8]) -> R<Cached> {
        self.check_writable()?;
        let _g = lock(&self.apply);
        let (id, _) = self.get(ino)?;
        let (npid, _) = self.get(new_parent)?;
        let mut e = self.engine();
        let l = e.link(&self.cache, id, npid, new_name, self.now())?;
        self.log_local(&mut e, l)?;
        drop(e);
        self.cached(id)
    }

    /// Write bytes: into the data file and the log; sent later.
    pub fn write(&self, ino: u64, offset: u64, data: &[u8]) -> R<usize> {
        self.check_writable()?;
        let _g = lock(&self.apply);
        let (id, _) = self.get(ino)?;
        let shared = Engine::write_is_shared(&self.cache, id)?;
        Engine::size_allowed(offset.saturating_add(data.len() as u64), self.rules().as_ref())?;
        let path = self.cache.data_path(id);
        let f = self.writer(ino, id)?;
        f.write_all_at(data, offset).map_err(io(&path))?;
        let len = data.len() as u64;
        if shared {
            // (removed while open: nobody else will see these bytes)
            self.cache.log_dirty(id, offset, len)?;
        }
        let mut e = self.engine();
        let l = e.wrote(&self.cache, id, offset, len, self.now())?;
        self.log_local(&mut e, l)?;
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

    /// An O_APPEND write: at the local end of file at once, online or
    /// not, queued with its bytes as one append (see [`Engine::append`]).
    pub fn append(&self, ino: u64, data: &[u8]) -> R<usize> {
        self.check_writable()?;
        let _g = lock(&self.apply);
        let (id, obj) = self.get(ino)?;
        let at = obj.attr.size;
        Engine::write_is_shared(&self.cache, id)?;
        Engine::size_allowed(at.saturating_add(data.len() as u64), self.rules().as_ref())?;
        let path = self.cache.data_path(id);
        let f = self.writer(ino, id)?;
        f.write_all_at(data, at).map_err(io(&path))?;
        // (durable with its log record, which carries the bytes)
        let mut e = self.engine();
        let l = e.append(&self.cache, id, at, data.to_vec(), self.now())?;
        self.log_local(&mut e, l)?;
        Ok(data.len())
    }

    /// Queue an op behind everything queued and wait for its answer (ops
    /// whose result the caller needs). Never waits more than 1 s without
    /// an answer arriving: then, or when disconnected, an op not sent yet
    /// is withdrawn (an error: it never happens later), and one already
    /// sent is `Ok(None)` (it will be applied: the caller applies its local
    /// effect; a refusal then is parked like any other).
    fn queue_and_wait(&self, op: Op, now: Now) -> R<Option<Applied>> {
        if !self.client.is_connected() {
            return Err(ReplicaError::NotConnected);
        }
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let lsn = {
            let _g = lock(&self.apply);
            let mut e = self.engine();
            let l = e.queue_wait(&self.cache, op, now)?;
            let Some(&lsn) = l.queued.first() else {
                return Err(ReplicaError::Invalid("nothing to send".into()));
            };
            // (registered before the sender can hand it out: it needs the
            // engine, held here)
            lock(&self.waiting).insert(lsn, tx);
            if let Err(err) = self.log_local(&mut e, l) {
                lock(&self.waiting).remove(&lsn);
                return Err(err);
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
                // answers are arriving: the call waits, up to a bound (a
                // backlog of changes before it, a loaded machine)
                Step::Progress if self.client.is_connected() && waited.elapsed() < PATIENCE => continue,
                _ => {}
            }
            // no progress (or no connection): withdraw it if still unsent
            let _g = lock(&self.apply);
            let mut e = self.engine();
            lock(&self.waiting).remove(&lsn);
            return match e.withdraw(lsn) {
                Withdraw::Withdrawn => Err(ReplicaError::Unreachable("the server did not answer within 1 s".into())),
                // sent, or answered meanwhile (the answer went nowhere)
                Withdraw::Sent | Withdraw::Gone => Ok(None),
            };
        }
    }

    /// fallocate(2): mode 0 allocates (and may grow the file), punch-hole
    /// with keep-size deallocates; other modes are not supported.
    pub fn allocate(&self, ino: u64, offset: u64, len: u64, mode: i32) -> R<()> {
        self.check_writable()?;
        let _g = lock(&self.apply);
        let (id, _) = self.get(ino)?;
        let punch = match mode {
            0 => {
                self.cache.data_allocate(id, offset, len)?;
                false
            }
            m if m == libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE => {
                self.cache.data_punch(id, offset, len)?;
                true
            }
            _ => return Err(ReplicaError::Unsupported),
        };
        let mut e = self.engine();
        let l = e.allocated(&self.cache, id, offset, len, punch, self.now())?;
        self.log_local(&mut e, l).map(drop)
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
        // (unknown before any handshake: the server's answer corrects it)
        let trusted = self.trusted().unwrap_or(true);
        if let Some(size) = size {
            Engine::size_allowed(size, self.rules().as_ref())?;
        }
        let mut e = self.engine();
        let l = e.setattr(&self.cache, id, size, attrs.clone(), trusted, self.now())?;
        match size {
            // shorter: the size is logged first, then the data file cut (a
            // crash between leaves bytes past the size, never a size past
            // the bytes)
            Some(size) if size < obj.attr.size => {
                if let Err(err) = self.log_local(&mut e, l) {
                    // (a full disk: the reserve is for this)
                    if !crate::replica::is_full(&err) {
                        return Err(err);
                    }
                    self.reserve_held.store(false, std::sync::atomic::Ordering::Relaxed);
                    self.cache.reserve(false)?;
                    let l = e.setattr(&self.cache, id, Some(size), attrs, trusted, self.now())?;
                    self.log_local(&mut e, l)?;
                }
                self.cache.data_set_len(id, size)?;
            }
            // longer (zeros) or the same: the data file first
            Some(size) => {
                if let Err(err) = self.cache.data_set_len(id, size) {
                    e.abandon(&l);
                    return Err(err.into());
                }
                self.log_local(&mut e, l)?;
            }
            None => {
                self.log_local(&mut e, l)?;
            }
        }
        drop(e);
        self.cached(id)
    }

    /// Set or remove an extended attribute: in the cache at once, online
    /// or not, and sent in order (see [`Engine::set_xattr`]); what the
    /// volume would refuse is refused here, with the server's errno.
    pub fn set_xattr(&self, ino: u64, name: &[u8], value: Option<&[u8]>) -> R<()> {
        self.check_writable()?;
        let rules = self.rules();
        let _g = lock(&self.apply);
        let (id, _) = self.get(ino)?;
        let mut e = self.engine();
        let l = e.set_xattr(&self.cache, id, name, value, rules.as_ref(), self.now())?;
        self.log_local(&mut e, l)?;
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
        let size = self.cache.data_len(id)?.unwrap_or(0);
        if obj.attr.nlink > 0 && size > 0 {
            self.cache.log_dirty(id, 0, size)?;
        }
        let mut e = self.engine();
        if let Some(l) = e.rewritten(&self.cache, id, size, self.now())? {
            self.log_local(&mut e, l)?;
        }
        Ok(())
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
        let mut e = self.engine();
        if let Some(l) = e.seal(&self.cache, id, self.now())? {
            self.log_local(&mut e, l)?;
        }
        Ok(())
    }

    /// fsync(2): durable here always; while connected, also waits (up to
    /// 1 s) until the server answered everything queued so far.
    pub fn fsync(&self, ino: u64) -> R<()> {
        self.seal(ino)?;
        if let Ok((id, _)) = self.get(ino) {
            if self.cache.data_len(id)?.is_some() {
                self.cache.data_sync(id)?;
            }
        }
        self.fold()?;
        if self.client.is_connected() {
            let upto = self.engine().next_lsn();
            let _ = self.rt.block_on(self.answered_before(upto, FSYNC_WAIT));
        }
        Ok(())
    }

    /// Make every local change durable (one commit; the log emptied);
    /// then the server may forget its replies to what this fold recorded.
    pub fn fold(&self) -> R<()> {
        let g = lock(&self.apply);
        let (mark, edits) = {
            let mut e = self.engine();
            // (answers are recorded under `apply`: every one through the
            // mark is in the log or in these edits)
            (e.durable_mark(), e.fold_edits(&self.cache)?)
        };
        self.cache.local(&edits)?;
        drop(g);
        self.cache.fold()?;
        self.engine().reported_durable(mark);
        self.client.set_durable_through(mark);
        Ok(())
    }

    /// The server's attributes of objects that went idle (stashed from
    /// their echoes) into the cache.
    pub(crate) fn apply_ready(&self) -> R<()> {
        let _g = lock(&self.apply);
        let mut e = self.engine();
        if !e.has_ready() {
            return Ok(());
        }
        let (edits, inval) = e.take_ready(&self.cache)?;
        drop(e);
        self.cache.local(&edits)?;
        self.invalidate(inval);
        Ok(())
    }

    /// Seal every unsealed write.
    pub(crate) fn seal_all(&self) -> R<()> {
        let _g = lock(&self.apply);
        let mut e = self.engine();
        if let Some(l) = e.seal_all(&self.cache, self.now())? {
            self.log_local(&mut e, l)?;
        }
        Ok(())
    }

    /// Wait until no entry below `upto` is queued (or `limit` passes).
    pub(crate) async fn answered_before(&self, upto: u64, limit: Duration) -> bool {
        let mut rx = self.cml_answered.subscribe();
        let wait = async {
            loop {
                if self.engine().answered_before(upto) {
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
        self.engine().stats()
    }

    /// When the oldest change not answered yet was made.
    pub fn oldest_pending(&self) -> Option<Timestamp> {
        self.engine().oldest_pending()
    }

    /// The op as sent: bases from the engine, bytes of a write read from
    /// the data file now (the newest; `None` if nothing is left to send:
    /// the file is gone or shorter).
    fn build(&self, e: CmlEntry) -> Result<Option<Op>, crate::cache::CacheError> {
        let mut op = Engine::bases(&self.cache, e.op);
        if let Op::Append { id, base, local_offset, data } = &mut op {
            // (a server before protocol 6 takes it as the write it was here)
            if self.client.welcome().is_some_and(|w| w.version < izo_proto::APPEND_VERSION) {
                op = Op::Write { id: *id, base: *base, offset: *local_offset, data: std::mem::take(data) };
            }
            return Ok(Some(op));
        }
        if let (Op::Write { id, offset, data, .. }, true) = (&mut op, e.len > 0) {
            if self.cache.data_len(*id)?.is_none() {
                return Ok(None); // removed since
            }
            let mut buf = vec![0u8; e.len as usize];
            let mut got = 0;
            while got < buf.len() {
                match self.cache.data_read_at(*id, *offset + got as u64, &mut buf[got..])? {
                    0 => break, // truncated since: the truncate follows
                    n => got += n,
                }
            }
            if got == 0 {
                return Ok(None);
            }
            buf.truncate(got);
            *data = buf;
        }
        Ok(Some(op))
    }

    /// A write op carrying `len` zero bytes (see `send`).
    fn zeros(mut op: Op, len: u64) -> Op {
        if let Op::Write { data, .. } = &mut op {
            *data = vec![0; len as usize];
        }
        op
    }

    /// Send the log's entries in order, pipelined, forever; seal writes and
    /// fold the log on a timer.
    pub async fn send(self: Arc<Self>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<(u64, Pending)>();
        tokio::spawn(self.clone().replies(rx));
        let mut sealed = Instant::now();
        let mut folded = Instant::now();
        let mut connections = self.client.wire_counters().2;
        {
            let tracked = self.client.welcome().is_some_and(|w| w.version >= izo_proto::APPEND_VERSION);
            self.engine().set_releases_tracked(tracked);
        }
        loop {
            // a new connection since the last look: what went unanswered
            // goes first, in order (before anything after it is sent there)
            let now_connections = self.client.wire_counters().2;
            if now_connections != connections {
                connections = now_connections;
                let tracked = self.client.welcome().is_some_and(|w| w.version >= izo_proto::APPEND_VERSION);
                {
                    let mut e = self.engine();
                    e.reconnected();
                    e.set_releases_tracked(tracked);
                }
                if let Err(e) = self.learn_rules().await {
                    tracing::debug!("asking the server for the volume's rules: {e}");
                }
            }
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
                self.keep_reserve();
                if self.cache.unsynced() {
                    let problem = match self.fold() {
                        Ok(()) => None,
                        Err(e) => {
                            tracing::warn!("folding the log of local changes: {e}");
                            Some(e.to_string())
                        }
                    };
                    *lock(&self.fold_problem) = problem;
                }
            }
            // (a mount that came up offline sends nothing before the
            // volume's incarnation was checked at its first connection)
            let connected = self.client.is_connected() && self.checked.load(std::sync::atomic::Ordering::Acquire);
            let next = self.engine().next_to_send(connected, self.now());
            let (lsn, e, was_sent) = match next {
                Next::Send { lsn, entry, was_sent } => (lsn, entry, was_sent),
                Next::Idle(pause) => {
                    tokio::select! {
                        _ = self.cml_wake.notified() => {}
                        _ = tokio::time::sleep(pause) => {}
                    }
                    continue;
                }
            };
            let stamp = e.time;
            let (len, op) = (e.len, e.op.clone());
            let built = match self.build(e) {
                // an entry sent before goes again whatever the data file
                // holds now (the server waits for it: zeros, which the
                // truncate or unlink after it settles)
                Ok(None) if was_sent => Ok(Some(Self::zeros(Engine::bases(&self.cache, op), len))),
                b => b,
            };
            match built {
                Err(err) => {
                    // not sent: again shortly (never dropped; an entry
                    // reloaded at start stays counted as sent)
                    tracing::warn!("reading change {lsn} from the cache: {err}; retrying");
                    self.engine().unsend(lsn, was_sent);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                Ok(None) => self.answered(lsn, Ok(None)),
                // (a connection made meanwhile takes what went unanswered
                // first: this one waits its turn)
                Ok(Some(_)) if self.client.wire_counters().2 != connections => {
                    self.engine().unsend(lsn, was_sent);
                    continue;
                }
                Ok(Some(op)) => match self.client.submit_stamped(lsn, op, stamp).await {
                    Ok(p) => {
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
                    // (the connection broke: the sender sends it again, and
                    // what follows it, in order)
                    tracing::debug!("change {lsn} has no answer ({e}); it is sent again");
                    self.engine().lost(lsn);
                    self.cml_wake.notify_one();
                }
            }
        }
    }

    /// A write op as parked: with its `len` bytes from the data file.
    fn with_bytes(&self, mut op: Op, len: u64) -> Op {
        if let (Op::Write { id, offset, data, .. }, true) = (&mut op, len > 0) {
            let mut buf = vec![0u8; len as usize];
            let n = self.cache.data_read_at(*id, *offset, &mut buf).unwrap_or(0);
            buf.truncate(n);
            *data = buf;
        }
        op
    }

    /// The server's volume was replaced: every change queued here is
    /// parked with its bytes instead of being sent to a state it was not
    /// made against. Returns how many.
    pub(crate) fn park_for_new_incarnation(&self) -> R<usize> {
        let _g = lock(&self.apply);
        let mut e = self.engine();
        if let Some(l) = e.seal_all(&self.cache, self.now())? {
            self.log_local(&mut e, l)?;
        }
        let why = OpError::conflict(ConflictKind::VolumeReplaced, None);
        let parked = e.park_all(&why);
        drop(e);
        let n = parked.len();
        let edits: Vec<Edit> = parked
            .into_iter()
            .map(|(lsn, op, error, len)| Edit::Park(lsn, Parked { op: self.with_bytes(op, len), error, kept: None }))
            .collect();
        self.cache.local(&edits)?;
        Ok(n)
    }

    /// At the first connection, before anything is sent: has the server
    /// applied changes of this replica that this cache never logged (a
    /// power loss took them, or the cache was restored from an earlier
    /// copy)? Then the changes the server applied leave the queue, and the
    /// replica continues under a fresh id (see [`Engine::after_gap`]).
    /// Returns whether it did.
    pub(crate) fn check_gap(&self) -> R<bool> {
        let Some(w) = self.client.welcome() else { return Ok(false) };
        let held = self.logged_before.load(std::sync::atomic::Ordering::Acquire);
        if w.last_applied <= held {
            return Ok(false);
        }
        let fresh = ReplicaId::random();
        {
            let _g = lock(&self.apply);
            let mut e = self.engine();
            if let Some(l) = e.seal_all(&self.cache, self.now())? {
                self.log_local(&mut e, l)?;
            }
            let edits = e.after_gap(held, w.last_applied);
            drop(e);
            self.cache.local(&edits)?;
            self.cache.fold()?;
        }
        // (the new id first in the cache: a restart speaks as it)
        self.cache.set_meta128("replica", fresh.0)?;
        tracing::warn!(
            "the server applied changes of this replica through {} that this cache holds only through {held} (a \
             power loss, or a cache restored from an earlier copy): those come back from the server, and this \
             replica continues as {fresh:?}, its queued changes checked against the server's state",
            w.last_applied
        );
        self.client.become_replica(fresh);
        Ok(true)
    }

    /// The server answered entry `lsn` (`Ok(None)`: nothing was left to send).
    fn answered(&self, lsn: u64, r: Result<Option<Applied>, OpError>) {
        let waiter = lock(&self.waiting).remove(&lsn);
        let refusal = r.as_ref().err().cloned();
        // (the decision and its record under `apply`: a fold's durable
        // mark never covers an answer not yet logged)
        let g = lock(&self.apply);
        let Some(out) = self.engine().answered(lsn, r, self.now()) else { return };
        if let (Some(pause), Some(why)) = (out.retry_in, &refusal) {
            tracing::warn!("the server could not apply a change now ({why}); retrying it in {pause:?}");
        }
        let mut now = out.now;
        if let Some((plsn, op, error, len)) = out.park {
            let op = self.with_bytes(op, len);
            tracing::error!(
                "the server refused a change made here ({error}): {} of {}; it is kept in the cache's parked \
                 list with its bytes (izo status) and this replica resyncs from the server, undoing it here",
                op.kind(),
                self.path_of(&op),
            );
            now.insert(0, Edit::Park(plsn, Parked { op, error, kept: None }));
        }
        // parked and retried entries are recorded now; plain answers ride
        // with the next commit
        if !now.is_empty() {
            if let Err(e) = self.cache.local_quiet(&now) {
                tracing::warn!("recording the answer to change {lsn}: {e}");
            }
        }
        drop(g);
        if let (Some(w), Some(v)) = (waiter, out.wake) {
            let _ = w.send(v);
        }
        if out.ready {
            if let Err(e) = self.apply_ready() {
                tracing::warn!("taking the server's attributes: {e}");
            }
        }
        if out.wake_sender {
            self.cml_wake.notify_one();
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

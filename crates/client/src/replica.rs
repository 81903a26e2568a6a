//! A full replica of a volume (replicate mode): the cache filled from a
//! snapshot, then kept current by the record stream; the file-system API
//! the FUSE adapter calls (by inode number, never by path).
//!
//! Mutations are applied to the cache at once and sent later through the
//! client modification log (`local.rs`, `cml.rs`); the stream brings their
//! records back ("echoes"), which only advance the objects' server
//! versions, and everyone else's changes, which are applied unless they
//! would overwrite a local change the server has not seen yet.

use crate::cache::{Cache, CacheError, Cached, Edit, ROOT_INO};
use crate::engine::{Data, Engine, Need, Planned, Refresh};
use crate::{Client, ClientError, FileSegment, Segment, StreamEvent};
use izo_proto::*;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

pub use crate::engine::{visible_change, Inval};
pub use crate::error::ReplicaError;

/// Why [`Replica::sync_within`] could not finish, each with what it knows.
#[derive(Debug, thiserror::Error)]
pub enum SyncWait {
    /// No connection.
    #[error(
        "the server at {addr} is unreachable since {} ({} s ago): {ops} changes made here ({bytes} bytes) are kept \
         in the cache and sent when it answers",
        since.secs, ago.as_secs()
    )]
    Unreachable {
        /// The server.
        addr: String,
        /// When the connection went down (wall clock, seconds since the epoch).
        since: Timestamp,
        /// How long ago.
        ago: Duration,
        /// Changes not answered.
        ops: u64,
        /// Their bytes.
        bytes: u64,
    },
    /// Connected, but changes made here are still on the way.
    #[error(
        "the server is reachable and still applying {ops} of the changes made here ({bytes} bytes) after {}s; \
         wait longer with --timeout",
        waited.as_secs()
    )]
    Applying {
        /// Changes not answered.
        ops: u64,
        /// Their bytes.
        bytes: u64,
        /// How long it waited.
        waited: Duration,
    },
    /// Everything made here is answered, but the stream has not brought
    /// what the server had applied.
    #[error("the record stream is at seq {at}, behind the server{} after {}s; wait longer with --timeout",
        head.map(|h| format!("'s {h}")).unwrap_or_default(), waited.as_secs())]
    Behind {
        /// The server's position, if it answered.
        head: Option<Seq>,
        /// This replica's.
        at: Seq,
        /// How long it waited.
        waited: Duration,
    },
    /// The cache's disk is full: the stream cannot be applied.
    #[error("{why}")]
    CacheFull {
        /// What it needs.
        why: String,
    },
    /// Something else failed.
    #[error(transparent)]
    Replica(ReplicaError),
}

impl From<ClientError> for ReplicaError {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Op(e) => e.into(),
            ClientError::Disconnected => ReplicaError::NotConnected,
            other => ReplicaError::Unreachable(other.to_string()),
        }
    }
}

type R<T> = Result<T, ReplicaError>;

/// Requests the mount served, by kind (for `izo status` and the tests
/// that prove a fast path: a passthrough read never reaches the daemon).
#[derive(Default, Debug)]
pub struct OpCounters {
    /// LOOKUP.
    pub lookup: std::sync::atomic::AtomicU64,
    /// GETATTR.
    pub getattr: std::sync::atomic::AtomicU64,
    /// READ.
    pub read: std::sync::atomic::AtomicU64,
    /// WRITE.
    pub write: std::sync::atomic::AtomicU64,
    /// READDIR.
    pub readdir: std::sync::atomic::AtomicU64,
    /// READDIRPLUS.
    pub readdirplus: std::sync::atomic::AtomicU64,
    /// Opens answered with passthrough to the cache file.
    pub passthrough_opens: std::sync::atomic::AtomicU64,
}

impl OpCounters {
    /// Count one.
    pub fn bump(c: &std::sync::atomic::AtomicU64) {
        c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// `name value` pairs.
    pub fn list(&self) -> Vec<(&'static str, u64)> {
        let g = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        vec![
            ("lookup", g(&self.lookup)),
            ("getattr", g(&self.getattr)),
            ("read", g(&self.read)),
            ("write", g(&self.write)),
            ("readdir", g(&self.readdir)),
            ("readdirplus", g(&self.readdirplus)),
            ("passthrough_opens", g(&self.passthrough_opens)),
        ]
    }
}

/// Progress of the initial replication.
#[derive(Clone, Copy, Debug, Default)]
pub struct Progress {
    /// Objects in the snapshot.
    pub objects: u64,
    /// Files whose data is fetched.
    pub files_done: u64,
    /// Files to fetch.
    pub files: u64,
    /// Bytes fetched.
    pub bytes_done: u64,
    /// Bytes to fetch.
    pub bytes: u64,
}

/// How long a request to the server may take before the caller gets EIO.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// Files up to this size are fetched many to a query (initial replication)...
const BATCH_FILE: u64 = 1 << 20;
/// ...at most this many...
const BATCH_FILES: usize = 256;
/// ...and this many bytes to a query.
const BATCH_BYTES: u64 = 8 << 20;

/// Most records applied to the cache in one transaction.
const BATCH: usize = 256;

/// A replica: cache + connection.
pub struct Replica {
    /// The connection.
    pub client: Client,
    /// The cache.
    pub cache: Cache,
    pub(crate) rt: tokio::runtime::Handle,
    /// Serialises changes to the cache (taken before `engine`).
    pub(crate) apply: Mutex<()>,
    /// The replica's decisions (and its modification log).
    pub(crate) engine: Mutex<Engine>,
    /// Where the engine's monotonic time starts.
    pub(crate) started: std::time::Instant,
    /// Wakes the sender.
    pub(crate) cml_wake: tokio::sync::Notify,
    /// Bumped whenever an entry is answered.
    pub(crate) cml_answered: tokio::sync::watch::Sender<u64>,
    /// Callers waiting for the answer to an entry.
    #[allow(clippy::type_complexity)]
    pub(crate) waiting: Mutex<std::collections::HashMap<u64, tokio::sync::oneshot::Sender<Result<Applied, OpError>>>>,
    /// Close waits for the server like fsync (`--sync-close`).
    pub sync_close: std::sync::atomic::AtomicBool,
    /// Requests served by the mount.
    pub ops: OpCounters,
    /// Data files open for writing, by inode, while handles are open.
    pub(crate) writers: Mutex<std::collections::HashMap<u64, Arc<File>>>,
    inval: Mutex<Option<mpsc::Sender<Inval>>>,
    /// Seq of the last record applied to the cache.
    applied: tokio::sync::watch::Sender<Seq>,
    /// Server time of the last record applied.
    last_time: Mutex<Option<Timestamp>>,
    /// Bytes fetched from the server since start.
    fetched: std::sync::atomic::AtomicU64,
    /// Open file handles per inode: an orphan is dropped at its last close.
    open: Mutex<std::collections::HashMap<u64, u32>>,
    /// The volume's rules as the server last sent them (kept in the cache
    /// for offline use; `None` before any server of protocol 6 answered).
    rules: Mutex<Option<VolumeRules>>,
    /// Why the record stream cannot be applied now (shown by `izo status`).
    /// (whether for want of space, and what is wrong)
    pub(crate) stream_problem: Mutex<Option<(bool, String)>>,
    /// The highest lsn this cache had logged when it started (before what
    /// the server told of it: see [`Replica::check_gap`]).
    pub(crate) logged_before: std::sync::atomic::AtomicU64,
    /// The reserve on the cache's disk is held (see [`Cache::reserve`]).
    pub(crate) reserve_held: std::sync::atomic::AtomicBool,
    /// Why the last fold of the log into the database failed, if it did.
    pub(crate) fold_problem: Mutex<Option<String>>,
    /// The volume's incarnation was checked on a live connection (at the
    /// start, or at the first connection of a mount that came up offline):
    /// nothing is sent or followed before.
    pub(crate) checked: std::sync::atomic::AtomicBool,
}

/// Run `f` until it succeeds, backing off from `pause` to 5 s between tries.
async fn retrying<F, Fut>(what: &str, mut pause: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = R<()>>,
{
    while let Err(e) = f().await {
        tracing::warn!("{what} failed: {e}; retrying");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

fn lock_std<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Did this fail for want of space on the cache's disk? (by the error's
/// kind: ENOSPC or EDQUOT from a data file or the log, or a database that
/// could not grow)
pub fn is_full(e: &ReplicaError) -> bool {
    match e {
        ReplicaError::Cache(CacheError::DbFull { .. }) => true,
        ReplicaError::Cache(CacheError::Io { err, .. }) => {
            matches!(err.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
        }
        _ => false,
    }
}

/// The bytes a record brings into the cache (its data, inline or fetched).
fn record_bytes(r: &Record) -> u64 {
    match &r.op {
        Op::Write { data, .. } => data.len() as u64 + r.elided,
        Op::SetXattr { value, .. } => value.len() as u64,
        _ => 0,
    }
}

/// Open (creating) a data file for writing, keeping its content.
pub(crate) fn open_data(path: &std::path::Path) -> R<File> {
    OpenOptions::new().create(true).truncate(false).write(true).open(path).map_err(io(path))
}

pub(crate) fn io(path: &std::path::Path) -> impl Fn(std::io::Error) -> ReplicaError + '_ {
    move |err| ReplicaError::Cache(CacheError::Io { path: path.to_path_buf(), err })
}

impl Replica {
    /// A replica over `client` and `cache`; blocking calls run on `rt`.
    /// Changes an earlier run left unsent are queued again.
    pub fn new(client: Client, cache: Cache, rt: tokio::runtime::Handle) -> R<Arc<Replica>> {
        let seq = cache.seq()?;
        let applied = tokio::sync::watch::Sender::new(seq);
        let r = Arc::new(Replica {
            client,
            cache,
            rt,
            apply: Mutex::new(()),
            engine: Mutex::new(Engine::new(seq, Default::default())),
            started: std::time::Instant::now(),
            cml_wake: tokio::sync::Notify::new(),
            cml_answered: tokio::sync::watch::Sender::new(0),
            waiting: Mutex::new(Default::default()),
            sync_close: Default::default(),
            ops: Default::default(),
            writers: Default::default(),
            inval: Mutex::new(None),
            applied,
            last_time: Mutex::new(None),
            fetched: Default::default(),
            open: Mutex::new(Default::default()),
            rules: Mutex::new(None),
            stream_problem: Mutex::new(None),
            fold_problem: Mutex::new(None),
            reserve_held: Default::default(),
            logged_before: Default::default(),
            checked: Default::default(),
        });
        *r.rules.lock().unwrap_or_else(|p| p.into_inner()) = r.cache_rules()?;
        r.keep_reserve();
        r.recover_cml()?;
        // (every answer before the recovered log's first entry was folded)
        let mark = r.engine().durable_mark();
        r.engine().reported_durable(mark);
        r.client.set_durable_through(mark);
        // (the log replay may have moved the stream position past what the
        // database held: waiters on it must see where the cache is now)
        r.set_applied(r.cache.seq()?);
        Ok(r)
    }

    /// What keeps the cache from taking changes now, if anything: the
    /// stream that cannot be applied, a fold that failed (a full disk says
    /// so and what it needs).
    pub fn cache_problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        out.extend(lock_std(&self.stream_problem).clone().map(|(_, why)| why));
        out.extend(lock_std(&self.fold_problem).clone().map(|f| format!("folding the log into the database: {f}")));
        out
    }

    /// The volume's rules as last known (see [`Query::Rules`]).
    pub fn rules(&self) -> Option<VolumeRules> {
        *self.rules.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The rules kept in the cache (each meta key holds its value plus
    /// one: 0 is "never heard").
    fn cache_rules(&self) -> R<Option<VolumeRules>> {
        let m = |k: &str| self.cache.meta(&format!("rules.{k}"));
        let (max, room, trusted, owners) = (m("max_file_size")?, m("xattr_room")?, m("trusted")?, m("owners")?);
        if max == 0 || room == 0 || trusted == 0 || owners == 0 {
            return Ok(None);
        }
        Ok(Some(VolumeRules {
            max_file_size: max - 1,
            xattr_room: room - 1,
            trusted: trusted == 2,
            owners: (owners - 1) as u8,
        }))
    }

    /// Ask a server of protocol 6 or later for the volume's rules, and keep
    /// them (in the cache too, for offline use). Older servers decide
    /// everything when a change is sent.
    pub async fn learn_rules(&self) -> R<()> {
        if self.client.welcome().is_none_or(|w| w.version < izo_proto::APPEND_VERSION) {
            return Ok(());
        }
        let r = self.client.rules().await?;
        let plus = |v: u64| v.saturating_add(1);
        self.cache.local(&[
            Edit::Meta("rules.max_file_size".into(), plus(r.max_file_size)),
            Edit::Meta("rules.xattr_room".into(), plus(r.xattr_room)),
            Edit::Meta("rules.trusted".into(), if r.trusted { 2 } else { 1 }),
            Edit::Meta("rules.owners".into(), plus(r.owners as u64)),
        ])?;
        *self.rules.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
        Ok(())
    }

    /// Where kernel invalidations go (one notifier thread drains it).
    pub fn set_invalidator(&self, tx: mpsc::Sender<Inval>) {
        *self.inval.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
    }

    /// The stream position the cache holds now (the engine's too).
    pub(crate) fn set_applied(&self, seq: Seq) {
        self.engine().set_applied(seq);
        self.applied.send_replace(seq);
    }

    pub(crate) fn invalidate(&self, what: Vec<Inval>) {
        if let Some(tx) = self.inval.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            for w in what {
                let _ = tx.send(w);
            }
        }
    }

    /// Check the volume's incarnation against the cache's: a server whose
    /// state was replaced (restored, recreated) voids every saved seq and
    /// id, so the cache starts over from a snapshot (objects it had become
    /// orphans; inode numbers of objects that exist again are kept).
    /// Also remembers this cache's replica id, so a remount speaks as the
    /// same replica.
    pub fn check_incarnation(&self) -> R<()> {
        let Some(w) = self.client.welcome() else { return Ok(()) };
        match self.cache.meta128("incarnation")? {
            Some(i) if i == w.incarnation => {}
            Some(_) => {
                tracing::warn!("the volume has a new incarnation (its server state was replaced): resyncing the cache");
                let parked = self.park_for_new_incarnation()?;
                if parked > 0 {
                    tracing::warn!(
                        "{parked} changes made here before the volume was replaced are parked, not sent (izo status)"
                    );
                }
                // (the resync keeps what this replica holds that the new
                // incarnation lacks: see rollback.rs)
                self.cache.change(&[Edit::Seq(0), Edit::Meta("synced".into(), 0), Edit::Meta("rollback".into(), 1)])?;
                self.set_applied(0);
                self.cache.set_meta128("incarnation", w.incarnation)?;
            }
            None => self.cache.set_meta128("incarnation", w.incarnation)?,
        }
        self.cache.set_meta128("replica", self.client.replica().0)?;
        Ok(())
    }

    /// Fill an empty cache from a snapshot (nothing to do if it already
    /// follows the stream).
    pub async fn initial_sync(&self, mut progress: impl FnMut(&Progress)) -> R<()> {
        // (an empty volume leaves the position at 0: the flag says done)
        if self.cache.seq()? > 0 || self.cache.meta("synced")? == 1 {
            return Ok(());
        }
        let (entries, seq) = self.client.snapshot().await?;
        if self.cache.meta("rollback")? == 1 {
            let kept = self.keep_what_the_restored_server_lacks(&entries)?;
            if kept > 0 {
                tracing::warn!("{kept} file versions the restored server lacks are kept as parked changes");
            }
            self.cache.local(&[Edit::Meta("rollback".into(), 0)])?;
        }
        let mut p = Progress { objects: entries.len() as u64, ..Progress::default() };
        // (an earlier initial sync may have been cut short: start clean)
        let present: std::collections::HashSet<ObjectId> = entries.iter().map(|e| e.attr.id).collect();
        let mut edits = vec![Edit::ClearEntries];
        for id in self.cache.ids()? {
            if !present.contains(&id) {
                edits.push(Edit::Forget { id });
            }
        }
        drop(present);
        // The namespace goes in in slices (nothing is mounted yet, and the
        // position is set only at the end: a cut-short sync starts over), so
        // memory stays that of the snapshot, not of its edits and log too.
        let mut files = Vec::new();
        for e in entries {
            edits.push(Edit::Put { attr: e.attr.clone(), target: e.target, xattrs: Some(e.xattrs) });
            for (parent, name) in e.links {
                edits.push(Edit::Link { parent, name, id: e.attr.id });
            }
            if e.attr.kind == FileKind::File {
                files.push((e.attr.id, e.attr.size));
                p.files += 1;
                p.bytes += e.attr.size;
            }
            if edits.len() >= 8192 {
                self.cache.local(&std::mem::take(&mut edits))?;
                self.cache.fold()?; // (the in-memory layer stays small)
            }
        }
        self.cache.local(&edits)?;
        drop(edits);
        self.cache.fold()?;
        progress(&p);
        // file contents, several fetches in flight: small files many to a
        // query, large ones one by one
        use futures_util::stream::{self, StreamExt};
        let mut jobs: Vec<Vec<(ObjectId, u64)>> = Vec::new();
        let mut batch: Vec<(ObjectId, u64)> = Vec::new();
        let mut batch_bytes = 0;
        for (id, size) in files {
            if size > BATCH_FILE {
                jobs.push(vec![(id, size)]);
                continue;
            }
            if batch.len() == BATCH_FILES || batch_bytes + size > BATCH_BYTES {
                jobs.push(std::mem::take(&mut batch));
                batch_bytes = 0;
            }
            batch_bytes += size;
            batch.push((id, size));
        }
        if !batch.is_empty() {
            jobs.push(batch);
        }
        let mut fetches = stream::iter(jobs)
            .map(|job| async move {
                let (n, bytes) = (job.len() as u64, job.iter().map(|(_, s)| s).sum::<u64>());
                match job[..] {
                    [(id, size)] if size > BATCH_FILE => self.fetch(id, 0, size, Some(size)).await,
                    _ => self.fetch_files(job).await,
                }
                .map(|()| (n, bytes))
            })
            .buffer_unordered(8);
        while let Some(r) = fetches.next().await {
            let (n, bytes) = r?;
            p.files_done += n;
            p.bytes_done += bytes;
            progress(&p);
        }
        self.cache.change(&[Edit::Seq(seq), Edit::Meta("synced".into(), 1)])?;
        self.set_applied(seq);
        Ok(())
    }

    /// Put a fetched segment into a file's data file (bytes counted as
    /// fetched), through the cache's storage.
    fn land(&self, id: ObjectId, seg: Segment) -> R<()> {
        match seg {
            Segment::Data(at, bytes) => {
                self.fetched.fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
                Ok(self.cache.data_write_at(id, at, &bytes)?)
            }
            Segment::Hole(at, n) => Ok(self.cache.data_punch(id, at, n)?),
        }
    }

    /// A file's data file, created empty if missing (its content kept).
    fn ensure_data(&self, id: ObjectId) -> R<()> {
        if self.cache.data_len(id)?.is_none() {
            self.cache.data_create(id)?;
        }
        Ok(())
    }

    /// Copy the first `size` bytes of each of `files` from the server into
    /// their data files (one query), and set each file's size.
    async fn fetch_files(&self, files: Vec<(ObjectId, u64)>) -> R<()> {
        let sizes: HashMap<ObjectId, u64> = files.iter().copied().collect();
        // the file being written, and its size
        let mut cur: Option<(ObjectId, u64)> = None;
        let mut failed: Option<ReplicaError> = None;
        let finish = |cur: &mut Option<(ObjectId, u64)>| -> R<()> {
            match cur.take() {
                Some((id, size)) => Ok(self.cache.data_set_len(id, size)?),
                None => Ok(()),
            }
        };
        let r = self
            .client
            .read_files(files, |seg| {
                if failed.is_some() {
                    return Ok(());
                }
                let r = match seg {
                    FileSegment::Start { id, .. } => finish(&mut cur).and_then(|()| {
                        let size = sizes.get(&id).copied().unwrap_or(0);
                        self.ensure_data(id)?;
                        cur = Some((id, size));
                        Ok(())
                    }),
                    // gone or changed meanwhile: a later record says what
                    // happened (its data file is there, empty, as for a
                    // fetch that found it gone)
                    FileSegment::Missing(id) => finish(&mut cur).and_then(|()| self.ensure_data(id)),
                    FileSegment::Seg(seg) => match &cur {
                        Some((id, _)) => self.land(*id, seg),
                        None => Err(ReplicaError::Invalid("file data before its start".into())),
                    },
                };
                if let Err(e) = r {
                    failed = Some(e);
                }
                Ok(())
            })
            .await;
        r?;
        if let Some(e) = failed {
            return Err(e);
        }
        finish(&mut cur)
    }

    /// Copy `offset..offset+len` of a file from the server into its data
    /// file, then set the file's size to `size` if given.
    async fn fetch(&self, id: ObjectId, offset: u64, len: u64, size: Option<u64>) -> R<()> {
        self.ensure_data(id)?;
        if len > 0 {
            let mut failed = None;
            let r = self
                .client
                .read_with(id, offset, len, |seg| {
                    if let Err(e) = self.land(id, seg) {
                        failed = Some(e);
                    }
                    Ok(())
                })
                .await;
            match r {
                Ok(()) => {}
                // gone or changed meanwhile: a later record says what happened
                Err(ClientError::Op(OpError::NotFound(_))) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
            if let Some(e) = failed {
                return Err(e);
            }
        }
        if let Some(size) = size {
            self.cache.data_set_len(id, size)?;
        }
        Ok(())
    }

    /// `offset..offset+len` of a file from the server, in memory.
    async fn fetch_mem(&self, id: ObjectId, offset: u64, len: u64) -> R<Option<Vec<Segment>>> {
        let mut segs = Vec::new();
        let r = self
            .client
            .read_with(id, offset, len, |seg| {
                if let Segment::Data(_, b) = &seg {
                    self.fetched.fetch_add(b.len() as u64, std::sync::atomic::Ordering::Relaxed);
                }
                segs.push(seg);
                Ok(())
            })
            .await;
        match r {
            Ok(()) => Ok(Some(segs)),
            // gone or changed meanwhile: a later record says what happened
            Err(ClientError::Op(OpError::NotFound(_))) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The pieces of file `id` (at the server's `a`) that differ from the
    /// cached content, by the server's block hashes: after a restart most
    /// files a refresh asks for are the same here (`None`: gone meanwhile).
    /// Without hashes of that version, the whole file.
    async fn fetch_differing(&self, id: ObjectId, a: &Attr) -> R<Option<Vec<Segment>>> {
        let blocks = match self.client.block_hashes(id).await {
            Ok((version, blocks))
                if version == a.versions.data && blocks.len() as u64 == a.size.div_ceil(BLOCK_SIZE) =>
            {
                blocks
            }
            Ok(_) => return self.fetch_mem(id, 0, a.size).await,
            Err(ClientError::Op(OpError::NotFound(_))) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let mut segs = Vec::new();
        for (start, len) in self.differing_blocks(id, a.size, &blocks)? {
            match self.fetch_mem(id, start, len).await? {
                Some(s) => segs.extend(s),
                None => return Ok(None),
            }
        }
        Ok(Some(segs))
    }

    /// The (offset, length) of each 1 MiB block of file `id` (of `size`
    /// bytes) whose hash differs from the cached content (missing bytes
    /// read as zeros).
    fn differing_blocks(&self, id: ObjectId, size: u64, blocks: &[[u8; 32]]) -> R<Vec<(u64, u64)>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; BLOCK_SIZE as usize];
        for (i, want) in blocks.iter().enumerate() {
            let start = i as u64 * BLOCK_SIZE;
            let len = (size - start).min(BLOCK_SIZE) as usize;
            let mut got = 0;
            while got < len {
                match self.cache.data_read_at(id, start + got as u64, &mut buf[got..len])? {
                    0 => break,
                    n => got += n,
                }
            }
            buf[got..len].fill(0);
            if blake3::hash(&buf[..len]).as_bytes() != want {
                out.push((start, len as u64));
            }
        }
        Ok(out)
    }

    /// Write fetched pieces into a data file.
    fn put_segments(&self, id: ObjectId, segs: &[Segment]) -> R<()> {
        for seg in segs {
            match seg {
                Segment::Data(at, b) => self.cache.data_write_at(id, *at, b)?,
                Segment::Hole(at, n) => self.cache.data_punch(id, *at, *n)?,
            }
        }
        Ok(())
    }

    /// Follow the record stream from the cache's position, forever (returns
    /// when the connection is gone for good).
    pub async fn follow(self: Arc<Self>) -> R<()> {
        loop {
            let from = self.cache.seq()?;
            let mut rx = self.client.subscribe(from).await?;
            let oldest = loop {
                let first = match tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
                    Ok(Some(first)) => first,
                    Ok(None) => return Err(ReplicaError::Unreachable("the record stream ended".into())),
                    Err(_) => {
                        self.housekeep().await;
                        continue;
                    }
                };
                // What else has arrived goes into the same cache
                // transaction (one commit for many records).
                let (mut recs, mut behind, mut next) = (Vec::new(), None, Some(first));
                while let Some(ev) = next {
                    match ev {
                        StreamEvent::Record(r) => recs.push(*r),
                        StreamEvent::SnapshotRequired { oldest } => {
                            behind = Some(oldest);
                            break;
                        }
                    }
                    next = if recs.len() < BATCH { rx.try_recv().ok() } else { None };
                    if next.is_none() && recs.len() < BATCH && recs.len() > 1 {
                        // a burst: let it gather (one commit for many records)
                        next = tokio::time::timeout(Duration::from_millis(2), rx.recv()).await.ok().flatten();
                    }
                }
                if !recs.is_empty() {
                    // Never past a record that did not apply (the stream
                    // waits; `izo status` shows the lag).
                    let mut pause = Duration::from_millis(50);
                    while let Err(e) = self.apply_batch(&recs).await {
                        let why = if is_full(&e) {
                            let need: u64 = recs.iter().map(record_bytes).sum();
                            format!(
                                "cache disk full: {:.1} MiB needed for records {}..; the stream waits and resumes \
                                 by itself once space is freed",
                                need as f64 / (1 << 20) as f64,
                                recs[0].seq
                            )
                        } else {
                            format!("applying records {}.. to the cache failed: {e}", recs[0].seq)
                        };
                        tracing::warn!("{why}; retrying");
                        *lock_std(&self.stream_problem) = Some((is_full(&e), why));
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(5));
                    }
                    *lock_std(&self.stream_problem) = None;
                }
                if let Some(oldest) = behind {
                    break oldest;
                }
                self.housekeep().await;
            };
            tracing::warn!("the server no longer holds the records after {from} (oldest {oldest}): resyncing");
            retrying("resyncing from a snapshot", Duration::from_millis(100), || self.resync()).await;
        }
    }

    /// Between batches of the stream: a refused local change left the cache
    /// ahead of the server, so once nothing local is on the way, start over
    /// from a snapshot (the refused op is parked, not lost); attributes a
    /// log replay set are asked for again.
    async fn housekeep(&self) {
        let (redo, refresh) = self.engine().housekeep();
        if !refresh.is_empty() {
            self.refresh(refresh).await;
        }
        if redo {
            tracing::warn!("resyncing from a snapshot after a refused change");
            retrying("resyncing from a snapshot", Duration::from_millis(100), || self.resync()).await;
        }
    }

    /// Take the server's attributes of objects that have no local change
    /// on the way (after a log replay: the replay set local values).
    async fn refresh(&self, ids: Vec<(ObjectId, bool)>) {
        if !self.client.is_connected() {
            // (asked again once the server answers)
            let mut e = self.engine();
            for (id, all) in ids {
                e.refresh_again(id, all);
            }
            return;
        }
        for (id, all) in ids {
            if let Err(e) = self.refresh_one(id, all).await {
                tracing::warn!("refreshing {id} from the server: {e}; trying again later");
                self.engine().refresh_again(id, all);
            }
        }
    }

    /// Attributes (with `all`, also xattrs and a file's content) of one
    /// object from the server, unless it is busy again (then later).
    async fn refresh_one(&self, id: ObjectId, all: bool) -> R<()> {
        if !all && self.cache.get(id)?.is_none() {
            return Ok(());
        }
        let a = match self.client.getattr(id).await {
            Ok(a) => a,
            Err(ClientError::Op(OpError::NotFound(_))) => return Ok(()), // its removal is on the way
            Err(e) => return Err(e.into()),
        };
        let x = match all {
            false => None,
            true => match self.client.xattrs(id).await {
                Ok(x) => Some(x),
                Err(ClientError::Op(OpError::NotFound(_))) => return Ok(()),
                Err(e) => return Err(e.into()),
            },
        };
        let segs = if all && a.kind == FileKind::File { self.fetch_differing(id, &a).await? } else { None };
        let _g = self.apply.lock().unwrap_or_else(|p| p.into_inner());
        if self.engine().refresh_answer(&self.cache, id, all, &a)? == Refresh::Skip {
            return Ok(()); // busy again (later), or the stream already brought newer
        }
        if let Some(segs) = segs {
            self.put_segments(id, &segs)?;
            if self.cache.data_len(id)?.is_some() {
                self.cache.data_set_len(id, a.size)?;
            }
        }
        self.cache.local(&[Edit::Put { attr: a, target: None, xattrs: x }, crate::engine::refresh_flag(id, false)])?;
        Ok(())
    }

    /// Bring the cache to a snapshot of the volume: the namespace as it is
    /// now (inode numbers kept), and of each file only the 1 MiB blocks whose
    /// hash differs from the cached content.
    /// Local changes on the way are sent and echoed first (a snapshot knows
    /// nothing of them).
    pub async fn resync(&self) -> R<()> {
        // everything sent must be answered (an answered op is in the
        // snapshot, its echo or not); nothing may be waiting to be sent
        let mut waited = std::time::Instant::now();
        while !self.engine().settled() {
            if waited.elapsed() > Duration::from_secs(10) {
                tracing::warn!("the resync waits for local changes to reach the server");
                waited = std::time::Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (entries, seq) = self.client.snapshot().await?;
        let mut edits = vec![Edit::ClearEntries];
        let mut keep = std::collections::HashSet::new();
        for e in &entries {
            keep.insert(e.attr.id);
            edits.push(Edit::Put { attr: e.attr.clone(), target: e.target.clone(), xattrs: Some(e.xattrs.clone()) });
            for (parent, name) in &e.links {
                edits.push(Edit::Link { parent: *parent, name: name.clone(), id: e.attr.id });
            }
        }
        let mut inval = Vec::new();
        for id in self.cache.ids()? {
            if let Some(i) = self.cache.get(id)?.map(|c| c.ino) {
                inval.push(Inval::Inode(i));
            }
            if !keep.contains(&id) {
                edits.push(Edit::Forget { id });
            }
        }
        {
            use futures_util::stream::{self, StreamExt};
            let jobs: Vec<(ObjectId, u64, Vec<[u8; 32]>)> = entries
                .iter()
                .filter(|e| e.attr.kind == FileKind::File)
                .map(|e| (e.attr.id, e.attr.size, e.blocks.clone()))
                .collect();
            let mut fetches = stream::iter(jobs)
                .map(|(id, size, blocks)| async move { self.fetch_changed(id, size, &blocks).await })
                .buffer_unordered(16);
            while let Some(r) = fetches.next().await {
                r?;
            }
        }
        edits.push(Edit::Seq(seq));
        edits.push(Edit::Meta(crate::engine::RESYNC.into(), 0));
        {
            let _g = self.apply.lock().unwrap_or_else(|p| p.into_inner());
            let mut e = self.engine();
            if !e.settled() {
                return Err(ReplicaError::Transient("local changes were made during the resync".into()));
            }
            self.cache.change(&edits)?;
            // answered before the snapshot: their echoes are in it
            e.resynced(seq);
        }
        self.applied.send_replace(seq);
        self.invalidate(inval);
        Ok(())
    }

    /// Fetch the blocks of a file whose hash differs from the data file's.
    async fn fetch_changed(&self, id: ObjectId, size: u64, blocks: &[[u8; 32]]) -> R<()> {
        let nblocks = size.div_ceil(BLOCK_SIZE);
        if blocks.len() as u64 != nblocks {
            return self.fetch(id, 0, size, Some(size)).await;
        }
        self.ensure_data(id)?;
        self.cache.data_set_len(id, size)?;
        for (start, len) in self.differing_blocks(id, size, blocks)? {
            self.fetch(id, start, len, None).await?;
        }
        Ok(())
    }

    /// What one record of the stream changes in the cache, as the engine
    /// plans it ([`Engine::plan_record`]), with its data effects landed on
    /// idle objects and its questions answered by the server.
    async fn prepare(&self, r: &Record, own: Option<u64>) -> R<Planned> {
        tracing::debug!("apply seq {} own {}: {:?}", r.seq, own.is_some(), r.op);
        let mut p = Engine::plan_record(&self.cache, r, own)?;
        for d in std::mem::take(&mut p.data) {
            // (elided bytes come from the server before anything is held)
            let segs = match &d {
                Data::Fetch { id, offset, len } => match self.fetch_mem(*id, *offset, *len).await? {
                    Some(segs) => Some(segs),
                    None => continue, // gone or changed meanwhile
                },
                _ => None,
            };
            let _g = self.apply.lock().unwrap_or_else(|p| p.into_inner());
            if !self.engine().may_land(d.id()) {
                continue;
            }
            match d {
                Data::Write { id, offset, data } => self.cache.data_write_at(id, offset, &data)?,
                Data::Fetch { id, .. } => self.put_segments(id, segs.as_deref().unwrap_or_default())?,
                Data::Punch { id, offset, len } => self.cache.data_punch(id, offset, len)?,
                Data::Allocate { id, offset, len } => self.cache.data_allocate(id, offset, len)?,
                Data::SetLen { id, size } => {
                    if let Err(e) = self.cache.data_set_len(id, size) {
                        tracing::warn!("keeping the length of {id}'s data file with its size: {e}");
                    }
                }
            }
        }
        for n in std::mem::take(&mut p.needs) {
            match n {
                Need::Xattrs { id, attr } => match self.client.xattrs(id).await {
                    Ok(x) => p.edits.push(Edit::Put { attr, target: None, xattrs: Some(x) }),
                    Err(ClientError::Op(OpError::NotFound(_))) => {} // removed later
                    Err(e) => return Err(e.into()),
                },
                Need::Attr(id) => {
                    let a = match self.client.getattr(id).await {
                        Ok(a) => Some(a),
                        Err(ClientError::Op(OpError::NotFound(_))) => None,
                        Err(e) => return Err(e.into()),
                    };
                    p.edits.extend(Engine::attr_answer(&self.cache, id, a)?);
                }
            }
        }
        Ok(p)
    }

    /// Apply records (in order) to the cache in one transaction: their
    /// edits, then the stream position of the last.
    async fn apply_batch(&self, recs: &[Record]) -> R<()> {
        let Some(last) = recs.last() else { return Ok(()) };
        let me = self.client.replica();
        let mut planned = Vec::with_capacity(recs.len());
        for r in recs {
            let own = self.engine().own(r, me);
            planned.push(self.prepare(r, own).await?);
        }
        let batch = {
            let _g = self.apply.lock().unwrap_or_else(|p| p.into_inner());
            let mut e = self.engine();
            let b = e.apply_records(&self.cache, planned, last.seq, self.now())?;
            // (not waiting for the disk: logged, folded every second)
            self.cache.local(&b.edits)?;
            e.set_applied(last.seq);
            b
        };
        for (id, ino) in batch.forgotten {
            if !ino.is_some_and(|i| self.is_open(i)) {
                self.purge(id)?;
            }
        }
        self.applied.send_replace(last.seq);
        *self.last_time.lock().unwrap_or_else(|p| p.into_inner()) = Some(last.time);
        self.invalidate(batch.inval);
        Ok(())
    }

    // ---- the file-system API (blocking; called from FUSE threads) ----

    /// The object behind an inode.
    pub fn get(&self, ino: u64) -> R<(ObjectId, Cached)> {
        self.cache.by_ino(ino)?.ok_or(ReplicaError::NotFound)
    }

    /// Look a name up.
    pub fn lookup(&self, parent: u64, name: &[u8]) -> R<Cached> {
        if name.len() > 255 {
            // as local file systems answer: no name that long can exist
            return Err(ReplicaError::NameTooLong);
        }
        let (pid, _) = self.get(parent)?;
        let id = self.cache.lookup(pid, name)?.ok_or(ReplicaError::NotFound);
        tracing::debug!("lookup {parent} {:?} -> {id:?}", String::from_utf8_lossy(name));
        self.cache.get(id?)?.ok_or(ReplicaError::NotFound)
    }

    /// Entries of a directory with their objects.
    pub fn readdir(&self, ino: u64) -> R<Vec<(Vec<u8>, Cached)>> {
        let (id, c) = self.get(ino)?;
        if c.attr.kind != FileKind::Dir {
            return Err(ReplicaError::NotDir);
        }
        let mut out = Vec::new();
        for (name, child) in self.cache.children(id)? {
            if let Some(c) = self.cache.get(child)? {
                out.push((name, c));
            }
        }
        Ok(out)
    }

    /// Inode number of a directory's parent (the root is its own).
    pub fn parent_ino(&self, ino: u64) -> Option<u64> {
        if ino == ROOT_INO {
            return Some(ROOT_INO);
        }
        let (id, _) = self.get(ino).ok()?;
        let p = self.cache.parent_of(id).ok()??;
        self.cache.get(p).ok()?.map(|c| c.ino)
    }

    /// Open the data file of a regular file.
    pub fn data_file(&self, ino: u64) -> R<File> {
        let (id, _) = self.get(ino)?;
        let path = self.cache.data_path(id);
        OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io(&path))
    }

    pub(crate) fn cached(&self, id: ObjectId) -> R<Cached> {
        self.cache.get(id)?.ok_or(ReplicaError::NotFound)
    }

    /// lseek(2) with SEEK_DATA or SEEK_HOLE, answered from the data file
    /// (which keeps the file's holes).
    pub fn seek(&self, ino: u64, offset: i64, whence: i32) -> R<i64> {
        let f = self.data_file(ino)?;
        use std::os::fd::AsRawFd;
        // SAFETY: plain syscall on an open fd.
        let r = unsafe { libc::lseek(f.as_raw_fd(), offset, whence) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::ENXIO) => ReplicaError::NoData,
                _ => ReplicaError::Invalid(e.to_string()),
            });
        }
        Ok(r)
    }

    pub(crate) fn is_open(&self, ino: u64) -> bool {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).get(&ino).is_some_and(|n| *n > 0)
    }

    /// Drop an object without names, and its data.
    pub(crate) fn purge(&self, id: ObjectId) -> R<()> {
        let _g = self.apply.lock().unwrap_or_else(|p| p.into_inner());
        if self.cache.get(id)?.is_some_and(|c| c.attr.nlink == 0) {
            self.cache.purge(id)?;
            if let Err(e) = self.cache.data_remove(id) {
                tracing::warn!("removing the data of {id}: {e}");
            }
        }
        Ok(())
    }

    /// A file handle was opened on `ino`.
    pub fn opened(&self, ino: u64) {
        *self.open.lock().unwrap_or_else(|p| p.into_inner()).entry(ino).or_default() += 1;
    }

    /// A file handle on `ino` was released: the last close of a file that
    /// lost its names frees it.
    pub fn released(&self, ino: u64) {
        let last = {
            let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
            let n = open.entry(ino).or_default();
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&ino);
                self.writers.lock().unwrap_or_else(|p| p.into_inner()).remove(&ino);
                true
            } else {
                false
            }
        };
        if last {
            if let Ok(Some((id, c))) = self.cache.by_ino(ino) {
                if c.attr.nlink == 0 {
                    let _ = self.purge(id);
                }
            }
        }
        if let Err(e) = self.flush(ino) {
            tracing::warn!("sealing the writes of inode {ino} at close: {e}");
        }
    }

    /// Wait until this replica has applied everything the server had
    /// applied when called (the barrier of `izo sync`). Returns that seq.
    /// Changes made here are sent and answered first.
    pub async fn sync(&self) -> R<Seq> {
        self.sync_within(DEADLINE).await.map_err(|e| match e {
            SyncWait::Replica(e) => e,
            e => ReplicaError::Unreachable(e.to_string()),
        })
    }

    /// [`Replica::sync`] waiting at most `limit`; why it could not finish
    /// says which of the three it is: the server is away, or it answers
    /// but is still applying changes made here, or the stream lags.
    pub async fn sync_within(&self, limit: Duration) -> Result<Seq, SyncWait> {
        let began = std::time::Instant::now();
        let left = || limit.saturating_sub(began.elapsed());
        self.seal_all().map_err(SyncWait::Replica)?;
        let upto = self.engine().next_lsn();
        let away = |r: &Replica| {
            let link = r.client.link();
            let (ops, bytes) = r.engine().backlog();
            SyncWait::Unreachable { addr: r.client.addr().to_string(), since: link.since, ago: link.for_, ops, bytes }
        };
        if !self.answered_before(upto, left()).await {
            if !self.client.is_connected() {
                return Err(away(self));
            }
            let (ops, bytes) = self.engine().backlog_before(upto);
            return Err(SyncWait::Applying { ops, bytes, waited: limit });
        }
        let stats = match tokio::time::timeout(left().max(Duration::from_millis(100)), self.client.server_stats()).await
        {
            Ok(Ok(s)) => s,
            _ if !self.client.is_connected() => return Err(away(self)),
            Ok(Err(e)) => return Err(SyncWait::Replica(e.into())),
            Err(_) => return Err(SyncWait::Behind { head: None, at: self.applied_seq(), waited: limit }),
        };
        let head = stats.iter().find(|(k, _)| k == "applied_seq").map(|(_, v)| *v).unwrap_or(0);
        let mut rx = self.applied.subscribe();
        let reached = matches!(tokio::time::timeout(left(), rx.wait_for(|s| *s >= head)).await, Ok(Ok(_)));
        if let (false, Some((true, why))) = (reached, lock_std(&self.stream_problem).clone()) {
            return Err(SyncWait::CacheFull { why });
        }
        if !reached {
            return Err(SyncWait::Behind { head: Some(head), at: self.applied_seq(), waited: limit });
        }
        Ok(head)
    }

    /// Server time of the last record applied to the cache.
    pub fn applied_time(&self) -> Option<Timestamp> {
        *self.last_time.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes fetched from the server since start.
    pub fn fetched(&self) -> u64 {
        self.fetched.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Seq of the last record applied to the cache.
    pub fn applied_seq(&self) -> Seq {
        *self.applied.borrow()
    }

    /// Inode number of the root.
    pub fn root_ino(&self) -> u64 {
        ROOT_INO
    }
}

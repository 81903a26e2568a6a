//! A full replica of a volume (replicate mode): the cache filled from a
//! snapshot, then kept current by the record stream; the file-system API
//! the FUSE adapter calls (by inode number, never by path).
//!
//! This first version writes through: a mutation returns once the server
//! acked it (so it is durable there), then the cache takes the reply. The
//! client modification log (write-back, offline work, reintegration) that
//! DESIGN describes is not built yet.

use crate::cache::{Cache, CacheError, Cached, Edit, ROOT_INO};
use crate::{Client, ClientError, Segment, StreamEvent};
use izo_proto::*;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

/// Errors of replica operations, mapped to errno by the mount.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// No such inode or name.
    #[error("not found")]
    NotFound,
    /// The name exists.
    #[error("exists")]
    Exists,
    /// Directory not empty.
    #[error("directory not empty")]
    NotEmpty,
    /// Malformed request.
    #[error("invalid: {0}")]
    Invalid(String),
    /// Not allowed.
    #[error("denied: {0}")]
    Denied(String),
    /// The volume is read-only.
    #[error("read-only volume: {0}")]
    ReadOnly(String),
    /// Someone else changed the object first.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The server did not answer in time or the connection is gone.
    #[error("server unreachable: {0}")]
    Unreachable(String),
    /// Not supported by this file system.
    #[error("not supported")]
    Unsupported,
    /// No data (or hole) at or after the offset (SEEK_DATA/SEEK_HOLE).
    #[error("no data past the offset")]
    NoData,
    /// The server could not do it now (space, I/O).
    #[error("transient: {0}")]
    Transient(String),
    /// The cache failed.
    #[error(transparent)]
    Cache(#[from] CacheError),
}

impl From<ClientError> for ReplicaError {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Op(OpError::NotFound(_)) => ReplicaError::NotFound,
            ClientError::Op(OpError::NotEmpty) => ReplicaError::NotEmpty,
            ClientError::Op(OpError::Invalid(m)) => ReplicaError::Invalid(m),
            ClientError::Op(OpError::Denied(m)) => ReplicaError::Denied(m),
            ClientError::Op(OpError::ReadOnly(m)) => ReplicaError::ReadOnly(m),
            ClientError::Op(OpError::Conflict { reason, .. }) if reason == "name exists" => ReplicaError::Exists,
            ClientError::Op(OpError::Conflict { reason, .. }) => ReplicaError::Conflict(reason),
            ClientError::Op(OpError::Transient(m)) => ReplicaError::Transient(m),
            other => ReplicaError::Unreachable(other.to_string()),
        }
    }
}

type R<T> = Result<T, ReplicaError>;

/// A kernel cache entry to drop after a remote change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Inval {
    /// An inode's attributes and data.
    Inode(u64),
    /// A name in a directory (by the directory's inode).
    Entry(u64, Vec<u8>),
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

/// Most records applied to the cache in one transaction.
const BATCH: usize = 256;

/// What one record changes in the cache, and the kernel caches to drop.
struct Prepared {
    edits: Vec<Edit>,
    inval: Vec<Inval>,
}

/// How long a mutation waits for the stream to bring its record.
const REACH: Duration = Duration::from_secs(2);

/// A replica: cache + connection.
pub struct Replica {
    /// The connection.
    pub client: Client,
    /// The cache.
    pub cache: Cache,
    rt: tokio::runtime::Handle,
    /// Serialises changes to the cache.
    apply: Mutex<()>,
    inval: Mutex<Option<mpsc::Sender<Inval>>>,
    /// Seq of the last record applied to the cache.
    applied: tokio::sync::watch::Sender<Seq>,
    /// Server time of the last record applied.
    last_time: Mutex<Option<Timestamp>>,
    /// Bytes of own writes in flight, by client seq: their records may
    /// leave the bytes out, and the stream applies them from here.
    own_writes: Mutex<std::collections::HashMap<u64, (u64, Vec<u8>)>>,
    /// Bytes fetched from the server since start.
    fetched: std::sync::atomic::AtomicU64,
    /// Open file handles per inode: an orphan is dropped at its last close.
    open: Mutex<std::collections::HashMap<u64, u32>>,
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

/// Deallocate a range of an open data file (reads as zeros after).
fn punch_fd(f: &File, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: plain syscall on an open fd.
    if unsafe { libc::fallocate(f.as_raw_fd(), mode, offset as i64, len as i64) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn allocate(path: &std::path::Path, offset: u64, len: u64) -> R<()> {
    use std::os::fd::AsRawFd;
    let f = OpenOptions::new().create(true).truncate(false).write(true).open(path).map_err(io(path))?;
    // SAFETY: plain syscall on an open fd.
    if unsafe { libc::fallocate(f.as_raw_fd(), 0, offset as i64, len as i64) } != 0 {
        return Err(io(path)(std::io::Error::last_os_error()));
    }
    Ok(())
}

fn punch(path: &std::path::Path, offset: u64, len: u64) -> R<()> {
    let f = OpenOptions::new().create(true).truncate(false).write(true).open(path).map_err(io(path))?;
    punch_fd(&f, offset, len).map_err(io(path))
}

fn io(path: &std::path::Path) -> impl Fn(std::io::Error) -> ReplicaError + '_ {
    move |err| ReplicaError::Cache(CacheError::Io { path: path.to_path_buf(), err })
}

impl Replica {
    /// A replica over `client` and `cache`; blocking calls run on `rt`.
    pub fn new(client: Client, cache: Cache, rt: tokio::runtime::Handle) -> Arc<Replica> {
        let seq = cache.seq().unwrap_or(0);
        let applied = tokio::sync::watch::Sender::new(seq);
        Arc::new(Replica {
            client,
            cache,
            rt,
            apply: Mutex::new(()),
            inval: Mutex::new(None),
            applied,
            last_time: Mutex::new(None),
            own_writes: Mutex::new(Default::default()),
            fetched: Default::default(),
            open: Mutex::new(Default::default()),
        })
    }

    /// Where kernel invalidations go (one notifier thread drains it).
    pub fn set_invalidator(&self, tx: mpsc::Sender<Inval>) {
        *self.inval.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
    }

    fn invalidate(&self, what: Vec<Inval>) {
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
                self.cache.change(&[Edit::Seq(0)])?;
                self.applied.send_replace(0);
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
        if self.cache.seq()? > 0 {
            return Ok(());
        }
        let (entries, seq) = self.client.snapshot().await?;
        let mut p = Progress { objects: entries.len() as u64, ..Progress::default() };
        // (an earlier initial sync may have been cut short: start clean)
        let mut edits = Vec::with_capacity(entries.len() * 2 + 1);
        edits.push(Edit::ClearEntries);
        let present: std::collections::HashSet<ObjectId> = entries.iter().map(|e| e.attr.id).collect();
        for id in self.cache.ids()? {
            if !present.contains(&id) {
                edits.push(Edit::Forget { id });
            }
        }
        let mut files = Vec::new();
        for e in &entries {
            edits.push(Edit::Put { attr: e.attr.clone(), target: e.target.clone(), xattrs: Some(e.xattrs.clone()) });
            for (parent, name) in &e.links {
                edits.push(Edit::Link { parent: *parent, name: name.clone(), id: e.attr.id });
            }
            if e.attr.kind == FileKind::File {
                files.push((e.attr.id, e.attr.size));
                p.files += 1;
                p.bytes += e.attr.size;
            }
        }
        self.cache.change(&edits)?;
        progress(&p);
        for (id, size) in files {
            self.fetch(id, 0, size, Some(size)).await?;
            p.files_done += 1;
            p.bytes_done += size;
            progress(&p);
        }
        self.cache.change(&[Edit::Seq(seq)])?;
        self.applied.send_replace(seq);
        Ok(())
    }

    /// Copy `offset..offset+len` of a file from the server into its data
    /// file, then set the file's size to `size` if given.
    async fn fetch(&self, id: ObjectId, offset: u64, len: u64, size: Option<u64>) -> R<()> {
        let path = self.cache.data_path(id);
        let f = OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(io(&path))?;
        if len > 0 {
            let mut failed = None;
            let r = self
                .client
                .read_with(id, offset, len, |seg| {
                    let r = match seg {
                        Segment::Data(at, bytes) => {
                            self.fetched.fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
                            f.write_all_at(&bytes, at)
                        }
                        Segment::Hole(at, n) => punch_fd(&f, at, n),
                    };
                    if let Err(e) = r {
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
                return Err(io(&path)(e));
            }
        }
        if let Some(size) = size {
            f.set_len(size).map_err(io(&path))?;
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
                let Some(first) = rx.recv().await else {
                    return Err(ReplicaError::Unreachable("the record stream ended".into()));
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
                }
                if !recs.is_empty() {
                    // Never past a record that did not apply (the stream
                    // waits; `izo status` shows the lag).
                    let what = format!("applying records {}.. to the cache", recs[0].seq);
                    retrying(&what, Duration::from_millis(50), || self.apply_batch(&recs)).await;
                }
                if let Some(oldest) = behind {
                    break oldest;
                }
            };
            tracing::warn!("the server no longer holds the records after {from} (oldest {oldest}): resyncing");
            retrying("resyncing from a snapshot", Duration::from_millis(100), || self.resync()).await;
        }
    }

    /// Bring the cache to a snapshot of the volume: the namespace as it is
    /// now (inode numbers kept), and of each file only the 1 MiB blocks whose
    /// hash differs from the cached content.
    pub async fn resync(&self) -> R<()> {
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
            if let Some(i) = self.ino(id)? {
                inval.push(Inval::Inode(i));
            }
            if !keep.contains(&id) {
                edits.push(Edit::Forget { id });
            }
        }
        for e in entries.iter().filter(|e| e.attr.kind == FileKind::File) {
            self.fetch_changed(e.attr.id, e.attr.size, &e.blocks).await?;
        }
        edits.push(Edit::Seq(seq));
        {
            let _g = self.apply.lock().unwrap_or_else(|p| p.into_inner());
            self.cache.change(&edits)?;
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
        let path = self.cache.data_path(id);
        let f =
            OpenOptions::new().create(true).truncate(false).read(true).write(true).open(&path).map_err(io(&path))?;
        f.set_len(size).map_err(io(&path))?;
        let mut buf = vec![0u8; BLOCK_SIZE as usize];
        for (i, want) in blocks.iter().enumerate() {
            let start = i as u64 * BLOCK_SIZE;
            let len = (size - start).min(BLOCK_SIZE) as usize;
            let mut got = 0;
            while got < len {
                match f.read_at(&mut buf[got..len], start + got as u64) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(e) => return Err(io(&path)(e)),
                }
            }
            buf[got..len].fill(0);
            if blake3::hash(&buf[..len]).as_bytes() != want {
                self.fetch(id, start, len as u64, None).await?;
            }
        }
        Ok(())
    }

    fn newer(&self, attr: &Attr) -> R<bool> {
        Ok(match self.cache.get(attr.id)? {
            Some(c) => attr.versions.data >= c.attr.versions.data && attr.versions.meta >= c.attr.versions.meta,
            None => true,
        })
    }

    fn ino(&self, id: ObjectId) -> R<Option<u64>> {
        Ok(self.cache.get(id)?.map(|c| c.ino))
    }

    /// Apply one record of the stream to the cache.
    async fn prepare(&self, r: Record) -> R<Prepared> {
        let own = matches!(r.origin, Origin::Replica(id, _) if id == self.client.replica());
        tracing::debug!("apply seq {} own {own}: {:?}", r.seq, r.op);
        let mut edits = Vec::new();
        let mut inval = Vec::new();
        let mut refresh = Vec::new(); // directories whose attributes changed
        match &r.op {
            Op::Create { parent, name, id, .. }
            | Op::Mkdir { parent, name, id, .. }
            | Op::Symlink { parent, name, id, .. }
            | Op::Mknod { parent, name, id, .. } => {
                let target = match &r.op {
                    Op::Symlink { target, .. } => Some(target.clone()),
                    _ => None,
                };
                if let Some(a) = &r.attr {
                    edits.push(Edit::Put { attr: a.clone(), target, xattrs: Some(Vec::new()) });
                }
                edits.push(Edit::Link { parent: *parent, name: name.clone(), id: *id });
                refresh.push(*parent);
                if let Some(p) = self.ino(*parent)? {
                    inval.push(Inval::Entry(p, name.clone()));
                }
            }
            Op::Link { id, parent, name } => {
                edits.push(Edit::Link { parent: *parent, name: name.clone(), id: *id });
                refresh.push(*parent);
                if let Some(p) = self.ino(*parent)? {
                    inval.push(Inval::Entry(p, name.clone()));
                }
                if let Some(i) = self.ino(*id)? {
                    inval.push(Inval::Inode(i));
                }
            }
            Op::Unlink { parent, name, expect } | Op::Rmdir { parent, name, expect } => {
                edits.push(Edit::Unlink { parent: *parent, name: name.clone() });
                if r.attr.is_none() {
                    edits.push(Edit::Forget { id: expect.id });
                }
                refresh.push(*parent);
                if let Some(p) = self.ino(*parent)? {
                    inval.push(Inval::Entry(p, name.clone()));
                }
                if let Some(i) = self.ino(expect.id)? {
                    inval.push(Inval::Inode(i));
                }
            }
            Op::Rename { parent, name, expect, new_parent, new_name, target, mode } => {
                match mode {
                    RenameMode::Exchange => {
                        if let Some(t) = target {
                            edits.push(Edit::Link { parent: *parent, name: name.clone(), id: t.id });
                        }
                    }
                    _ => edits.push(Edit::Unlink { parent: *parent, name: name.clone() }),
                }
                edits.push(Edit::Link { parent: *new_parent, name: new_name.clone(), id: expect.id });
                refresh.extend([*parent, *new_parent]);
                if let (Some(t), false) = (target, *mode == RenameMode::Exchange) {
                    // the replaced object may be gone
                    refresh.push(t.id);
                }
                for (d, n) in [(*parent, name), (*new_parent, new_name)] {
                    if let Some(p) = self.ino(d)? {
                        inval.push(Inval::Entry(p, n.clone()));
                    }
                }
            }
            Op::Write { id, offset, data, .. } => {
                // An own write's bytes come from the caller (kept by client
                // seq) when the record leaves them out; after a restart they
                // are fetched like anyone else's.
                let path = self.cache.data_path(*id);
                let mine = match r.origin {
                    Origin::Replica(_, cseq) if own => {
                        self.own_writes.lock().unwrap_or_else(|p| p.into_inner()).remove(&cseq)
                    }
                    _ => None,
                };
                let bytes = if !data.is_empty() { Some((*offset, data.as_slice())) } else { None };
                let bytes = bytes.or(mine.as_ref().map(|(o, b)| (*o, b.as_slice())));
                match bytes {
                    Some((at, b)) => {
                        let f = OpenOptions::new()
                            .create(true)
                            .truncate(false)
                            .write(true)
                            .open(&path)
                            .map_err(io(&path))?;
                        f.write_all_at(b, at).map_err(io(&path))?;
                    }
                    None => self.fetch(*id, *offset, r.elided, None).await?,
                }
                if let Some(i) = self.ino(*id)? {
                    inval.push(Inval::Inode(i));
                }
            }
            Op::Truncate { id, .. } | Op::Allocate { id, .. } | Op::PunchHole { id, .. } => {
                // in stream order, own ones too (a later write may follow)
                match &r.op {
                    Op::PunchHole { offset, len, .. } => punch(&self.cache.data_path(*id), *offset, *len)?,
                    Op::Allocate { offset, len, .. } => allocate(&self.cache.data_path(*id), *offset, *len)?,
                    _ => {}
                }
                if let Some(i) = self.ino(*id)? {
                    inval.push(Inval::Inode(i));
                }
            }
            Op::SetAttr { id, .. } => {
                if let Some(i) = self.ino(*id)? {
                    inval.push(Inval::Inode(i));
                }
            }
            Op::SetXattr { id, .. } | Op::RemoveXattr { id, .. } => {
                match self.client.xattrs(*id).await {
                    Ok(x) => {
                        if let Some(a) = &r.attr {
                            edits.push(Edit::Put { attr: a.clone(), target: None, xattrs: Some(x) });
                        }
                    }
                    Err(ClientError::Op(OpError::NotFound(_))) => {} // removed later
                    Err(e) => return Err(e.into()),
                }
                if let Some(i) = self.ino(*id)? {
                    inval.push(Inval::Inode(i));
                }
            }
        }
        if let Some(a) = &r.attr {
            if self.newer(a)? {
                // keep the data file's length with the size
                if a.kind == FileKind::File {
                    let path = self.cache.data_path(a.id);
                    if let Ok(f) = OpenOptions::new().create(true).truncate(false).write(true).open(&path) {
                        let _ = f.set_len(a.size);
                    }
                }
                edits.push(Edit::attr(a.clone()));
            }
        }
        // Directories' attributes come with the record; a replaced object
        // (and a record from an older server): ask the server.
        for id in refresh {
            if let Some(a) = r.dirs.iter().find(|a| a.id == id) {
                if self.newer(a)? {
                    edits.push(Edit::attr(a.clone()));
                }
                if let Some(i) = self.ino(id)? {
                    inval.push(Inval::Inode(i));
                }
                continue;
            }
            match self.client.getattr(id).await {
                Ok(a) => {
                    if self.newer(&a)? {
                        edits.push(Edit::attr(a));
                    }
                }
                Err(ClientError::Op(OpError::NotFound(_))) => {
                    if self.cache.get(id)?.is_some() {
                        edits.push(Edit::Forget { id });
                    }
                }
                Err(e) => return Err(e.into()),
            }
            if let Some(i) = self.ino(id)? {
                inval.push(Inval::Inode(i));
            }
        }
        Ok(Prepared { edits, inval: if own { Vec::new() } else { inval } })
    }

    /// Apply records (in order) to the cache in one transaction: their
    /// edits, then the stream position of the last.
    async fn apply_batch(&self, recs: &[Record]) -> R<()> {
        let Some(last) = recs.last() else { return Ok(()) };
        let mut edits = Vec::new();
        let mut inval = Vec::new();
        for r in recs {
            let p = self.prepare(r.clone()).await?;
            edits.extend(p.edits);
            inval.extend(p.inval);
        }
        edits.push(Edit::Seq(last.seq));
        let forgotten: Vec<ObjectId> =
            edits.iter().filter_map(|e| if let Edit::Forget { id } = e { Some(*id) } else { None }).collect();
        let inos: Vec<(ObjectId, Option<u64>)> =
            forgotten.iter().map(|id| Ok((*id, self.ino(*id)?))).collect::<R<_>>()?;
        {
            let _g = self.apply.lock().unwrap_or_else(|p| p.into_inner());
            self.cache.change(&edits)?;
        }
        for (id, ino) in inos {
            if !ino.is_some_and(|i| self.is_open(i)) {
                self.purge(id)?;
            }
        }
        self.applied.send_replace(last.seq);
        *self.last_time.lock().unwrap_or_else(|p| p.into_inner()) = Some(last.time);
        self.invalidate(inval);
        Ok(())
    }

    // ---- the file-system API (blocking; called from FUSE threads) ----

    /// Send a mutation only while connected: an op once sent is never
    /// cancelled, so queueing it while the server is away would make a
    /// call that failed (after the deadline) happen later.
    fn connected(&self) -> R<()> {
        if self.client.is_connected() {
            Ok(())
        } else {
            Err(ReplicaError::Unreachable("not connected to the server".into()))
        }
    }

    fn block<T>(&self, f: impl std::future::Future<Output = Result<T, ClientError>>) -> R<T> {
        match self.rt.block_on(async { tokio::time::timeout(DEADLINE, f).await }) {
            Ok(r) => r.map_err(ReplicaError::from),
            Err(_) => Err(ReplicaError::Unreachable(format!("no answer within {DEADLINE:?}"))),
        }
    }

    /// Send a mutation and wait until the record stream has brought the
    /// cache to it: the cache applies every change in the server's order
    /// (its own included), so a reply never overtakes an earlier record.
    fn mutate(&self, op: Op) -> R<Applied> {
        self.connected()?;
        let a = self.block(self.client.mutate(op))?;
        self.reach(a)
    }

    /// Wait (briefly) until the stream has applied `a`'s record. The op is
    /// applied at the server either way: a stream that lags is no error
    /// (the cache catches up; `izo sync` waits for it).
    fn reach(&self, a: Applied) -> R<Applied> {
        let mut rx = self.applied.subscribe();
        let reached = self
            .rt
            .block_on(async { tokio::time::timeout(REACH, rx.wait_for(|s| *s >= a.seq)).await.map(|r| r.is_ok()) });
        if reached != Ok(true) {
            tracing::debug!("seq {} acked; the stream has not brought it yet", a.seq);
            if let Some(attr) = a.attr.clone() {
                // at least the object's own attributes (and an inode number)
                if self.cache.get(attr.id)?.is_none() || self.newer(&attr)? {
                    let _g = self.apply.lock().unwrap_or_else(|p| p.into_inner());
                    self.cache.change(&[Edit::attr(attr)])?;
                }
            }
        }
        Ok(a)
    }

    /// The object behind an inode.
    pub fn get(&self, ino: u64) -> R<(ObjectId, Cached)> {
        self.cache.by_ino(ino)?.ok_or(ReplicaError::NotFound)
    }

    /// Look a name up.
    pub fn lookup(&self, parent: u64, name: &[u8]) -> R<Cached> {
        let (pid, _) = self.get(parent)?;
        let id = self.cache.lookup(pid, name)?.ok_or(ReplicaError::NotFound);
        tracing::debug!("lookup {parent} {:?} -> {id:?}", String::from_utf8_lossy(name));
        self.cache.get(id?)?.ok_or(ReplicaError::NotFound)
    }

    /// Entries of a directory with their objects.
    pub fn readdir(&self, ino: u64) -> R<Vec<(Vec<u8>, Cached)>> {
        let (id, c) = self.get(ino)?;
        if c.attr.kind != FileKind::Dir {
            return Err(ReplicaError::Invalid("not a directory".into()));
        }
        let mut out = Vec::new();
        for (name, child) in self.cache.children(id)? {
            if let Some(c) = self.cache.get(child)? {
                out.push((name, c));
            }
        }
        Ok(out)
    }

    /// Open the data file of a regular file.
    pub fn data_file(&self, ino: u64) -> R<File> {
        let (id, _) = self.get(ino)?;
        let path = self.cache.data_path(id);
        OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io(&path))
    }

    fn cached(&self, id: ObjectId) -> R<Cached> {
        self.cache.get(id)?.ok_or(ReplicaError::NotFound)
    }

    /// Write bytes (durable at the server when this returns).
    pub fn write(&self, ino: u64, offset: u64, data: &[u8]) -> R<usize> {
        let (id, c) = self.get(ino)?;
        if c.attr.nlink == 0 && c.attr.kind == FileKind::File {
            return self.write_orphan(id, c, offset, data);
        }
        let mut done = 0usize;
        let mut base = c.attr.versions.data;
        for chunk in data.chunks(MAX_DATA) {
            let at = offset + done as u64;
            self.connected()?;
            let p = self.block(self.client.submit(Op::Write { id, base, offset: at, data: chunk.to_vec() }))?;
            // (a record that beats this insert to the stream fetches its bytes)
            self.own_writes.lock().unwrap_or_else(|p| p.into_inner()).insert(p.cseq, (at, chunk.to_vec()));
            let cseq = p.cseq;
            let a = match self.block(p.wait()) {
                Ok(a) => a,
                Err(e) => {
                    self.own_writes.lock().unwrap_or_else(|p| p.into_inner()).remove(&cseq);
                    return Err(e);
                }
            };
            let a = self.reach(a)?;
            // (an inline record already wrote the bytes: drop the copy)
            self.own_writes.lock().unwrap_or_else(|p| p.into_inner()).remove(&cseq);
            base = a.attr.map(|a| a.versions.data).unwrap_or(base);
            done += chunk.len();
        }
        Ok(done)
    }

    /// A file removed while open: it has no name anywhere, so its bytes
    /// stay with those who hold it open (local only, as on any file system).
    fn write_orphan(&self, id: ObjectId, mut c: Cached, offset: u64, data: &[u8]) -> R<usize> {
        let path = self.cache.data_path(id);
        let f = OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(io(&path))?;
        f.write_all_at(data, offset).map_err(io(&path))?;
        c.attr.size = c.attr.size.max(offset + data.len() as u64);
        self.cache.change(&[Edit::attr(c.attr)])?;
        Ok(data.len())
    }

    /// fallocate(2): mode 0 allocates (and may grow the file), punch-hole
    /// with keep-size deallocates; other modes are not supported.
    pub fn allocate(&self, ino: u64, offset: u64, len: u64, mode: i32) -> R<()> {
        let (id, c) = self.get(ino)?;
        let base = c.attr.versions.data;
        let op = match mode {
            0 => Op::Allocate { id, base, offset, len },
            m if m == libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE => Op::PunchHole { id, base, offset, len },
            _ => return Err(ReplicaError::Unsupported),
        };
        // (the stream does the same to the data file, in order)
        self.mutate(op).map(drop)
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
        let (pid, _) = self.get(parent)?;
        let id = ObjectId::new();
        let name = name.to_vec();
        let op = match kind {
            FileKind::File => Op::Create { parent: pid, name, id, mode, uid, gid },
            FileKind::Dir => Op::Mkdir { parent: pid, name, id, mode, uid, gid },
            FileKind::Symlink => {
                let target = target.unwrap_or_default().to_vec();
                Op::Symlink { parent: pid, name, id, target, uid, gid }
            }
            k => Op::Mknod { parent: pid, name, id, kind: k, mode, uid, gid },
        };
        self.mutate(op)?;
        self.cached(id)
    }

    /// Remove a name (a directory with `dir`).
    pub fn remove(&self, parent: u64, name: &[u8], dir: bool) -> R<()> {
        let (pid, _) = self.get(parent)?;
        let id = self.cache.lookup(pid, name)?.ok_or(ReplicaError::NotFound)?;
        let c = self.cached(id)?;
        if dir != (c.attr.kind == FileKind::Dir) {
            return Err(ReplicaError::Invalid(if dir { "not a directory" } else { "is a directory" }.into()));
        }
        let expect = Expect { id, base: c.attr.versions };
        let name = name.to_vec();
        let op = if dir { Op::Rmdir { parent: pid, name, expect } } else { Op::Unlink { parent: pid, name, expect } };
        self.mutate(op).map(drop)
    }

    /// Rename (`mode`: replace, no-replace or exchange).
    pub fn rename(&self, parent: u64, name: &[u8], new_parent: u64, new_name: &[u8], mode: RenameMode) -> R<()> {
        let (pid, _) = self.get(parent)?;
        let (npid, _) = self.get(new_parent)?;
        let id = self.cache.lookup(pid, name)?.ok_or(ReplicaError::NotFound)?;
        let c = self.cached(id)?;
        let target = match self.cache.lookup(npid, new_name)? {
            Some(t) => Some(Expect { id: t, base: self.cached(t)?.attr.versions }),
            None => None,
        };
        if mode == RenameMode::Exchange && target.is_none() {
            return Err(ReplicaError::NotFound);
        }
        if mode == RenameMode::NoReplace && target.is_some() {
            return Err(ReplicaError::Exists);
        }
        if let (Some(t), RenameMode::Replace) = (&target, mode) {
            if t.id == id {
                return Ok(()); // two names of one object: rename(2) does nothing
            }
            let tk = self.cached(t.id)?.attr.kind;
            if tk == FileKind::Dir && c.attr.kind != FileKind::Dir {
                return Err(ReplicaError::Invalid("is a directory".into()));
            }
            if tk != FileKind::Dir && c.attr.kind == FileKind::Dir {
                return Err(ReplicaError::Invalid("not a directory".into()));
            }
        }
        let op = Op::Rename {
            parent: pid,
            name: name.to_vec(),
            expect: Expect { id, base: c.attr.versions },
            new_parent: npid,
            new_name: new_name.to_vec(),
            target,
            mode,
        };
        self.mutate(op).map(drop)
    }

    /// A new name for a non-directory.
    pub fn link(&self, ino: u64, new_parent: u64, new_name: &[u8]) -> R<Cached> {
        let (id, _) = self.get(ino)?;
        let (npid, _) = self.get(new_parent)?;
        self.mutate(Op::Link { id, parent: npid, name: new_name.to_vec() })?;
        self.cached(id)
    }

    /// Change attributes; `size` truncates.
    pub fn setattr(&self, ino: u64, size: Option<u64>, attrs: SetAttrs) -> R<Cached> {
        let (id, c) = self.get(ino)?;
        if c.attr.nlink == 0 && c.attr.kind == FileKind::File {
            // open but removed: local only
            if let Some(size) = size {
                let path = self.cache.data_path(id);
                let f = OpenOptions::new().write(true).open(&path).map_err(io(&path))?;
                f.set_len(size).map_err(io(&path))?;
                let mut a = c.attr.clone();
                a.size = size;
                self.cache.change(&[Edit::attr(a)])?;
            }
            return self.cached(id);
        }
        if let Some(size) = size {
            if c.attr.kind != FileKind::File {
                return Err(ReplicaError::Invalid("is a directory".into()));
            }
            self.mutate(Op::Truncate { id, base: c.attr.versions.data, size })?;
        }
        if attrs != SetAttrs::default() {
            let base = self.cached(id)?.attr.versions.meta;
            self.mutate(Op::SetAttr { id, base, attrs })?;
        }
        self.cached(id)
    }

    /// Set or remove an extended attribute.
    pub fn set_xattr(&self, ino: u64, name: &[u8], value: Option<&[u8]>) -> R<()> {
        let (id, c) = self.get(ino)?;
        let base = c.attr.versions.meta;
        let op = match value {
            Some(v) => Op::SetXattr { id, base, name: name.to_vec(), value: v.to_vec() },
            None => {
                if !c.xattrs.iter().any(|(n, _)| n == name) {
                    return Err(ReplicaError::NotFound);
                }
                Op::RemoveXattr { id, base, name: name.to_vec() }
            }
        };
        self.mutate(op).map(drop)
    }

    fn is_open(&self, ino: u64) -> bool {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).get(&ino).is_some_and(|n| *n > 0)
    }

    /// Drop an object without names, and its data.
    fn purge(&self, id: ObjectId) -> R<()> {
        let _g = self.apply.lock().unwrap_or_else(|p| p.into_inner());
        if self.cache.get(id)?.is_some_and(|c| c.attr.nlink == 0) {
            self.cache.purge(id)?;
            let _ = std::fs::remove_file(self.cache.data_path(id));
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
    }

    /// Append `data` at the end of the file as this replica knows it (the
    /// kernel's idea of the size may be stale after another replica's
    /// append). The write's base version makes the server refuse it if the
    /// file changed meanwhile: then catch up and try again.
    pub fn append(&self, ino: u64, data: &[u8]) -> R<usize> {
        for _ in 0..5 {
            let (_, c) = self.get(ino)?;
            match self.write(ino, c.attr.size, data) {
                Err(ReplicaError::Conflict(_)) => {
                    self.rt.block_on(self.sync())?;
                }
                other => return other,
            }
        }
        Err(ReplicaError::Conflict("the file kept changing under the append".into()))
    }

    /// Wait until this replica has applied everything the server had
    /// applied when called (the barrier of `izo sync`). Returns that seq.
    pub async fn sync(&self) -> R<Seq> {
        let stats = tokio::time::timeout(DEADLINE, self.client.server_stats())
            .await
            .map_err(|_| ReplicaError::Unreachable(format!("no answer within {DEADLINE:?}")))??;
        let head = stats.iter().find(|(k, _)| k == "applied_seq").map(|(_, v)| *v).unwrap_or(0);
        let mut rx = self.applied.subscribe();
        tokio::time::timeout(DEADLINE, rx.wait_for(|s| *s >= head))
            .await
            .map_err(|_| ReplicaError::Unreachable(format!("the stream did not reach seq {head} within {DEADLINE:?}")))?
            .map_err(|_| ReplicaError::Unreachable("the stream stopped".into()))?;
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

//! The client's cache of a volume: a redb database with the namespace
//! (inode numbers ⇄ object ids, entries, attributes and versions, the
//! stream position, the modification log) and one data file per regular
//! file, named by its id.
//!
//! Changes do not wait for the disk: each is appended to a log file (one
//! `write(2)`, so it survives a SIGKILL of the daemon) and kept in memory
//! over the database; a fold (every second, at fsync and `izo sync`)
//! syncs the data files, writes the changes to the database in one durable
//! commit and drops the log. A start replays what a killed daemon left.
//!
//! Inode numbers are allocated from a counter and stored per object, so
//! `st_ino` stays the same across remounts and every name of a hard-linked
//! object has the same one.

// redb's error is large; it only travels on the rare failure path.
#![allow(clippy::result_large_err)]

use crate::storage::{Disk, Storage};
use izo_proto::{Attr, FileKind, ObjectId, Op, Seq, Timestamp, Versions};
use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

pub(crate) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Object id → [`Cached`].
pub(crate) const OBJECTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("objects");
/// Inode number → object id.
const INOS: TableDefinition<u64, &[u8]> = TableDefinition::new("inos");
/// Parent id ‖ name → child id.
const DENTRIES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("dentries");
/// Objects whose last name is gone, dropped at the next start.
const ORPHANS: TableDefinition<&[u8], ()> = TableDefinition::new("orphans");
/// Directory id → its parent's id (for the rename cycle check).
const PARENTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("parents");
/// Client modification log: client seq → [`CmlEntry`] not yet answered.
pub(crate) const CML: TableDefinition<u64, &[u8]> = TableDefinition::new("cml");
/// Ops the server refused for good: client seq → [`Parked`].
pub(crate) const PARKED: TableDefinition<u64, &[u8]> = TableDefinition::new("parked");

/// One op of the client modification log. Writes are stored as a range
/// (`len`) whose bytes are read from the data file when sent; bases are
/// filled in from the cached versions when sent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CmlEntry {
    /// The op (a `Write` has no bytes here).
    pub op: Op,
    /// Bytes of a write.
    pub len: u64,
    /// When the change was made here (the implicit mtime it set, sent
    /// with it so every replica keeps that time).
    pub time: Option<izo_proto::Timestamp>,
}

/// An op the server refused, kept with what it carried.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Parked {
    /// The op, bytes included.
    pub op: Op,
    /// Why the server refused it (a conflict carries the server's current
    /// attributes of the object).
    pub error: izo_proto::OpError,
    /// A version of a file this replica held that a restored server lacks:
    /// its path then, and the file its bytes were moved to.
    pub kept: Option<Kept>,
}

/// Where a kept version is (see [`Parked::kept`]).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Kept {
    /// The file's path in the volume when it was kept (from the root, `/…`).
    pub path: String,
    /// The file holding its bytes, under the cache's `kept/` directory.
    pub file: PathBuf,
}

/// What the append-only log holds (see [`Cache::local`]).
#[derive(Serialize, Deserialize)]
pub(crate) enum LogRec {
    /// A local change.
    Edits(Vec<Edit>),
    /// Bytes written to a data file, not yet in a CML entry.
    Dirty(ObjectId, u64, u64),
    /// A file opened for writing beside passthrough readers: its writes
    /// reach the data file unseen, so a start after a kill takes the whole
    /// file as written.
    WriterOpen(ObjectId),
    /// One such open was released (its writes were taken).
    WriterClosed(ObjectId),
}

/// The meta key of the first log generation the database does not hold.
const LOG_NEXT: &str = "log.next";

/// Prefix of the meta keys counting writable opens (see [`Cache::log_writer`]).
const WRITERS: &str = "writers.";

/// redb's page cache for the cache database.
const CACHE_BYTES: usize = 16 << 20;

/// Inode number of the volume root.
pub const ROOT_INO: u64 = 1;

/// What the cache keeps of an object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cached {
    /// Attributes and versions as the server last described them.
    pub attr: Attr,
    /// Local inode number.
    pub ino: u64,
    /// Symlink target.
    pub target: Option<Vec<u8>>,
    /// Extended attributes.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Status change time, kept by this replica only (DESIGN: ctime is
    /// local): set by [`Edit::Ctime`] on every local change and every
    /// applied foreign record, never by the replica's own echoes. An object
    /// first seen in a snapshot starts at its mtime.
    pub ctime: Timestamp,
}

/// Errors of the cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The database failed.
    #[error("cache database {path}: {why}")]
    Db {
        /// Database file.
        path: PathBuf,
        /// What failed.
        why: String,
    },
    /// The database could not grow: the cache's disk is full.
    #[error("cache database {path}: the cache's disk is full (free space on it; the mount resumes by itself)")]
    DbFull {
        /// Database file.
        path: PathBuf,
    },
    /// A data file failed.
    #[error("cache data file {path}: {err}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        err: std::io::Error,
    },
}

/// The cache of one volume.
pub struct Cache {
    /// (replaced by a fresh open after a failed commit: redb refuses every
    /// later transaction of a database that met an I/O error)
    db: RwLock<Option<Database>>,
    /// A commit failed: the database is opened again before the next one.
    poisoned: std::sync::atomic::AtomicBool,
    /// Where the log, the data files and the database live.
    store: Box<dyn Storage>,
    path: PathBuf,
    data: PathBuf,
    dir: PathBuf,
    /// Changes not folded into the database yet (logged, in memory).
    ov: RwLock<Overlay>,
    /// One fold at a time.
    fold_lock: Mutex<()>,
}

/// Unsealed write ranges per object, as found in the log at open.
pub type DirtyRanges = BTreeMap<ObjectId, Vec<(u64, u64)>>;

fn key(parent: ObjectId, name: &[u8]) -> Vec<u8> {
    let mut k = parent.to_bytes().to_vec();
    k.extend_from_slice(name);
    k
}

fn id_of(b: &[u8]) -> ObjectId {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[..16]);
    ObjectId::from_bytes(a)
}

/// Changes not in the database yet, latest first: `None` marks a removal.
#[derive(Default, Clone)]
struct Maps {
    objs: HashMap<ObjectId, Option<Cached>>,
    inos: HashMap<u64, Option<ObjectId>>,
    dents: BTreeMap<Vec<u8>, Option<ObjectId>>,
    parents: HashMap<ObjectId, ObjectId>,
    meta: HashMap<String, u64>,
    cml: BTreeMap<u64, Option<CmlEntry>>,
    parked: BTreeMap<u64, Parked>,
    orphans: HashMap<ObjectId, bool>,
    /// Every entry (and directory parent) below this layer is void.
    cleared: bool,
    /// Anything at all.
    touched: bool,
}

/// The in-memory layers over the database: `live` takes changes; `frozen`
/// is being written to the database by a fold (readers see both).
#[derive(Default)]
struct Overlay {
    live: Maps,
    frozen: Option<Arc<Maps>>,
    /// Unsealed write ranges (logged again after each fold).
    dirty: DirtyRanges,
    /// Opens writing the data file unseen, per object (logged again after
    /// each fold).
    writers: BTreeMap<ObjectId, u32>,
    /// Whether the log file of `gen` took a record since it was chosen.
    log_open: bool,
    /// The generation of the log file taking records.
    gen: u64,
}

impl Maps {
    fn clone_maps(&self) -> Maps {
        self.clone()
    }

    /// This layer with `newer` on top (a fold that failed is retried with
    /// what came since).
    fn absorb(&mut self, newer: Maps) {
        if newer.cleared {
            self.dents.clear();
            self.parents.clear();
            self.cleared = true;
        }
        self.objs.extend(newer.objs);
        self.inos.extend(newer.inos);
        self.dents.extend(newer.dents);
        self.parents.extend(newer.parents);
        self.meta.extend(newer.meta);
        self.cml.extend(newer.cml);
        self.parked.extend(newer.parked);
        self.orphans.extend(newer.orphans);
        self.touched |= newer.touched;
    }
}

impl Overlay {
    fn layers(&self) -> impl Iterator<Item = &Maps> {
        std::iter::once(&self.live).chain(self.frozen.as_deref())
    }
}

impl Cache {
    /// Open or create the cache in `dir` (real files, see [`Disk`]). Call
    /// [`Cache::replay_log`] before use: it brings back what a killed
    /// daemon had not folded.
    pub fn open(dir: &Path) -> Result<Cache, CacheError> {
        Cache::open_on(Disk::new(dir)?)
    }

    /// Open or create a cache on `store` (a [`crate::storage::MemStorage`]
    /// keeps a whole cache in memory, for tests and the simulation). Call
    /// [`Cache::replay_log`] before use.
    pub fn open_on(store: impl Storage + 'static) -> Result<Cache, CacheError> {
        // (redb's own page cache is bounded small: the kernel's page cache
        // holds the file anyway, and the daemon's memory is per file)
        let db = store.open_db(CACHE_BYTES)?;
        let dir = store.dir().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("<memory>"));
        let c = Cache {
            db: RwLock::new(Some(db)),
            poisoned: Default::default(),
            path: store.db_name(),
            data: dir.join("data"),
            dir,
            store: Box::new(store),
            ov: RwLock::new(Overlay::default()),
            fold_lock: Mutex::new(()),
        };
        // (a cache of an older format is upgraded before anything reads it)
        crate::format::upgrade(c.database().as_ref().expect("opened just now"), &c.path, c.store.as_ref())?;
        // Orphans of the last run are no longer open anywhere: drop them
        // (unless a log says otherwise: a replay puts them back).
        let dropped = c.write(|tx| {
            tx.open_table(META)?;
            tx.open_table(DENTRIES)?;
            tx.open_table(PARENTS)?;
            tx.open_table(CML)?;
            tx.open_table(PARKED)?;
            let mut objs = tx.open_table(OBJECTS)?;
            let mut inos = tx.open_table(INOS)?;
            let mut orphans = tx.open_table(ORPHANS)?;
            let mut dropped = Vec::new();
            for row in orphans.iter()? {
                dropped.push(id_of(row?.0.value()));
            }
            for id in &dropped {
                let old = objs.remove(id.to_bytes().as_slice())?.map(|v| v.value().to_vec());
                if let Some(c) = old.as_deref().and_then(|v| postcard::from_bytes::<Cached>(v).ok()) {
                    inos.remove(c.ino)?;
                }
            }
            orphans.retain(|_, _| false)?;
            // (a cache from before directories' parents were kept)
            let mut parents = tx.open_table(PARENTS)?;
            if parents.first()?.is_none() {
                let dents = tx.open_table(DENTRIES)?;
                for row in dents.iter()? {
                    let (k, v) = row?;
                    let child = id_of(v.value());
                    let is_dir = objs
                        .get(child.to_bytes().as_slice())?
                        .and_then(|v| postcard::from_bytes::<Cached>(v.value()).ok())
                        .is_some_and(|c| c.attr.kind == FileKind::Dir);
                    if is_dir {
                        parents.insert(child.to_bytes().as_slice(), &k.value()[..16])?;
                    }
                }
            }
            Ok(dropped)
        })?;
        for id in dropped {
            let _ = c.store.data_remove(id);
        }
        let writers = c.read(|tx| {
            let meta = tx.open_table(META)?;
            let mut out = Vec::new();
            for row in meta.range(WRITERS..)? {
                let (k, v) = row?;
                match writers_of(k.value()) {
                    Some(id) => out.push((id, v.value())),
                    None if k.value().starts_with(WRITERS) => {}
                    None => break,
                }
            }
            Ok(out)
        })?;
        for (id, n) in writers {
            set_writers(&mut c.ov_mut().writers, id, n);
        }
        Ok(c)
    }

    fn ov(&self) -> std::sync::RwLockReadGuard<'_, Overlay> {
        self.ov.read().unwrap_or_else(|p| p.into_inner())
    }

    fn ov_mut(&self) -> std::sync::RwLockWriteGuard<'_, Overlay> {
        self.ov.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Bring back what a killed daemon had not folded: every change since
    /// the last fold is in the log (one `write(2)` each, so a SIGKILL loses
    /// none that returned), applied again in order, then folded. Returns
    /// the write ranges not yet in a CML entry, and the objects whose
    /// attributes the log set (ask the server for them again once their
    /// ops are answered: their echoes may have been among the lost).
    pub fn replay_log(&self) -> Result<(DirtyRanges, Vec<ObjectId>), CacheError> {
        let gens = self.store.log_gens()?;
        let mut touched = std::collections::BTreeSet::new();
        let mut legacy_writers = std::collections::BTreeSet::new();
        let mut n = 0u64;
        {
            // logs the database already holds (a crash after a fold's
            // commit, before their removal was durable) are not applied
            // again: their edits are not all idempotent over a later state
            let from = self.read(|tx| Ok(tx.open_table(META)?.get(LOG_NEXT)?.map(|v| v.value())))?.unwrap_or(0);
            let mut ov = self.ov_mut();
            ov.gen = gens.last().copied().unwrap_or(0).max(from);
            for g in gens.iter().filter(|g| **g >= from) {
                let buf = self.store.log_read(*g)?;
                let body_at =
                    if buf.starts_with(crate::format::LOG_MAGIC) { crate::format::LOG_MAGIC.len() } else { 0 };
                for body in crate::format::frames(&buf[body_at..]) {
                    match postcard::from_bytes::<LogRec>(body) {
                        Ok(LogRec::Edits(edits)) => {
                            for e in &edits {
                                if let Edit::Put { attr, .. } = e {
                                    touched.insert(attr.id);
                                }
                            }
                            self.apply(&mut ov, &edits)?;
                        }
                        Ok(LogRec::Dirty(id, off, len)) => add_range(ov.dirty.entry(id).or_default(), off, len),
                        // (records of older builds: their counts go into the
                        // database below)
                        Ok(LogRec::WriterOpen(id)) => {
                            *ov.writers.entry(id).or_default() += 1;
                            legacy_writers.insert(id);
                        }
                        Ok(LogRec::WriterClosed(id)) => {
                            writer_closed(&mut ov.writers, id);
                            legacy_writers.insert(id);
                        }
                        Err(_) => break,
                    }
                    n += 1;
                }
            }
            let counts: Vec<Edit> = legacy_writers
                .into_iter()
                .map(|id| Edit::Meta(writers_key(id), ov.writers.get(&id).copied().unwrap_or(0).into()))
                .collect();
            self.apply(&mut ov, &counts)?;
        }
        if n > 0 {
            tracing::info!("replayed {n} changes from the log in {}", self.dir.display());
        }
        self.fold()?;
        let dirty = self.ov().dirty.clone();
        Ok((dirty, touched.into_iter().collect()))
    }

    fn append(&self, ov: &mut Overlay, rec: &LogRec) -> Result<(), CacheError> {
        let body =
            postcard::to_allocvec(rec).map_err(|e| CacheError::Db { path: self.path.clone(), why: e.to_string() })?;
        let mut frame = crate::format::frame(&body);
        if !ov.log_open && self.store.log_len(ov.gen)? == 0 {
            // a new file starts with its format (in the same write(2))
            frame.splice(0..0, crate::format::LOG_MAGIC.iter().copied());
        }
        ov.log_open = true;
        self.store.log_append(ov.gen, &frame)
    }

    /// A change: logged (one `write(2)`: it survives a SIGKILL of the
    /// daemon), then visible to every reader; in the database at the next
    /// fold.
    pub fn local(&self, edits: &[Edit]) -> Result<(), CacheError> {
        if edits.is_empty() {
            return Ok(());
        }
        let mut ov = self.ov_mut();
        self.append(&mut ov, &LogRec::Edits(edits.to_vec()))?;
        self.apply(&mut ov, edits)
    }

    /// Same as [`Cache::local`] (kept for callers that mean "need not be
    /// durable now").
    pub fn local_quiet(&self, edits: &[Edit]) -> Result<(), CacheError> {
        self.local(edits)
    }

    /// A writable open beside passthrough readers began (`true`) or was
    /// released (`false`).
    /// The count is logged as a number set (not as one more open): a
    /// replay of a log whose change the database already holds must not
    /// count an open twice.
    pub fn log_writer(&self, id: ObjectId, open: bool) -> Result<(), CacheError> {
        let mut ov = self.ov_mut();
        let n = ov.writers.get(&id).copied().unwrap_or(0);
        let n = if open { n + 1 } else { n.saturating_sub(1) };
        let edits = [Edit::Meta(writers_key(id), n.into())];
        self.append(&mut ov, &LogRec::Edits(edits.to_vec()))?;
        self.apply(&mut ov, &edits)
    }

    /// Objects a killed daemon had open for writing beside passthrough
    /// readers (found by [`Cache::replay_log`]), with their count of such
    /// opens; each is dropped by a [`Cache::log_writer`] release.
    pub fn open_writers(&self) -> Vec<(ObjectId, u32)> {
        self.ov().writers.iter().map(|(id, n)| (*id, *n)).collect()
    }

    /// Bytes written to a data file (the write itself is in the file).
    pub fn log_dirty(&self, id: ObjectId, offset: u64, len: u64) -> Result<(), CacheError> {
        let mut ov = self.ov_mut();
        self.append(&mut ov, &LogRec::Dirty(id, offset, len))?;
        add_range(ov.dirty.entry(id).or_default(), offset, len);
        Ok(())
    }

    /// Are there changes not in the database yet?
    pub fn unsynced(&self) -> bool {
        self.ov().live.touched
    }

    /// Make every change so far durable: data files synced, then the
    /// changes written to the database in one durable commit (readers keep
    /// seeing them meanwhile), then the logs that held them removed.
    pub fn fold(&self) -> Result<(), CacheError> {
        let _one = self.fold_lock.lock().unwrap_or_else(|p| p.into_inner());
        let (frozen, old_gen) = {
            let mut ov = self.ov_mut();
            let live = std::mem::take(&mut ov.live);
            let frozen = match ov.frozen.take() {
                // an earlier fold failed: its layer goes in with this one
                Some(old) => {
                    let mut m = Arc::try_unwrap(old).unwrap_or_else(|a| a.clone_maps());
                    m.absorb(live);
                    Arc::new(m)
                }
                None => Arc::new(live),
            };
            ov.frozen = Some(frozen.clone());
            // a new log generation, starting with the unsealed ranges
            let old_gen = ov.gen;
            ov.gen += 1;
            ov.log_open = false;
            let dirty: Vec<(ObjectId, u64, u64)> =
                ov.dirty.iter().flat_map(|(id, r)| r.iter().map(move |(o, l)| (*id, *o, *l))).collect();
            for (id, o, l) in dirty {
                self.append(&mut ov, &LogRec::Dirty(id, o, l))?;
            }
            (frozen, old_gen)
        };
        // data files first: a durable commit must not claim bytes (a stream
        // position, a sealed write) that a machine crash would lose
        self.store.sync_all()?;
        if frozen.touched {
            self.write(|tx| {
                let mut objs = tx.open_table(OBJECTS)?;
                let mut inos = tx.open_table(INOS)?;
                let mut dents = tx.open_table(DENTRIES)?;
                let mut meta = tx.open_table(META)?;
                let mut parents = tx.open_table(PARENTS)?;
                let mut cml = tx.open_table(CML)?;
                let mut parked = tx.open_table(PARKED)?;
                let mut orphans = tx.open_table(ORPHANS)?;
                if frozen.cleared {
                    dents.retain(|_, _| false)?;
                    parents.retain(|_, _| false)?;
                }
                for (id, c) in &frozen.objs {
                    match c {
                        Some(c) => {
                            let row = postcard::to_allocvec(c).expect("a row always encodes");
                            objs.insert(id.to_bytes().as_slice(), row.as_slice())?;
                        }
                        None => {
                            objs.remove(id.to_bytes().as_slice())?;
                        }
                    }
                }
                for (ino, id) in &frozen.inos {
                    match id {
                        Some(id) => inos.insert(*ino, id.to_bytes().as_slice())?,
                        None => inos.remove(*ino)?,
                    };
                }
                for (k, id) in &frozen.dents {
                    match id {
                        Some(id) => dents.insert(k.as_slice(), id.to_bytes().as_slice())?,
                        None => dents.remove(k.as_slice())?,
                    };
                }
                for (d, p) in &frozen.parents {
                    parents.insert(d.to_bytes().as_slice(), p.to_bytes().as_slice())?;
                }
                for (k, v) in &frozen.meta {
                    meta.insert(k.as_str(), *v)?;
                }
                meta.insert(LOG_NEXT, old_gen + 1)?;
                for (l, e) in &frozen.cml {
                    match e {
                        Some(e) => {
                            let row = postcard::to_allocvec(e).expect("a row always encodes");
                            cml.insert(*l, row.as_slice())?
                        }
                        None => cml.remove(*l)?,
                    };
                }
                for (l, p) in &frozen.parked {
                    let row = postcard::to_allocvec(p).expect("a row always encodes");
                    parked.insert(*l, row.as_slice())?;
                }
                for (id, on) in &frozen.orphans {
                    if *on {
                        orphans.insert(id.to_bytes().as_slice(), ())?;
                    } else {
                        orphans.remove(id.to_bytes().as_slice())?;
                    }
                }
                Ok(())
            })?;
        }
        self.ov_mut().frozen = None;
        for g in self.store.log_gens()? {
            if g <= old_gen {
                let _ = self.store.log_remove(g);
            }
        }
        Ok(())
    }

    /// The client modification log, in client-seq order.
    pub fn cml(&self) -> Result<Vec<(u64, CmlEntry)>, CacheError> {
        let mut out: BTreeMap<u64, Option<CmlEntry>> = BTreeMap::new();
        self.read(|tx| {
            for row in tx.open_table(CML)?.iter()? {
                let (k, v) = row?;
                if let Ok(e) = postcard::from_bytes(v.value()) {
                    out.insert(k.value(), Some(e));
                }
            }
            Ok(())
        })?;
        let ov = self.ov();
        let layers: Vec<&Maps> = ov.layers().collect();
        for m in layers.iter().rev() {
            for (l, e) in &m.cml {
                out.insert(*l, e.clone());
            }
        }
        Ok(out.into_iter().filter_map(|(l, e)| Some((l, e?))).collect())
    }

    /// Ops the server refused for good.
    pub fn parked(&self) -> Result<Vec<(u64, Parked)>, CacheError> {
        let mut out: BTreeMap<u64, Parked> = BTreeMap::new();
        self.read(|tx| {
            for row in tx.open_table(PARKED)?.iter()? {
                let (k, v) = row?;
                if let Ok(e) = postcard::from_bytes(v.value()) {
                    out.insert(k.value(), e);
                }
            }
            Ok(())
        })?;
        for m in self.ov().layers() {
            for (l, p) in &m.parked {
                out.insert(*l, p.clone());
            }
        }
        Ok(out.into_iter().collect())
    }

    /// The parent of a directory, as far as the cache knows.
    pub fn parent_of(&self, dir: ObjectId) -> Result<Option<ObjectId>, CacheError> {
        {
            let ov = self.ov();
            for m in ov.layers() {
                if let Some(p) = m.parents.get(&dir) {
                    return Ok(Some(*p));
                }
                if m.cleared {
                    return Ok(None);
                }
            }
        }
        self.read(|tx| Ok(tx.open_table(PARENTS)?.get(dir.to_bytes().as_slice())?.map(|v| id_of(v.value()))))
    }

    /// A database error, by its kind: a full disk says so.
    fn err(&self, e: impl Into<redb::Error>) -> CacheError {
        match e.into() {
            redb::Error::Io(io) if matches!(io.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) => {
                CacheError::DbFull { path: self.path.clone() }
            }
            e => CacheError::Db { path: self.path.clone(), why: e.to_string() },
        }
    }

    fn database(&self) -> std::sync::RwLockReadGuard<'_, Option<Database>> {
        self.db.read().unwrap_or_else(|p| p.into_inner())
    }

    /// After a failed commit: the database as its file holds it (redb
    /// refuses every transaction of a handle that met an I/O error).
    fn reopen(&self) -> Result<(), CacheError> {
        let mut db = self.db.write().unwrap_or_else(|p| p.into_inner());
        // (the old handle goes first: it holds the file's lock)
        drop(db.take());
        *db = Some(self.store.open_db(CACHE_BYTES)?);
        self.poisoned.store(false, std::sync::atomic::Ordering::Release);
        tracing::info!("reopened the cache database {} after a failed commit", self.path.display());
        Ok(())
    }

    fn write<T>(&self, f: impl FnOnce(&redb::WriteTransaction) -> Result<T, redb::Error>) -> Result<T, CacheError> {
        if self.poisoned.load(std::sync::atomic::Ordering::Acquire) {
            self.reopen()?;
        }
        let db = self.database();
        let Some(db) = db.as_ref() else { return Err(self.closed()) };
        let done = (|| {
            let tx = db.begin_write().map_err(|e| self.err(e))?;
            let out = f(&tx).map_err(|e| self.err(e))?;
            tx.commit().map_err(|e| self.err(e))?;
            Ok(out)
        })();
        if done.is_err() {
            self.poisoned.store(true, std::sync::atomic::Ordering::Release);
        }
        done
    }

    fn closed(&self) -> CacheError {
        CacheError::Db { path: self.path.clone(), why: "closed after a failed commit and not reopened".into() }
    }

    fn read<T>(&self, f: impl FnOnce(&redb::ReadTransaction) -> Result<T, redb::Error>) -> Result<T, CacheError> {
        let db = self.database();
        let Some(db) = db.as_ref() else { return Err(self.closed()) };
        let tx = db.begin_read().map_err(|e| self.err(e))?;
        f(&tx).map_err(|e| self.err(e))
    }

    fn meta_in(&self, ov: &Overlay, k: &str) -> Result<u64, CacheError> {
        for m in ov.layers() {
            if let Some(v) = m.meta.get(k) {
                return Ok(*v);
            }
        }
        self.read(|tx| Ok(tx.open_table(META)?.get(k)?.map(|v| v.value()).unwrap_or(0)))
    }

    /// The lsns of this replica whose changes this cache holds, for a start
    /// whose lowest new lsn is `floor` (see [`crate::engine::Engine::own`]):
    /// every lsn up to the highest logged, but for the gaps earlier starts
    /// found (lsns the server has that a power loss took from here,
    /// recorded durably at the start that found them). A cache that never
    /// tracked this (an earlier release's, or a new one) starts now, taking
    /// every lsn below `floor` as held: what its owner sent was logged.
    pub fn logged_lsn(&self, floor: u64) -> Result<crate::engine::Logged, CacheError> {
        use crate::engine::{Logged, GAP, LOGGED, TRACKED};
        let tracked = self.meta(TRACKED)? == 1;
        let logged = self.meta(LOGGED)?;
        let mut gaps = Vec::new();
        for (k, end) in self.meta_prefix(GAP)? {
            if let Ok(start) = k[GAP.len()..].parse::<u64>() {
                gaps.push((start, end));
            }
        }
        let top = floor.saturating_sub(1);
        let mut edits = Vec::new();
        if !tracked {
            edits.push(Edit::Meta(TRACKED.into(), 1));
        } else if top > logged {
            // the server has changes of ours this cache lost
            gaps.push((logged + 1, top));
            edits.push(Edit::Meta(format!("{GAP}{:020}", logged + 1), top));
        }
        let through = top.max(logged);
        if through != logged {
            edits.push(Edit::Meta(LOGGED.into(), through));
        }
        if !edits.is_empty() {
            self.change(&edits)?;
        }
        Ok(Logged { through, gaps })
    }

    /// Every stored number whose key starts with `prefix`.
    pub fn meta_prefix(&self, prefix: &str) -> Result<BTreeMap<String, u64>, CacheError> {
        let ov = self.ov();
        let mut keys: BTreeMap<String, u64> = self.read(|tx| {
            let meta = tx.open_table(META)?;
            let mut out = BTreeMap::new();
            for row in meta.range(prefix..)? {
                let (k, v) = row?;
                if !k.value().starts_with(prefix) {
                    break;
                }
                out.insert(k.value().to_string(), v.value());
            }
            Ok(out)
        })?;
        for m in ov.layers().collect::<Vec<_>>().into_iter().rev() {
            for (k, v) in &m.meta {
                if k.starts_with(prefix) {
                    keys.insert(k.clone(), *v);
                }
            }
        }
        Ok(keys)
    }

    /// Objects whose attributes to ask the server for again (a directory
    /// whose local mtime came from changes that were cancelled before the
    /// server saw them), as flagged by [`crate::engine::refresh_flag`].
    pub fn flagged_refreshes(&self) -> Result<Vec<ObjectId>, CacheError> {
        let prefix = crate::engine::REFRESH;
        Ok(self
            .meta_prefix(prefix)?
            .into_iter()
            .filter(|(_, v)| *v == 1)
            .filter_map(|(k, _)| u128::from_str_radix(&k[prefix.len()..], 16).ok().map(ObjectId))
            .collect())
    }

    /// A stored number (stream position, incarnation halves, ...).
    pub fn meta(&self, k: &str) -> Result<u64, CacheError> {
        self.meta_in(&self.ov(), k)
    }

    /// Store a number (durably).
    pub fn set_meta(&self, k: &str, v: u64) -> Result<(), CacheError> {
        self.change(&[Edit::Meta(k.to_string(), v)])
    }

    /// A stored 128-bit value (replica id, incarnation), if any.
    pub fn meta128(&self, k: &str) -> Result<Option<u128>, CacheError> {
        let (hi, lo) = (self.meta(&format!("{k}.hi"))?, self.meta(&format!("{k}.lo"))?);
        Ok(if hi == 0 && lo == 0 { None } else { Some(((hi as u128) << 64) | lo as u128) })
    }

    /// Store a 128-bit value (durably).
    pub fn set_meta128(&self, k: &str, v: u128) -> Result<(), CacheError> {
        self.change(&[Edit::Meta(format!("{k}.hi"), (v >> 64) as u64), Edit::Meta(format!("{k}.lo"), v as u64)])
    }

    /// Seq of the last record applied to the cache.
    pub fn seq(&self) -> Result<Seq, CacheError> {
        self.meta("seq")
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where data files live (statfs of the mount reports this file system).
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// The data file of an object, as a real file: only a cache on
    /// [`Disk`] has one (the FUSE passthrough path hands it to the kernel);
    /// on other storage the path names nothing. Everything else goes
    /// through the `data_*` methods.
    pub fn data_path(&self, id: ObjectId) -> PathBuf {
        self.data.join(id.to_string())
    }

    /// Whether data files are real files (see [`Cache::data_path`]).
    pub fn has_real_files(&self) -> bool {
        self.store.dir().is_some()
    }

    /// Create an empty data file (truncating one that exists).
    pub fn data_create(&self, id: ObjectId) -> Result<(), CacheError> {
        self.store.data_create(id)
    }

    /// Keep or give up the reserve on the cache's disk (see
    /// [`crate::storage::Storage::reserve`]).
    pub fn reserve(&self, keep: bool) -> Result<bool, CacheError> {
        self.store.reserve(keep)
    }

    /// Write bytes into a data file at `offset` (created if missing). Log
    /// the range with [`Cache::log_dirty`] after, not before: a kill in
    /// between then loses only bytes no record claims.
    pub fn data_write_at(&self, id: ObjectId, offset: u64, bytes: &[u8]) -> Result<(), CacheError> {
        self.store.data_write_at(id, offset, bytes)
    }

    /// Read a data file at `offset` into `buf`: the bytes read (fewer at
    /// the end of the file, 0 past it or without a file).
    pub fn data_read_at(&self, id: ObjectId, offset: u64, buf: &mut [u8]) -> Result<usize, CacheError> {
        self.store.data_read_at(id, offset, buf)
    }

    /// A data file's length (`None`: no data file).
    pub fn data_len(&self, id: ObjectId) -> Result<Option<u64>, CacheError> {
        self.store.data_len(id)
    }

    /// Truncate or extend a data file (created if missing).
    pub fn data_set_len(&self, id: ObjectId, len: u64) -> Result<(), CacheError> {
        self.store.data_set_len(id, len)
    }

    /// Deallocate a range of a data file, keeping its size.
    pub fn data_punch(&self, id: ObjectId, offset: u64, len: u64) -> Result<(), CacheError> {
        self.store.data_punch(id, offset, len)
    }

    /// Allocate a range of a data file (it may grow, with zeros).
    pub fn data_allocate(&self, id: ObjectId, offset: u64, len: u64) -> Result<(), CacheError> {
        self.store.data_allocate(id, offset, len)
    }

    /// Remove a data file (absent is fine).
    pub fn data_remove(&self, id: ObjectId) -> Result<(), CacheError> {
        self.store.data_remove(id)
    }

    /// Make one data file durable now (fsync(2) of a file; a fold syncs
    /// them all).
    pub fn data_sync(&self, id: ObjectId) -> Result<(), CacheError> {
        self.store.data_sync(id)
    }

    /// Write ranges not yet in a CML entry (as logged).
    pub fn dirty(&self) -> DirtyRanges {
        self.ov().dirty.clone()
    }

    fn obj_in(&self, ov: &Overlay, id: ObjectId) -> Result<Option<Cached>, CacheError> {
        for m in ov.layers() {
            if let Some(v) = m.objs.get(&id) {
                return Ok(v.clone());
            }
        }
        self.read(|tx| {
            let t = tx.open_table(OBJECTS)?;
            let v = t.get(id.to_bytes().as_slice())?;
            Ok(v.and_then(|v| postcard::from_bytes(v.value()).ok()))
        })
    }

    fn dent_in(&self, ov: &Overlay, k: &[u8]) -> Result<Option<ObjectId>, CacheError> {
        for m in ov.layers() {
            if let Some(v) = m.dents.get(k) {
                return Ok(*v);
            }
            if m.cleared {
                return Ok(None);
            }
        }
        self.read(|tx| Ok(tx.open_table(DENTRIES)?.get(k)?.map(|v| id_of(v.value()))))
    }

    /// An object by id.
    pub fn get(&self, id: ObjectId) -> Result<Option<Cached>, CacheError> {
        self.obj_in(&self.ov(), id)
    }

    /// The object behind an inode number.
    pub fn by_ino(&self, ino: u64) -> Result<Option<(ObjectId, Cached)>, CacheError> {
        let id = if ino == ROOT_INO {
            Some(ObjectId::ROOT)
        } else {
            let ov = self.ov();
            let mut found = None;
            for m in ov.layers() {
                if let Some(v) = m.inos.get(&ino) {
                    found = Some(*v);
                    break;
                }
            }
            match found {
                Some(v) => v,
                None => self.read(|tx| Ok(tx.open_table(INOS)?.get(ino)?.map(|v| id_of(v.value()))))?,
            }
        };
        match id {
            Some(id) => Ok(self.get(id)?.map(|c| (id, c))),
            None => Ok(None),
        }
    }

    /// The object `name` in `parent` leads to.
    pub fn lookup(&self, parent: ObjectId, name: &[u8]) -> Result<Option<ObjectId>, CacheError> {
        self.dent_in(&self.ov(), &key(parent, name))
    }

    /// Entries of a directory in name order.
    pub fn children(&self, dir: ObjectId) -> Result<Vec<(Vec<u8>, ObjectId)>, CacheError> {
        let lo = dir.to_bytes().to_vec();
        let hi = ObjectId(dir.0.wrapping_add(1)).to_bytes().to_vec();
        let ov = self.ov();
        let layers: Vec<&Maps> = ov.layers().collect();
        let mut out: BTreeMap<Vec<u8>, Option<ObjectId>> = BTreeMap::new();
        if !layers.iter().any(|m| m.cleared) {
            self.read(|tx| {
                let t = tx.open_table(DENTRIES)?;
                for row in t.range(lo.as_slice()..hi.as_slice())? {
                    let (k, v) = row?;
                    out.insert(k.value().to_vec(), Some(id_of(v.value())));
                }
                Ok(())
            })?;
        }
        // oldest layer first, so newer ones win
        let upto = layers.iter().position(|m| m.cleared).map(|i| i + 1).unwrap_or(layers.len());
        for m in layers[..upto].iter().rev() {
            for (k, v) in m.dents.range(lo.clone()..hi.clone()) {
                out.insert(k.clone(), *v);
            }
        }
        Ok(out.into_iter().filter_map(|(k, v)| Some((k[16..].to_vec(), v?))).collect())
    }

    /// Remove an object (row, inode number, orphan mark) for good.
    pub fn purge(&self, id: ObjectId) -> Result<(), CacheError> {
        self.local(&[Edit::Purge { id }])
    }

    /// Every object id in the cache.
    pub fn ids(&self) -> Result<Vec<ObjectId>, CacheError> {
        let mut all = std::collections::BTreeSet::new();
        self.read(|tx| {
            for row in tx.open_table(OBJECTS)?.iter()? {
                all.insert(id_of(row?.0.value()));
            }
            Ok(())
        })?;
        let ov = self.ov();
        let layers: Vec<&Maps> = ov.layers().collect();
        for m in layers.iter().rev() {
            for (id, c) in &m.objs {
                if c.is_some() {
                    all.insert(*id);
                } else {
                    all.remove(id);
                }
            }
        }
        Ok(all.into_iter().collect())
    }

    /// Apply a change and make it durable at once (a fold).
    pub fn change(&self, edits: &[Edit]) -> Result<(), CacheError> {
        self.local(edits)?;
        self.fold()
    }

    /// Apply edits to the live layer (the overlay write-locked).
    fn apply(&self, ov: &mut Overlay, edits: &[Edit]) -> Result<(), CacheError> {
        ov.live.touched = true;
        for e in edits {
            match e {
                Edit::Put { attr, target, xattrs } => {
                    let id = attr.id;
                    let old = self.obj_in(ov, id)?;
                    let ino = match &old {
                        Some(o) => o.ino,
                        None if id == ObjectId::ROOT => ROOT_INO,
                        None => {
                            let next = match self.meta_in(ov, "next_ino")? {
                                0 => ROOT_INO + 1,
                                n => n,
                            };
                            ov.live.meta.insert("next_ino".into(), next + 1);
                            ov.live.inos.insert(next, Some(id));
                            next
                        }
                    };
                    let target = target.clone().or_else(|| old.as_ref().and_then(|o| o.target.clone()));
                    let ctime = old.as_ref().map(|o| o.ctime).unwrap_or(attr.mtime);
                    let xattrs = xattrs.clone().or_else(|| old.map(|o| o.xattrs)).unwrap_or_default();
                    ov.live.objs.insert(id, Some(Cached { attr: attr.clone(), ino, target, xattrs, ctime }));
                }
                Edit::Link { parent, name, id } => {
                    ov.live.dents.insert(key(*parent, name), Some(*id));
                    if self.obj_in(ov, *id)?.is_some_and(|c| c.attr.kind == FileKind::Dir) {
                        ov.live.parents.insert(*id, *parent);
                    }
                }
                Edit::Unlink { parent, name } => {
                    ov.live.dents.insert(key(*parent, name), None);
                }
                Edit::UnlinkIf { parent, name, id } => {
                    let k = key(*parent, name);
                    if self.dent_in(ov, &k)? == Some(*id) {
                        ov.live.dents.insert(k, None);
                    }
                }
                Edit::Versions { id, versions } => {
                    if let Some(mut c) = self.obj_in(ov, *id)? {
                        c.attr.versions = *versions;
                        ov.live.objs.insert(*id, Some(c));
                    }
                }
                Edit::Forget { id } => {
                    // Kept as an orphan (no names, nlink 0) until the next
                    // start: files still open keep working (unlink is not
                    // forget), and the kernel may still ask about the inode.
                    if let Some(mut c) = self.obj_in(ov, *id)? {
                        c.attr.nlink = 0;
                        ov.live.objs.insert(*id, Some(c));
                        ov.live.orphans.insert(*id, true);
                    }
                }
                Edit::Purge { id } => {
                    if let Some(c) = self.obj_in(ov, *id)? {
                        ov.live.inos.insert(c.ino, None);
                    }
                    ov.live.objs.insert(*id, None);
                    ov.live.orphans.insert(*id, false);
                }
                Edit::Seq(s) => {
                    ov.live.meta.insert("seq".into(), *s);
                }
                Edit::ClearEntries => {
                    ov.live.dents.clear();
                    ov.live.parents.clear();
                    ov.live.cleared = true;
                }
                Edit::Cml(lsn, entry) => {
                    ov.live.cml.insert(*lsn, Some(entry.clone()));
                }
                Edit::CmlDone(lsn) => {
                    ov.live.cml.insert(*lsn, None);
                }
                Edit::Park(lsn, p) => {
                    ov.live.cml.insert(*lsn, None);
                    ov.live.parked.insert(*lsn, p.clone());
                }
                Edit::Meta(k, v) => {
                    ov.live.meta.insert(k.clone(), *v);
                    if let Some(id) = writers_of(k) {
                        set_writers(&mut ov.writers, id, *v);
                    }
                }
                // (here, so a replayed log forgets sealed ranges too: sealed
                // again at start they became writes after a later utimens)
                Edit::Sealed { id } => {
                    ov.dirty.remove(id);
                }
                Edit::Ctime { id, time } => {
                    if let Some(mut c) = self.obj_in(ov, *id)? {
                        c.ctime = *time;
                        ov.live.objs.insert(*id, Some(c));
                    }
                }
            }
        }
        Ok(())
    }
}

/// The meta key counting an object's writable opens beside passthrough
/// readers.
fn writers_key(id: ObjectId) -> String {
    format!("{WRITERS}{:032x}", id.0)
}

/// The object a [`writers_key`] is of.
fn writers_of(key: &str) -> Option<ObjectId> {
    let hex = key.strip_prefix(WRITERS)?;
    u128::from_str_radix(hex, 16).ok().map(ObjectId)
}

fn set_writers(writers: &mut BTreeMap<ObjectId, u32>, id: ObjectId, n: u64) {
    match u32::try_from(n) {
        Ok(0) => writers.remove(&id),
        Ok(n) => writers.insert(id, n),
        Err(_) => writers.insert(id, u32::MAX),
    };
}

fn writer_closed(writers: &mut BTreeMap<ObjectId, u32>, id: ObjectId) {
    if let Some(n) = writers.get_mut(&id) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            writers.remove(&id);
        }
    }
}

/// One change to the cached namespace. Each sets state (applying one twice
/// is harmless), which the log replay relies on.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Edit {
    /// Store an object's attributes (keeping its inode number, target and
    /// xattrs unless given).
    Put {
        /// New attributes.
        attr: Attr,
        /// Symlink target, if known.
        target: Option<Vec<u8>>,
        /// Extended attributes, if known.
        xattrs: Option<Vec<(Vec<u8>, Vec<u8>)>>,
    },
    /// Add or replace an entry.
    Link {
        /// Directory.
        parent: ObjectId,
        /// Entry name.
        name: Vec<u8>,
        /// Object it leads to.
        id: ObjectId,
    },
    /// Remove an entry.
    Unlink {
        /// Directory.
        parent: ObjectId,
        /// Entry name.
        name: Vec<u8>,
    },
    /// Drop an object (its last name is gone).
    Forget {
        /// The object.
        id: ObjectId,
    },
    /// The stream position.
    Seq(Seq),
    /// Drop every entry (a resync from a snapshot lists them all again).
    ClearEntries,
    /// Remove an entry if it still leads to `id`.
    UnlinkIf {
        /// Directory.
        parent: ObjectId,
        /// Entry name.
        name: Vec<u8>,
        /// Object it must lead to.
        id: ObjectId,
    },
    /// Set an object's versions only (an own op's record came back).
    Versions {
        /// The object.
        id: ObjectId,
        /// Its versions at the server.
        versions: Versions,
    },
    /// Queue an op in the client modification log.
    Cml(u64, CmlEntry),
    /// An op of the log is answered.
    CmlDone(u64),
    /// An op of the log was refused for good: kept aside.
    Park(u64, Parked),
    /// Store a number.
    Meta(String, u64),
    /// Remove an object (row, inode number, orphan mark) for good.
    Purge {
        /// The object.
        id: ObjectId,
    },
    /// An object's write ranges are in CML entries now (for the log replay).
    Sealed {
        /// The object.
        id: ObjectId,
    },
    /// An object's status changed here (a local change, or a foreign
    /// record applied): its ctime. The time is logged, so a replay after a
    /// SIGKILL gives back the same ctime.
    Ctime {
        /// The object.
        id: ObjectId,
        /// Its new ctime (this machine's clock).
        time: Timestamp,
    },
}

impl Edit {
    /// Store attributes only.
    pub fn attr(attr: Attr) -> Edit {
        Edit::Put { attr, target: None, xattrs: None }
    }

    /// The object whose status this edit changes (what moves its ctime:
    /// new attributes or a new name).
    pub fn status_of(&self) -> Option<ObjectId> {
        match self {
            Edit::Put { attr, .. } => Some(attr.id),
            Edit::Link { id, .. } => Some(*id),
            _ => None,
        }
    }
}

/// `edits` followed by a ctime of `time` for every object they change.
pub fn with_ctime(mut edits: Vec<Edit>, time: Timestamp) -> Vec<Edit> {
    let mut ids: Vec<ObjectId> = edits.iter().filter_map(Edit::status_of).collect();
    ids.sort();
    ids.dedup();
    edits.extend(ids.into_iter().map(|id| Edit::Ctime { id, time }));
    edits
}

/// Whether an object kind has a data file.
pub fn has_data(kind: FileKind) -> bool {
    kind == FileKind::File
}

/// Add `offset..offset+len` to a sorted set of disjoint ranges, merging
/// what overlaps or touches.
pub(crate) fn add_range(v: &mut Vec<(u64, u64)>, offset: u64, len: u64) {
    if len == 0 {
        return;
    }
    let (mut lo, mut hi) = (offset, offset + len);
    let mut out = Vec::with_capacity(v.len() + 1);
    let mut placed = false;
    for &(o, l) in v.iter() {
        let (a, b) = (o, o + l);
        if b < lo {
            out.push((a, b - a));
        } else if a > hi {
            if !placed {
                out.push((lo, hi - lo));
                placed = true;
            }
            out.push((a, b - a));
        } else {
            lo = lo.min(a);
            hi = hi.max(b);
        }
    }
    if !placed {
        out.push((lo, hi - lo));
    }
    *v = out;
}

#[cfg(test)]
mod range_tests {
    use super::*;

    /// The range set against a byte map, on random inserts.
    #[test]
    fn ranges_match_a_bitmap() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..200 {
            let mut v = Vec::new();
            let mut bits = [false; 300];
            for _ in 0..rnd(20) {
                let (o, l) = (rnd(250), rnd(40));
                add_range(&mut v, o, l);
                for b in bits.iter_mut().skip(o as usize).take(l as usize) {
                    *b = true;
                }
            }
            let mut want = Vec::new();
            let mut i = 0;
            while i < bits.len() {
                if bits[i] {
                    let s = i;
                    while i < bits.len() && bits[i] {
                        i += 1;
                    }
                    want.push((s as u64, (i - s) as u64));
                } else {
                    i += 1;
                }
            }
            assert_eq!(v, want);
        }
    }
}

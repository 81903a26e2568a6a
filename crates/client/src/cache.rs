//! The client's cache of a volume: a redb database with the namespace
//! (inode numbers ⇄ object ids, entries, attributes and versions, the
//! stream position) and one data file per regular file, named by its id.
//!
//! Inode numbers are allocated from a counter and stored per object, so
//! `st_ino` stays the same across remounts and every name of a hard-linked
//! object has the same one.

// redb's error is large; it only travels on the rare failure path.
#![allow(clippy::result_large_err)]

use izo_proto::{Attr, FileKind, ObjectId, Op, Seq, Versions};
use redb::{Database, Durability, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Object id → [`Cached`].
const OBJECTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("objects");
/// Inode number → object id.
const INOS: TableDefinition<u64, &[u8]> = TableDefinition::new("inos");
/// Parent id ‖ name → child id.
const DENTRIES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("dentries");
/// Objects whose last name is gone, dropped at the next start.
const ORPHANS: TableDefinition<&[u8], ()> = TableDefinition::new("orphans");
/// Directory id → its parent's id (for the rename cycle check).
const PARENTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("parents");
/// Client modification log: client seq → [`CmlEntry`] not yet answered.
const CML: TableDefinition<u64, &[u8]> = TableDefinition::new("cml");
/// Ops the server refused for good: client seq → [`Parked`].
const PARKED: TableDefinition<u64, &[u8]> = TableDefinition::new("parked");

/// One op of the client modification log. Writes are stored as a range
/// (`len`) whose bytes are read from the data file when sent; bases are
/// filled in from the cached versions when sent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CmlEntry {
    /// The op (a `Write` has no bytes here).
    pub op: Op,
    /// Bytes of a write.
    pub len: u64,
}

/// An op the server refused, kept with what it carried.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Parked {
    /// The op, bytes included.
    pub op: Op,
    /// Why the server refused it.
    pub reason: String,
}

/// What the append-only log holds (see [`Cache::local`]).
#[derive(Serialize, Deserialize)]
enum LogRec {
    /// A local change.
    Edits(Vec<Edit>),
    /// Bytes written to a data file, not yet in a CML entry.
    Dirty(ObjectId, u64, u64),
}

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
    db: Database,
    path: PathBuf,
    data: PathBuf,
    /// The append-only log of local changes since the last durable commit.
    log: Mutex<std::fs::File>,
    log_path: PathBuf,
    /// Commits not durable yet.
    unsynced: std::sync::atomic::AtomicBool,
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

impl Cache {
    /// Open or create the cache in `dir`.
    pub fn open(dir: &Path) -> Result<Cache, CacheError> {
        let data = dir.join("data");
        std::fs::create_dir_all(&data).map_err(|err| CacheError::Io { path: data.clone(), err })?;
        let path = dir.join("cache.redb");
        let db = Database::create(&path).map_err(|e| CacheError::Db { path: path.clone(), why: e.to_string() })?;
        let log_path = dir.join("cml.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&log_path)
            .map_err(|err| CacheError::Io { path: log_path.clone(), err })?;
        let c = Cache { db, path, data, log: Mutex::new(log), log_path, unsynced: Default::default() };
        // Orphans of the last run are no longer open anywhere: drop them.
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
            let _ = std::fs::remove_file(c.data_path(id));
        }
        Ok(c)
    }

    /// Fold the log of local changes into the database: what a SIGKILL
    /// left there is applied again (every edit sets state, so applying one
    /// twice is harmless), then committed durably and the log emptied.
    /// Returns the write ranges not yet in a CML entry, and the objects
    /// whose attributes the replay set (their echoes may have come before
    /// the SIGKILL: ask the server again once their ops are answered).
    pub fn replay_log(&self) -> Result<(DirtyRanges, Vec<ObjectId>), CacheError> {
        let mut buf = Vec::new();
        {
            let mut f = self.log.lock().unwrap_or_else(|p| p.into_inner());
            let mut r = std::fs::File::open(&self.log_path).map_err(|err| self.io(err))?;
            r.read_to_end(&mut buf).map_err(|err| self.io(err))?;
            drop(std::mem::replace(&mut *f, self.reopen_log()?));
        }
        let mut dirty = DirtyRanges::new();
        let mut touched = std::collections::BTreeSet::new();
        let mut at = 0usize;
        let mut n = 0u64;
        while at + 8 <= buf.len() {
            let len = u32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]) as usize;
            let sum = &buf[at + 4..at + 8];
            let Some(body) = buf.get(at + 8..at + 8 + len) else { break };
            if &blake3::hash(body).as_bytes()[..4] != sum {
                break; // torn by a machine crash: what follows never returned
            }
            match postcard::from_bytes::<LogRec>(body) {
                Ok(LogRec::Edits(edits)) => {
                    for e in &edits {
                        match e {
                            Edit::Sealed { id } => {
                                dirty.remove(id);
                            }
                            Edit::Put { attr, .. } => {
                                touched.insert(attr.id);
                            }
                            _ => {}
                        }
                    }
                    self.commit(&edits, Durability::None)?;
                }
                Ok(LogRec::Dirty(id, off, len)) => dirty.entry(id).or_default().push((off, len)),
                Err(_) => break,
            }
            n += 1;
            at += 8 + len;
        }
        if n > 0 {
            tracing::info!("replayed {n} local changes from {}", self.log_path.display());
        }
        self.fold(&dirty)?;
        Ok((dirty, touched.into_iter().collect()))
    }

    fn io(&self, err: std::io::Error) -> CacheError {
        CacheError::Io { path: self.log_path.clone(), err }
    }

    fn reopen_log(&self) -> Result<std::fs::File, CacheError> {
        std::fs::OpenOptions::new().create(true).read(true).append(true).open(&self.log_path).map_err(|e| self.io(e))
    }

    fn append(&self, rec: &LogRec) -> Result<(), CacheError> {
        let body = postcard::to_allocvec(rec).map_err(|e| self.err(e))?;
        let mut frame = Vec::with_capacity(body.len() + 8);
        frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
        frame.extend_from_slice(&blake3::hash(&body).as_bytes()[..4]);
        frame.extend_from_slice(&body);
        let mut f = self.log.lock().unwrap_or_else(|p| p.into_inner());
        f.write_all(&frame).map_err(|e| self.io(e))
    }

    /// A local change: logged (one `write(2)`, so it survives a SIGKILL of
    /// the daemon) and committed without waiting for the disk.
    pub fn local(&self, edits: &[Edit]) -> Result<(), CacheError> {
        self.append(&LogRec::Edits(edits.to_vec()))?;
        self.commit(edits, Durability::None)
    }

    /// A change that need not survive a crash (answers to sent ops: sent
    /// again after a restart, the server answers from its reply cache).
    pub fn local_quiet(&self, edits: &[Edit]) -> Result<(), CacheError> {
        if edits.is_empty() {
            return Ok(());
        }
        self.commit(edits, Durability::None)
    }

    /// Bytes written to a data file (the write itself is in the file).
    pub fn log_dirty(&self, id: ObjectId, offset: u64, len: u64) -> Result<(), CacheError> {
        self.append(&LogRec::Dirty(id, offset, len))
    }

    /// Are there commits (or logged changes) not durable yet?
    pub fn unsynced(&self) -> bool {
        self.unsynced.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Make every local change durable: one durable commit, then an empty
    /// log holding only the write ranges still unsealed. The caller keeps
    /// local changes out meanwhile.
    pub fn fold(&self, dirty: &DirtyRanges) -> Result<(), CacheError> {
        self.unsynced.store(false, std::sync::atomic::Ordering::Relaxed);
        // data files first: a durable commit must not claim bytes (a stream
        // position, a sealed write) that a machine crash would lose
        {
            use std::os::fd::AsRawFd;
            let d = std::fs::File::open(&self.data).map_err(|err| CacheError::Io { path: self.data.clone(), err })?;
            // SAFETY: plain syscall on an open fd.
            if unsafe { libc::syncfs(d.as_raw_fd()) } != 0 {
                let err = std::io::Error::last_os_error();
                return Err(CacheError::Io { path: self.data.clone(), err });
            }
        }
        self.commit(&[], Durability::Immediate)?;
        {
            let f = self.log.lock().unwrap_or_else(|p| p.into_inner());
            f.set_len(0).map_err(|e| self.io(e))?;
        }
        for (id, ranges) in dirty {
            for (off, len) in ranges {
                self.log_dirty(*id, *off, *len)?;
            }
        }
        Ok(())
    }

    /// The client modification log, in client-seq order.
    pub fn cml(&self) -> Result<Vec<(u64, CmlEntry)>, CacheError> {
        self.read(|tx| {
            let mut out = Vec::new();
            for row in tx.open_table(CML)?.iter()? {
                let (k, v) = row?;
                if let Ok(e) = postcard::from_bytes(v.value()) {
                    out.push((k.value(), e));
                }
            }
            Ok(out)
        })
    }

    /// Ops the server refused for good.
    pub fn parked(&self) -> Result<Vec<(u64, Parked)>, CacheError> {
        self.read(|tx| {
            let mut out = Vec::new();
            for row in tx.open_table(PARKED)?.iter()? {
                let (k, v) = row?;
                if let Ok(e) = postcard::from_bytes(v.value()) {
                    out.push((k.value(), e));
                }
            }
            Ok(out)
        })
    }

    /// The parent of a directory, as far as the cache knows.
    pub fn parent_of(&self, dir: ObjectId) -> Result<Option<ObjectId>, CacheError> {
        self.read(|tx| Ok(tx.open_table(PARENTS)?.get(dir.to_bytes().as_slice())?.map(|v| id_of(v.value()))))
    }

    fn err(&self, e: impl std::fmt::Display) -> CacheError {
        CacheError::Db { path: self.path.clone(), why: e.to_string() }
    }

    fn write<T>(&self, f: impl FnOnce(&redb::WriteTransaction) -> Result<T, redb::Error>) -> Result<T, CacheError> {
        self.write_with(Durability::Immediate, f)
    }

    fn write_with<T>(
        &self,
        d: Durability,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<T, redb::Error>,
    ) -> Result<T, CacheError> {
        let mut tx = self.db.begin_write().map_err(|e| self.err(e))?;
        if matches!(d, Durability::None) {
            self.unsynced.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        tx.set_durability(d);
        let out = f(&tx).map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))?;
        Ok(out)
    }

    fn read<T>(&self, f: impl FnOnce(&redb::ReadTransaction) -> Result<T, redb::Error>) -> Result<T, CacheError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        f(&tx).map_err(|e| self.err(e))
    }

    /// A stored number (stream position, incarnation halves, ...).
    pub fn meta(&self, k: &str) -> Result<u64, CacheError> {
        self.read(|tx| Ok(tx.open_table(META)?.get(k)?.map(|v| v.value()).unwrap_or(0)))
    }

    /// Store a number.
    pub fn set_meta(&self, k: &str, v: u64) -> Result<(), CacheError> {
        self.write(|tx| {
            tx.open_table(META)?.insert(k, v)?;
            Ok(())
        })
    }

    /// A stored 128-bit value (replica id, incarnation), if any.
    pub fn meta128(&self, k: &str) -> Result<Option<u128>, CacheError> {
        let (hi, lo) = (self.meta(&format!("{k}.hi"))?, self.meta(&format!("{k}.lo"))?);
        Ok(if hi == 0 && lo == 0 { None } else { Some(((hi as u128) << 64) | lo as u128) })
    }

    /// Store a 128-bit value.
    pub fn set_meta128(&self, k: &str, v: u128) -> Result<(), CacheError> {
        self.set_meta(&format!("{k}.hi"), (v >> 64) as u64)?;
        self.set_meta(&format!("{k}.lo"), v as u64)
    }

    /// Seq of the last record applied to the cache.
    pub fn seq(&self) -> Result<Seq, CacheError> {
        self.meta("seq")
    }

    /// Where data files live (statfs of the mount reports this file system).
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// The data file of an object.
    pub fn data_path(&self, id: ObjectId) -> PathBuf {
        self.data.join(id.to_string())
    }

    /// An object by id.
    pub fn get(&self, id: ObjectId) -> Result<Option<Cached>, CacheError> {
        self.read(|tx| {
            let t = tx.open_table(OBJECTS)?;
            let v = t.get(id.to_bytes().as_slice())?;
            Ok(v.and_then(|v| postcard::from_bytes(v.value()).ok()))
        })
    }

    /// The object behind an inode number.
    pub fn by_ino(&self, ino: u64) -> Result<Option<(ObjectId, Cached)>, CacheError> {
        let id = self.read(|tx| Ok(tx.open_table(INOS)?.get(ino)?.map(|v| id_of(v.value()))))?;
        let id = if ino == ROOT_INO { Some(ObjectId::ROOT) } else { id };
        match id {
            Some(id) => Ok(self.get(id)?.map(|c| (id, c))),
            None => Ok(None),
        }
    }

    /// The object `name` in `parent` leads to.
    pub fn lookup(&self, parent: ObjectId, name: &[u8]) -> Result<Option<ObjectId>, CacheError> {
        self.read(|tx| Ok(tx.open_table(DENTRIES)?.get(key(parent, name).as_slice())?.map(|v| id_of(v.value()))))
    }

    /// Entries of a directory in name order.
    pub fn children(&self, dir: ObjectId) -> Result<Vec<(Vec<u8>, ObjectId)>, CacheError> {
        self.read(|tx| {
            let t = tx.open_table(DENTRIES)?;
            let lo = dir.to_bytes().to_vec();
            let hi = ObjectId(dir.0.wrapping_add(1)).to_bytes().to_vec();
            let mut out = Vec::new();
            for row in t.range(lo.as_slice()..hi.as_slice())? {
                let (k, v) = row?;
                out.push((k.value()[16..].to_vec(), id_of(v.value())));
            }
            Ok(out)
        })
    }

    /// Remove an object (row, inode number, orphan mark) for good.
    pub fn purge(&self, id: ObjectId) -> Result<(), CacheError> {
        self.write(|tx| {
            let old = tx.open_table(OBJECTS)?.remove(id.to_bytes().as_slice())?.map(|v| v.value().to_vec());
            if let Some(c) = old.as_deref().and_then(|v| postcard::from_bytes::<Cached>(v).ok()) {
                tx.open_table(INOS)?.remove(c.ino)?;
            }
            tx.open_table(ORPHANS)?.remove(id.to_bytes().as_slice())?;
            Ok(())
        })
    }

    /// Every object id in the cache.
    pub fn ids(&self) -> Result<Vec<ObjectId>, CacheError> {
        self.read(|tx| {
            let mut out = Vec::new();
            for row in tx.open_table(OBJECTS)?.iter()? {
                out.push(id_of(row?.0.value()));
            }
            Ok(out)
        })
    }

    /// Apply a change to the namespace in one durable transaction.
    pub fn change(&self, edits: &[Edit]) -> Result<(), CacheError> {
        self.commit(edits, Durability::Immediate)
    }

    fn commit(&self, edits: &[Edit], d: Durability) -> Result<(), CacheError> {
        self.write_with(d, |tx| {
            let mut objs = tx.open_table(OBJECTS)?;
            let mut inos = tx.open_table(INOS)?;
            let mut dents = tx.open_table(DENTRIES)?;
            let mut meta = tx.open_table(META)?;
            let mut parents = tx.open_table(PARENTS)?;
            let mut cml = tx.open_table(CML)?;
            for e in edits {
                match e {
                    Edit::Put { attr, target, xattrs } => {
                        let id = attr.id;
                        let old: Option<Cached> =
                            objs.get(id.to_bytes().as_slice())?.and_then(|v| postcard::from_bytes(v.value()).ok());
                        let ino = match &old {
                            Some(o) => o.ino,
                            None if id == ObjectId::ROOT => ROOT_INO,
                            None => {
                                let next = meta.get("next_ino")?.map(|v| v.value()).unwrap_or(ROOT_INO + 1);
                                meta.insert("next_ino", next + 1)?;
                                inos.insert(next, id.to_bytes().as_slice())?;
                                next
                            }
                        };
                        let target = target.clone().or_else(|| old.as_ref().and_then(|o| o.target.clone()));
                        let xattrs = xattrs.clone().or_else(|| old.map(|o| o.xattrs)).unwrap_or_default();
                        let c = Cached { attr: attr.clone(), ino, target, xattrs };
                        let row = postcard::to_allocvec(&c).unwrap_or_default();
                        objs.insert(id.to_bytes().as_slice(), row.as_slice())?;
                    }
                    Edit::Link { parent, name, id } => {
                        dents.insert(key(*parent, name).as_slice(), id.to_bytes().as_slice())?;
                        let kind = objs
                            .get(id.to_bytes().as_slice())?
                            .and_then(|v| postcard::from_bytes::<Cached>(v.value()).ok())
                            .map(|c| c.attr.kind);
                        if kind == Some(FileKind::Dir) {
                            parents.insert(id.to_bytes().as_slice(), parent.to_bytes().as_slice())?;
                        }
                    }
                    Edit::Unlink { parent, name } => {
                        dents.remove(key(*parent, name).as_slice())?;
                    }
                    Edit::UnlinkIf { parent, name, id } => {
                        let k = key(*parent, name);
                        let cur = dents.get(k.as_slice())?.map(|v| id_of(v.value()));
                        if cur == Some(*id) {
                            dents.remove(k.as_slice())?;
                        }
                    }
                    Edit::Versions { id, versions } => {
                        let old: Option<Cached> =
                            objs.get(id.to_bytes().as_slice())?.and_then(|v| postcard::from_bytes(v.value()).ok());
                        if let Some(mut c) = old {
                            c.attr.versions = *versions;
                            let row = postcard::to_allocvec(&c).unwrap_or_default();
                            objs.insert(id.to_bytes().as_slice(), row.as_slice())?;
                        }
                    }
                    Edit::Cml(lsn, entry) => {
                        let row = postcard::to_allocvec(entry).unwrap_or_default();
                        cml.insert(*lsn, row.as_slice())?;
                    }
                    Edit::CmlDone(lsn) => {
                        cml.remove(*lsn)?;
                    }
                    Edit::Park(lsn, p) => {
                        cml.remove(*lsn)?;
                        let row = postcard::to_allocvec(p).unwrap_or_default();
                        tx.open_table(PARKED)?.insert(*lsn, row.as_slice())?;
                    }
                    Edit::Meta(k, v) => {
                        meta.insert(k.as_str(), *v)?;
                    }
                    Edit::Sealed { .. } => {}
                    Edit::Forget { id } => {
                        // Kept as an orphan (no names, nlink 0) until the next
                        // start: files still open keep working (unlink is not
                        // forget), and the kernel may still ask about the inode.
                        let old: Option<Cached> =
                            objs.get(id.to_bytes().as_slice())?.and_then(|v| postcard::from_bytes(v.value()).ok());
                        if let Some(mut c) = old {
                            c.attr.nlink = 0;
                            let row = postcard::to_allocvec(&c).unwrap_or_default();
                            objs.insert(id.to_bytes().as_slice(), row.as_slice())?;
                            tx.open_table(ORPHANS)?.insert(id.to_bytes().as_slice(), ())?;
                        }
                    }
                    Edit::Seq(s) => {
                        meta.insert("seq", *s)?;
                    }
                    Edit::ClearEntries => {
                        dents.retain(|_, _| false)?;
                        parents.retain(|_, _| false)?;
                    }
                }
            }
            Ok(())
        })
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
    /// An object's write ranges are in CML entries now (for the log replay).
    Sealed {
        /// The object.
        id: ObjectId,
    },
}

impl Edit {
    /// Store attributes only.
    pub fn attr(attr: Attr) -> Edit {
        Edit::Put { attr, target: None, xattrs: None }
    }
}

/// Whether an object kind has a data file.
pub fn has_data(kind: FileKind) -> bool {
    kind == FileKind::File
}

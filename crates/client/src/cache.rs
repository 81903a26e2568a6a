//! The client's cache of a volume: a redb database with the namespace
//! (inode numbers ⇄ object ids, entries, attributes and versions, the
//! stream position) and one data file per regular file, named by its id.
//!
//! Inode numbers are allocated from a counter and stored per object, so
//! `st_ino` stays the same across remounts and every name of a hard-linked
//! object has the same one.

// redb's error is large; it only travels on the rare failure path.
#![allow(clippy::result_large_err)]

use izo_proto::{Attr, FileKind, ObjectId, Seq};
use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Object id → [`Cached`].
const OBJECTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("objects");
/// Inode number → object id.
const INOS: TableDefinition<u64, &[u8]> = TableDefinition::new("inos");
/// Parent id ‖ name → child id.
const DENTRIES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("dentries");
/// Objects whose last name is gone, dropped at the next start.
const ORPHANS: TableDefinition<&[u8], ()> = TableDefinition::new("orphans");

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
}

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
        let c = Cache { db, path, data };
        // Orphans of the last run are no longer open anywhere: drop them.
        let dropped = c.write(|tx| {
            tx.open_table(META)?;
            tx.open_table(DENTRIES)?;
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
            Ok(dropped)
        })?;
        for id in dropped {
            let _ = std::fs::remove_file(c.data_path(id));
        }
        Ok(c)
    }

    fn err(&self, e: impl std::fmt::Display) -> CacheError {
        CacheError::Db { path: self.path.clone(), why: e.to_string() }
    }

    fn write<T>(&self, f: impl FnOnce(&redb::WriteTransaction) -> Result<T, redb::Error>) -> Result<T, CacheError> {
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
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

    /// Apply a change to the namespace in one transaction.
    pub fn change(&self, edits: &[Edit]) -> Result<(), CacheError> {
        self.write(|tx| {
            let mut objs = tx.open_table(OBJECTS)?;
            let mut inos = tx.open_table(INOS)?;
            let mut dents = tx.open_table(DENTRIES)?;
            let mut meta = tx.open_table(META)?;
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
                    }
                    Edit::Unlink { parent, name } => {
                        dents.remove(key(*parent, name).as_slice())?;
                    }
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
                    }
                }
            }
            Ok(())
        })
    }
}

/// One change to the cached namespace.
#[derive(Clone, Debug)]
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

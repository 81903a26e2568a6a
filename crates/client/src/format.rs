//! Versions of the cache's on-disk formats and the upgrade on open.
//!
//! The database carries its format in `meta["format"]`; a database without
//! one was written by format 1 (before formats were numbered). Log files
//! of format 2 start with the line `izolog2`; one without it is format 1. An
//! open upgrades what it finds before anything reads it: first each log
//! file (rewritten beside, then renamed over: a crash leaves either the old
//! or the new file, and a file already upgraded is recognised by its
//! magic), then every row of the database in one commit that also records
//! the new format. So an upgrade never strands a laptop's offline changes.
//! The frozen format-1 types are [`v1`]'s; see docs/formats.md.

// redb's error is large; it only travels on the rare failure path.
#![allow(clippy::result_large_err)]

use crate::cache::{CacheError, Cached, CmlEntry, Edit, LogRec, Parked, CML, META, OBJECTS, PARKED};
use crate::storage::Storage;
use izo_proto::{ObjectId, Seq};
use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The format this build writes.
pub const CACHE_FORMAT: u64 = 2;

/// The first bytes of a log file of format 2.
pub(crate) const LOG_MAGIC: &[u8; 8] = b"izolog2\n";

/// The cache's types as format 1 stored them. Frozen.
pub mod v1 {
    use super::*;
    use izo_proto::v1 as p;

    /// A CML entry of format 1 (no stamp).
    #[derive(Clone, Debug, Serialize, Deserialize)]
    pub struct CmlEntry {
        /// The op.
        pub op: p::Op,
        /// Bytes of a write.
        pub len: u64,
    }

    /// A parked op of format 1 (its refusal as text).
    #[derive(Clone, Debug, Serialize, Deserialize)]
    pub struct Parked {
        /// The op, bytes included.
        pub op: p::Op,
        /// Why the server refused it.
        pub reason: String,
    }

    /// A cached object of format 1.
    #[derive(Clone, Debug, Serialize, Deserialize)]
    pub struct Cached {
        /// Attributes and versions.
        pub attr: p::Attr,
        /// Local inode number.
        pub ino: u64,
        /// Symlink target.
        pub target: Option<Vec<u8>>,
        /// Extended attributes.
        pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    }

    /// A change of format 1 (see [`crate::cache::Edit`]).
    #[allow(missing_docs)]
    #[derive(Clone, Debug, Serialize, Deserialize)]
    pub enum Edit {
        Put { attr: p::Attr, target: Option<Vec<u8>>, xattrs: Option<Vec<(Vec<u8>, Vec<u8>)>> },
        Link { parent: ObjectId, name: Vec<u8>, id: ObjectId },
        Unlink { parent: ObjectId, name: Vec<u8> },
        Forget { id: ObjectId },
        Seq(Seq),
        ClearEntries,
        UnlinkIf { parent: ObjectId, name: Vec<u8>, id: ObjectId },
        Versions { id: ObjectId, versions: p::Versions },
        Cml(u64, CmlEntry),
        CmlDone(u64),
        Park(u64, Parked),
        Meta(String, u64),
        Purge { id: ObjectId },
        Sealed { id: ObjectId },
    }

    /// A log record of format 1.
    #[derive(Clone, Debug, Serialize, Deserialize)]
    pub enum LogRec {
        /// A local change.
        Edits(Vec<Edit>),
        /// Bytes written to a data file, not yet in a CML entry.
        Dirty(ObjectId, u64, u64),
    }
}

impl From<v1::CmlEntry> for CmlEntry {
    fn from(e: v1::CmlEntry) -> Self {
        // (no stamp: the server stamps such a change with its own time)
        CmlEntry { op: e.op.into(), len: e.len, time: None }
    }
}

impl From<v1::Parked> for Parked {
    fn from(p: v1::Parked) -> Self {
        let why = format!("refused before the cache was upgraded: {}", p.reason);
        Parked { op: p.op.into(), error: izo_proto::OpError::Invalid(why), kept: None }
    }
}

impl From<v1::Cached> for Cached {
    fn from(c: v1::Cached) -> Self {
        // (format 1 kept no ctime: it started at the mtime then too)
        let attr: izo_proto::Attr = c.attr.into();
        Cached { ctime: attr.mtime, attr, ino: c.ino, target: c.target, xattrs: c.xattrs }
    }
}

impl From<v1::Edit> for Edit {
    fn from(e: v1::Edit) -> Self {
        match e {
            v1::Edit::Put { attr, target, xattrs } => Edit::Put { attr: attr.into(), target, xattrs },
            v1::Edit::Link { parent, name, id } => Edit::Link { parent, name, id },
            v1::Edit::Unlink { parent, name } => Edit::Unlink { parent, name },
            v1::Edit::Forget { id } => Edit::Forget { id },
            v1::Edit::Seq(s) => Edit::Seq(s),
            v1::Edit::ClearEntries => Edit::ClearEntries,
            v1::Edit::UnlinkIf { parent, name, id } => Edit::UnlinkIf { parent, name, id },
            v1::Edit::Versions { id, versions } => Edit::Versions { id, versions: versions.into() },
            v1::Edit::Cml(lsn, e) => Edit::Cml(lsn, e.into()),
            v1::Edit::CmlDone(lsn) => Edit::CmlDone(lsn),
            v1::Edit::Park(lsn, p) => Edit::Park(lsn, p.into()),
            v1::Edit::Meta(k, v) => Edit::Meta(k, v),
            v1::Edit::Purge { id } => Edit::Purge { id },
            v1::Edit::Sealed { id } => Edit::Sealed { id },
        }
    }
}

impl From<v1::LogRec> for LogRec {
    fn from(r: v1::LogRec) -> Self {
        match r {
            v1::LogRec::Edits(e) => LogRec::Edits(e.into_iter().map(Into::into).collect()),
            v1::LogRec::Dirty(id, off, len) => LogRec::Dirty(id, off, len),
        }
    }
}

fn db_err(path: &Path) -> impl Fn(redb::Error) -> CacheError + '_ {
    move |e| CacheError::Db { path: path.to_path_buf(), why: e.to_string() }
}

/// One frame of a log: length, 4 bytes of BLAKE3, body.
pub(crate) fn frame(body: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(body.len() + 8);
    f.extend_from_slice(&(body.len() as u32).to_le_bytes());
    f.extend_from_slice(&blake3::hash(body).as_bytes()[..4]);
    f.extend_from_slice(body);
    f
}

/// The whole frames of a log's bytes (a torn tail ends them).
pub(crate) fn frames(buf: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        let len = u32::from_le_bytes(buf.get(at..at + 4)?.try_into().ok()?) as usize;
        let sum = buf.get(at + 4..at + 8)?;
        let body = buf.get(at + 8..at + 8 + len)?;
        if &blake3::hash(body).as_bytes()[..4] != sum {
            return None; // torn by a machine crash: what follows never returned
        }
        at += 8 + len;
        Some(body)
    })
}

/// Bring the cache on `store` (database `db`) to [`CACHE_FORMAT`]. Refuses
/// a cache of a newer format.
pub(crate) fn upgrade(db: &Database, db_path: &Path, store: &dyn Storage) -> Result<(), CacheError> {
    let logs = store.log_gens()?;
    let format = {
        let tx = db.begin_write().map_err(|e| db_err(db_path)(e.into()))?;
        let (format, empty) = {
            let meta = tx.open_table(META).map_err(|e| db_err(db_path)(e.into()))?;
            let objs = tx.open_table(OBJECTS).map_err(|e| db_err(db_path)(e.into()))?;
            let f = meta.get("format").map_err(|e| db_err(db_path)(e.into()))?.map(|v| v.value());
            let empty = objs.first().map_err(|e| db_err(db_path)(e.into()))?.is_none();
            (f, empty)
        };
        match (format, empty && logs.is_empty()) {
            (Some(f), _) => f,
            (None, true) => {
                // a new cache: this build's format from the start
                let set = |tx: &redb::WriteTransaction| -> Result<(), redb::Error> {
                    tx.open_table(META)?.insert("format", CACHE_FORMAT)?;
                    Ok(())
                };
                set(&tx).map_err(db_err(db_path))?;
                tx.commit().map_err(|e| db_err(db_path)(e.into()))?;
                return Ok(());
            }
            (None, false) => 1,
        }
    };
    if format > CACHE_FORMAT {
        return Err(CacheError::Db {
            path: db_path.to_path_buf(),
            why: format!(
                "written by a newer intermezzo (cache format {format}; this build reads formats 1 to \
                 {CACHE_FORMAT}): run the newer build, or mount with a new --cache"
            ),
        });
    }
    if format == CACHE_FORMAT {
        return Ok(());
    }
    tracing::info!("upgrading the cache {} from format {format} to {CACHE_FORMAT}", db_path.display());
    for gen in logs {
        upgrade_log(store, gen)?;
    }
    upgrade_rows(db, db_path)
}

/// Rewrite one format-1 log file in today's format (a file that already
/// starts with the magic is left as it is).
fn upgrade_log(store: &dyn Storage, gen: u64) -> Result<(), CacheError> {
    let buf = store.log_read(gen)?;
    if buf.starts_with(LOG_MAGIC) {
        return Ok(());
    }
    let mut out = LOG_MAGIC.to_vec();
    for body in frames(&buf) {
        let Ok(old) = postcard::from_bytes::<v1::LogRec>(body) else { break };
        let rec: LogRec = old.into();
        let body = postcard::to_allocvec(&rec).expect("a log record always encodes");
        out.extend_from_slice(&frame(&body));
    }
    store.log_replace(gen, &out)
}

/// Re-encode every row of a table keyed by client seq from `Old` to `New`.
fn reencode<Old, New>(tx: &redb::WriteTransaction, def: TableDefinition<u64, &[u8]>) -> Result<(), redb::Error>
where
    Old: for<'a> Deserialize<'a>,
    New: From<Old> + Serialize,
{
    let mut t = tx.open_table(def)?;
    let rows: Vec<(u64, Vec<u8>)> =
        t.iter()?.map(|r| r.map(|(k, v)| (k.value(), v.value().to_vec()))).collect::<Result<_, _>>()?;
    for (k, v) in rows {
        if let Ok(old) = postcard::from_bytes::<Old>(&v) {
            let new: New = old.into();
            t.insert(k, postcard::to_allocvec(&new).expect("a row always encodes").as_slice())?;
        }
    }
    Ok(())
}

/// Re-encode every object, CML entry and parked op, and record the format,
/// in one commit.
fn upgrade_rows(db: &Database, db_path: &Path) -> Result<(), CacheError> {
    let err = db_err(db_path);
    let tx = db.begin_write().map_err(|e| err(e.into()))?;
    let result: Result<(), redb::Error> = (|| {
        let mut objs = tx.open_table(OBJECTS)?;
        let rows: Vec<(Vec<u8>, Vec<u8>)> =
            objs.iter()?.map(|r| r.map(|(k, v)| (k.value().to_vec(), v.value().to_vec()))).collect::<Result<_, _>>()?;
        for (k, v) in rows {
            if let Ok(old) = postcard::from_bytes::<v1::Cached>(&v) {
                let c: Cached = old.into();
                objs.insert(k.as_slice(), postcard::to_allocvec(&c).expect("a row always encodes").as_slice())?;
            }
        }
        reencode::<v1::CmlEntry, CmlEntry>(&tx, CML)?;
        reencode::<v1::Parked, Parked>(&tx, PARKED)?;
        tx.open_table(META)?.insert("format", CACHE_FORMAT)?;
        Ok(())
    })();
    result.map_err(&err)?;
    tx.commit().map_err(|e| err(e.into()))
}

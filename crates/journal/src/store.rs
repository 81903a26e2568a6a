//! Opening the database, volume identity, progress counters, records and
//! retention.

use crate::tables::*;
use izo_proto::{FileKind, ObjectId, OpError, ReplicaId, Seq, Timestamp, Versions};
use redb::{Database, Durability, ReadableTable, StorageBackend};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Errors of the metadata store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed (I/O, corruption, lock held by another process).
    #[error("metadata database: {0}")]
    Db(String),
    /// A row could not be decoded.
    #[error("corrupt row in table {0}")]
    Corrupt(&'static str),
}

impl From<StoreError> for OpError {
    fn from(e: StoreError) -> Self {
        OpError::Io(e.to_string())
    }
}

pub(crate) fn db<E: Into<redb::Error>>(e: E) -> StoreError {
    StoreError::Db(e.into().to_string())
}

/// Bytes of database pages redb keeps in memory. Its default (1 GiB) let a
/// server's memory grow with its journal; the kernel's page cache still
/// holds the file, so a miss costs a copy, not a disk read.
const CACHE_BYTES: usize = 32 << 20;

/// The metadata store of one volume.
pub struct Store {
    pub(crate) db: Database,
    pub(crate) head: AtomicU64,
    pub(crate) cookie: AtomicU64,
    /// Cost of the records recorded since open (see `journal_written`).
    pub(crate) written: AtomicU64,
    incarnation: std::sync::Mutex<u128>,
    /// Durable commits made (each is one group-commit fsync).
    pub commits: AtomicU64,
    /// Largest file size the export's file system takes (probed by the server).
    pub max_file_size: AtomicU64,
    /// The volume is trusted: `trusted.*` and `security.capability` xattrs
    /// replicate (set by the server from its config).
    pub trusted: std::sync::atomic::AtomicBool,
    /// Bytes of extended attributes (names, values, 24 bytes per entry)
    /// one inode of the export holds (probed by the server).
    pub xattr_room: AtomicU64,
    /// Bytes new data may still take on the export in the current batch
    /// (set by the server from statfs before each batch, minus a margin).
    pub space_budget: AtomicU64,
}

pub(crate) fn get_u64(t: &impl ReadableTable<&'static str, &'static [u8]>, k: &str) -> Result<Option<u64>, StoreError> {
    Ok(t.get(k).map_err(db)?.and_then(|v| v.value().try_into().ok().map(u64::from_be_bytes)))
}

impl Store {
    /// Open or create the store at `path`. A new store gets a fresh
    /// incarnation and a root directory with the given attributes.
    pub fn open(path: &Path, root: (u32, u32, u32, Timestamp)) -> Result<Store, StoreError> {
        let database = Database::builder().set_cache_size(CACHE_BYTES).create(path).map_err(db)?;
        Store::init(database, root, uuid::Uuid::new_v4().as_u128())
    }

    /// Open or create the store on a storage backend other than a file (an
    /// in-memory disk in tests and simulation), as [`Store::open`] does.
    pub fn open_on(backend: impl StorageBackend, root: (u32, u32, u32, Timestamp)) -> Result<Store, StoreError> {
        Store::open_on_as(backend, root, uuid::Uuid::new_v4().as_u128())
    }

    /// [`Store::open_on`] where a new store takes the given incarnation
    /// instead of a random one, so a seeded simulation replays exactly. An
    /// existing store keeps its own.
    pub fn open_on_as(
        backend: impl StorageBackend,
        root: (u32, u32, u32, Timestamp),
        incarnation: u128,
    ) -> Result<Store, StoreError> {
        let database = Database::builder().set_cache_size(CACHE_BYTES).create_with_backend(backend).map_err(db)?;
        Store::init(database, root, incarnation)
    }

    /// Create the tables a store needs, and on a new store its identity
    /// (`incarnation`) and root directory; upgrade what older builds wrote.
    fn init(database: Database, root: (u32, u32, u32, Timestamp), incarnation: u128) -> Result<Store, StoreError> {
        let tx = database.begin_write().map_err(db)?;
        let (incarnation, head, cookie) = {
            let mut meta = tx.open_table(META).map_err(db)?;
            for t in [OBJECTS, DENTRIES, XATTRS, REPLIES, COOKIES, HASHES, OWNERS, HANDLES] {
                tx.open_table(t).map_err(db)?;
            }
            tx.open_table(LINKS).map_err(db)?;
            crate::retention::upgrade_cost(&mut meta, &tx.open_table(RECORDS).map_err(db)?)?;
            tx.open_table(REPLICAS).map_err(db)?;
            // (a store from before the released marks: every reply below a
            // replica's last may have been dropped, as that build assumed)
            if meta.get("released_tracked").map_err(db)?.is_none() {
                let replicas = tx.open_table(REPLICAS).map_err(db)?;
                let mut released = tx.open_table(RELEASED).map_err(db)?;
                for row in replicas.iter().map_err(db)? {
                    let (k, v) = row.map_err(db)?;
                    released.insert(k.value(), v.value()).map_err(db)?;
                }
                meta.insert("released_tracked", [1u8].as_slice()).map_err(db)?;
            }
            let inc =
                meta.get("incarnation").map_err(db)?.and_then(|v| v.value().try_into().ok().map(u128::from_be_bytes));
            let inc = match inc {
                Some(i) => i,
                None => {
                    let i = incarnation;
                    meta.insert("incarnation", i.to_be_bytes().as_slice()).map_err(db)?;
                    let (mode, uid, gid, mtime) = root;
                    let row = new_row(FileKind::Dir, mode, uid, gid, mtime, None, 0);
                    let mut objs = tx.open_table(OBJECTS).map_err(db)?;
                    objs.insert(ObjectId::ROOT.to_bytes().as_slice(), enc(&row).as_slice()).map_err(db)?;
                    i
                }
            };
            // Stores written before the handle index existed get it built once.
            let mut handles = tx.open_table(HANDLES).map_err(db)?;
            if handles.first().map_err(db)?.is_none() {
                let objs = tx.open_table(OBJECTS).map_err(db)?;
                for row in objs.iter().map_err(db)? {
                    let (k, v) = row.map_err(db)?;
                    if let Some(r) = dec::<ObjectRow>(v.value()).filter(|r| !r.handle.is_empty()) {
                        handles.insert(r.handle.as_slice(), k.value()).map_err(db)?;
                    }
                }
            }
            (inc, get_u64(&meta, "head")?.unwrap_or(0), get_u64(&meta, "cookie")?.unwrap_or(0))
        };
        tx.commit().map_err(db)?;
        Ok(Store {
            db: database,
            head: AtomicU64::new(head),
            cookie: AtomicU64::new(cookie),
            written: AtomicU64::new(0),
            incarnation: std::sync::Mutex::new(incarnation),
            commits: AtomicU64::new(1),
            max_file_size: AtomicU64::new(i64::MAX as u64),
            trusted: std::sync::atomic::AtomicBool::new(false),
            xattr_room: AtomicU64::new(u64::MAX),
            space_budget: AtomicU64::new(u64::MAX),
        })
    }

    /// Volume incarnation.
    pub fn incarnation(&self) -> u128 {
        *self.incarnation.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Take a new incarnation (durably): every client's saved seqs and ids
    /// become void and it resyncs. For a server found rolled back (its state
    /// restored from a backup older than what clients saw acked).
    pub fn new_incarnation(&self) -> Result<u128, StoreError> {
        let i = uuid::Uuid::new_v4().as_u128();
        let tx = self.db.begin_write().map_err(db)?;
        tx.open_table(META).map_err(db)?.insert("incarnation", i.to_be_bytes().as_slice()).map_err(db)?;
        tx.commit().map_err(db)?;
        self.commits.fetch_add(1, Ordering::Relaxed);
        *self.incarnation.lock().unwrap_or_else(|p| p.into_inner()) = i;
        Ok(i)
    }

    /// Highest committed seq.
    pub fn head(&self) -> Seq {
        self.head.load(Ordering::Acquire)
    }

    pub(crate) fn meta_u64(&self, key: &str) -> Result<u64, StoreError> {
        let r = self.db.begin_read().map_err(db)?;
        let t = r.open_table(META).map_err(db)?;
        Ok(get_u64(&t, key)?.unwrap_or(0))
    }

    /// Seq through which the tree is durably applied (after a syncfs).
    pub fn checkpoint(&self) -> Result<Seq, StoreError> {
        self.meta_u64("checkpoint")
    }

    /// Record a durable checkpoint. Call only after `syncfs` on the export.
    /// `settled` (nanoseconds since the epoch) is a time before which every
    /// out-of-band change of the export is known to be journaled: the next
    /// start-up scan rereads only files whose ctime is later.
    pub fn set_checkpoint(&self, seq: Seq, settled: i64) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(db)?;
        {
            let mut m = tx.open_table(META).map_err(db)?;
            m.insert("checkpoint", seq.to_be_bytes().as_slice()).map_err(db)?;
            m.insert("settled", (settled.max(0) as u64).to_be_bytes().as_slice()).map_err(db)?;
        }
        tx.commit().map_err(db)?;
        self.commits.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Nanoseconds since the epoch before which every out-of-band change is
    /// journaled (0: none known, every file is a candidate).
    pub fn settled(&self) -> Result<i64, StoreError> {
        let v = self.meta_u64("settled")? as i64;
        // (stores of the first capture build kept seconds)
        Ok(if v < 1_000_000_000_000 { v.saturating_mul(1_000_000_000) } else { v })
    }

    /// The object whose server file handle is `handle`.
    pub fn by_handle(&self, handle: &[u8]) -> Result<Option<ObjectId>, StoreError> {
        let r = self.db.begin_read().map_err(db)?;
        let t = r.open_table(HANDLES).map_err(db)?;
        let v = t.get(handle).map_err(db)?.map(|v| id_at(v.value(), 0));
        Ok(v)
    }

    /// Last client seq of `replica` the server has recorded (0 if new).
    pub fn replica_last(&self, replica: ReplicaId) -> Result<u64, StoreError> {
        let r = self.db.begin_read().map_err(db)?;
        let t = r.open_table(REPLICAS).map_err(db)?;
        Ok(t.get(replica.0.to_be_bytes().as_slice()).map_err(db)?.map(|v| v.value()).unwrap_or(0))
    }

    /// Register `replica` under `owner` (a token's stable id) on first use.
    /// Later, `is_owner` says whether a stored owner names the same token
    /// (an older form of its name is rewritten to `owner`); false when the
    /// replica belongs to another token, which must not use it.
    pub fn claim_replica(
        &self,
        replica: ReplicaId,
        owner: &[u8],
        is_owner: impl Fn(&[u8]) -> bool,
    ) -> Result<bool, StoreError> {
        let key = replica.0.to_be_bytes();
        {
            let r = self.db.begin_read().map_err(db)?;
            let t = r.open_table(OWNERS).map_err(db)?;
            if let Some(v) = t.get(key.as_slice()).map_err(db)? {
                if v.value() == owner || !is_owner(v.value()) {
                    return Ok(v.value() == owner);
                }
            }
        }
        let tx = self.db.begin_write().map_err(db)?;
        let ok = {
            let mut t = tx.open_table(OWNERS).map_err(db)?;
            let existing = t.get(key.as_slice()).map_err(db)?.map(|v| v.value().to_vec());
            match existing {
                Some(v) if v != owner && !is_owner(&v) => false,
                _ => {
                    t.insert(key.as_slice(), owner).map_err(db)?;
                    true
                }
            }
        };
        tx.commit().map_err(db)?;
        self.commits.fetch_add(1, Ordering::Relaxed);
        Ok(ok)
    }

    /// The cached reply to (`replica`, `cseq`), encoded as it was sent.
    pub fn cached_reply(&self, replica: ReplicaId, cseq: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let r = self.db.begin_read().map_err(db)?;
        let t = r.open_table(REPLIES).map_err(db)?;
        Ok(t.get(rkey(replica, cseq).as_slice()).map_err(db)?.map(|v| v.value().to_vec()))
    }

    /// Up to `max` records with seq ≥ `from`.
    pub fn records_from(&self, from: Seq, max: usize) -> Result<Vec<StoredRecord>, StoreError> {
        let r = self.db.begin_read().map_err(db)?;
        let t = r.open_table(RECORDS).map_err(db)?;
        let mut out = Vec::new();
        for row in t.range(from..).map_err(db)?.take(max) {
            let (_, v) = row.map_err(db)?;
            out.push(dec_record(v.value()).ok_or(StoreError::Corrupt("records"))?);
        }
        Ok(out)
    }

    /// Time of the record at `seq`, if still held.
    pub fn record_time(&self, seq: Seq) -> Result<Option<Timestamp>, StoreError> {
        Ok(self.records_from(seq, 1)?.into_iter().find(|r| r.record.seq == seq).map(|r| r.record.time))
    }

    /// Store a new file handle for an object (after replay recreated it).
    pub fn set_handle(&self, id: ObjectId, handle: &[u8]) -> Result<(), StoreError> {
        let mut tx = self.db.begin_write().map_err(db)?;
        tx.set_durability(Durability::None);
        {
            let mut t = tx.open_table(OBJECTS).map_err(db)?;
            let row = t.get(id.to_bytes().as_slice()).map_err(db)?.map(|v| v.value().to_vec());
            if let Some(mut row) = row.as_deref().and_then(dec::<ObjectRow>) {
                let mut h = tx.open_table(HANDLES).map_err(db)?;
                if !row.handle.is_empty() {
                    h.remove(row.handle.as_slice()).map_err(db)?;
                }
                h.insert(handle, id.to_bytes().as_slice()).map_err(db)?;
                row.handle = handle.to_vec();
                t.insert(id.to_bytes().as_slice(), enc(&row).as_slice()).map_err(db)?;
            }
        }
        tx.commit().map_err(db)?;
        Ok(())
    }
}

/// A fresh object row.
pub(crate) fn new_row(
    kind: FileKind,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: Timestamp,
    writer: Option<ReplicaId>,
    seq: Seq,
) -> ObjectRow {
    ObjectRow {
        kind,
        mode: if kind == FileKind::Symlink { 0o777 } else { mode & 0o7777 },
        uid,
        gid,
        size: 0,
        mtime,
        atime: mtime,
        nlink: if kind == FileKind::Dir { 2 } else { 1 },
        versions: Versions { data: seq, meta: seq },
        data_writer: writer,
        data_run_start: 0,
        meta_writer: writer,
        meta_run_start: 0,
        handle: Vec::new(),
        target: None,
        stale: Vec::new(),
        rdev: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &tempfile::TempDir) -> Store {
        Store::open(&dir.path().join("v.redb"), (0o755, 0, 0, Timestamp::default())).expect("open")
    }

    #[test]
    fn a_store_on_a_backend_reopens_with_its_identity_and_what_it_committed() {
        let disk = izo_memdisk::MemDisk::new();
        let root = (0o700, 1, 2, Timestamp { secs: 5, nsec: 6 });
        let s = Store::open_on_as(disk.clone(), root, 77).expect("create");
        let mut b = s.batch().expect("batch");
        let op = izo_proto::Op::Mkdir {
            parent: ObjectId::ROOT,
            name: b"d".to_vec(),
            id: ObjectId::new(),
            mode: 0o755,
            uid: 0,
            gid: 0,
        };
        b.execute(izo_proto::Origin::Local, &op, Timestamp::default()).expect("mkdir");
        b.commit(true).expect("commit");
        drop(s);
        let s = Store::open_on_as(disk, (0o755, 0, 0, Timestamp::default()), 99).expect("reopen");
        assert_eq!((s.incarnation(), s.head()), (77, 1), "an existing store keeps its incarnation");
        let a = s.getattr(ObjectId::ROOT).expect("root");
        assert_eq!((a.mode, a.uid, a.gid), (0o700, 1, 2), "the root made at creation");
        assert_eq!(s.records_from(1, 10).expect("records").len(), 1);
    }

    #[test]
    fn a_replica_keeps_its_owner_and_an_older_name_of_it_is_rewritten() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = store(&dir);
        let r = ReplicaId(7);
        let never = |_: &[u8]| false;
        assert!(s.claim_replica(r, b"old-name", never).expect("claim"), "first use registers");
        assert!(!s.claim_replica(r, b"other", never).expect("claim"), "another owner is refused");
        // the same owner under its new name: accepted, and stored under it
        assert!(s.claim_replica(r, b"new-name", |o: &[u8]| o == b"old-name").expect("claim"));
        assert!(s.claim_replica(r, b"new-name", never).expect("claim"), "the new name is what is stored now");
        assert!(!s.claim_replica(r, b"old-name", never).expect("claim"));
    }

    #[test]
    fn an_append_lands_where_its_replica_put_it_unless_another_wrote_first_then_at_the_end() {
        use izo_proto::{Op, Origin, ReplicaId};
        let s = Store::open_on_as(izo_memdisk::MemDisk::new(), (0o755, 0, 0, Timestamp::default()), 1).expect("store");
        let f = ObjectId::new();
        let (a, b) = (ReplicaId(1), ReplicaId(2));
        let t = Timestamp::default();
        let mut batch = s.batch().expect("batch");
        let create = Op::Create { parent: ObjectId::ROOT, name: b"log".to_vec(), id: f, mode: 0o644, uid: 0, gid: 0 };
        batch.execute(Origin::Replica(a, 1), &create, t).expect("create");
        let v0 = batch.object(f).expect("row").versions.data;
        let append = |base, at: u64, data: &[u8]| Op::Append { id: f, base, local_offset: at, data: data.to_vec() };
        // nothing moved: at the replica's offset
        let r = batch.execute(Origin::Replica(a, 2), &append(v0, 0, b"A1\n"), t).expect("A1");
        assert_eq!(r.attr.expect("attr").size, 3);
        // B saw A1 (its base is A1's version): at its offset too
        let r = batch.execute(Origin::Replica(b, 1), &append(r.seq, 3, b"B1\n"), t).expect("B1");
        assert_eq!(r.attr.expect("attr").size, 6);
        // A appended on A1's version, not knowing B1: at the end, never over B1
        let r = batch.execute(Origin::Replica(a, 3), &append(v0, 3, b"A2\n"), t).expect("A2");
        assert_eq!(r.attr.expect("attr").size, 9);
        // and it is recorded as the write it became
        let recs = batch.records();
        match &recs[recs.len() - 1].record.op {
            Op::Write { offset, data, .. } => assert_eq!((*offset, data.as_slice()), (6, &b"A2\n"[..])),
            op => panic!("recorded as {op:?}"),
        }
        match &recs[recs.len() - 2].record.op {
            Op::Write { offset, .. } => assert_eq!(*offset, 3, "B1 where B put it"),
            op => panic!("recorded as {op:?}"),
        }
        // an append to a directory is refused as a write would be
        let d = Op::Append { id: ObjectId::ROOT, base: 0, local_offset: 0, data: b"x".to_vec() };
        assert!(batch.execute(Origin::Replica(a, 4), &d, t).is_err());
    }
}

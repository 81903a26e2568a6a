//! Table definitions and row types. Rows are postcard-encoded, each with a
//! leading format byte so they can migrate (see docs/formats.md).

use crate::Handle;
use izo_proto::{Attr, FileKind, ObjectId, Record, ReplicaId, Seq, Timestamp, Versions};
use redb::TableDefinition;
use serde::{Deserialize, Serialize};

mod old;

/// Small named values: incarnation, head seq, checkpoint seq, volume name.
pub const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// Object id → [`ObjectRow`].
pub const OBJECTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("objects");
/// Parent id ‖ name → child id.
pub const DENTRIES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("dentries");
/// Parent id ‖ cookie → name: readdir order, stable under concurrent changes.
pub const COOKIES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("cookies");
/// Child id ‖ parent id ‖ name → (): every name of an object.
pub const LINKS: TableDefinition<&[u8], ()> = TableDefinition::new("links");
/// Object id ‖ xattr name → value.
pub const XATTRS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("xattrs");
/// Object id → BLAKE3 hashes of its 1 MiB blocks, 32 bytes each. Kept out
/// of the object row so a write to a big file does not rewrite them.
pub const HASHES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("hashes");
/// Server file handle → object id: maps what fanotify reports to objects.
pub const HANDLES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("handles");
/// Seq → [`StoredRecord`].
pub const RECORDS: TableDefinition<u64, &[u8]> = TableDefinition::new("records");
/// Replica id → last applied client seq.
pub const REPLICAS: TableDefinition<&[u8], u64> = TableDefinition::new("replicas");
/// Replica id → stable id of the token it was registered under (or, for
/// replicas registered before token ids, that token's hash).
pub const OWNERS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("replica_owners");
/// Replica id ‖ client seq → encoded reply.
pub const REPLIES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("replies");
/// Replica id (16 bytes BE) → the client seq through which its cached
/// replies were dropped (the client holds them durably): a resend at or
/// below it is answered "expired"; one above it, below the replica's last
/// recorded seq and without a cached reply was never recorded.
pub const RELEASED: TableDefinition<&[u8], u64> = TableDefinition::new("replies_released");

/// Format byte of rows before object rows carried `rdev` (object rows of
/// this format are upgraded on read; see [`Row`]).
pub const ROW_V1: u8 = 1;

/// Format byte of object rows since they carry `rdev`.
pub const OBJECT_V2: u8 = 2;

/// One object's metadata.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ObjectRow {
    /// Kind of object.
    pub kind: FileKind,
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size in bytes.
    pub size: u64,
    /// Modification time.
    pub mtime: Timestamp,
    /// Access time: the creation time until an explicit utimens sets it
    /// (reads do not move it).
    pub atime: Timestamp,
    /// Link count (directories: 2 + subdirectories).
    pub nlink: u32,
    /// Data and meta versions.
    pub versions: Versions,
    /// Replica whose ops produced the current run of data changes.
    pub data_writer: Option<ReplicaId>,
    /// Data version before that run began (own ops rebase onto the run).
    pub data_run_start: Seq,
    /// Replica whose ops produced the current run of meta changes.
    pub meta_writer: Option<ReplicaId>,
    /// Meta version before that run began.
    pub meta_run_start: Seq,
    /// Server file handle of the inode in the export.
    pub handle: Handle,
    /// Symlink target.
    pub target: Option<Vec<u8>>,
    /// Ranges of 1 MiB blocks (first, last; sorted, disjoint) whose hash in
    /// the hashes table is out of date.
    pub stale: Vec<(u64, u64)>,
    /// Device number of a device node (0 for every other kind).
    pub rdev: u32,
}

impl ObjectRow {
    /// Attributes as sent on the wire.
    pub fn attr(&self, id: ObjectId) -> Attr {
        Attr {
            id,
            kind: self.kind,
            mode: self.mode,
            uid: self.uid,
            gid: self.gid,
            size: self.size,
            mtime: self.mtime,
            atime: self.atime,
            nlink: self.nlink,
            versions: self.versions,
            rdev: self.rdev,
        }
    }
}

/// A row type with a format byte: [`enc`] writes `FORMAT`, [`dec`] reads it
/// and hands any other format to `upgrade`.
pub trait Row: Serialize + for<'a> Deserialize<'a> {
    /// Format byte written today.
    const FORMAT: u8;
    /// Decode a row of an older `format` (`None`: unknown or corrupt).
    fn upgrade(format: u8, rest: &[u8]) -> Option<Self>;
}

impl Row for ObjectRow {
    const FORMAT: u8 = OBJECT_V2;
    fn upgrade(format: u8, rest: &[u8]) -> Option<Self> {
        match format {
            ROW_V1 => postcard::from_bytes::<old::ObjectRowV1>(rest).ok().map(ObjectRow::from),
            _ => None,
        }
    }
}

/// A journal record with what the applier needs beyond the wire record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredRecord {
    /// The record as streamed.
    pub record: Record,
    /// Handles of every object the op names, as known when it was recorded.
    pub handles: Vec<(ObjectId, Handle)>,
    /// Where a write's bytes are.
    pub payload: Payload,
}

/// Where the bytes of a write record live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Payload {
    /// In the record itself (or the op has no payload).
    #[default]
    Inline,
    /// In a stage file, fsynced before the commit; the length.
    Staged(u64),
    /// Already in the target file beyond its old end, fdatasynced before the
    /// commit (an append); the length.
    Direct(u64),
}

impl StoredRecord {
    /// Handle of `id` as recorded.
    pub fn handle(&self, id: ObjectId) -> Option<&Handle> {
        self.handles.iter().find(|(i, _)| *i == id).map(|(_, h)| h)
    }
}

/// Encode a row with its format byte.
pub fn enc<T: Row>(v: &T) -> Vec<u8> {
    // postcard only fails on writers that run out of space; a Vec never does.
    postcard::to_extend(v, vec![T::FORMAT]).expect("encoding into a Vec cannot fail")
}

/// Decode a row written by [`enc`], of this format or an older one.
pub fn dec<T: Row>(b: &[u8]) -> Option<T> {
    match b.split_first() {
        Some((&f, rest)) if f == T::FORMAT => postcard::from_bytes(rest).ok(),
        Some((&f, rest)) => T::upgrade(f, rest),
        None => None,
    }
}

/// Format byte of journal records since they carry `Record::elided`.
pub const RECORD_V2: u8 = 2;

/// Format byte of journal records since `Attr` and `Op::Mknod` carry `rdev`.
pub const RECORD_V3: u8 = 3;

/// Encode a journal record row.
pub fn enc_record(r: &StoredRecord) -> Vec<u8> {
    postcard::to_extend(r, vec![RECORD_V3]).expect("encoding into a Vec cannot fail")
}

/// Decode a journal record row of any format.
pub fn dec_record(b: &[u8]) -> Option<StoredRecord> {
    match b.split_first() {
        Some((&RECORD_V3, rest)) => postcard::from_bytes(rest).ok(),
        Some((&RECORD_V2, rest)) => postcard::from_bytes::<old::StoredRecordV2>(rest).ok().map(StoredRecord::from),
        Some((&ROW_V1, rest)) => postcard::from_bytes::<old::StoredRecordV1>(rest).ok().map(StoredRecord::from),
        _ => None,
    }
}

/// Key of a dentry: parent id ‖ name.
pub fn dkey(parent: ObjectId, name: &[u8]) -> Vec<u8> {
    let mut k = parent.to_bytes().to_vec();
    k.extend_from_slice(name);
    k
}

/// Key of a cookie: parent id ‖ cookie (big-endian, so keys sort by cookie).
pub fn ckey(parent: ObjectId, cookie: u64) -> Vec<u8> {
    let mut k = parent.to_bytes().to_vec();
    k.extend_from_slice(&cookie.to_be_bytes());
    k
}

/// Key of a link: child ‖ parent ‖ name.
pub fn lkey(child: ObjectId, parent: ObjectId, name: &[u8]) -> Vec<u8> {
    let mut k = child.to_bytes().to_vec();
    k.extend_from_slice(&parent.to_bytes());
    k.extend_from_slice(name);
    k
}

/// Key range bounds covering every key that starts with `id`.
pub fn prefix_range(id: ObjectId) -> (Vec<u8>, Vec<u8>) {
    let lo = id.to_bytes().to_vec();
    let hi = ObjectId(id.0.wrapping_add(1)).to_bytes().to_vec();
    (lo, hi)
}

/// Reply-cache key: replica ‖ client seq.
pub fn rkey(replica: ReplicaId, cseq: u64) -> Vec<u8> {
    let mut k = replica.0.to_be_bytes().to_vec();
    k.extend_from_slice(&cseq.to_be_bytes());
    k
}

/// Parse an id from the first 16 bytes of a key.
pub fn id_at(b: &[u8], at: usize) -> ObjectId {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[at..at + 16]);
    ObjectId::from_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::old::{ObjectRowV1, RecordV1, StoredRecordV1, StoredRecordV2};
    use super::*;
    use izo_proto::{v1, Op, Origin};

    #[test]
    fn records_written_by_format_1_still_decode() {
        let id = ObjectId::new();
        let op = v1::Op::Write { id, base: 3, offset: 4096, data: Vec::new() };
        let time = Timestamp { secs: 1_700_000_000, nsec: 5 };
        let v1 = StoredRecordV1 {
            record: RecordV1 { seq: 9, origin: Origin::Local, time, op, attr: None },
            handles: vec![(id, vec![1, 2, 3])],
            payload: Payload::Direct(65536),
        };
        let row = postcard::to_extend(&v1, vec![ROW_V1]).expect("encode");
        let r = dec_record(&row).expect("a format-1 row decodes");
        assert_eq!(r.record.seq, 9);
        assert_eq!(r.record.op, Op::Write { id, base: 3, offset: 4096, data: Vec::new() });
        assert_eq!(r.record.elided, 65536, "elided comes from the payload placement");
        assert_eq!(r.handles, vec![(id, vec![1, 2, 3])]);
        let again = dec_record(&enc_record(&r)).expect("format 3 round trip");
        assert_eq!(again, r);
        assert!(dec_record(&[7, 1, 2]).is_none(), "an unknown format is refused");
    }

    #[test]
    fn records_written_by_format_2_decode_with_no_device_number() {
        let (parent, id) = (ObjectId::ROOT, ObjectId::new());
        let time = Timestamp { secs: 1_700_000_000, nsec: 5 };
        let versions = v1::Versions { data: 9, meta: 9 };
        let attr =
            |id, kind| v1::Attr { id, kind, mode: 0o600, uid: 0, gid: 0, size: 0, mtime: time, nlink: 1, versions };
        let op =
            v1::Op::Mknod { parent, name: b"p".to_vec(), id, kind: v1::FileKind::Fifo, mode: 0o600, uid: 0, gid: 0 };
        let v2 = StoredRecordV2 {
            record: v1::Record {
                seq: 9,
                origin: Origin::Local,
                time,
                op,
                attr: Some(attr(id, v1::FileKind::Fifo)),
                elided: 0,
                dirs: vec![attr(parent, v1::FileKind::Dir)],
            },
            handles: vec![(id, vec![4, 5])],
            payload: Payload::Inline,
        };
        let row = postcard::to_extend(&v2, vec![RECORD_V2]).expect("encode");
        let r = dec_record(&row).expect("a format-2 row decodes");
        let want =
            Op::Mknod { parent, name: b"p".to_vec(), id, kind: FileKind::Fifo, mode: 0o600, uid: 0, gid: 0, rdev: 0 };
        assert_eq!(r.record.op, want);
        let a = r.record.attr.as_ref().expect("attr");
        assert_eq!((a.kind, a.rdev, a.versions), (FileKind::Fifo, 0, Versions { data: 9, meta: 9 }));
        assert_eq!(r.record.dirs.len(), 1);
        assert_eq!(dec_record(&enc_record(&r)), Some(r));
    }

    #[test]
    fn object_rows_written_by_format_1_decode_with_no_device_number() {
        let old = ObjectRowV1 {
            kind: v1::FileKind::File,
            mode: 0o644,
            uid: 1,
            gid: 2,
            size: 3,
            mtime: Timestamp { secs: 4, nsec: 5 },
            nlink: 1,
            versions: v1::Versions { data: 6, meta: 7 },
            data_writer: None,
            data_run_start: 0,
            meta_writer: None,
            meta_run_start: 0,
            handle: vec![8, 9],
            target: None,
            stale: vec![(0, 0)],
        };
        let bytes = postcard::to_extend(&old, vec![ROW_V1]).expect("encode");
        let row: ObjectRow = dec(&bytes).expect("a format-1 object row decodes");
        assert_eq!((row.kind, row.size, row.rdev, row.handle.clone()), (FileKind::File, 3, 0, vec![8, 9]));
        let mut dev = row.clone();
        (dev.kind, dev.rdev) = (FileKind::CharDev, libc_makedev(1, 3));
        let again = enc(&dev);
        assert_eq!(again[0], OBJECT_V2);
        assert_eq!(dec::<ObjectRow>(&again), Some(dev));
        assert!(dec::<ObjectRow>(&[9, 0]).is_none(), "an unknown format is refused");
    }

    /// `makedev(3)` for small numbers.
    fn libc_makedev(major: u32, minor: u32) -> u32 {
        (major << 8) | minor
    }
}

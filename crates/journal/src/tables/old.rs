//! Row layouts of earlier formats, decoded and upgraded on read (see
//! docs/formats.md). Never written.

use super::{ObjectRow, Payload, StoredRecord};
use crate::Handle;
use izo_proto::{v1, ObjectId, Origin, Record, ReplicaId, Seq, Timestamp};
use serde::{Deserialize, Serialize};

/// An object row of format 1 (no `rdev`).
#[derive(Serialize, Deserialize)]
pub(super) struct ObjectRowV1 {
    pub kind: v1::FileKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: Timestamp,
    pub nlink: u32,
    pub versions: v1::Versions,
    pub data_writer: Option<ReplicaId>,
    pub data_run_start: Seq,
    pub meta_writer: Option<ReplicaId>,
    pub meta_run_start: Seq,
    pub handle: Handle,
    pub target: Option<Vec<u8>>,
    pub stale: Vec<(u64, u64)>,
}

impl From<ObjectRowV1> for ObjectRow {
    fn from(o: ObjectRowV1) -> ObjectRow {
        ObjectRow {
            kind: o.kind.into(),
            mode: o.mode,
            uid: o.uid,
            gid: o.gid,
            size: o.size,
            mtime: o.mtime,
            // format 1 kept no atime: the mtime stands for it, as a new object's does
            atime: o.mtime,
            nlink: o.nlink,
            versions: o.versions.into(),
            data_writer: o.data_writer,
            data_run_start: o.data_run_start,
            meta_writer: o.meta_writer,
            meta_run_start: o.meta_run_start,
            handle: o.handle,
            target: o.target,
            stale: o.stale,
            // format 1 made no device nodes
            rdev: 0,
        }
    }
}

/// A journal record as format 1 stored it (no `elided`, no `dirs`).
#[derive(Serialize, Deserialize)]
pub(super) struct RecordV1 {
    pub seq: Seq,
    pub origin: Origin,
    pub time: Timestamp,
    pub op: v1::Op,
    pub attr: Option<v1::Attr>,
}

#[derive(Serialize, Deserialize)]
pub(super) struct StoredRecordV1 {
    pub record: RecordV1,
    pub handles: Vec<(ObjectId, Handle)>,
    pub payload: Payload,
}

impl From<StoredRecordV1> for StoredRecord {
    fn from(old: StoredRecordV1) -> StoredRecord {
        let elided = match old.payload {
            Payload::Staged(n) | Payload::Direct(n) => n,
            Payload::Inline => 0,
        };
        let r = old.record;
        let record = Record {
            seq: r.seq,
            origin: r.origin,
            time: r.time,
            op: r.op.into(),
            attr: r.attr.map(Into::into),
            elided,
            dirs: Vec::new(),
        };
        StoredRecord { record, handles: old.handles, payload: old.payload }
    }
}

/// A journal record row of format 2 (its record is [`v1::Record`]).
#[derive(Serialize, Deserialize)]
pub(super) struct StoredRecordV2 {
    pub record: v1::Record,
    pub handles: Vec<(ObjectId, Handle)>,
    pub payload: Payload,
}

impl From<StoredRecordV2> for StoredRecord {
    fn from(old: StoredRecordV2) -> StoredRecord {
        StoredRecord { record: old.record.into(), handles: old.handles, payload: old.payload }
    }
}

//! Validating ops against the metadata and recording them: the "validate"
//! and "record" steps of the redo log. Everything an op changes in the
//! metadata, its record and its reply go into one write transaction.
//!
//! The POSIX rules themselves (names, kinds, emptiness, cycles, what a
//! setattr may change) are `izo_proto::rules`, called here through the
//! [`rules::Namespace`] view of the batch; what is this crate's own is the
//! preconditions (names expected at versions) and the records.

use crate::store::{db, new_row, Store, StoreError};
use crate::tables::*;
use crate::Handle;
use izo_proto::rules::{self, Namespace, Node};
use izo_proto::*;
use redb::{Durability, ReadableTable, WriteTransaction};
use std::sync::atomic::Ordering;

/// A group of ops committed together (one fsync).
pub struct Batch<'s> {
    store: &'s Store,
    tx: WriteTransaction,
    seq: Seq,
    cookie: u64,
    records: Vec<StoredRecord>,
    /// Directories the op being executed touched, with their new attributes.
    dirs: Vec<Attr>,
}

type R<T> = Result<T, OpError>;

/// What executing an op yields: the main object's attributes and the handles
/// of every object the op names.
pub(crate) type Out = (Option<Attr>, Vec<(ObjectId, Handle)>);

fn conflict(kind: ConflictKind, current: Option<Attr>) -> OpError {
    OpError::Conflict { kind, current }
}

/// Does a precondition on a version hold? The object's own run of changes by
/// the same replica counts as the base (the client pipelines on its own ops).
fn base_ok(current: Seq, writer: Option<ReplicaId>, run_start: Seq, base: Seq, who: Option<ReplicaId>) -> bool {
    base == current || (who.is_some() && writer == who && base >= run_start)
}

impl Store {
    /// Start a batch of mutations.
    pub fn batch(&self) -> Result<Batch<'_>, StoreError> {
        let tx = self.db.begin_write().map_err(db)?;
        Ok(Batch {
            store: self,
            tx,
            seq: self.head(),
            cookie: self.cookie.load(Ordering::Acquire),
            records: Vec::new(),
            dirs: Vec::new(),
        })
    }
}

impl Batch<'_> {
    /// Records added so far, in seq order.
    pub fn records(&self) -> &[StoredRecord] {
        &self.records
    }

    /// Last client seq recorded for `replica` in this batch or before.
    pub fn replica_last(&self, replica: ReplicaId) -> Result<u64, StoreError> {
        let t = self.tx.open_table(REPLICAS).map_err(db)?;
        let v = t.get(replica.0.to_be_bytes().as_slice()).map_err(db)?.map(|v| v.value());
        Ok(v.unwrap_or(0))
    }

    /// The cached reply to (`replica`, `cseq`), as seen inside this batch.
    pub fn cached_reply(&self, replica: ReplicaId, cseq: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let t = self.tx.open_table(REPLIES).map_err(db)?;
        let v = t.get(rkey(replica, cseq).as_slice()).map_err(db)?.map(|v| v.value().to_vec());
        Ok(v)
    }

    /// Cache the reply to (`replica`, `cseq`) and advance its progress
    /// (never back: a change recorded late, below the last, keeps it).
    pub fn put_reply(&mut self, replica: ReplicaId, cseq: u64, reply: &[u8]) -> Result<(), StoreError> {
        self.tx.open_table(REPLIES).map_err(db)?.insert(rkey(replica, cseq).as_slice(), reply).map_err(db)?;
        let last = self.replica_last(replica)?.max(cseq);
        self.tx.open_table(REPLICAS).map_err(db)?.insert(replica.0.to_be_bytes().as_slice(), last).map_err(db)?;
        Ok(())
    }

    /// The client seq through which cached replies of `replica` were dropped.
    pub fn replies_released(&self, replica: ReplicaId) -> Result<u64, StoreError> {
        let t = self.tx.open_table(RELEASED).map_err(db)?;
        let v = t.get(replica.0.to_be_bytes().as_slice()).map_err(db)?.map(|v| v.value());
        Ok(v.unwrap_or(0))
    }

    /// Drop cached replies of `replica` through `cseq` (the client holds them durably).
    pub fn release_replies(&mut self, replica: ReplicaId, through: u64) -> Result<(), StoreError> {
        let mut t = self.tx.open_table(REPLIES).map_err(db)?;
        let lo = rkey(replica, 0);
        let hi = rkey(replica, through.saturating_add(1));
        t.retain_in(lo.as_slice()..hi.as_slice(), |_, _| false).map_err(db)?;
        let mark = self.replies_released(replica)?.max(through);
        self.tx.open_table(RELEASED).map_err(db)?.insert(replica.0.to_be_bytes().as_slice(), mark).map_err(db)?;
        Ok(())
    }

    /// Set the handle of the object the last executed op created, in its row
    /// and in that op's record (later records read it from the row).
    pub fn set_handle(&mut self, id: ObjectId, handle: Handle) -> Result<(), StoreError> {
        let mut row = self.row(id).map_err(|_| StoreError::Corrupt("objects"))?;
        {
            let mut h = self.tx.open_table(HANDLES).map_err(db)?;
            if !row.handle.is_empty() {
                h.remove(row.handle.as_slice()).map_err(db)?;
            }
            h.insert(handle.as_slice(), id.to_bytes().as_slice()).map_err(db)?;
        }
        row.handle = handle.clone();
        self.put_row(id, &row).map_err(|_| StoreError::Corrupt("objects"))?;
        if let Some(r) = self.records.last_mut() {
            for (i, h) in &mut r.handles {
                if *i == id {
                    *h = handle.clone();
                }
            }
        }
        Ok(())
    }

    /// Commit durably: the ack point for every op in the batch.
    pub fn commit(mut self, durable: bool) -> Result<Vec<StoredRecord>, StoreError> {
        {
            let mut t = self.tx.open_table(RECORDS).map_err(db)?;
            let mut lens = Vec::with_capacity(self.records.len());
            for r in &self.records {
                let row = enc_record(r);
                lens.push(row.len());
                t.insert(r.record.seq, row.as_slice()).map_err(db)?;
            }
            let mut m = self.tx.open_table(META).map_err(db)?;
            crate::retention::add_cost(self.store, &mut m, lens.into_iter())?;
            m.insert("head", self.seq.to_be_bytes().as_slice()).map_err(db)?;
            m.insert("cookie", self.cookie.to_be_bytes().as_slice()).map_err(db)?;
        }
        if !durable {
            self.tx.set_durability(Durability::None);
        }
        self.tx.commit().map_err(db)?;
        if durable {
            self.store.commits.fetch_add(1, Ordering::Relaxed);
        }
        self.store.head.store(self.seq, Ordering::Release);
        self.store.cookie.store(self.cookie, Ordering::Release);
        Ok(self.records)
    }

    pub(crate) fn row(&self, id: ObjectId) -> R<ObjectRow> {
        let t = self.tx.open_table(OBJECTS).map_err(db)?;
        let v = t.get(id.to_bytes().as_slice()).map_err(db)?;
        match v {
            Some(v) => dec(v.value()).ok_or_else(|| StoreError::Corrupt("objects").into()),
            None => Err(OpError::NotFound(format!("object {id}"))),
        }
    }

    /// The row of an object an op changes: one removed meanwhile is a
    /// conflict (update/remove), not a plain "not found".
    pub(crate) fn live_row(&self, id: ObjectId) -> R<ObjectRow> {
        match self.row(id) {
            Err(OpError::NotFound(_)) => Err(conflict(ConflictKind::ObjectGone, None)),
            r => r,
        }
    }

    fn put_row(&mut self, id: ObjectId, row: &ObjectRow) -> R<()> {
        let mut t = self.tx.open_table(OBJECTS).map_err(db)?;
        t.insert(id.to_bytes().as_slice(), enc(row).as_slice()).map_err(db)?;
        Ok(())
    }

    fn dentry(&self, parent: ObjectId, name: &[u8]) -> R<Option<ObjectId>> {
        let t = self.tx.open_table(DENTRIES).map_err(db)?;
        let v = t.get(dkey(parent, name).as_slice()).map_err(db)?;
        Ok(v.map(|v| id_at(v.value(), 0)))
    }

    fn add_name(&mut self, parent: ObjectId, name: &[u8], child: ObjectId) -> R<()> {
        self.cookie += 1;
        let mut val = child.to_bytes().to_vec();
        val.extend_from_slice(&self.cookie.to_be_bytes());
        self.tx.open_table(DENTRIES).map_err(db)?.insert(dkey(parent, name).as_slice(), val.as_slice()).map_err(db)?;
        self.tx.open_table(COOKIES).map_err(db)?.insert(ckey(parent, self.cookie).as_slice(), name).map_err(db)?;
        self.tx.open_table(LINKS).map_err(db)?.insert(lkey(child, parent, name).as_slice(), ()).map_err(db)?;
        Ok(())
    }

    fn drop_name(&mut self, parent: ObjectId, name: &[u8], child: ObjectId) -> R<()> {
        let old = self
            .tx
            .open_table(DENTRIES)
            .map_err(db)?
            .remove(dkey(parent, name).as_slice())
            .map_err(db)?
            .map(|v| v.value().to_vec());
        if let Some(cookie) = old.as_deref().and_then(|v| v.get(16..24)).and_then(|c| c.try_into().ok()) {
            let key = ckey(parent, u64::from_be_bytes(cookie));
            self.tx.open_table(COOKIES).map_err(db)?.remove(key.as_slice()).map_err(db)?;
        }
        self.tx.open_table(LINKS).map_err(db)?.remove(lkey(child, parent, name).as_slice()).map_err(db)?;
        Ok(())
    }

    fn dir_is_empty(&self, id: ObjectId) -> R<bool> {
        let t = self.tx.open_table(DENTRIES).map_err(db)?;
        let (lo, hi) = prefix_range(id);
        let empty = t.range(lo.as_slice()..hi.as_slice()).map_err(db)?.next().is_none();
        Ok(empty)
    }

    /// Parent of a directory (directories have exactly one name).
    fn dir_parent(&self, id: ObjectId) -> R<Option<ObjectId>> {
        let t = self.tx.open_table(LINKS).map_err(db)?;
        let (lo, hi) = prefix_range(id);
        let first = t.range(lo.as_slice()..hi.as_slice()).map_err(db)?.next();
        let parent = match first {
            Some(r) => Some(id_at(r.map_err(db)?.0.value(), 16)),
            None => None,
        };
        Ok(parent)
    }

    fn remove_object(&mut self, id: ObjectId) -> R<()> {
        let old = self
            .tx
            .open_table(OBJECTS)
            .map_err(db)?
            .remove(id.to_bytes().as_slice())
            .map_err(db)?
            .map(|v| v.value().to_vec());
        if let Some(row) = old.as_deref().and_then(dec::<ObjectRow>).filter(|r| !r.handle.is_empty()) {
            let mut h = self.tx.open_table(HANDLES).map_err(db)?;
            // only if the index still names this object (a handle may be reused)
            let ours = h.get(row.handle.as_slice()).map_err(db)?.is_some_and(|v| id_at(v.value(), 0) == id);
            if ours {
                h.remove(row.handle.as_slice()).map_err(db)?;
            }
        }
        self.tx.open_table(HASHES).map_err(db)?.remove(id.to_bytes().as_slice()).map_err(db)?;
        let (lo, hi) = prefix_range(id);
        self.tx.open_table(XATTRS).map_err(db)?.retain_in(lo.as_slice()..hi.as_slice(), |_, _| false).map_err(db)?;
        Ok(())
    }

    /// The object `name` in `parent` points to, as this batch sees it.
    pub fn lookup(&self, parent: ObjectId, name: &[u8]) -> R<Option<ObjectId>> {
        self.dentry(parent, name)
    }

    /// Every name (parent, name) of an object.
    pub fn names_of(&self, id: ObjectId) -> R<Vec<(ObjectId, Vec<u8>)>> {
        let t = self.tx.open_table(LINKS).map_err(db)?;
        let (lo, hi) = prefix_range(id);
        let mut out = Vec::new();
        for row in t.range(lo.as_slice()..hi.as_slice()).map_err(db)? {
            let (k, _) = row.map_err(db)?;
            let k = k.value();
            out.push((id_at(k, 16), k[32..].to_vec()));
        }
        Ok(out)
    }

    /// Every entry (name, child) of a directory, in name order.
    pub fn children(&self, dir: ObjectId) -> R<Vec<(Vec<u8>, ObjectId)>> {
        let t = self.tx.open_table(DENTRIES).map_err(db)?;
        let (lo, hi) = prefix_range(dir);
        let mut out = Vec::new();
        for row in t.range(lo.as_slice()..hi.as_slice()).map_err(db)? {
            let (k, v) = row.map_err(db)?;
            out.push((k.value()[16..].to_vec(), id_at(v.value(), 0)));
        }
        Ok(out)
    }

    /// The object whose server file handle is `handle`, as this batch sees it.
    pub fn by_handle(&self, handle: &[u8]) -> R<Option<ObjectId>> {
        let t = self.tx.open_table(HANDLES).map_err(db)?;
        let v = t.get(handle).map_err(db)?.map(|v| id_at(v.value(), 0));
        Ok(v)
    }

    /// Whether the volume is trusted (see [`xattr_replicates`]).
    pub fn trusted(&self) -> bool {
        self.store.trusted.load(Ordering::Relaxed)
    }

    /// Extended attributes of an object as this batch sees them, by name.
    pub fn xattrs(&self, id: ObjectId) -> R<Vec<(Vec<u8>, Vec<u8>)>> {
        crate::query::xattrs_in(&self.tx.open_table(XATTRS).map_err(db)?, id)
    }

    /// Block hashes of a file as this batch sees them (some may be stale:
    /// see `ObjectRow::stale`).
    pub fn hashes(&self, id: ObjectId) -> R<Vec<[u8; 32]>> {
        crate::query::hashes_in(&self.tx.open_table(HASHES).map_err(db)?, id)
    }

    /// Store block hashes computed from the file as it is now, for its
    /// current data version (clears its stale ranges).
    pub fn set_hashes(&mut self, id: ObjectId, blocks: &[[u8; 32]]) -> R<()> {
        let mut row = self.row(id)?;
        row.stale.clear();
        self.put_row(id, &row)?;
        let flat: Vec<u8> = blocks.concat();
        self.tx.open_table(HASHES).map_err(db)?.insert(id.to_bytes().as_slice(), flat.as_slice()).map_err(db)?;
        Ok(())
    }

    /// Validate `op` from `origin` and record it at the next seq, stamped
    /// with `time`. On error nothing of the op is kept.
    pub fn execute(&mut self, origin: Origin, op: &Op, time: Timestamp) -> R<Applied> {
        let place = match op {
            Op::Write { data, .. } if data.len() > INLINE_WRITE_MAX => Payload::Staged(data.len() as u64),
            _ => Payload::Inline,
        };
        self.execute_placed(origin, op, time, place)
    }

    /// Like [`Batch::execute`], with the implicit mtimes the replica chose
    /// (`stamp`: when it made the change). A stamp the export cannot store
    /// is ignored; one not after an object's current mtime moves to just
    /// after it (an implicit mtime never goes backwards) and the answer's
    /// attributes say so.
    pub fn execute_stamped(
        &mut self,
        origin: Origin,
        op: &Op,
        time: Timestamp,
        stamp: Option<Timestamp>,
    ) -> R<Applied> {
        let place = match op {
            Op::Write { data, .. } if data.len() > INLINE_WRITE_MAX => Payload::Staged(data.len() as u64),
            _ => Payload::Inline,
        };
        self.execute_stamped_placed(origin, op, time, stamp, place)
    }

    /// [`Batch::execute_stamped`] with the caller choosing where a write's
    /// bytes live.
    pub fn execute_stamped_placed(
        &mut self,
        origin: Origin,
        op: &Op,
        time: Timestamp,
        stamp: Option<Timestamp>,
        place: Payload,
    ) -> R<Applied> {
        let stamp = stamp.filter(|t| storable_time(*t));
        self.execute_full(origin, op, time, place, (stamp, stamp))
    }

    /// The op as it is recorded: an [`Op::Append`] becomes the write it
    /// is, at its placement (`local_offset` when the data version is its
    /// base or `origin`'s own run, else the end of the file as this batch
    /// has it), on the current version; every other op is itself.
    pub fn placed(&self, origin: Origin, op: &Op) -> R<Op> {
        let Op::Append { id, base, local_offset, data } = op else { return Ok(op.clone()) };
        let row = self.live_row(*id)?;
        izo_proto::rules::data_target(*id, row.kind)?;
        let who = match origin {
            Origin::Replica(r, _) => Some(r),
            Origin::Local => None,
        };
        let at = if base_ok(row.versions.data, row.data_writer, row.data_run_start, *base, who) {
            *local_offset
        } else {
            row.size
        };
        Ok(Op::Write { id: *id, base: row.versions.data, offset: at, data: data.clone() })
    }

    /// Metadata row of an object as this batch sees it.
    pub fn object(&self, id: ObjectId) -> R<ObjectRow> {
        self.row(id)
    }

    /// Like [`Batch::execute`], with the caller choosing where a write's
    /// bytes live (anything but `Inline` leaves them out of the record).
    pub fn execute_placed(&mut self, origin: Origin, op: &Op, time: Timestamp, place: Payload) -> R<Applied> {
        self.execute_full(origin, op, time, place, (None, None))
    }

    /// Record a change another program made in the export (origin `Local`),
    /// stamped now, with the mtimes the export shows: `mtime` for the
    /// object the op makes or writes, `dir_mtime` for the directories whose
    /// entries it changes (either left to the record time when `None`).
    pub fn execute_local(
        &mut self,
        op: &Op,
        place: Payload,
        mtime: Option<Timestamp>,
        dir_mtime: Option<Timestamp>,
    ) -> R<Applied> {
        self.execute_full(Origin::Local, op, Timestamp::now(), place, (mtime, dir_mtime))
    }

    fn execute_full(
        &mut self,
        origin: Origin,
        op: &Op,
        time: Timestamp,
        place: Payload,
        (mtime, dir_mtime): (Option<Timestamp>, Option<Timestamp>),
    ) -> R<Applied> {
        let placed;
        let op = match op {
            Op::Append { .. } => {
                placed = self.placed(origin, op)?;
                &placed
            }
            _ => op,
        };
        let who = match origin {
            Origin::Replica(r, _) => Some(r),
            Origin::Local => None,
        };
        let seq = self.seq + 1;
        self.dirs.clear();
        // A write whose bytes are already in the file may leave them out of the op.
        let data_len = match (op, place) {
            (Op::Write { data, .. }, Payload::Direct(n)) if data.is_empty() => Some(n),
            _ => None,
        };
        let cx = Cx { seq, time, who, data_len, mtime, dir_mtime };
        let (attr, handles) = self.exec_op(&cx, op)?;
        // Bytes kept elsewhere are not copied into the record.
        let op = match (op, place) {
            (Op::Write { id, base, offset, .. }, Payload::Staged(_) | Payload::Direct(_)) => {
                Op::Write { id: *id, base: *base, offset: *offset, data: Vec::new() }
            }
            _ => op.clone(),
        };
        let elided = match place {
            Payload::Staged(n) | Payload::Direct(n) => n,
            Payload::Inline => 0,
        };
        let dirs = std::mem::take(&mut self.dirs);
        let record = Record { seq, origin, time, op, attr: attr.clone(), elided, dirs };
        self.records.push(StoredRecord { record, handles, payload: place });
        self.seq = seq;
        Ok(Applied { seq, time, attr })
    }

    /// Precondition helper: name → expected object at its versions.
    fn check_expect(&self, cx: &Cx, parent: ObjectId, name: &[u8], e: &Expect) -> R<ObjectRow> {
        let Some(id) = self.dentry(parent, name)? else {
            return Err(conflict(ConflictKind::NameGone, None));
        };
        let row = self.row(id)?;
        if id != e.id {
            return Err(conflict(ConflictKind::NameMoved, Some(row.attr(id))));
        }
        let v = row.versions;
        if !base_ok(v.data, row.data_writer, row.data_run_start, e.base.data, cx.who)
            || !base_ok(v.meta, row.meta_writer, row.meta_run_start, e.base.meta, cx.who)
        {
            return Err(conflict(ConflictKind::ObjectChanged, Some(row.attr(id))));
        }
        Ok(row)
    }

    pub(crate) fn touch_dir(&mut self, cx: &Cx, id: ObjectId, nlink_delta: i32) -> R<Handle> {
        let mut row = self.row(id)?;
        row.mtime = cx.later_than(row.mtime, cx.dir_mtime.unwrap_or(cx.time));
        bump_data(&mut row, cx);
        row.nlink = (row.nlink as i64 + nlink_delta as i64).max(0) as u32;
        self.put_row(id, &row)?;
        self.dirs.retain(|a| a.id != id);
        self.dirs.push(row.attr(id));
        Ok(row.handle)
    }

    fn create_common(&mut self, cx: &Cx, parent: ObjectId, name: &[u8], id: ObjectId, row: ObjectRow) -> R<Out> {
        rules::create(self, parent, name)?;
        if self.row(id).is_ok() {
            return Err(OpError::Invalid(format!("object id {id} already exists")));
        }
        let is_dir = row.kind == FileKind::Dir;
        let attr = row.attr(id);
        self.put_row(id, &row)?;
        self.add_name(parent, name, id)?;
        let ph = self.touch_dir(cx, parent, if is_dir { 1 } else { 0 })?;
        Ok((Some(attr), vec![(parent, ph), (id, Vec::new())]))
    }
}

/// Context of the op being executed.
pub(crate) struct Cx {
    pub seq: Seq,
    pub time: Timestamp,
    pub who: Option<ReplicaId>,
    /// Length of a write whose bytes are not in the op (already in the file).
    pub data_len: Option<u64>,
    /// mtime of the object the op makes or writes, when not the record time.
    pub mtime: Option<Timestamp>,
    /// mtime of the directories whose entries change, when not the record time.
    pub dir_mtime: Option<Timestamp>,
}

impl Cx {
    pub fn obj_mtime(&self) -> Timestamp {
        self.mtime.unwrap_or(self.time)
    }

    /// The implicit mtime an op from a replica gives an object whose mtime
    /// is `current`: never earlier than it (a stamp not after it becomes
    /// `current` + 1 ns). Changes found in the export keep the export's.
    pub fn later_than(&self, current: Timestamp, stamp: Timestamp) -> Timestamp {
        if self.who.is_none() || stamp > current {
            return stamp;
        }
        match current.nsec {
            n if n >= 999_999_999 => Timestamp { secs: current.secs + 1, nsec: 0 },
            n => Timestamp { secs: current.secs, nsec: n + 1 },
        }
    }
}

pub use izo_proto::rules::storable_time;

/// The namespace as this batch sees it, for the rules.
impl Namespace for Batch<'_> {
    type Error = OpError;

    fn lookup(&self, parent: ObjectId, name: &[u8]) -> R<Option<ObjectId>> {
        self.dentry(parent, name)
    }

    fn node(&self, id: ObjectId) -> R<Option<Node>> {
        match self.row(id) {
            Ok(row) => Ok(Some(Node { kind: row.kind, nlink: row.nlink })),
            Err(OpError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn is_empty(&self, dir: ObjectId) -> R<bool> {
        self.dir_is_empty(dir)
    }

    fn parent_of(&self, dir: ObjectId) -> R<Option<ObjectId>> {
        self.dir_parent(dir)
    }

    fn current(&self, id: ObjectId) -> Option<Attr> {
        self.row(id).ok().map(|r| r.attr(id))
    }
}

pub(crate) fn bump_data(row: &mut ObjectRow, cx: &Cx) {
    if row.data_writer != cx.who || cx.who.is_none() {
        row.data_run_start = row.versions.data;
    }
    row.data_writer = cx.who;
    row.versions.data = cx.seq;
}

pub(crate) fn bump_meta(row: &mut ObjectRow, cx: &Cx) {
    if row.meta_writer != cx.who || cx.who.is_none() {
        row.meta_run_start = row.versions.meta;
    }
    row.meta_writer = cx.who;
    row.versions.meta = cx.seq;
}

mod ops;
mod rename;
mod xattr;

/// Does an extended attribute of an object of `kind` replicate on this
/// volume (`user.*`, POSIX ACLs; `trusted.*` and file capabilities on a
/// trusted volume)?
pub fn xattr_replicates(name: &[u8], value: &[u8], kind: FileKind, trusted: bool) -> bool {
    xattr::check(name, Some(value), kind, trusted).is_ok()
}

//! The volume actor: one thread owns the tree and the write side of the
//! store. It takes mutations in batches, validates and records them in one
//! transaction (the group commit and ack point), applies them in place,
//! then answers. Checkpoints, retention and rehashing run between batches.

use crate::background::Job;
use crate::counters::Counters;
use crate::hint::Hint;
use crate::testhooks::TestHooks;
use crate::tree::{write_stage_name, Mode, Tree};
use crate::{sys, ServerError};
use izo_journal::{reply_frame, Fences, Intake, ReplyCache, Request, Store, StoredRecord};
use izo_proto::*;
use std::collections::{HashMap, VecDeque};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Sender of encoded frames to one connection.
pub type FrameTx = tokio::sync::mpsc::UnboundedSender<Vec<u8>>;

/// A mutation on its way to the actor.
pub struct Mutation {
    /// Origin replica.
    pub replica: ReplicaId,
    /// Client seq.
    pub cseq: u64,
    /// Replies through this client seq are durable at the client.
    pub acked_through: u64,
    /// The op.
    pub op: Op,
    /// When the replica made the change (its implicit mtimes), if it said.
    pub stamp: Option<Timestamp>,
    /// Where the reply frame goes.
    pub reply: FrameTx,
    /// The connection it came on (unique in this process).
    pub conn: u64,
    /// The connection's in-flight slot, freed when the mutation is answered
    /// (held only for its drop).
    #[allow(dead_code)]
    pub slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Mutation {
    /// The mutation as the reply cache sees it.
    fn request(&self) -> Request {
        Request { replica: self.replica, cseq: self.cseq, acked_through: self.acked_through, conn: self.conn }
    }
}

/// Work for the actor.
// Mutations are the hot path and stay unboxed; event batches are rare.
#[allow(clippy::large_enum_variant)]
pub enum Work {
    /// A client's mutation.
    Mutate(Mutation),
    /// Changes other programs made in the export.
    Local(Vec<crate::capture::Event>),
    /// Block hashes recomputed off the actor, for data version `version`.
    Hashes { id: ObjectId, version: Seq, blocks: Vec<[u8; 32]> },
}

/// Retention and checkpoint settings.
#[derive(Clone, Debug)]
pub struct Tuning {
    /// Keep at most this many records.
    pub retain_records: u64,
    /// Keep records at most this long.
    pub retain_age: Duration,
    /// Keep records within this many bytes of the database's pages.
    pub retain_bytes: u64,
    /// Checkpoint (syncfs + durable mark) this often when there is new work.
    pub checkpoint_every: Duration,
    /// Largest batch per group commit.
    pub max_batch: usize,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            retain_records: 1_000_000,
            retain_age: Duration::from_secs(7 * 24 * 3600),
            retain_bytes: 1 << 30,
            checkpoint_every: Duration::from_secs(2),
            max_batch: 2048,
        }
    }
}

/// State shared between the actor and connection tasks.
pub struct Shared {
    /// The metadata store (read side used by connections).
    pub store: Arc<Store>,
    /// Counters.
    pub counters: Arc<Counters>,
    /// Highest seq applied to the tree.
    pub applied: watch::Receiver<Seq>,
    /// Set while a record failed to apply: mutations are refused.
    pub readonly: AtomicBool,
    /// The export root (for reads by handle).
    pub root: std::os::fd::OwnedFd,
    /// Set to stop: the actor finishes its batch, checkpoints and exits.
    pub stop: AtomicBool,
    /// The scan at the start journaled what the export holds (or there is
    /// no capture): a snapshot before would hold a part of the tree.
    pub scanned: AtomicBool,
}

pub(crate) struct Actor {
    pub store: Arc<Store>,
    pub tree: Tree,
    pub shared: Arc<Shared>,
    pub applied_tx: watch::Sender<Seq>,
    pub hint: Hint,
    pub hooks: TestHooks,
    pub tuning: Tuning,
    pub pending: VecDeque<StoredRecord>,
    pub staged_writes: Vec<(Seq, Vec<u8>)>,
    pub dirty: HashMap<ObjectId, Instant>,
    /// Rehashed blocks not stored yet (stored together, once per turn).
    pub hashes: Vec<(ObjectId, Seq, Vec<[u8; 32]>)>,
    /// The last checkpoint asked for: its seq, when, and the journal's
    /// `journal_written` then.
    pub last_checkpoint: (Seq, Instant, u64),
    pub background: mpsc::Sender<Job>,
    /// Direct appends of the batch being recorded: fd and committed size.
    pub direct: HashMap<ObjectId, (Arc<std::os::fd::OwnedFd>, u64, Timestamp)>,
    /// Objects whose content a non-direct op of this batch changes.
    pub touched: std::collections::HashSet<ObjectId>,
    /// New objects staged by the batch being recorded (unstaged if it fails).
    pub staged_ids: Vec<ObjectId>,
    /// The marker replay started from (pending records at or below it are
    /// data redos).
    pub replay_marked: Seq,
    pub checkpointed: Arc<std::sync::atomic::AtomicU64>,
    /// Out-of-band capture.
    pub local: local::Local,
    /// Records not to apply when next met (a data op on a file another
    /// program removed).
    pub skip_once: std::collections::HashSet<Seq>,
    /// Replicas with a change refused for now: their later changes wait
    /// for it (see `izo_journal::Fences`).
    pub fences: Fences,
}

impl Actor {
    /// Serve until stopped; returns after the final checkpoint, dropping
    /// the actor (and with it the background thread's queue).
    pub(crate) fn run(mut self, rx: mpsc::Receiver<Work>) {
        let tick = Duration::from_millis(200);
        if self.capturing() && self.pending.is_empty() {
            // What changed while the server was down: files whose ctime is
            // after the last checkpoint's settled time are reread.
            let since = if self.local.rescan { i64::MIN } else { self.store.settled().unwrap_or(0) };
            self.scan(since);
        } else if self.capturing() {
            // replay left records to retry: scan once they are applied
            self.local.overflow = true;
        }
        self.shared.scanned.store(true, Ordering::Release);
        while !self.shared.stop.load(Ordering::Acquire) {
            let wait = match self.local.next_due() {
                Some(due) => due.saturating_duration_since(Instant::now()).min(tick),
                None => tick,
            };
            let first = match rx.recv_timeout(wait) {
                Ok(Work::Mutate(m)) => Some(m),
                Ok(Work::Local(events)) => {
                    self.take_events(events);
                    None
                }
                Ok(Work::Hashes { id, version, blocks }) => {
                    self.store_hashes(id, version, blocks);
                    None
                }
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            if let Some(first) = first {
                // Bound a batch by count and by payload, so replies keep
                // flowing while a client streams large writes.
                // A batch carrying bulk data waits a moment for more, so a
                // stream of large writes pays its two syncs per ~MAX bytes
                // rather than per whatever arrived during the last sync.
                let mut bytes = payload_len(&first.op);
                let mut batch = vec![first];
                while batch.len() < self.tuning.max_batch && bytes < MAX_BATCH_BYTES {
                    let next = if bytes >= BULK_BYTES { rx.recv_timeout(BULK_WAIT).ok() } else { rx.try_recv().ok() };
                    match next {
                        Some(Work::Mutate(m)) => {
                            bytes += payload_len(&m.op);
                            batch.push(m);
                        }
                        Some(Work::Local(events)) => self.take_events(events),
                        Some(Work::Hashes { id, version, blocks }) => self.store_hashes(id, version, blocks),
                        None => break,
                    }
                }
                self.reconcile_for(&batch);
                self.process(batch);
            }
            self.reconcile_due();
            self.flush_hashes();
            self.housekeeping();
            self.await_retention();
        }
        // Blocks written by clients and not rehashed yet: hash them now, so
        // the next start-up scan can tell an edit made while stopped (kept
        // only if no local change of the file is queued, as while running).
        for id in std::mem::take(&mut self.dirty).into_keys() {
            match crate::hash::compute(&self.store, self.tree.root(), id) {
                Ok(Some((version, blocks))) => self.store_hashes(id, version, blocks),
                Ok(None) => {}
                Err(e) => tracing::debug!("rehash of {id} at stop failed: {e}"),
            }
        }
        self.flush_hashes();
        self.capture_stop(&rx);
        self.final_checkpoint();
    }

    /// On a clean stop: make everything applied durable and mark it, so the
    /// next start replays nothing (and, with capture, rereads no file).
    fn final_checkpoint(&mut self) {
        let seq = self.hint.seq();
        if !self.pending.is_empty() {
            return;
        }
        // Everything queued was read and journaled just before: a second's
        // margin covers the file system's clock granularity.
        let settled = self.settled_within(1);
        if seq <= self.checkpointed.load(Ordering::Acquire) && settled <= self.store.settled().unwrap_or(0) {
            return;
        }
        let done = sys::syncfs(self.tree.root())
            .map_err(|e| e.to_string())
            .and_then(|_| self.store.set_checkpoint(seq, settled).map_err(|e| e.to_string()));
        match done {
            Ok(()) => tracing::info!("checkpointed at seq {seq} on stop"),
            Err(e) => tracing::error!("final checkpoint failed ({e}); the next start replays"),
        }
    }

    /// Answer a batch that failed before its commit: ops committed earlier
    /// (resends) get their cached reply, the rest a transient error.
    fn refuse_all(&mut self, batch: Vec<Mutation>, e: &ServerError) {
        for m in batch {
            let frame = self.store.answer_uncommitted(m.request(), OpError::Io(e.to_string()), &mut self.fences);
            let _ = m.reply.send(frame);
        }
    }

    fn process(&mut self, mut batch: Vec<Mutation>) {
        self.staged_ids.clear();
        let recorded = self.record(&batch);
        // Free the connections' window slots before anyone sees a reply, so a
        // client that sends on each reply never finds its slot still taken.
        for m in &mut batch {
            m.slot = None;
        }
        match recorded {
            Ok((records, outs)) => {
                if !self.staged_ids.is_empty() {
                    self.handles_added();
                }
                let kinds: Vec<&str> = records.iter().map(|r| r.record.op.kind()).collect();
                self.hooks.maybe_crash(true, &kinds);
                self.hooks.maybe_kill_after_commit();
                self.hooks.maybe_pause_before_apply();
                self.apply_all(records);
                self.hooks.maybe_crash(false, &kinds);
                self.applied_tx.send_replace(self.hint.seq());
                for (tx, frame) in outs {
                    let _ = tx.send(frame);
                }
            }
            Err(e) => {
                tracing::error!("batch failed before commit: {e}");
                for id in std::mem::take(&mut self.staged_ids) {
                    self.tree.unstage_id(id);
                }
                self.undo_direct();
                self.refuse_all(batch, &e);
            }
        }
    }

    /// Validate, stage and record a batch; commit it durably.
    #[allow(clippy::type_complexity)]
    fn record(&mut self, batch: &[Mutation]) -> Result<(Vec<StoredRecord>, Vec<(FrameTx, Vec<u8>)>), ServerError> {
        let store = self.store.clone();
        let space = self.tree.space_available().map_err(|e| ServerError::io("statfs of the export", e))?;
        store.space_budget.store(space, Ordering::Release);
        let mut b = store.batch()?;
        let mut outs = Vec::with_capacity(batch.len());
        let mut staged_any = false;
        let mut cache = ReplyCache::new(!self.hooks.no_reply_cache);
        let readonly = self.shared.readonly.load(Ordering::Acquire);
        self.direct.clear();
        self.touched.clear();
        for m in batch {
            let ticket = match cache.intake(&b, m.request(), &mut self.fences)? {
                Intake::Answer(frame) => {
                    Counters::add(&self.shared.counters.reply_cache_hits, 1);
                    outs.push((m.reply.clone(), frame));
                    continue;
                }
                Intake::Execute(ticket) => ticket,
            };
            let result = if readonly {
                Err(OpError::ReadOnly("a journal record failed to apply; see the server log".into()))
            } else {
                self.record_one(&mut b, m, &mut staged_any)?
            };
            // An I/O failure of one op fails its whole batch: nothing of it
            // is kept, and `Io` always means "not applied, not recorded:
            // send it again" (a recorded `Io` would be answered to every
            // resend, and the change never applied).
            if let Err(OpError::Io(why)) = &result {
                return Err(ServerError::io("recording a change", std::io::Error::other(why.clone())));
            }
            let frame = reply_frame(m.cseq, result);
            cache.remember(&mut b, ticket, &frame)?;
            outs.push((m.reply.clone(), frame));
        }
        cache.finish(&mut b)?;
        if staged_any {
            sys::fsync(self.tree.stage()).map_err(|e| ServerError::io("fsync stage directory", e))?;
            Counters::add(&self.shared.counters.fsyncs, 1);
        }
        for (fd, _, _) in self.direct.values() {
            sys::fdatasync(fd.as_fd()).map_err(|e| ServerError::io("fdatasync of appended data", e))?;
            Counters::add(&self.shared.counters.fsyncs, 1);
        }
        if self.hooks.crash.is_some() {
            let kinds: Vec<&str> = batch.iter().map(|m| m.op.kind()).collect();
            self.hooks.maybe_crash_precommit(&kinds);
        }
        let records = b.commit(true)?;
        for id in self.direct.keys() {
            self.tree.clear_intent(*id);
        }
        self.direct.clear();
        Counters::add(&self.shared.counters.fsyncs, 1);
        Counters::add(&self.shared.counters.batches, 1);
        Counters::add(&self.shared.counters.records, records.len() as u64);
        Ok((records, outs))
    }

    fn record_one(
        &mut self,
        b: &mut izo_journal::Batch<'_>,
        m: &Mutation,
        staged_any: &mut bool,
    ) -> Result<MutateResult, ServerError> {
        let time = Timestamp::now();
        if let Some(r) = self.try_direct(b, m, time)? {
            return Ok(r);
        }
        if let Some(id) = m.op.data_target() {
            self.touched.insert(id);
        }
        Ok(self.record_plain(b, m, staged_any, time))
    }

    fn record_plain(
        &mut self,
        b: &mut izo_journal::Batch<'_>,
        m: &Mutation,
        staged_any: &mut bool,
        time: Timestamp,
    ) -> MutateResult {
        if let Op::Create { parent, name, .. }
        | Op::Mkdir { parent, name, .. }
        | Op::Symlink { parent, name, .. }
        | Op::Mknod { parent, name, .. }
        | Op::Link { parent, name, .. } = &m.op
        {
            if *parent == ObjectId::ROOT && name.as_slice() == crate::tree::STAGE_DIR {
                return Err(OpError::BadName("name .izo-stage is reserved at the volume root".into()));
            }
        }
        if let Op::Rename { new_parent, new_name, .. } = &m.op {
            if *new_parent == ObjectId::ROOT && new_name.as_slice() == crate::tree::STAGE_DIR {
                return Err(OpError::BadName("name .izo-stage is reserved at the volume root".into()));
            }
        }
        let origin = Origin::Replica(m.replica, m.cseq);
        // an append is the write it is placed as (its bytes staged like one)
        let placed = b.placed(origin, &m.op)?;
        let op = &placed;
        // a new object's inode is made with its final mtime: the replica's stamp
        let made = m.stamp.filter(|t| izo_journal::storable_time(*t)).unwrap_or(time);
        let handle = match self.tree.stage_new(op, made) {
            Ok(h) => h,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(OpError::Invalid("object id already in use".into()))
            }
            Err(e) => return Err(crate::sys::op_io("staging new inode", e)),
        };
        *staged_any |= handle.is_some();
        if let (Some(_), Some(id)) = (&handle, op.new_object()) {
            self.staged_ids.push(id);
        }
        let large = matches!(op, Op::Write { data, .. } if data.len() > INLINE_WRITE_MAX);
        if let (true, Op::Write { data, .. }) = (large, op) {
            let name = write_stage_name(origin, 0);
            if let Err(e) = self.tree.stage_write(&name, data) {
                return Err(crate::sys::op_io("staging write", e));
            }
            Counters::add(&self.shared.counters.fsyncs, 1);
            *staged_any = true;
        }
        match b.execute_stamped(origin, op, time, m.stamp) {
            Ok(applied) => {
                if let (Some(h), Some(id)) = (handle, op.new_object()) {
                    b.set_handle(id, h).map_err(OpError::from)?;
                }
                if large {
                    self.staged_writes.push((applied.seq, write_stage_name(origin, 0)));
                }
                Ok(applied)
            }
            Err(e) => {
                self.tree.unstage(op);
                if large {
                    let _ = sys::unlinkat(self.tree.stage(), &write_stage_name(origin, 0), false);
                }
                Err(e)
            }
        }
    }
}

/// Most payload bytes in one group commit.
const MAX_BATCH_BYTES: usize = 64 << 20;

/// A batch with at least this much payload is a bulk transfer...
const BULK_BYTES: usize = 1 << 20;

/// ...and waits this long for each further op before committing.
const BULK_WAIT: Duration = Duration::from_millis(3);

fn payload_len(op: &Op) -> usize {
    match op {
        Op::Write { data, .. } | Op::Append { data, .. } => data.len(),
        Op::SetXattr { value, .. } => value.len(),
        _ => 0,
    }
}

mod apply;
mod direct;
mod local;
pub(crate) use local::Local;

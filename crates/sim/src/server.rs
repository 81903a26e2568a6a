//! The simulated server: one volume actor's batches (reply cache,
//! validation, one durable commit), the record stream, snapshots, the
//! handshake's answer, and a crash that loses what was not synced.

use crate::disk::{Access, Attached};
use crate::export::{Export, ROOT};
use izo_journal::{
    reply_frame, reply_of, set_id_stripped, Fences, Intake, Payload, ReplyCache, Request, Store, StoreError,
    StoredRecord,
};
use izo_memdisk::MemDisk;
use izo_proto::{
    MutateResult, ObjectId, Op, OpError, Origin, Record, ReplicaId, Seq, SnapshotEntry, Timestamp, Welcome,
    PROTOCOL_VERSION,
};
use izo_testkit::Digest;
use std::sync::Arc;

/// How the simulated server behaves.
#[derive(Clone, Debug)]
pub struct ServerOpts {
    /// Answer resends from the reply cache (off: the test-only switch the
    /// real server reads from `IZO_TEST_NO_REPLY_CACHE`).
    pub reply_cache: bool,
    /// Incarnation of the new volume (drawn from the simulation's seed).
    pub incarnation: u128,
}

impl Default for ServerOpts {
    fn default() -> Self {
        ServerOpts { reply_cache: true, incarnation: 1 }
    }
}

/// A mutation as a connection hands it to the volume actor.
#[derive(Clone, Debug, PartialEq, Eq)]
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
    /// The connection it came on (a fence holds only on its connection).
    pub conn: u64,
}

impl Mutation {
    fn request(&self) -> Request {
        Request { replica: self.replica, cseq: self.cseq, acked_through: self.acked_through, conn: self.conn }
    }
}

/// One object of a snapshot with what a resync fetches after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotObject {
    /// The object as the snapshot stream sends it.
    pub entry: SnapshotEntry,
    /// A file's content at the snapshot's seq (`None` for other kinds).
    pub data: Option<Vec<u8>>,
}

/// What the simulated server could not do.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The journal store failed (a bug, or a disk made to fail).
    #[error("simulated server store: {0}")]
    Store(#[from] StoreError),
    /// A read of the store failed.
    #[error("simulated server read: {0}")]
    Read(#[from] OpError),
}

/// The server of a simulation. Every call runs to completion on the
/// caller's thread; dropping it ends the process as a crash does.
pub struct SimServer {
    opts: ServerOpts,
    /// The journal disk, surviving crashes.
    disk: MemDisk,
    /// What the running process may still do with the disk.
    access: Arc<Access>,
    store: Store,
    export: Export,
    /// Mutations answered from the reply cache.
    cache_hits: u64,
    /// The next batch fails before its commit (a transient refusal).
    refuse_next: bool,
    /// Replicas with a change refused for now (lost with a crash, as the
    /// volume actor's).
    fences: Fences,
}

impl SimServer {
    /// A fresh volume: root directory 0o755, owned by 0:0, mtime 0.
    pub fn new(opts: ServerOpts) -> Result<SimServer, SimError> {
        let disk = MemDisk::new();
        let (attached, access) = Attached::new(&disk);
        let store = Store::open_on_as(attached, ROOT, opts.incarnation)?;
        Ok(SimServer {
            opts,
            disk,
            access,
            store,
            export: Export::new(),
            cache_hits: 0,
            refuse_next: false,
            fences: Fences::default(),
        })
    }

    /// What the handshake tells `replica`: the incarnation, the last client
    /// seq the server recorded for it, the head; registers it on first use.
    pub fn hello(&mut self, replica: ReplicaId, now: Timestamp) -> Result<Welcome, SimError> {
        self.store.claim_replica(replica, b"sim", |_| false)?;
        Ok(Welcome {
            version: PROTOCOL_VERSION,
            incarnation: self.store.incarnation(),
            volume: "sim".into(),
            last_applied: self.store.replica_last(replica)?,
            head_seq: self.store.head(),
            time: now,
            writable: true,
            trusted: false,
        })
    }

    /// One volume-actor batch, stamped `now`: each mutation answered from
    /// the reply cache or validated and recorded, all in one durable
    /// commit; the answers in order. A batch that fails before its commit
    /// keeps nothing and is answered as the server answers it.
    pub fn mutate(&mut self, batch: &[Mutation], now: Timestamp) -> Vec<MutateResult> {
        let recorded = match std::mem::take(&mut self.refuse_next) {
            // (as a batch whose commit failed: nothing of it is kept)
            true => Err(StoreError::Db("injected: the batch failed before its commit".into())),
            false => self.record(batch, now),
        };
        let frames = match recorded {
            Ok((records, frames)) => {
                for r in &records {
                    self.export.apply(&r.record);
                }
                frames
            }
            Err(e) => {
                let error = || OpError::Io(e.to_string());
                let fences = &mut self.fences;
                batch.iter().map(|m| self.store.answer_uncommitted(m.request(), error(), fences)).collect()
            }
        };
        frames.iter().zip(batch).map(|(f, m)| answer(f, m.cseq)).collect()
    }

    fn record(&mut self, batch: &[Mutation], now: Timestamp) -> Result<(Vec<StoredRecord>, Vec<Vec<u8>>), StoreError> {
        let mut b = self.store.batch()?;
        let mut cache = ReplyCache::new(self.opts.reply_cache);
        let mut frames = Vec::with_capacity(batch.len());
        for m in batch {
            match cache.intake(&b, m.request(), &mut self.fences)? {
                Intake::Answer(frame) => {
                    self.cache_hits += 1;
                    frames.push(frame);
                }
                Intake::Execute(ticket) => {
                    let origin = Origin::Replica(m.replica, m.cseq);
                    let op = volume_policy(&m.op);
                    // write bytes stay in the record, whatever their size
                    let result = b.execute_stamped_placed(origin, &op, now, m.stamp, Payload::Inline);
                    // (as the server: an op's I/O failure fails its batch)
                    if let Err(OpError::Io(why)) = &result {
                        return Err(StoreError::Db(why.clone()));
                    }
                    let frame = reply_frame(m.cseq, result);
                    cache.remember(&mut b, ticket, &frame)?;
                    frames.push(frame);
                }
            }
        }
        cache.finish(&mut b)?;
        let records = b.commit(true)?;
        Ok((records, frames))
    }

    /// Up to `max` records with seq ≥ `from`, as the stream sends them.
    pub fn records_from(&self, from: Seq, max: usize) -> Result<Vec<Record>, SimError> {
        Ok(self.store.records_from(from, max)?.into_iter().map(|r| r.record).collect())
    }

    /// Highest committed seq.
    pub fn head(&self) -> Seq {
        self.store.head()
    }

    /// Incarnation of the volume.
    pub fn incarnation(&self) -> u128 {
        self.store.incarnation()
    }

    /// Mutations answered from the reply cache so far (across crashes).
    pub fn cache_hits(&self) -> u64 {
        self.cache_hits
    }

    /// Records the journal accepted that the model refused, in release
    /// builds (debug builds panic at the first one).
    pub fn findings(&self) -> &[String] {
        self.export.findings()
    }

    /// From now on the journal disk refuses writes: every batch fails
    /// before its commit, until [`SimServer::crash`] restarts the server.
    /// The next batch fails before its commit, as one does when the
    /// export's disk fails for a moment: every fresh op in it is refused
    /// transiently (not applied, not recorded), resends get their cached
    /// replies.
    pub fn refuse_next_batch(&mut self) {
        self.refuse_next = true;
    }

    /// From now on the journal disk refuses writes: every batch fails
    /// before its commit, until [`SimServer::crash`] restarts the server.
    pub fn fail_disk(&mut self) {
        self.access.fail_writes();
    }

    /// Power loss of the journal disk, then a restart: the store is
    /// reopened on what was synced and the export rebuilt from the
    /// committed records.
    pub fn crash(&mut self) -> Result<(), SimError> {
        self.kill();
        self.fences = Fences::default();
        self.disk.power_loss();
        let (attached, access) = Attached::new(&self.disk);
        let store = Store::open_on_as(attached, ROOT, self.opts.incarnation)?;
        self.store = store;
        self.access = access;
        let mut export = Export::new();
        let mut next = 1;
        loop {
            let records = self.store.records_from(next, 512)?;
            let Some(last) = records.last() else { break };
            next = last.record.seq + 1;
            for r in &records {
                export.apply(&r.record);
            }
        }
        self.export = export;
        Ok(())
    }

    /// What a resync needs, consistent at the returned seq: every object
    /// with its names, attributes, target, xattrs and a file's content.
    pub fn snapshot(&self) -> Result<(Vec<SnapshotObject>, Seq), SimError> {
        let mut objects = Vec::new();
        let seq = self.store.snapshot(|entry| {
            let data = self.export.read(entry.attr.id);
            objects.push(SnapshotObject { entry, data });
            Ok::<(), OpError>(())
        })?;
        debug_assert_eq!(seq, self.export.applied(), "the export follows the journal");
        Ok((objects, seq))
    }

    /// A file's content (`None`: no such file).
    pub fn read(&self, id: ObjectId) -> Option<Vec<u8>> {
        self.export.read(id)
    }

    /// Digest of the export, comparable with a [`izo_testkit::Model`]'s.
    pub fn digest(&self) -> Digest {
        self.export.model().digest()
    }

    /// The journal store (for checks beyond this API).
    pub fn store(&self) -> &Store {
        &self.store
    }
}

impl SimServer {
    /// End the running process: its disk handle fails every call from now
    /// on, and one empty commit makes its store meet that failure, so that
    /// dropping it skips redb's clean shutdown (which rewrites the
    /// allocator state: the costliest step of a short simulation).
    fn kill(&mut self) {
        self.access.kill();
        if let Ok(b) = self.store.batch() {
            let _ = b.commit(true);
        }
    }
}

impl Drop for SimServer {
    /// The simulated process ends as a crash does.
    fn drop(&mut self) {
        self.kill();
    }
}

/// What the server's default volume policy makes of an op before the actor
/// sees it: owners as sent, and on an untrusted volume no set-id bits on
/// what an op creates (the policy of `izo serve` without options).
fn volume_policy(op: &Op) -> Op {
    let mut op = op.clone();
    let dir = matches!(op, Op::Mkdir { .. });
    if let Op::Create { mode, .. } | Op::Mkdir { mode, .. } | Op::Mknod { mode, .. } = &mut op {
        *mode = set_id_stripped(*mode, dir, false);
    }
    op
}

/// The result a reply frame carries; a frame that is not a reply to
/// `cseq` would be a bug in the journal's cache.
fn answer(frame: &[u8], cseq: u64) -> MutateResult {
    match reply_of(frame) {
        Some((c, result)) if c == cseq => result,
        other => panic!("reply frame for client seq {cseq} decodes as {other:?}"),
    }
}

//! The reply cache's decisions (exactly-once): which mutation of a batch is
//! a resend answered from the cache, which is executed, what reply is kept
//! with its record, and which cached replies a client holds durably and
//! may be dropped. The server's volume actor and the simulation both call
//! these, so both answer a resend the same way.

use crate::store::{Store, StoreError};
use crate::Batch;
use izo_proto::{encode_frame, MutateResult, OpError, ReplicaId, ServerMsg};
use std::collections::{BTreeMap, HashMap};

/// Replicas with a change whose batch failed before its commit (not
/// applied, not recorded: answered `Io`):
/// until that client seq comes again, every later change of the replica is
/// refused for now too, so no change overtakes one sent before it, and no
/// later change records a client seq past a hole (a resend of the refused
/// one would then be answered "expired" and taken as applied). Kept by the
/// volume actor across batches, in memory: a restart breaks every
/// connection, and a replica resends from its first unanswered change.
/// A fence holds only on the connection it was raised on: a replica on a
/// new connection sends what went unanswered again first, in order (and a
/// change a power loss took from it is never sent again at all).
#[derive(Debug, Default)]
pub struct Fences {
    lowest: HashMap<ReplicaId, (u64, u64)>,
}

impl Fences {
    /// A change of `replica` at `cseq`, on connection `conn`, was refused
    /// for now.
    fn raise(&mut self, replica: ReplicaId, cseq: u64, conn: u64) {
        let f = self.lowest.entry(replica).or_insert((cseq, conn));
        if f.1 != conn {
            *f = (cseq, conn);
        }
        f.0 = f.0.min(cseq);
    }

    /// The client seq a replica must send again first on this connection,
    /// if any.
    pub fn of(&self, replica: ReplicaId, conn: u64) -> Option<u64> {
        self.lowest.get(&replica).filter(|(_, c)| *c == conn).map(|(s, _)| *s)
    }
}

/// The refusal of a change held behind an earlier refused one: `Io`, as
/// the refusal of a batch whose commit failed (not applied, not recorded:
/// send it again under its seq).
fn fenced(cseq: u64, first: u64) -> Vec<u8> {
    let why = format!("change {first} of this replica failed before its commit; this one follows it");
    reply_frame(cseq, Err(OpError::Io(why)))
}

/// The reply frame for client seq `cseq`, as sent and as cached.
pub fn reply_frame(cseq: u64, result: MutateResult) -> Vec<u8> {
    // (a reply holds attributes and a short message, far below a frame)
    encode_frame(&ServerMsg::Reply { cseq, result }).expect("a reply always fits in a frame")
}

/// The client seq and result a reply frame carries (`None`: not a reply).
pub fn reply_of(frame: &[u8]) -> Option<(u64, MutateResult)> {
    match izo_proto::decode_frame(frame.get(4..)?) {
        Ok(ServerMsg::Reply { cseq, result }) => Some((cseq, result)),
        _ => None,
    }
}

/// A mutation as the reply cache sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Origin replica.
    pub replica: ReplicaId,
    /// Its client seq.
    pub cseq: u64,
    /// Replies through this client seq are durable at the client.
    pub acked_through: u64,
    /// The connection it came on (unique per server process).
    pub conn: u64,
}

/// What to do with a mutation of a batch.
#[derive(Debug)]
pub enum Intake {
    /// A resend of an op recorded before: send this frame (its cached
    /// reply, or `ReplyExpired` if the client already released it) and
    /// execute nothing.
    Answer(Vec<u8>),
    /// Execute the op, then hand its reply to [`ReplyCache::remember`].
    Execute(Ticket),
}

/// An executed mutation whose reply is still to be remembered.
#[derive(Debug)]
#[must_use = "an executed op's reply must be remembered"]
pub struct Ticket {
    request: Request,
}

/// The reply cache's part of one batch.
#[derive(Debug)]
pub struct ReplyCache {
    /// Off only in tests (the server's `IZO_TEST_NO_REPLY_CACHE`): resends
    /// are executed again, which the crash tests must catch.
    enabled: bool,
    /// Highest client seq per replica whose reply the client holds durably.
    release: BTreeMap<ReplicaId, u64>,
}

impl ReplyCache {
    /// The reply cache of a new batch.
    pub fn new(enabled: bool) -> ReplyCache {
        ReplyCache { enabled, release: BTreeMap::new() }
    }

    /// Decide what to do with `r`: answer it from the cache, refuse it for
    /// now (an earlier change of its replica is refused for now and not sent
    /// again yet), or execute it.
    pub fn intake(&mut self, b: &Batch<'_>, r: Request, fences: &mut Fences) -> Result<Intake, StoreError> {
        let last = b.replica_last(r.replica)?;
        if r.cseq <= last && self.enabled {
            match b.cached_reply(r.replica, r.cseq)? {
                Some(f) => return Ok(Intake::Answer(f)),
                // recorded, and released by the client since
                None if r.cseq <= b.replies_released(r.replica)? => {
                    return Ok(Intake::Answer(reply_frame(r.cseq, Err(OpError::ReplyExpired(r.cseq)))));
                }
                // never recorded (its batch failed before the commit, or it
                // never arrived, and a later change went first on another
                // connection): executed now, once
                None => {}
            }
        }
        match fences.of(r.replica, r.conn) {
            Some(first) if r.cseq > first => return Ok(Intake::Answer(fenced(r.cseq, first))),
            // the refused change (or one before it) again, or a new
            // connection: the fence lifts
            _ => {
                fences.lowest.remove(&r.replica);
            }
        }
        Ok(Intake::Execute(Ticket { request: r }))
    }

    /// Keep the reply `frame` of an executed op with its record (a client
    /// seq not above the replica's last is not recorded again), and note
    /// what the client says it holds. (A refusal for now that the op
    /// itself met, as `NoSpace`, is recorded like any answer: a resend is
    /// answered the same, and the client queues it again as a new change.)
    pub fn remember(&mut self, b: &mut Batch<'_>, t: Ticket, frame: &[u8]) -> Result<(), StoreError> {
        let r = t.request;
        // (every executed change: one recorded late, below the last, too)
        b.put_reply(r.replica, r.cseq, frame)?;
        if r.acked_through > 0 {
            // never the reply just recorded, whatever the client claims
            let upto = r.acked_through.min(r.cseq.saturating_sub(1));
            let held = self.release.entry(r.replica).or_default();
            *held = (*held).max(upto);
        }
        Ok(())
    }

    /// Before the commit: drop the cached replies clients hold durably,
    /// once per replica, up to the highest point its ops reported.
    pub fn finish(self, b: &mut Batch<'_>) -> Result<(), StoreError> {
        for (replica, upto) in self.release {
            b.release_replies(replica, upto)?;
        }
        Ok(())
    }
}

impl Store {
    /// The answer to `r` when its batch failed before the commit: a resend
    /// of an op committed earlier gets its cached reply, any other op
    /// `error` (nothing of it was kept).
    pub fn answer_uncommitted(&self, r: Request, error: OpError, fences: &mut Fences) -> Vec<u8> {
        let cached = match self.replica_last(r.replica) {
            Ok(last) if r.cseq <= last => self.cached_reply(r.replica, r.cseq).ok().flatten(),
            _ => None,
        };
        cached.unwrap_or_else(|| {
            // (nothing of it was kept: a refusal for now, and a fence)
            fences.raise(r.replica, r.cseq, r.conn);
            reply_frame(r.cseq, Err(error))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use izo_proto::{Op, Origin, Timestamp};

    fn store(dir: &tempfile::TempDir) -> Store {
        Store::open(&dir.path().join("v.redb"), (0o755, 0, 0, Timestamp::default())).expect("open")
    }

    fn mkdir(name: &str) -> Op {
        let name = name.as_bytes().to_vec();
        Op::Mkdir {
            parent: izo_proto::ObjectId::ROOT,
            name,
            id: izo_proto::ObjectId::new(),
            mode: 0o755,
            uid: 0,
            gid: 0,
        }
    }

    /// One batch of `(cseq, acked_through, op)` from `replica`: the answers.
    fn batch(s: &Store, enabled: bool, replica: ReplicaId, ops: &[(u64, u64, Op)]) -> Vec<MutateResult> {
        let mut b = s.batch().expect("batch");
        let mut cache = ReplyCache::new(enabled);
        let mut fences = Fences::default();
        let mut out = Vec::new();
        for (cseq, acked_through, op) in ops {
            let r = Request { replica, cseq: *cseq, acked_through: *acked_through, conn: 1 };
            let frame = match cache.intake(&b, r, &mut fences).expect("intake") {
                Intake::Answer(f) => f,
                Intake::Execute(t) => {
                    let result = b.execute(Origin::Replica(replica, *cseq), op, Timestamp::default());
                    let f = reply_frame(*cseq, result);
                    cache.remember(&mut b, t, &f).expect("remember");
                    f
                }
            };
            out.push(reply_of(&frame).expect("a reply").1);
        }
        cache.finish(&mut b).expect("finish");
        b.commit(true).expect("commit");
        out
    }

    #[test]
    fn a_resend_is_answered_from_the_cache_until_the_client_releases_it() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = store(&dir);
        let r = ReplicaId(3);
        let first = batch(&s, true, r, &[(1, 0, mkdir("a"))]);
        assert!(first[0].is_ok());
        assert_eq!(batch(&s, true, r, &[(1, 0, mkdir("a"))]), first, "the cached reply, not a conflict");
        assert_eq!(s.head(), 1, "the resend recorded nothing");
        batch(&s, true, r, &[(2, 1, mkdir("b"))]);
        let again = batch(&s, true, r, &[(1, 0, mkdir("a"))]);
        assert_eq!(again, vec![Err(OpError::ReplyExpired(1))]);
    }

    #[test]
    fn without_the_cache_a_resend_is_executed_again() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = store(&dir);
        let r = ReplicaId(3);
        batch(&s, false, r, &[(1, 0, mkdir("a"))]);
        let again = batch(&s, false, r, &[(1, 0, mkdir("a"))]);
        assert!(matches!(again[0], Err(OpError::Conflict { .. })), "executed again: {again:?}");
        assert_eq!(s.replica_last(r).expect("last"), 1);
    }

    #[test]
    fn a_change_never_recorded_below_the_last_is_executed_once_and_a_released_one_is_expired() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = store(&dir);
        let r = ReplicaId(4);
        // 2 never arrived (its connection broke); 3 went first on a new one
        batch(&s, true, r, &[(1, 0, mkdir("a")), (3, 0, mkdir("c"))]);
        let late = batch(&s, true, r, &[(2, 0, mkdir("b"))]);
        assert!(late[0].is_ok(), "never recorded: executed, not called expired: {late:?}");
        assert_eq!(s.replica_last(r).expect("last"), 3, "the last stays");
        assert_eq!(batch(&s, true, r, &[(2, 0, mkdir("b"))]), late, "and recorded: a resend gets its reply");
        // the client releases through 3: a resend then is expired, never run again
        batch(&s, true, r, &[(4, 3, mkdir("d"))]);
        for cseq in [1, 2, 3] {
            let again = batch(&s, true, r, &[(cseq, 0, mkdir("x"))]);
            assert_eq!(again, vec![Err(OpError::ReplyExpired(cseq))]);
        }
        assert_eq!(s.head(), 4, "nothing applied twice");
    }
}

//! The replica engine: every decision a replica takes about its local
//! changes and the server's records, as plain state and plain functions.
//!
//! No I/O, no clock, no locks, no runtime: the namespace is read through
//! [`View`], time comes in as [`Now`], and every effect goes out as a value
//! the shell (`replica.rs`, `local.rs`) executes: cache [`Edit`]s to log,
//! ops to send with their bases, kernel invalidations ([`Inval`]), callers
//! to wake, "resync now", parked entries, data effects to land.
//!
//! The contract is the one raft-rs gives its users: an input returns its
//! outputs ([`Local`], [`Next`], [`Answered`], [`Batch`]); the shell
//! executes them (logs the edits, writes the data file, sends the op) and
//! then acknowledges: [`Engine::advance`] when the log took a local change,
//! [`Engine::abandon`] when it failed (nothing of it happened),
//! [`Engine::unsend`] when an op handed out could not be sent.
//!
//! The state is the client modification log (CML, `cml.rs`), owned here
//! alone. Its rules:
//!
//! - **Queue order is send order.** Every op gets its client seq (lsn) when
//!   it is queued; the sender hands them out in lsn order, and a transient
//!   refusal queues the op again *behind* everything queued meanwhile, after
//!   a pause, so no op overtakes one queued before it.
//! - **An op once sent is never cancelled or joined** (coalescing works
//!   only on ops the server has never seen). A test-only switch,
//!   [`Options::break_never_cancel_sent`], turns this rule off so the
//!   simulation proves that it notices.
//! - **Busy objects keep their local state.** An object with ops not yet
//!   echoed by the stream (or unsealed writes) takes no foreign change; the
//!   change is noted (`stale`) and fetched once the object is idle.
//! - **A refusal for good is parked with its bytes** and the replica
//!   resyncs once nothing local is on the way; nothing is dropped.
//!
//! The engine is written for what comes next: a conflict policy is a new
//! arm in [`Engine::answered`] (a refusal handled instead of parked); an
//! on-demand file is a data effect the shell defers ([`Data`]).

mod cml;
mod local;
mod stream;
#[cfg(test)]
mod tests;

use crate::cache::{with_ctime, CacheError, Cached, CmlEntry, DirtyRanges, Edit};
pub use crate::error::ReplicaError;
pub(crate) use cml::objs;
use cml::Cml;
use izo_proto::*;
use std::collections::HashSet;
use std::time::Duration;

pub use local::{Make, Withdraw};
pub use stream::{Batch, Data, Need, Planned, Refresh};

pub(crate) type R<T> = Result<T, ReplicaError>;

/// Sending pauses this long after the first transient refusal, doubling
/// with each one in a row (up to 6 doublings).
pub const RETRY_PAUSE: Duration = Duration::from_millis(100);
/// Unsealed writes are sealed into log entries this often (the sender
/// looks for work at least this often).
pub const SEAL_EVERY: Duration = Duration::from_millis(500);

/// The cache's meta key holding the highest lsn whose change is logged
/// (written with the change, in the same log record).
pub const LOGGED: &str = "lsn.logged";
/// Set once the cache tracks [`LOGGED`] (a cache of an earlier release
/// does not: all its own records count as its own).
pub const TRACKED: &str = "lsn.tracked";
/// Meta keys `lsn.gap.<first>` = last: lsns the server has whose changes a
/// power loss took from this cache.
pub const GAP: &str = "lsn.gap.";

/// Meta key set to 1 while a resync is due (with the change that makes it
/// due: a crash before it does not forget it), 0 once done.
pub const RESYNC: &str = "resync.due";

/// Meta keys `refresh.<id>` = 1: an object to ask the server about again
/// once idle, flagged in the same log record as the change that needs it
/// (so a crash after a fold does not forget it); 0 once done.
pub const REFRESH: &str = "refresh.";

/// The edit flagging (`on`) or clearing an object's refresh (see [`REFRESH`]).
pub fn refresh_flag(id: ObjectId, on: bool) -> Edit {
    Edit::Meta(format!("{REFRESH}{:032x}", id.0), on as u64)
}

/// Which lsns of this replica the cache holds the changes of.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Logged {
    /// Every lsn up to this one ...
    pub through: u64,
    /// ... but for these ranges (inclusive).
    pub gaps: Vec<(u64, u64)>,
}

impl Logged {
    /// Does the cache hold the change of `lsn`?
    pub fn holds(&self, lsn: u64) -> bool {
        lsn <= self.through && !self.gaps.iter().any(|(a, b)| (*a..=*b).contains(&lsn))
    }
}

/// A read-only view of the namespace the engine decides on (the cache).
pub trait View {
    /// An object.
    fn get(&self, id: ObjectId) -> Result<Option<Cached>, CacheError>;
    /// A name in a directory.
    fn lookup(&self, parent: ObjectId, name: &[u8]) -> Result<Option<ObjectId>, CacheError>;
    /// A directory's entries.
    fn children(&self, dir: ObjectId) -> Result<Vec<(Vec<u8>, ObjectId)>, CacheError>;
    /// A directory's parent.
    fn parent_of(&self, dir: ObjectId) -> Result<Option<ObjectId>, CacheError>;
}

impl View for crate::cache::Cache {
    fn get(&self, id: ObjectId) -> Result<Option<Cached>, CacheError> {
        crate::cache::Cache::get(self, id)
    }
    fn lookup(&self, parent: ObjectId, name: &[u8]) -> Result<Option<ObjectId>, CacheError> {
        crate::cache::Cache::lookup(self, parent, name)
    }
    fn children(&self, dir: ObjectId) -> Result<Vec<(Vec<u8>, ObjectId)>, CacheError> {
        crate::cache::Cache::children(self, dir)
    }
    fn parent_of(&self, dir: ObjectId) -> Result<Option<ObjectId>, CacheError> {
        crate::cache::Cache::parent_of(self, dir)
    }
}

/// The time an input happens at: a monotonic instant (timers) and the wall
/// clock (stamps, ctimes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Now {
    /// Since any fixed origin (the shell's start).
    pub mono: Duration,
    /// The wall clock.
    pub wall: Timestamp,
}

/// Switches of the engine's rules. The default is the real engine; the
/// others exist so the simulation can prove it notices a broken rule.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// Test only: cancel and join ops even after they were sent.
    pub break_never_cancel_sent: bool,
}

/// A kernel cache entry to drop after a remote change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Inval {
    /// An inode's attributes and data.
    Inode(u64),
    /// A name in a directory (by the directory's inode).
    Entry(u64, Vec<u8>),
    /// An inode's attributes only (its cached pages stay).
    Attr(u64),
}

/// Do two attribute sets differ in what `stat` shows?
pub fn visible_change(a: &Attr, b: &Attr) -> bool {
    (a.mode, a.uid, a.gid, a.size, a.mtime, a.atime, a.nlink)
        != (b.mode, b.uid, b.gid, b.size, b.mtime, b.atime, b.nlink)
}

/// A local change as planned: the shell executes its data effect, logs
/// `edits` (one record), then calls [`Engine::advance`] (or
/// [`Engine::abandon`] if the log failed).
#[must_use = "a planned change must be logged and then advanced or abandoned"]
#[derive(Debug, Default)]
pub struct Local {
    /// To log, in order.
    pub edits: Vec<Edit>,
    /// Lsns queued by this change.
    pub queued: Vec<u64>,
    /// An unsent entry this change joined: replaced once logged.
    merged: Option<(u64, CmlEntry)>,
    /// An object whose last name this change removed (and its inode):
    /// its data goes once no handle holds it.
    pub gone: Option<(ObjectId, u64)>,
}

/// What the sender does next.
#[derive(Debug, PartialEq)]
#[allow(clippy::large_enum_variant)] // (one at a time, moved once)
pub enum Next {
    /// Send this entry (now marked sent; `was_sent`: it was before, as an
    /// entry reloaded at start is).
    Send {
        /// Its client seq.
        lsn: u64,
        /// The entry (a write's bytes are read by the shell).
        entry: CmlEntry,
        /// Sent before (for [`Engine::unsend`]).
        was_sent: bool,
    },
    /// Nothing to send now; look again after this long (or when woken).
    Idle(Duration),
}

/// The engine's decision on an answer.
#[derive(Debug, Default)]
pub struct Answered {
    /// Edits to log now (a parked or re-queued entry must survive).
    pub now: Vec<Edit>,
    /// The entry is parked: the shell fills in a write's bytes (`len` of
    /// them at its offset, read from the data file) and logs the
    /// [`Edit::Park`] first in `now`.
    pub park: Option<(u64, Op, OpError, u64)>,
    /// A caller waits for this answer (its lsn was queued by
    /// [`Engine::queue_wait`]): hand it over.
    pub wake: Option<Result<Applied, OpError>>,
    /// The sender has something to send again.
    pub wake_sender: bool,
    /// A transient refusal: the op is queued again, sending pauses this long.
    pub retry_in: Option<Duration>,
    /// Stashed server attributes became ready: take them
    /// ([`Engine::take_ready`]).
    pub ready: bool,
}

/// The replica engine (see the module header).
pub struct Engine {
    c: Cml,
    /// Lsns whose caller waits for the answer.
    waiting: HashSet<u64>,
    /// The stream position the cache has applied.
    applied: Seq,
    /// The lsns logged here before the start: their local effect is in the
    /// cache (see [`Engine::own`]).
    logged: Logged,
    /// The highest lsn through which this replica let the server forget
    /// its replies: a change above it the server calls expired was never
    /// recorded there.
    reported: u64,
    /// The server answers "expired" only for a change it recorded and this
    /// replica released (protocol 6 on: one it never recorded it executes
    /// then), so "expired" always means applied. Before, a change above
    /// what this replica released that the server called expired was one
    /// it never recorded (see [`Engine::answered`]).
    releases_tracked: bool,
    opts: Options,
}

impl Engine {
    /// An engine for a cache at stream position `applied`.
    pub fn new(applied: Seq, opts: Options) -> Engine {
        Engine {
            c: Cml { next_lsn: 1, ..Cml::default() },
            waiting: HashSet::new(),
            applied,
            logged: Logged::default(),
            releases_tracked: false,
            reported: 0,
            opts,
        }
    }

    /// Load the log an earlier run left: its entries (all counted as sent:
    /// any may have reached the server, so none may be cancelled or joined;
    /// they are sent again in order and the server's reply cache answers
    /// those it applied), its unsealed writes (sealed now: the edits to
    /// log), the objects a killed run's log touched (asked for again once
    /// idle), the lowest lsn new ops may take, and the highest lsn whose
    /// change the cache holds (its [`LOGGED`] meta).
    #[allow(clippy::too_many_arguments)]
    pub fn recover(
        &mut self,
        view: &dyn View,
        entries: Vec<(u64, CmlEntry)>,
        dirty: DirtyRanges,
        touched: Vec<ObjectId>,
        floor: u64,
        logged: Logged,
    ) -> Vec<Edit> {
        // (never an lsn this cache logged before, answered or not: a start
        // without the server does not know how far the server is)
        let last = entries.last().map(|(l, _)| l + 1).unwrap_or(0);
        self.c.next_lsn = floor.max(last).max(self.c.next_lsn).max(logged.through + 1).max(1);
        self.logged = logged;
        for (lsn, e) in entries {
            // A write's bytes are read from the data file when it is sent:
            // an earlier run may have sent bytes of later changes to the
            // file (a write, a truncate) that a power loss then took from
            // this cache, and the server answers the resend from its reply
            // cache, the echo bringing nothing (an own record). Once the
            // file is idle it is taken from the server whole.
            if let (Op::Write { id, .. }, true) = (&e.op, e.len > 0) {
                self.c.stale.insert(*id);
            }
            self.c.hold(lsn, objs(&e.op));
            self.c.q.insert(lsn, (e, true));
        }
        self.c.dirty = dirty;
        self.c.refresh = touched.into_iter().map(|id| (id, false)).collect();
        let ids: Vec<ObjectId> = self.c.dirty.keys().copied().collect();
        let mut edits = Vec::new();
        let mut lsns = Vec::new();
        for id in ids {
            lsns.extend(self.seal_into(view, id, &mut edits));
        }
        if let Some(m) = lsns.iter().max() {
            edits.push(Edit::Meta(LOGGED.into(), *m));
        }
        edits
    }

    /// The server applied changes of this replica through `server_applied`,
    /// past `held` (the highest lsn this cache had logged when it started):
    /// changes a power loss took from this cache, or that an earlier copy
    /// of it (a restored backup) never saw. The replica continues under a
    /// fresh id (the shell's part): under the old one, the server would take
    /// its next changes for the same run of writes as those it lost, and
    /// apply them over the newer state without a conflict; under the new one
    /// each is checked against its base. Queued entries the server applied
    /// already (logged here before the start, through `server_applied`) go:
    /// sent under the new id they would be applied twice. The others stay,
    /// in order, to be sent under the new id; the records of the old id
    /// land as someone else's. Edits to log.
    pub fn after_gap(&mut self, held: u64, server_applied: u64) -> Vec<Edit> {
        let mut edits = Vec::new();
        let applied: Vec<u64> = self.c.q.range(..=held.min(server_applied)).map(|(l, _)| *l).collect();
        for lsn in applied {
            self.c.q.remove(&lsn);
            self.c.release(lsn);
            self.waiting.remove(&lsn);
            edits.push(Edit::CmlDone(lsn));
        }
        // (what stays was never sent under the new id)
        for (_, sent) in self.c.q.values_mut() {
            *sent = false;
        }
        self.c.cursor = 0;
        edits
    }

    /// The server's volume was replaced (a new incarnation): every queued
    /// entry was made against a state it no longer has, so none is sent;
    /// each is parked (the shell fills in a write's bytes and logs the
    /// parks). Unsealed writes are sealed into entries first by the shell
    /// ([`Engine::seal_all`]).
    pub fn park_all(&mut self, why: &OpError) -> Vec<(u64, Op, OpError, u64)> {
        let mut out = Vec::new();
        for (lsn, (e, _)) in std::mem::take(&mut self.c.q) {
            self.c.release(lsn);
            self.waiting.remove(&lsn);
            self.c.parked += 1;
            out.push((lsn, e.op, why.clone(), e.len));
        }
        out
    }

    /// The next lsn this engine hands out.
    pub fn next_lsn(&self) -> u64 {
        self.c.next_lsn
    }

    /// Take an lsn for something kept outside the queue (a parked version
    /// a rollback keeps): never reused.
    pub fn take_lsn(&mut self) -> u64 {
        let l = self.c.next_lsn;
        self.c.next_lsn += 1;
        l
    }

    /// Entries queued and not answered.
    pub fn queued(&self) -> usize {
        self.c.q.len()
    }

    /// The queued entries in order, with whether each was sent (for tests
    /// and status).
    pub fn entries(&self) -> Vec<(u64, CmlEntry, bool)> {
        self.c.q.iter().map(|(l, (e, s))| (*l, e.clone(), *s)).collect()
    }

    /// The sender's position and until when it pauses (status and tests).
    pub fn sender(&self) -> (u64, Option<Duration>) {
        (self.c.cursor, self.c.pause_until)
    }

    /// Does the object have local changes the server has not echoed?
    pub fn busy(&self, id: ObjectId) -> bool {
        self.c.busy(id)
    }

    /// Has the object unsealed writes?
    pub fn has_dirty(&self, id: ObjectId) -> bool {
        self.c.dirty.contains_key(&id)
    }

    /// Nothing queued, nothing unsealed.
    pub fn settled(&self) -> bool {
        self.c.q.is_empty() && self.c.dirty.is_empty()
    }

    /// No entry below `upto` is queued.
    pub fn answered_before(&self, upto: u64) -> bool {
        self.c.q.range(..upto).next().is_none()
    }

    /// Whether the server the changes go to tracks what this replica
    /// released (protocol 6 on; see the field).
    pub fn set_releases_tracked(&mut self, tracked: bool) {
        self.releases_tracked = tracked;
    }

    /// The server may forget replies through `mark` (reported after a fold).
    pub fn reported_durable(&mut self, mark: u64) {
        self.reported = self.reported.max(mark);
    }

    /// A resync was due when the last run ended (its [`RESYNC`] meta).
    pub fn resync_due(&mut self) {
        self.c.resync = true;
    }

    /// The highest lsn through which every entry is answered and echoed
    /// (the answers are recorded once the edits taken with them are
    /// folded; an answered entry stays in the log until its echo lands, and
    /// a start after a crash sends it again: its reply must still be there).
    pub fn durable_mark(&self) -> u64 {
        let echo = self.c.acked_at.iter().map(|(_, l)| *l).min();
        match self.c.q.keys().next().copied().into_iter().chain(echo).min() {
            Some(first) => first.saturating_sub(1),
            None => self.c.next_lsn.saturating_sub(1),
        }
    }

    /// Changes not answered yet (ops, bytes).
    pub fn backlog(&self) -> (u64, u64) {
        self.c.backlog()
    }

    /// Changes queued before `upto` not answered yet (ops, bytes).
    pub fn backlog_before(&self, upto: u64) -> (u64, u64) {
        self.c.q.range(..upto).fold((0, 0), |(n, b), (_, (e, _))| (n + 1, b + e.len))
    }

    /// When the oldest change not answered yet was made (as its stamp
    /// says: every change but an attribute or xattr change carries one).
    pub fn oldest_pending(&self) -> Option<Timestamp> {
        self.c.q.values().filter_map(|(e, _)| e.time).min()
    }

    /// Backlog, and ops answered / parked / retried since start.
    pub fn stats(&self) -> ((u64, u64), u64, u64, u64) {
        (self.c.backlog(), self.c.sent, self.c.parked, self.c.retried)
    }

    /// The stream position applied.
    pub fn applied_seq(&self) -> Seq {
        self.applied
    }

    /// The stream position moved (a batch applied, a resync).
    pub fn set_applied(&mut self, seq: Seq) {
        self.applied = seq;
    }

    /// A logged change is acknowledged: a joined entry takes its new form.
    pub fn advance(&mut self, l: &Local) {
        if let Some((lsn, e)) = &l.merged {
            if let Some((q, _)) = self.c.q.get_mut(lsn) {
                *q = e.clone();
            }
        }
    }

    /// A planned change was not logged: its queued ops never happened.
    pub fn abandon(&mut self, l: &Local) {
        for lsn in &l.queued {
            self.c.q.remove(lsn);
            self.c.release(*lsn);
            self.waiting.remove(lsn);
        }
    }

    /// An implicit mtime for an object whose mtime is `current`: now, or
    /// just after `current` if that is later (an implicit stamp never goes
    /// backwards; the server applies the same rule).
    pub fn stamp_after(current: Timestamp, now: Timestamp) -> Timestamp {
        if now > current {
            return now;
        }
        match current.nsec {
            n if n >= 999_999_999 => Timestamp { secs: current.secs + 1, nsec: 0 },
            n => Timestamp { secs: current.secs, nsec: n + 1 },
        }
    }

    /// When `op` was made here: the implicit mtime it gave the object it
    /// writes or makes, or the directory whose entries it changes, as
    /// `edits` (about to be applied) or else the view hold it. `None` for
    /// attribute and xattr changes, which set no implicit mtime.
    fn stamp(view: &dyn View, op: &Op, edits: &[Edit]) -> Option<Timestamp> {
        let target = match op {
            Op::Create { id, .. } | Op::Mkdir { id, .. } | Op::Symlink { id, .. } | Op::Mknod { id, .. } => *id,
            Op::Write { id, .. }
            | Op::Append { id, .. }
            | Op::Truncate { id, .. }
            | Op::Allocate { id, .. }
            | Op::PunchHole { id, .. } => *id,
            Op::Link { parent, .. } | Op::Unlink { parent, .. } | Op::Rmdir { parent, .. } => *parent,
            Op::Rename { new_parent, .. } => *new_parent,
            Op::SetAttr { .. } | Op::SetXattr { .. } | Op::RemoveXattr { .. } => return None,
        };
        let queued = edits.iter().rev().find_map(|e| match e {
            Edit::Put { attr, .. } if attr.id == target => Some(attr.mtime),
            _ => None,
        });
        queued.or_else(|| view.get(target).ok().flatten().map(|c| c.attr.mtime))
    }

    /// A CML entry for `op` (of `len` bytes for a write), stamped.
    fn entry(view: &dyn View, op: Op, len: u64, edits: &[Edit]) -> CmlEntry {
        let time = Self::stamp(view, &op, edits);
        CmlEntry { op, len, time }
    }

    /// Turn an object's unsealed write ranges into log entries (each at
    /// most [`MAX_DATA`] bytes), in `edits`.
    fn seal_into(&mut self, view: &dyn View, id: ObjectId, edits: &mut Vec<Edit>) -> Vec<u64> {
        let mut lsns = Vec::new();
        let Some(ranges) = self.c.dirty.remove(&id) else { return lsns };
        for (off, len) in ranges {
            let mut at = off;
            while at < off + len {
                let n = (off + len - at).min(MAX_DATA as u64);
                let e = Self::entry(view, Op::Write { id, base: 0, offset: at, data: Vec::new() }, n, edits);
                let lsn = self.c.push(e.clone());
                edits.push(Edit::Cml(lsn, e));
                lsns.push(lsn);
                at += n;
            }
        }
        edits.push(Edit::Sealed { id });
        lsns
    }

    /// Plan `edits` with `op` queued after them (if any; `stamp` given for
    /// a change whose local effect comes only with the server's answer).
    /// Every object they change gets a new ctime; answers and server
    /// attributes that went idle ride along (first: this change wins).
    fn commit(
        &mut self,
        view: &dyn View,
        edits: Vec<Edit>,
        op: Option<Op>,
        stamp: Option<Timestamp>,
        now: Now,
        mut l: Local,
    ) -> R<Local> {
        let mut edits = with_ctime(edits, now.wall);
        edits.extend(self.c.done.drain(..).map(Edit::CmlDone));
        let mut ready = Vec::new();
        for a in std::mem::take(&mut self.c.ready) {
            if view.get(a.id)?.is_some() {
                ready.push(Edit::attr(a));
            }
        }
        if !ready.is_empty() {
            ready.append(&mut edits);
            edits = ready;
        }
        if let Some(op) = op {
            let mut e = Self::entry(view, op, 0, &edits);
            if stamp.is_some() {
                e.time = stamp;
            }
            let lsn = self.c.push(e.clone());
            edits.push(Edit::Cml(lsn, e));
            l.queued.push(lsn);
        }
        if let Some(m) = l.queued.iter().max() {
            edits.push(Edit::Meta(LOGGED.into(), *m));
        }
        l.edits.splice(0..0, edits);
        Ok(l)
    }

    /// Seal an object's writes (flush, close): `None` if it has none.
    pub fn seal(&mut self, view: &dyn View, id: ObjectId, now: Now) -> R<Option<Local>> {
        if !self.c.dirty.contains_key(&id) {
            return Ok(None);
        }
        let mut l = Local::default();
        let mut edits = Vec::new();
        l.queued = self.seal_into(view, id, &mut edits);
        self.commit(view, edits, None, None, now, l).map(Some)
    }

    /// Seal every unsealed write (the timer, `izo sync`).
    pub fn seal_all(&mut self, view: &dyn View, now: Now) -> R<Option<Local>> {
        let ids: Vec<ObjectId> = self.c.dirty.keys().copied().collect();
        if ids.is_empty() {
            return Ok(None);
        }
        let mut l = Local::default();
        let mut edits = Vec::new();
        for id in ids {
            l.queued.extend(self.seal_into(view, id, &mut edits));
        }
        self.commit(view, edits, None, None, now, l).map(Some)
    }

    /// What a fold commits besides the log: answers, and server
    /// attributes of objects that went idle.
    pub fn fold_edits(&mut self, view: &dyn View) -> R<Vec<Edit>> {
        let mut edits = Vec::new();
        for a in std::mem::take(&mut self.c.ready) {
            if view.get(a.id)?.is_some() {
                edits.push(Edit::attr(a));
            }
        }
        edits.extend(self.c.done.drain(..).map(Edit::CmlDone));
        Ok(edits)
    }

    /// The server's attributes of objects that went idle (stashed from
    /// their echoes), with the kernel caches they make stale.
    pub fn take_ready(&mut self, view: &dyn View) -> R<(Vec<Edit>, Vec<Inval>)> {
        let mut edits = Vec::new();
        let mut inval = Vec::new();
        for a in std::mem::take(&mut self.c.ready) {
            if let Some(cur) = view.get(a.id)? {
                if visible_change(&cur.attr, &a) {
                    inval.push(Inval::Attr(cur.ino));
                }
                edits.push(Edit::attr(a));
            }
        }
        Ok((edits, inval))
    }

    /// Are stashed attributes ready to take?
    pub fn has_ready(&self) -> bool {
        !self.c.ready.is_empty()
    }

    /// The next entry to send. While disconnected or pausing after a
    /// transient refusal nothing is handed out: an op once sent is never
    /// cancelled, and what waits here still coalesces.
    pub fn next_to_send(&mut self, connected: bool, now: Now) -> Next {
        let paused = match self.c.pause_until {
            Some(t) if t > now.mono => true,
            Some(_) => {
                self.c.pause_until = None;
                false
            }
            None => false,
        };
        if paused || !connected {
            return Next::Idle(Duration::from_millis(50));
        }
        match self.c.q.range_mut(self.c.cursor + 1..).next() {
            Some((lsn, (e, sent))) => {
                let was_sent = std::mem::replace(sent, true);
                self.c.cursor_before = self.c.cursor;
                self.c.cursor = *lsn;
                Next::Send { lsn: *lsn, entry: e.clone(), was_sent }
            }
            None => Next::Idle(SEAL_EVERY),
        }
    }

    /// An entry handed out could not be built or sent: as it was.
    pub fn unsend(&mut self, lsn: u64, was_sent: bool) {
        if let Some((_, sent)) = self.c.q.get_mut(&lsn) {
            *sent = was_sent;
        }
        if self.c.cursor == lsn {
            self.c.cursor = self.c.cursor_before;
        }
    }

    /// A new connection: every entry sent and not answered goes again, in
    /// order, before anything after it (the connection sends nothing
    /// again itself).
    pub fn reconnected(&mut self) {
        if let Some(first) = self.c.q.iter().find(|(_, (_, sent))| *sent).map(|(l, _)| *l) {
            self.c.cursor = self.c.cursor.min(first.saturating_sub(1));
        }
    }

    /// An entry sent will get no answer (its connection broke and the
    /// connection does not send it again): the sender sends it again, and
    /// everything after it, in order.
    pub fn lost(&mut self, lsn: u64) {
        if self.c.q.contains_key(&lsn) {
            self.c.cursor = self.c.cursor.min(lsn.saturating_sub(1));
        }
    }

    /// The op as sent: bases from the versions the view has from the
    /// server (or those taken when queued, for an object no longer there).
    /// A write's bytes are the shell's to fill in.
    pub fn bases(view: &dyn View, mut op: Op) -> Op {
        let cached = |id: ObjectId| view.get(id).ok().flatten().map(|c| c.attr.versions);
        match &mut op {
            Op::Write { id, base: b, .. }
            | Op::Append { id, base: b, .. }
            | Op::Truncate { id, base: b, .. }
            | Op::Allocate { id, base: b, .. }
            | Op::PunchHole { id, base: b, .. } => {
                if let Some(v) = cached(*id) {
                    *b = v.data;
                }
            }
            Op::SetAttr { id, base: b, .. }
            | Op::SetXattr { id, base: b, .. }
            | Op::RemoveXattr { id, base: b, .. } => {
                if let Some(v) = cached(*id) {
                    *b = v.meta;
                }
            }
            Op::Unlink { expect, .. } | Op::Rmdir { expect, .. } => {
                expect.base = cached(expect.id).unwrap_or(expect.base);
            }
            Op::Rename { expect, target, .. } => {
                expect.base = cached(expect.id).unwrap_or(expect.base);
                if let Some(t) = target {
                    t.base = cached(t.id).unwrap_or(t.base);
                }
            }
            _ => {}
        }
        op
    }

    /// The server answered entry `lsn` (`Ok(None)`: nothing was left to
    /// send). `None` if the entry is no longer queued (settled meanwhile).
    pub fn answered(&mut self, lsn: u64, r: Result<Option<Applied>, OpError>, now: Now) -> Option<Answered> {
        let waiter = self.waiting.remove(&lsn);
        let (e, _) = self.c.q.remove(&lsn)?;
        let mut out = Answered::default();
        match &r {
            Ok(Some(a)) => {
                self.c.sent += 1;
                self.c.streak = 0;
                if a.seq <= self.applied {
                    self.c.release(lsn);
                    self.c.done.push(lsn);
                } else {
                    // Its entry stays in the log until the echo lands (see
                    // `apply_records`): a start after a crash reloads it and
                    // holds its objects again. Dropped now, the restarted
                    // engine would not know the echo is still coming, and
                    // someone else's records the server ordered before it
                    // would overwrite its local effect (the echo, an own
                    // record, then brings nothing back).
                    self.c.acked_at.push((a.seq, lsn));
                }
            }
            Err(OpError::ReplyExpired(_)) if lsn > self.reported && !self.releases_tracked => {
                // This replica never let the server forget that reply: the
                // server never recorded the change (a power loss here took
                // its cancellation, and a later change went first). It is
                // queued again, as a new change after the others.
                self.c.release(lsn);
                let again = self.c.push(e.clone());
                if let Some((_, sent)) = self.c.q.get_mut(&again) {
                    *sent = true;
                }
                out.now.push(Edit::CmlDone(lsn));
                out.now.push(Edit::Cml(again, e));
                out.now.push(Edit::Meta(LOGGED.into(), again));
                out.wake_sender = true;
                self.waiting.remove(&lsn);
                return Some(out);
            }
            Ok(None) | Err(OpError::ReplyExpired(_)) => {
                // (expired: applied in an earlier run, its record seen or coming)
                self.c.release(lsn);
                self.c.done.push(lsn);
            }
            Err(OpError::Io(_)) => {
                // Not applied, not recorded (its batch failed before the
                // commit, or it follows one that did): sent again under the
                // same lsn,
                // and so is everything after it (the server refuses those
                // for now until this one comes again: nothing overtakes it),
                // after a pause that grows while refusals go on.
                self.c.q.insert(lsn, (e, true));
                self.c.cursor = self.c.cursor.min(lsn.saturating_sub(1));
                if self.c.pause_until.is_none_or(|t| t <= now.mono) {
                    self.c.streak = (self.c.streak + 1).min(6);
                    let pause = RETRY_PAUSE * (1 << self.c.streak);
                    self.c.pause_until = Some(now.mono + pause);
                    out.retry_in = Some(pause);
                    self.c.retried += 1;
                }
                out.wake_sender = true;
                // (a caller waiting for it hears nothing: it will happen,
                // as an op sent whose answer did not come in time)
                return Some(out);
            }
            Err(_) if waiter => {
                // the caller hears of it (and applies nothing locally)
                self.c.release(lsn);
                self.c.done.push(lsn);
            }
            Err(why) if why.is_transient() => {
                // Refused for now and recorded (no space): queued again as
                // a new change after the others, after a pause that grows
                // while refusals go on. (Changes sent after it may land
                // first: the full-disk work is issue 14's.)
                self.c.streak = (self.c.streak + 1).min(6);
                let pause = RETRY_PAUSE * (1 << self.c.streak);
                self.c.pause_until = Some(now.mono + pause);
                out.retry_in = Some(pause);
                self.c.retried += 1;
                self.c.release(lsn);
                let again = self.c.push(e.clone());
                out.now.push(Edit::CmlDone(lsn));
                out.now.push(Edit::Cml(again, e.clone()));
                out.now.push(Edit::Meta(LOGGED.into(), again));
                out.wake_sender = true;
            }
            Err(err) => {
                self.c.parked += 1;
                self.c.resync = true;
                out.now.push(Edit::Meta(RESYNC.into(), 1));
                self.c.release(lsn);
                out.park = Some((lsn, e.op.clone(), err.clone(), e.len));
            }
        }
        if !out.now.is_empty() || out.park.is_some() {
            // recorded now (with the answers that ride along)
            out.now.extend(self.c.done.drain(..).map(Edit::CmlDone));
        }
        if waiter {
            out.wake = Some(match r {
                Ok(Some(a)) => Ok(a),
                Ok(None) | Err(OpError::ReplyExpired(_)) => Ok(Applied { seq: 0, time: now.wall, attr: None }),
                Err(e) => Err(e),
            });
        }
        out.ready = !self.c.ready.is_empty();
        Some(out)
    }
}

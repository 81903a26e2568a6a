//! The client modification log (CML): local changes waiting for the server.
//!
//! A mutation is applied to the cache first and queued here under a client
//! seq (its "lsn") chosen when it is queued, so an op resent after a restart
//! keeps its seq and the server's reply cache keeps it exactly-once. Writes
//! are not queued one per `write(2)`: their ranges collect per object
//! ("dirty") and are sealed into entries at flush, fsync, close or a short
//! timer. A create…unlink of a file none of whose ops were sent cancels
//! them all.
//!
//! While an object has ops that the server has not echoed back in the
//! record stream it is "busy": foreign records do not overwrite it (its
//! next op carries the old base, so the server refuses it as a conflict,
//! and the refused op is parked with its bytes, never dropped).

use crate::cache::{add_range, CmlEntry, DirtyRanges};
use izo_proto::{Attr, ObjectId, Op, RenameMode, Seq, SetAttrs};
use std::collections::{BTreeMap, HashMap};

/// The in-memory side of the log (the database holds the entries).
#[derive(Default)]
pub(super) struct Cml {
    /// Queued entries by lsn, with whether they were sent.
    pub q: BTreeMap<u64, (CmlEntry, bool)>,
    /// The next lsn to hand out.
    pub next_lsn: u64,
    /// Ops per object not yet echoed by the stream.
    pub pending: HashMap<ObjectId, u32>,
    /// Objects each un-echoed op holds.
    pub objs_of: HashMap<u64, Vec<ObjectId>>,
    /// Answered ops whose records were not seen yet: (record seq, lsn).
    pub acked_at: Vec<(Seq, u64)>,
    /// Write ranges not sealed into entries yet.
    pub dirty: DirtyRanges,
    /// Ops answered since start.
    pub sent: u64,
    /// Ops refused for good since start.
    pub parked: u64,
    /// Ops retried after a transient refusal.
    pub retried: u64,
    /// A refused op left the cache ahead of the server: resync once idle.
    pub resync: bool,
    /// The server's newest attributes of busy objects (from own echoes),
    /// taken when the object is no longer busy.
    pub stash: HashMap<ObjectId, Attr>,
    /// Stashed attributes of objects no longer busy, for the next commit.
    pub ready: Vec<Attr>,
    /// Busy objects whose foreign changes were held back: refreshed from
    /// the server once idle.
    pub stale: std::collections::HashSet<ObjectId>,
    /// The last lsn handed to the sender (it hands out what follows).
    pub cursor: u64,
    /// The cursor before the last hand-out (restored by an unsend).
    pub cursor_before: u64,
    /// Sending waits until then (after a transient refusal).
    pub pause_until: Option<std::time::Duration>,
    /// Transient refusals in a row.
    pub streak: u32,
    /// Answered entries to drop from the database with the next commit.
    pub done: Vec<u64>,
    /// Objects whose attributes to ask the server for once idle (set by
    /// the replay of a log that a SIGKILL left).
    /// (object, with its content and xattrs too).
    pub refresh: Vec<(ObjectId, bool)>,
}

impl Cml {
    /// Queue an entry: a new lsn, its objects held.
    pub fn push(&mut self, e: CmlEntry) -> u64 {
        let lsn = self.next_lsn;
        self.next_lsn += 1;
        self.hold(lsn, objs(&e.op));
        self.q.insert(lsn, (e, false));
        lsn
    }

    /// `next` joined into the newest queued entry, if that is an unsent
    /// SetAttr of `id` (nothing queued behind it, so no other op moves
    /// relative to it): its lsn and the joined entry, to log and then put
    /// in its place.
    pub fn merge_setattr(&self, id: ObjectId, next: &SetAttrs) -> Option<(u64, CmlEntry)> {
        self.merge_setattr_as(id, next, true)
    }

    /// [`Cml::merge_setattr`] breaking the rule that a sent op is never
    /// joined (the simulation's proof that it notices).
    pub fn merge_setattr_ignoring_sent(&self, id: ObjectId, next: &SetAttrs) -> Option<(u64, CmlEntry)> {
        self.merge_setattr_as(id, next, false)
    }

    fn merge_setattr_as(&self, id: ObjectId, next: &SetAttrs, respect_sent: bool) -> Option<(u64, CmlEntry)> {
        let (lsn, (e, sent)) = self.q.iter().next_back()?;
        let Op::SetAttr { id: on, .. } = &e.op else { return None };
        if (*sent && respect_sent) || *on != id {
            return None;
        }
        let mut e = e.clone();
        if let Op::SetAttr { attrs, .. } = &mut e.op {
            attrs.mode = next.mode.or(attrs.mode);
            attrs.uid = next.uid.or(attrs.uid);
            attrs.gid = next.gid.or(attrs.gid);
            attrs.mtime = next.mtime.or(attrs.mtime);
            attrs.atime = next.atime.or(attrs.atime);
        }
        Some((*lsn, e))
    }

    /// Hold objects for an lsn (until its record comes back or it fails).
    pub fn hold(&mut self, lsn: u64, objs: Vec<ObjectId>) {
        for o in &objs {
            *self.pending.entry(*o).or_default() += 1;
        }
        self.objs_of.insert(lsn, objs);
    }

    /// Release what an lsn holds.
    pub fn release(&mut self, lsn: u64) {
        for o in self.objs_of.remove(&lsn).unwrap_or_default() {
            if let Some(n) = self.pending.get_mut(&o) {
                *n -= 1;
                if *n == 0 {
                    self.pending.remove(&o);
                    if !self.dirty.contains_key(&o) {
                        if let Some(a) = self.stash.remove(&o) {
                            self.ready.push(a);
                        }
                        if self.stale.remove(&o) {
                            self.refresh.push((o, true));
                        }
                    }
                }
            }
        }
    }

    /// Does the object have local changes the server has not echoed?
    pub fn busy(&self, id: ObjectId) -> bool {
        self.pending.contains_key(&id) || self.dirty.contains_key(&id)
    }

    /// Entries and bytes not answered yet (sealed or not).
    pub fn backlog(&self) -> (u64, u64) {
        let sealed: u64 = self.q.values().map(|(e, _)| e.len).sum();
        let dirty: u64 = self.dirty.values().flatten().map(|(_, l)| l).sum();
        (self.q.len() as u64, sealed + dirty)
    }

    /// Note bytes written at `offset`.
    pub fn dirty(&mut self, id: ObjectId, offset: u64, len: u64) {
        add_range(self.dirty.entry(id).or_default(), offset, len);
    }

    /// Lsns of queued entries touching `id` if all are unsent and one of
    /// them created it with no other name or replaced object involved: a
    /// later unlink can cancel them all.
    pub fn cancellable(&self, id: ObjectId) -> Option<Vec<u64>> {
        self.cancellable_as(id, true)
    }

    /// [`Cml::cancellable`] breaking the rule that a sent op is never
    /// cancelled (the simulation's proof that it notices).
    pub fn cancellable_ignoring_sent(&self, id: ObjectId) -> Option<Vec<u64>> {
        self.cancellable_as(id, false)
    }

    fn cancellable_as(&self, id: ObjectId, respect_sent: bool) -> Option<Vec<u64>> {
        let mut lsns = Vec::new();
        let mut created = false;
        for (lsn, (e, sent)) in &self.q {
            let touches = match &e.op {
                Op::Create { id: i, .. } | Op::Symlink { id: i, .. } | Op::Mknod { id: i, .. } if *i == id => {
                    created = true;
                    true
                }
                Op::Rename { expect, target, mode, .. } => {
                    if target.as_ref().is_some_and(|t| t.id == id) {
                        return None;
                    }
                    if expect.id == id && (target.is_some() || *mode == RenameMode::Exchange) {
                        return None;
                    }
                    expect.id == id
                }
                Op::Link { id: i, .. } if *i == id => return None,
                op => op.changed_object() == Some(id),
            };
            if touches {
                if *sent && respect_sent {
                    return None;
                }
                lsns.push(*lsn);
            }
        }
        (created && self.objs_of.keys().all(|l| self.q.contains_key(l) || !held(self, *l, id))).then_some(lsns)
    }
}

fn held(c: &Cml, lsn: u64, id: ObjectId) -> bool {
    c.objs_of.get(&lsn).is_some_and(|v| v.contains(&id))
}

/// Every object an op changes (directories whose entries change included).
pub(crate) fn objs(op: &Op) -> Vec<ObjectId> {
    match op {
        Op::Create { parent, id, .. }
        | Op::Mkdir { parent, id, .. }
        | Op::Symlink { parent, id, .. }
        | Op::Mknod { parent, id, .. }
        | Op::Link { parent, id, .. } => vec![*parent, *id],
        Op::Unlink { parent, expect, .. } | Op::Rmdir { parent, expect, .. } => vec![*parent, expect.id],
        Op::Rename { parent, expect, new_parent, target, .. } => {
            let mut v = vec![*parent, expect.id];
            if new_parent != parent {
                v.push(*new_parent);
            }
            if let Some(t) = target {
                v.push(t.id);
            }
            v
        }
        op => op.changed_object().into_iter().collect(),
    }
}

//! The engine alone: no runtime, no temp dir, no server. A small view in
//! memory takes the engine's edits the way the cache does.

use super::*;
use crate::cache::{CmlEntry, Edit};
use std::collections::{BTreeMap, HashMap};

/// The namespace part of the cache, in memory.
#[derive(Default)]
struct Mem {
    objs: HashMap<ObjectId, Cached>,
    dents: BTreeMap<(ObjectId, Vec<u8>), ObjectId>,
    parents: HashMap<ObjectId, ObjectId>,
    next_ino: u64,
}

impl View for Mem {
    fn get(&self, id: ObjectId) -> Result<Option<Cached>, CacheError> {
        Ok(self.objs.get(&id).cloned())
    }
    fn lookup(&self, parent: ObjectId, name: &[u8]) -> Result<Option<ObjectId>, CacheError> {
        Ok(self.dents.get(&(parent, name.to_vec())).copied())
    }
    fn children(&self, dir: ObjectId) -> Result<Vec<(Vec<u8>, ObjectId)>, CacheError> {
        Ok(self.dents.iter().filter(|((p, _), _)| *p == dir).map(|((_, n), id)| (n.clone(), *id)).collect())
    }
    fn parent_of(&self, dir: ObjectId) -> Result<Option<ObjectId>, CacheError> {
        Ok(self.parents.get(&dir).copied())
    }
}

fn t(secs: i64) -> Timestamp {
    Timestamp { secs, nsec: 0 }
}

fn now(ms: u64) -> Now {
    Now { mono: Duration::from_millis(ms), wall: t(1_000 + ms as i64) }
}

impl Mem {
    fn new() -> Mem {
        let mut m = Mem { next_ino: 2, ..Mem::default() };
        let root = Attr {
            id: ObjectId::ROOT,
            kind: FileKind::Dir,
            mode: 0o755,
            uid: 0,
            gid: 0,
            size: 0,
            mtime: t(1),
            atime: t(1),
            nlink: 2,
            versions: Versions::default(),
            rdev: 0,
        };
        m.objs.insert(ObjectId::ROOT, Cached { attr: root, ino: 1, target: None, xattrs: vec![], ctime: t(1) });
        m
    }

    fn apply(&mut self, edits: &[Edit]) {
        for e in edits {
            match e {
                Edit::Put { attr, target, xattrs } => {
                    let old = self.objs.get(&attr.id).cloned();
                    let ino = old.as_ref().map(|o| o.ino).unwrap_or_else(|| {
                        self.next_ino += 1;
                        self.next_ino
                    });
                    let target = target.clone().or_else(|| old.as_ref().and_then(|o| o.target.clone()));
                    let xattrs = xattrs.clone().or_else(|| old.as_ref().map(|o| o.xattrs.clone())).unwrap_or_default();
                    let ctime = old.map(|o| o.ctime).unwrap_or(attr.mtime);
                    self.objs.insert(attr.id, Cached { attr: attr.clone(), ino, target, xattrs, ctime });
                }
                Edit::Link { parent, name, id } => {
                    self.dents.insert((*parent, name.clone()), *id);
                    if self.objs.get(id).is_some_and(|c| c.attr.kind == FileKind::Dir) {
                        self.parents.insert(*id, *parent);
                    }
                }
                Edit::Unlink { parent, name } => {
                    self.dents.remove(&(*parent, name.clone()));
                }
                Edit::UnlinkIf { parent, name, id } if self.dents.get(&(*parent, name.clone())) == Some(id) => {
                    self.dents.remove(&(*parent, name.clone()));
                }
                Edit::Versions { id, versions } => {
                    if let Some(c) = self.objs.get_mut(id) {
                        c.attr.versions = *versions;
                    }
                }
                Edit::Forget { id } => {
                    if let Some(c) = self.objs.get_mut(id) {
                        c.attr.nlink = 0;
                    }
                }
                Edit::Ctime { id, time } => {
                    if let Some(c) = self.objs.get_mut(id) {
                        c.ctime = *time;
                    }
                }
                _ => {}
            }
        }
    }

    /// Plan, log (here: apply) and acknowledge a local change.
    #[allow(clippy::must_use_candidate)]
    fn run(&mut self, e: &mut Engine, l: R<Local>) -> Local {
        let l = l.expect("the change is allowed");
        self.apply(&l.edits);
        e.advance(&l);
        l
    }
}

fn file(m: &mut Mem, e: &mut Engine, name: &str) -> ObjectId {
    let id = ObjectId::new();
    let mk = Make {
        parent: ObjectId::ROOT,
        name: name.as_bytes(),
        kind: FileKind::File,
        mode: 0o644,
        uid: 0,
        gid: 0,
        target: None,
        rdev: 0,
        trusted: Some(true),
    };
    let l = e.make(m, mk, id, now(0));
    let _ = m.run(e, l);
    id
}

fn dir(m: &mut Mem, e: &mut Engine, parent: ObjectId, name: &str) -> ObjectId {
    let id = ObjectId::new();
    let mk = Make {
        parent,
        name: name.as_bytes(),
        kind: FileKind::Dir,
        mode: 0o755,
        uid: 0,
        gid: 0,
        target: None,
        rdev: 0,
        trusted: Some(true),
    };
    let l = e.make(m, mk, id, now(0));
    let _ = m.run(e, l);
    id
}

fn ops(e: &Engine) -> Vec<&'static str> {
    e.entries().iter().map(|(_, en, _)| en.op.kind()).collect()
}

/// Hand out every entry to send, as a connected sender does.
fn send_all(e: &mut Engine) -> Vec<(u64, CmlEntry)> {
    let mut out = Vec::new();
    while let Next::Send { lsn, entry, .. } = e.next_to_send(true, now(0)) {
        out.push((lsn, entry));
    }
    out
}

fn applied(seq: Seq) -> Result<Option<Applied>, OpError> {
    Ok(Some(Applied { seq, time: t(5), attr: None }))
}

#[test]
fn create_write_unlink_of_unsent_ops_cancels_them_all() {
    let (mut m, mut e) = (Mem::new(), Engine::new(0, Options::default()));
    let id = file(&mut m, &mut e, "f");
    let l = e.wrote(&m, id, 0, 10, now(1));
    let _ = m.run(&mut e, l);
    let l = e.seal_all(&m, now(2)).expect("seal").expect("something to seal");
    let _ = m.run(&mut e, Ok(l));
    assert_eq!(ops(&e), ["create", "write"]);
    let l = e.remove(&m, ObjectId::ROOT, b"f", false, now(3));
    let l = m.run(&mut e, l);
    assert!(l.queued.is_empty(), "no unlink is queued");
    assert_eq!(e.queued(), 0, "the create and the write are cancelled");
    assert!(l.edits.iter().filter(|x| matches!(x, Edit::CmlDone(_))).count() >= 2, "their log entries are dropped");
}

#[test]
fn an_op_once_sent_is_never_cancelled() {
    let (mut m, mut e) = (Mem::new(), Engine::new(0, Options::default()));
    file(&mut m, &mut e, "f");
    assert_eq!(send_all(&mut e).len(), 1, "the create is sent");
    let l = e.remove(&m, ObjectId::ROOT, b"f", false, now(3));
    let _ = m.run(&mut e, l);
    assert_eq!(ops(&e), ["create", "unlink"], "the sent create stays and the unlink follows it");
    // the test switch breaks exactly this rule
    let (mut m, mut e) = (Mem::new(), Engine::new(0, Options { break_never_cancel_sent: true }));
    file(&mut m, &mut e, "f");
    send_all(&mut e);
    let l = e.remove(&m, ObjectId::ROOT, b"f", false, now(3));
    let _ = m.run(&mut e, l);
    assert_eq!(e.queued(), 0, "with the rule broken the sent create is cancelled");
}

#[test]
fn setattrs_in_a_row_join_into_one_unsent_op() {
    let (mut m, mut e) = (Mem::new(), Engine::new(0, Options::default()));
    let id = file(&mut m, &mut e, "f");
    for attrs in [
        SetAttrs { mtime: Some(t(7)), ..Default::default() },
        SetAttrs { uid: Some(5), ..Default::default() },
        SetAttrs { mode: Some(0o600), ..Default::default() },
    ] {
        let l = e.setattr(&m, id, None, attrs, true, now(4));
        let _ = m.run(&mut e, l);
    }
    assert_eq!(ops(&e), ["create", "setattr"], "one setattr for three calls");
    let joined = e.entries().pop().expect("an entry").1;
    match joined.op {
        Op::SetAttr { attrs, .. } => {
            assert_eq!((attrs.mtime, attrs.uid, attrs.mode), (Some(t(7)), Some(5), Some(0o600)), "later values join")
        }
        op => panic!("not a setattr: {op:?}"),
    }
    // a sent one is not joined
    send_all(&mut e);
    let l = e.setattr(&m, id, None, SetAttrs { gid: Some(9), ..Default::default() }, true, now(5));
    let _ = m.run(&mut e, l);
    assert_eq!(ops(&e), ["create", "setattr", "setattr"]);
}

#[test]
fn writes_are_sealed_in_pieces_of_at_most_max_data_before_a_rename() {
    let (mut m, mut e) = (Mem::new(), Engine::new(0, Options::default()));
    let id = file(&mut m, &mut e, "f");
    let len = MAX_DATA as u64 * 2 + 5;
    let l = e.wrote(&m, id, 0, len, now(1));
    let _ = m.run(&mut e, l);
    assert!(e.has_dirty(id));
    let l = e.rename(&m, ObjectId::ROOT, b"f", ObjectId::ROOT, b"g", RenameMode::Replace, now(2));
    let _ = m.run(&mut e, l);
    assert!(!e.has_dirty(id), "the rename sealed the writes");
    assert_eq!(ops(&e), ["create", "write", "write", "write", "rename"], "the bytes go before the new name");
    let lens: Vec<u64> = e.entries().iter().filter(|(_, x, _)| x.op.kind() == "write").map(|(_, x, _)| x.len).collect();
    assert_eq!(lens, [MAX_DATA as u64, MAX_DATA as u64, 5]);
}

#[test]
fn a_foreign_change_to_a_busy_object_waits_and_an_idle_one_lands() {
    let (mut m, mut e) = (Mem::new(), Engine::new(0, Options::default()));
    let id = file(&mut m, &mut e, "f");
    assert!(e.busy(id), "not echoed yet");
    let mut theirs = m.objs[&id].attr.clone();
    theirs.mode = 0o600;
    theirs.versions.meta = 3;
    let rec = |seq, attr: Attr| Record {
        seq,
        time: t(9),
        origin: Origin::Replica(ReplicaId(77), 1),
        op: Op::SetAttr { id, base: 0, attrs: SetAttrs { mode: Some(0o600), ..Default::default() } },
        attr: Some(attr),
        dirs: vec![],
        elided: 0,
    };
    let p = Engine::plan_record(&m, &rec(1, theirs.clone()), None).expect("plan");
    let b = e.apply_records(&m, vec![p], 1, now(3)).expect("apply");
    assert!(!b.edits.iter().any(|x| matches!(x, Edit::Put { .. })), "held back: the local state stays");
    assert!(!e.may_land(id), "no data lands on it either");
    // the echo of the create arrives: idle now, the held-back change is asked for
    let create = e.entries()[0].0;
    let echo = Record {
        seq: 2,
        time: t(9),
        origin: Origin::Replica(ReplicaId(77), create),
        op: e.entries()[0].1.op.clone(),
        attr: None,
        dirs: vec![],
        elided: 0,
    };
    let p = Engine::plan_record(&m, &echo, Some(create)).expect("plan");
    e.apply_records(&m, vec![p], 2, now(4)).expect("apply");
    assert!(!e.busy(id), "the echo released it");
    let (_, refresh) = e.housekeep();
    assert_eq!(refresh, [(id, true)], "the stale object is fetched whole once idle");
    let p = Engine::plan_record(&m, &rec(3, theirs), None).expect("plan");
    let b = e.apply_records(&m, vec![p], 3, now(5)).expect("apply");
    assert!(b.edits.iter().any(|x| matches!(x, Edit::Put { attr, .. } if attr.mode == 0o600)), "lands when idle");
}

#[test]
fn a_refusal_is_parked_and_the_replica_resyncs_once_settled() {
    let (mut m, mut e) = (Mem::new(), Engine::new(0, Options::default()));
    let id = file(&mut m, &mut e, "f");
    let l = e.setattr(&m, id, None, SetAttrs { mode: Some(0o600), ..Default::default() }, true, now(1));
    let _ = m.run(&mut e, l);
    let sent = send_all(&mut e);
    let refusal = OpError::conflict(ConflictKind::MetaMoved, None);
    let out = e.answered(sent[1].0, Err(refusal.clone()), now(2)).expect("queued");
    let (lsn, op, err, _) = out.park.expect("parked");
    assert_eq!((lsn, op.kind(), err), (sent[1].0, "setattr", refusal));
    assert!(!e.housekeep().0, "the create is still on the way: no resync yet");
    let out = e.answered(sent[0].0, applied(1), now(3)).expect("queued");
    assert!(out.park.is_none());
    assert!(e.housekeep().0, "settled: resync now");
    e.resynced(7);
    assert!(!e.housekeep().0, "once");
    assert_eq!(e.applied_seq(), 7);
}

/// Found by the simulation (a batch failing before its commit): a change
/// refused for now was queued again behind the changes sent after it, so
/// they were applied first, and a later one recorded a client seq past it:
/// its resend was answered "expired" and taken as applied. Now it keeps its
/// lsn, the sender goes back to it, and the server refuses what follows it
/// until it comes again (`izo_journal::Fences`).
#[test]
fn a_transient_refusal_sends_the_change_again_first_under_its_lsn() {
    let (mut m, mut e) = (Mem::new(), Engine::new(0, Options::default()));
    file(&mut m, &mut e, "f");
    file(&mut m, &mut e, "g");
    let sent = send_all(&mut e);
    assert_eq!(sent.len(), 2);
    let out = e.answered(sent[0].0, Err(OpError::Io("disk".into())), now(10)).expect("queued");
    assert_eq!(out.retry_in, Some(RETRY_PAUSE * 2));
    assert!(out.wake_sender && out.park.is_none() && out.now.is_empty());
    let lsns: Vec<u64> = e.entries().iter().map(|(l, _, _)| *l).collect();
    assert_eq!(lsns, [sent[0].0, sent[1].0], "same lsns, same order");
    // the second's answer (held behind it) changes nothing more
    let out = e.answered(sent[1].0, Err(OpError::Io("follows".into())), now(11)).expect("queued");
    assert_eq!(out.retry_in, None, "one pause for the run of refusals");
    assert!(matches!(e.next_to_send(true, now(12)), Next::Idle(_)), "paused");
    match e.next_to_send(true, now(10 + 200)) {
        Next::Send { lsn, was_sent, .. } => assert_eq!((lsn, was_sent), (sent[0].0, true), "the refused one first"),
        n => panic!("{n:?}"),
    }
    assert!(matches!(e.next_to_send(true, now(10 + 201)), Next::Send { lsn, .. } if lsn == sent[1].0));
    assert!(matches!(e.next_to_send(false, now(10_000)), Next::Idle(_)), "never while disconnected");
    // a sent change (refused for now) is never cancelled
    let l = e.remove(&m, ObjectId::ROOT, b"f", false, now(20));
    let _ = m.run(&mut e, l);
    assert!(e.entries().iter().any(|(l, _, _)| *l == sent[0].0), "the create stays and its unlink follows");
}

#[test]
fn a_change_whose_answer_is_lost_is_sent_again_in_order() {
    let (mut m, mut e) = (Mem::new(), Engine::new(0, Options::default()));
    file(&mut m, &mut e, "f");
    file(&mut m, &mut e, "g");
    let sent = send_all(&mut e);
    e.lost(sent[1].0);
    e.lost(sent[0].0);
    let again = send_all(&mut e);
    assert_eq!(again.iter().map(|(l, _)| *l).collect::<Vec<_>>(), [sent[0].0, sent[1].0]);
}

#[test]
fn an_echo_before_or_after_its_answer_releases_the_object_once() {
    let (mut m, mut e) = (Mem::new(), Engine::new(0, Options::default()));
    let id = file(&mut m, &mut e, "f");
    let (lsn, entry) = send_all(&mut e).remove(0);
    // answered at seq 4, the stream has applied 2: held until the record
    e.answered(lsn, applied(4), now(1)).expect("queued");
    assert!(e.busy(id), "its record is not seen yet");
    let b = e.apply_records(&m, vec![], 3, now(2)).expect("apply");
    assert!(e.busy(id));
    assert!(!b.edits.iter().any(|x| matches!(x, Edit::CmlDone(l) if *l == lsn)), "its entry stays until the echo");
    let echo = Record { seq: 4, time: t(9), origin: Origin::Local, op: entry.op, attr: None, dirs: vec![], elided: 0 };
    let p = Engine::plan_record(&m, &echo, None).expect("plan");
    let b = e.apply_records(&m, vec![p], 4, now(3)).expect("apply");
    assert!(!e.busy(id), "covered by the batch up to seq 4");
    assert!(b.edits.iter().any(|x| matches!(x, Edit::CmlDone(l) if *l == lsn)), "its entry goes with the echo");
}

/// Found by the simulation: an op answered, its log entry dropped with the
/// next commit or fold, then the daemon killed before its echo came. The
/// restarted engine no longer held the object, so someone else's record
/// the server had ordered before the echo (a directory made and removed
/// under the same name) took the name from it, and the echo, an own
/// record, brought nothing back: the replica lost its symlink. The entry
/// now stays in the log until the echo lands, so a start holds the object
/// again.
#[test]
fn an_answered_op_holds_its_objects_across_a_restart_until_its_echo() {
    let me = ReplicaId(5);
    let (mut m, mut e) = (Mem::new(), Engine::new(0, Options::default()));
    // the log as the cache keeps it: entries logged, minus those done
    let mut log: BTreeMap<u64, CmlEntry> = BTreeMap::new();
    let mut keep = |edits: &[Edit]| {
        for x in edits {
            match x {
                Edit::Cml(l, en) => {
                    log.insert(*l, en.clone());
                }
                Edit::CmlDone(l) => {
                    log.remove(l);
                }
                _ => {}
            }
        }
    };
    let id = ObjectId::new();
    let mk = Make {
        parent: ObjectId::ROOT,
        name: b"n2",
        kind: FileKind::Symlink,
        mode: 0o777,
        uid: 0,
        gid: 0,
        target: Some(b"t"),
        rdev: 0,
        trusted: Some(true),
    };
    let l = e.make(&m, mk, id, now(0));
    keep(&m.run(&mut e, l).edits);
    let (lsn, _) = send_all(&mut e).remove(0);
    // answered at seq 3: someone else's mkdir and rmdir of "n2" came first
    let out = e.answered(lsn, applied(3), now(1)).expect("queued");
    keep(&out.now);
    keep(&e.fold_edits(&m).expect("fold"));
    assert!(e.durable_mark() < lsn, "its reply must stay on the server until the echo");
    // the daemon is killed; a start reloads what the log holds
    let mut e = Engine::new(0, Options::default());
    let entries: Vec<(u64, CmlEntry)> = log.clone().into_iter().collect();
    let _ = e.recover(&m, entries, Default::default(), vec![], lsn + 1, Logged { through: lsn, gaps: vec![] });
    assert!(e.busy(id), "its echo is still to come");
    let theirs = ObjectId::new();
    let dir_attr = Attr { id: theirs, kind: FileKind::Dir, nlink: 2, ..m.objs[&ObjectId::ROOT].attr.clone() };
    let mkdir = Record {
        seq: 1,
        time: t(9),
        origin: Origin::Replica(ReplicaId(77), 1),
        op: Op::Mkdir { parent: ObjectId::ROOT, name: b"n2".to_vec(), id: theirs, mode: 0o755, uid: 0, gid: 0 },
        attr: Some(dir_attr),
        dirs: vec![],
        elided: 0,
    };
    let p = Engine::plan_record(&m, &mkdir, e.own(&mkdir, me)).expect("plan");
    let b = e.apply_records(&m, vec![p], 1, now(2)).expect("apply");
    m.apply(&b.edits);
    assert_eq!(m.lookup(ObjectId::ROOT, b"n2").expect("lookup"), Some(id), "the local symlink keeps its name");
}

#[test]
fn a_waited_op_is_withdrawn_only_while_unsent() {
    let (mut m, mut e) = (Mem::new(), Engine::new(0, Options::default()));
    let id = file(&mut m, &mut e, "f");
    let op = Op::SetXattr { id, base: 0, name: b"user.a".to_vec(), value: b"1".to_vec() };
    let l = e.queue_wait(&m, op.clone(), now(1));
    let l = m.run(&mut e, l);
    assert_eq!(e.withdraw(l.queued[0]), Withdraw::Withdrawn);
    assert_eq!(ops(&e), ["create"]);
    let l = e.queue_wait(&m, op, now(2));
    let l = m.run(&mut e, l);
    send_all(&mut e);
    assert_eq!(e.withdraw(l.queued[0]), Withdraw::Sent, "sent: it will be applied");
    // a refusal of a waited op goes to the caller, not to the parked list
    let l = e.queue_wait(&m, Op::RemoveXattr { id, base: 0, name: b"user.b".to_vec() }, now(3));
    let l = m.run(&mut e, l);
    send_all(&mut e);
    let out = e.answered(l.queued[0], Err(OpError::NotFound("user.b".into())), now(4)).expect("queued");
    assert!(out.park.is_none());
    assert!(matches!(out.wake, Some(Err(OpError::NotFound(_)))));
}

#[test]
fn a_directory_never_moves_below_itself() {
    let (mut m, mut e) = (Mem::new(), Engine::new(0, Options::default()));
    let a = dir(&mut m, &mut e, ObjectId::ROOT, "a");
    let b = dir(&mut m, &mut e, a, "b");
    let r = e.rename(&m, ObjectId::ROOT, b"a", b, b"a", RenameMode::Replace, now(1));
    assert!(matches!(r, Err(ReplicaError::Invalid(_))), "{r:?}");
    assert_eq!(ops(&e), ["mkdir", "mkdir"], "nothing queued");
}

#[test]
fn an_entry_reloaded_at_start_counts_as_sent() {
    let m = Mem::new();
    let mut e = Engine::new(0, Options::default());
    let id = ObjectId::new();
    let create = CmlEntry {
        op: Op::Create { parent: ObjectId::ROOT, name: b"f".to_vec(), id, mode: 0o644, uid: 0, gid: 0 },
        len: 0,
        time: None,
    };
    let mut dirty = crate::cache::DirtyRanges::new();
    dirty.insert(id, vec![(0, 3)]);
    let edits = e.recover(&m, vec![(4, create)], dirty, vec![], 9, Logged { through: 3, gaps: vec![] });
    assert!(edits.iter().any(|x| matches!(x, Edit::Cml(_, c) if c.op.kind() == "write")), "unsealed writes sealed");
    assert_eq!(e.entries()[0], (4, e.entries()[0].1.clone(), true), "counted as sent");
    assert!(e.entries()[1].0 >= 9, "new ops number after the floor");
    assert!(e.cancellable(id).is_none(), "never cancelled");
}

/// Found by the simulation (seed 193): a foreign name held back because a
/// local change holds it, whose local change is then cancelled, came back
/// only with a resync; without one the replica never had it.
#[test]
fn a_foreign_name_held_back_by_a_cancelled_local_change_comes_back_by_resync() {
    let (mut m, mut e) = (Mem::new(), Engine::new(0, Options::default()));
    let mine = file(&mut m, &mut e, "n2");
    let theirs = ObjectId::new();
    let attr = Attr { id: theirs, kind: FileKind::Symlink, nlink: 1, ..m.objs[&mine].attr.clone() };
    let rec = Record {
        seq: 1,
        time: t(9),
        origin: Origin::Replica(ReplicaId(77), 1),
        op: Op::Symlink {
            parent: ObjectId::ROOT,
            name: b"n2".to_vec(),
            id: theirs,
            target: b"t".to_vec(),
            uid: 0,
            gid: 0,
        },
        attr: Some(attr),
        dirs: vec![],
        elided: 0,
    };
    let p = Engine::plan_record(&m, &rec, None).expect("plan");
    let b = e.apply_records(&m, vec![p], 1, now(2)).expect("apply");
    m.apply(&b.edits);
    assert_eq!(m.lookup(ObjectId::ROOT, b"n2").expect("lookup"), Some(mine), "the local name stays");
    let l = e.remove(&m, ObjectId::ROOT, b"n2", false, now(3));
    let _ = m.run(&mut e, l);
    assert_eq!(e.queued(), 0, "the create is cancelled: nothing will be refused");
    assert!(e.housekeep().0, "settled: a resync brings the server's name back");
}

/// Found by the simulation (seed 16): a mkdir applied by the server whose
/// local effect a power loss took came back as this replica's own record,
/// and an own record's namespace edits are skipped: the replica never had
/// the directory. A record of this replica the engine does not hold is now
/// someone else's.
#[test]
fn an_own_record_whose_local_effect_was_lost_lands_as_someone_elses() {
    let me = ReplicaId(5);
    let (m, e) = (Mem::new(), Engine::new(0, Options::default()));
    let id = ObjectId::new();
    let mut attr = m.objs[&ObjectId::ROOT].attr.clone();
    attr.id = id;
    let rec = Record {
        seq: 1,
        time: t(9),
        origin: Origin::Replica(me, 1),
        op: Op::Mkdir { parent: ObjectId::ROOT, name: b"d".to_vec(), id, mode: 0o755, uid: 0, gid: 0 },
        attr: Some(attr),
        dirs: vec![],
        elided: 0,
    };
    assert_eq!(e.own(&rec, me), None, "lsn 1 is not held here (the restarted engine never queued it)");
    let p = Engine::plan_record(&m, &rec, e.own(&rec, me)).expect("plan");
    assert!(p.edits.iter().any(|x| matches!(x, Edit::Link { name, .. } if name == b"d")), "the name lands");
    // an op the engine holds is its echo
    let (mut m, mut e) = (Mem::new(), Engine::new(0, Options::default()));
    dir(&mut m, &mut e, ObjectId::ROOT, "d");
    let lsn = e.entries()[0].0;
    let echo = Record { origin: Origin::Replica(me, lsn), ..rec.clone() };
    assert_eq!(e.own(&echo, me), Some(lsn));
    // found by the simulation too (seed 347): after a kill, an op answered
    // before it (so no longer queued) but logged is still this replica's
    // own: its record must not land a second name for a directory renamed
    // since
    let mut e = Engine::new(0, Options::default());
    let _ = e.recover(&m, vec![], Default::default(), vec![], 3, Logged { through: 2, gaps: vec![] });
    assert_eq!(e.own(&rec, me), Some(1), "logged before the restart: its effect is in the cache");
    let later = Record { origin: Origin::Replica(me, 3), ..rec };
    assert_eq!(e.own(&later, me), None, "past what the cache logged");
}

/// Found by the simulation: a foreign new name for an object this replica
/// is changing may be removed on the server by this replica's own change
/// (whose echo changes nothing here): the name lands, and once settled a
/// resync says which names are left.
#[test]
fn a_foreign_name_for_a_busy_object_lands_and_a_resync_follows() {
    let (mut m, mut e) = (Mem::new(), Engine::new(0, Options::default()));
    let id = file(&mut m, &mut e, "f");
    let rec = Record {
        seq: 1,
        time: t(9),
        origin: Origin::Replica(ReplicaId(77), 1),
        op: Op::Link { id, parent: ObjectId::ROOT, name: b"g".to_vec() },
        attr: None,
        dirs: vec![],
        elided: 0,
    };
    let p = Engine::plan_record(&m, &rec, None).expect("plan");
    let b = e.apply_records(&m, vec![p], 1, now(2)).expect("apply");
    assert!(b.edits.iter().any(|x| matches!(x, Edit::Link { name, .. } if name == b"g")), "the name lands");
    let create = e.entries()[0].0;
    e.answered(create, applied(2), now(3)).expect("queued");
    let echo = Record { seq: 2, origin: Origin::Replica(ReplicaId(5), create), ..rec };
    let p = Engine::plan_record(&m, &echo, Some(create)).expect("plan");
    e.apply_records(&m, vec![p], 2, now(4)).expect("apply");
    assert!(e.housekeep().0, "settled: a resync");
}

/// A refusal for now that the server recorded (no space) is queued again
/// as a new change after the others: the server answers its resend the
/// same.
#[test]
fn a_recorded_refusal_for_now_is_queued_again_as_a_new_change() {
    let (mut m, mut e) = (Mem::new(), Engine::new(0, Options::default()));
    file(&mut m, &mut e, "f");
    let first = send_all(&mut e)[0].0;
    file(&mut m, &mut e, "g");
    let out = e.answered(first, Err(OpError::NoSpace("full".into())), now(10)).expect("queued");
    assert_eq!(out.retry_in, Some(RETRY_PAUSE * 2));
    assert!(out.now.iter().any(|x| matches!(x, Edit::Cml(l, _) if *l > first)), "a new lsn, logged now");
    let lsns: Vec<u64> = e.entries().iter().map(|(l, _, _)| *l).collect();
    assert!(lsns.len() == 2 && lsns[1] > lsns[0] && lsns[0] > first, "behind the others: {lsns:?}");
}

/// The engine does no I/O and reads no clock: its sources name none of
/// what would let it.
#[test]
fn an_append_is_queued_at_once_with_its_bytes_behind_the_files_unsealed_writes() {
    let (mut m, mut e) = (Mem::new(), Engine::new(0, Options::default()));
    let id = file(&mut m, &mut e, "log");
    let l = e.wrote(&m, id, 0, 5, now(1));
    let _ = m.run(&mut e, l);
    // offline: nothing is sent, the append is made here all the same
    assert_eq!(e.next_to_send(false, now(2)), Next::Idle(Duration::from_millis(50)));
    let l = e.append(&m, id, 5, b"xy\n".to_vec(), now(2));
    let _ = m.run(&mut e, l);
    assert_eq!(m.objs[&id].attr.size, 8, "at the local end of file at once");
    assert_eq!(ops(&e), ["create", "write", "append"], "the unsealed write goes first");
    let (_, entry, _) = e.entries().pop().expect("the append");
    assert_eq!(entry.op, Op::Append { id, base: 0, local_offset: 5, data: b"xy\n".to_vec() });
    assert_eq!(entry.len, 3, "its bytes count in the backlog");
    assert_eq!(e.backlog(), (3, 8));
    // another replica appended meanwhile: held back while this one's append
    // is on the way, then the file is taken whole from the server
    send_all(&mut e);
    let theirs = Record {
        seq: 1,
        time: t(9),
        origin: Origin::Replica(ReplicaId(77), 1),
        op: Op::Write { id, base: 0, offset: 0, data: b"theirs\n".to_vec() },
        attr: Some(Attr { size: 7, ..m.objs[&id].attr.clone() }),
        dirs: vec![],
        elided: 0,
    };
    let p = Engine::plan_record(&m, &theirs, None).expect("plan");
    let b = e.apply_records(&m, vec![p], 1, now(3)).expect("apply");
    assert!(b.edits.iter().all(|x| !matches!(x, Edit::Put { .. })), "held back");
    for (n, (lsn, entry, _)) in e.entries().into_iter().enumerate() {
        let echo = Record {
            seq: 2 + n as u64,
            time: t(9),
            origin: Origin::Replica(ReplicaId(5), lsn),
            op: entry.op,
            attr: None,
            dirs: vec![],
            elided: 0,
        };
        let p = Engine::plan_record(&m, &echo, Some(lsn)).expect("plan");
        e.apply_records(&m, vec![p], 2 + n as u64, now(4)).expect("apply");
    }
    assert!(!e.busy(id));
    assert_eq!(e.housekeep().1, [(id, true)], "fetched whole once idle: the server's layout wins");
}

#[test]
fn xattrs_are_set_here_at_once_and_refused_as_the_server_would() {
    let (mut m, mut e) = (Mem::new(), Engine::new(0, Options::default()));
    let id = file(&mut m, &mut e, "f");
    let rules = VolumeRules { max_file_size: 1 << 20, xattr_room: 100, trusted: false, owners: 0 };
    let l = e.set_xattr(&m, id, b"user.k", Some(b"v"), Some(&rules), now(1));
    let _ = m.run(&mut e, l);
    assert_eq!(m.objs[&id].xattrs, [(b"user.k".to_vec(), b"v".to_vec())], "in the cache at once");
    assert_eq!(ops(&e), ["create", "setxattr"]);
    let refused = |r: R<Local>| r.map(|_| ()).expect_err("refused");
    assert!(matches!(
        refused(e.set_xattr(&m, id, b"trusted.x", Some(b"v"), Some(&rules), now(2))),
        ReplicaError::Unsupported
    ));
    assert!(matches!(
        refused(e.set_xattr(&m, id, b"user.big", Some(&[0u8; 80]), Some(&rules), now(2))),
        ReplicaError::NoSpace(_)
    ));
    assert!(matches!(refused(e.set_xattr(&m, id, b"user.none", None, Some(&rules), now(2))), ReplicaError::NotFound));
    // before any rules came, a trusted name is the server's to decide
    let l = e.set_xattr(&m, id, b"trusted.x", Some(b"v"), None, now(3));
    let _ = m.run(&mut e, l);
    let l = e.set_xattr(&m, id, b"user.k", None, Some(&rules), now(4));
    let _ = m.run(&mut e, l);
    assert_eq!(m.objs[&id].xattrs, [(b"trusted.x".to_vec(), b"v".to_vec())]);
    assert_eq!(ops(&e), ["create", "setxattr", "setxattr", "removexattr"]);
    assert!(matches!(Engine::size_allowed(2 << 20, Some(&rules)), Err(ReplicaError::FileTooBig(_))));
    assert!(Engine::size_allowed(2 << 20, None).is_ok());
}

#[test]
fn a_create_the_server_made_first_lands_once() {
    let (mut m, mut e) = (Mem::new(), Engine::new(0, Options::default()));
    let id = ObjectId::new();
    let mk = || Make {
        parent: ObjectId::ROOT,
        name: b"index.lock",
        kind: FileKind::File,
        mode: 0o644,
        uid: 0,
        gid: 0,
        target: None,
        rdev: 0,
        trusted: None,
    };
    let l = e.made_remotely(&m, mk(), id, None, now(1)).expect("plan").expect("not there yet");
    assert!(l.queued.is_empty(), "the server has it: nothing to send");
    let _ = m.run(&mut e, Ok(l));
    assert_eq!(m.dents.get(&(ObjectId::ROOT, b"index.lock".to_vec())), Some(&id));
    assert!(e.made_remotely(&m, mk(), id, None, now(2)).expect("plan").is_none(), "its record came first");
}

/// Found by the simulation: a write's bytes are read from the data file
/// when it is sent, so a run may send bytes of a later write that a power
/// loss then takes from the cache; the resend is answered from the reply
/// cache and the echo, an own record, brings nothing. A write reloaded at a
/// start takes the file from the server whole once the file is idle.
#[test]
fn a_write_reloaded_at_start_takes_the_file_from_the_server_once_idle() {
    let me = ReplicaId(5);
    let echo = |seq, lsn, op| Record {
        seq,
        time: t(9),
        origin: Origin::Replica(me, lsn),
        op,
        attr: None,
        dirs: vec![],
        elided: 0,
    };
    let (mut m, mut e) = (Mem::new(), Engine::new(0, Options::default()));
    let id = file(&mut m, &mut e, "f");
    let l = e.wrote(&m, id, 2, 39, now(1));
    let _ = m.run(&mut e, l);
    let l = e.seal(&m, id, now(1)).transpose().expect("unsealed writes");
    let _ = m.run(&mut e, l);
    // in the run that made them: sent, answered and echoed, nothing to ask
    let sent = send_all(&mut e);
    assert_eq!(sent.iter().map(|(_, x)| x.op.kind()).collect::<Vec<_>>(), ["create", "write"]);
    let mut planned = Vec::new();
    for (seq, (lsn, entry)) in (1..).zip(sent.clone()) {
        e.answered(lsn, applied(seq), now(2)).expect("queued");
        let r = echo(seq, lsn, entry.op);
        planned.push(Engine::plan_record(&m, &r, e.own(&r, me)).expect("plan"));
    }
    e.apply_records(&m, planned, 2, now(3)).expect("apply");
    assert!(!e.busy(id));
    assert!(e.housekeep().1.is_empty(), "the bytes sent are the ones this cache holds");
    // the same two entries reloaded at a start (a power loss after a fold)
    let mut e = Engine::new(0, Options::default());
    let _ = e.recover(&m, sent.clone(), Default::default(), vec![], 3, Logged { through: 2, gaps: vec![] });
    let again = send_all(&mut e);
    assert_eq!(again.len(), 2, "both sent again");
    let (create, write) = (&again[0], &again[1]);
    e.answered(create.0, applied(1), now(2)).expect("queued");
    e.answered(write.0, applied(2), now(2)).expect("queued");
    let r = echo(1, create.0, create.1.op.clone());
    let p = Engine::plan_record(&m, &r, e.own(&r, me)).expect("plan");
    assert!(p.data.is_empty(), "an own record lands no bytes");
    e.apply_records(&m, vec![p], 1, now(3)).expect("apply");
    assert!(e.busy(id), "its write is not echoed yet");
    assert!(e.housekeep().1.is_empty(), "nothing asked while the file is busy");
    let r = echo(2, write.0, write.1.op.clone());
    let p = Engine::plan_record(&m, &r, e.own(&r, me)).expect("plan");
    e.apply_records(&m, vec![p], 2, now(4)).expect("apply");
    assert!(!e.busy(id));
    assert_eq!(e.housekeep().1, [(id, true)], "idle: the file whole from the server");
}

#[test]
fn an_offline_start_never_reuses_an_lsn_and_after_a_gap_drops_only_what_the_server_applied() {
    let (mut m, mut e) = (Mem::new(), Engine::new(0, Options::default()));
    // a start without the server: the cache logged through 10; 9 and 10
    // are still queued (sent before the start)
    let entry = |n: &str| CmlEntry {
        op: Op::Create {
            parent: ObjectId::ROOT,
            name: n.as_bytes().to_vec(),
            id: ObjectId::new(),
            mode: 0o644,
            uid: 0,
            gid: 0,
        },
        len: 0,
        time: None,
    };
    let queued = vec![(9, entry("nine")), (10, entry("ten"))];
    let _ = e.recover(&m, queued, Default::default(), vec![], 1, Logged { through: 10, gaps: vec![] });
    assert_eq!(e.next_lsn(), 11, "never an lsn this cache logged before");
    let ids: Vec<ObjectId> = ["a", "b"].iter().map(|n| file(&mut m, &mut e, n)).collect();
    let lsns = |e: &Engine| e.entries().iter().map(|(l, _, _)| *l).collect::<Vec<_>>();
    assert_eq!(lsns(&e), [9, 10, 11, 12]);
    // the server applied through 12 (9 of them, and 11, 12 of an earlier
    // copy of this cache): 9 and 10 were applied (sent before), the ones
    // made since stay, as never sent
    let edits = e.after_gap(10, 12);
    assert_eq!(lsns(&e), [11, 12]);
    assert!(
        edits.iter().any(|x| matches!(x, Edit::CmlDone(9))) && edits.iter().any(|x| matches!(x, Edit::CmlDone(10)))
    );
    let made: Vec<ObjectId> = e.entries().iter().filter_map(|(_, x, _)| x.op.new_object()).collect();
    assert_eq!(made, ids);
    assert!(e.entries().iter().all(|(_, _, sent)| !sent));
    let sent: Vec<u64> = send_all(&mut e).iter().map(|(l, _)| *l).collect();
    assert_eq!(sent, [11, 12], "sent again from the first, in order");
    // a gap below entries sent before: those the server did not reach stay
    let mut e = Engine::new(0, Options::default());
    let queued = vec![(9, entry("nine")), (10, entry("ten"))];
    let _ = e.recover(&m, queued, Default::default(), vec![], 1, Logged { through: 10, gaps: vec![] });
    let _ = e.after_gap(10, 9);
    assert_eq!(lsns(&e), [10]);
}

#[test]
fn the_engine_names_no_io_clock_or_lock() {
    let sources = [
        ("mod.rs", include_str!("mod.rs")),
        ("cml.rs", include_str!("cml.rs")),
        ("local.rs", include_str!("local.rs")),
        ("stream.rs", include_str!("stream.rs")),
    ];
    let banned = [
        "std::fs",
        "std::net",
        "std::thread",
        "tokio",
        "redb",
        "fuser",
        "Instant::now",
        "SystemTime::now",
        "Timestamp::now",
        "Mutex",
    ];
    for (file, src) in sources {
        for word in banned {
            assert!(!src.contains(word), "engine/{file} names {word}");
        }
    }
}

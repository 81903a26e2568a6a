//! The cache crashed at random points, in both crash models, then reopened
//! and replayed: it must come back at a state it was in.
//!
//! Each schedule drives a cache on [`MemStorage`] with random changes
//! (`local` edits, data-file writes with their `log_dirty`, writer opens,
//! seals, folds), arms a crash at a random storage step (so it can fall
//! inside any call, between the steps of a fold too), reopens a cache on
//! what is left and replays its log, then goes on. The reference is the
//! state the running cache showed after each call that returned:
//!
//! - after a kill it must be the state after the last returned call (or
//!   after the interrupted one, which may have been logged);
//! - after a power loss, the state after some call at or after the last
//!   fold that returned;
//! - always: every file's data file holds at least its size, every dirty
//!   range is inside its data file, inode numbers are unique and below the
//!   counter.
//!
//! `IZO_STORAGE_SEED=N` replays one schedule; `IZO_STORAGE_SCHEDULES=N`
//! runs more (default 100 per crash model).

use izo_client::cache::{Cache, CacheError, Cached, CmlEntry, DirtyRanges, Edit, Parked};
use izo_client::storage::{Crash, MemStorage};
use izo_proto::{Attr, FileKind, ObjectId, Op, OpError, Timestamp, Versions};
use std::collections::{BTreeMap, BTreeSet};

/// splitmix64: one seeded generator for the whole harness.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.below(from.len() as u64) as usize]
    }
}

const FILES: [ObjectId; 4] = [ObjectId(100), ObjectId(101), ObjectId(102), ObjectId(103)];
const DIRS: [ObjectId; 2] = [ObjectId(200), ObjectId(201)];
const NAMES: [&[u8]; 3] = [b"a", b"b", b"c"];

fn attr(id: ObjectId, kind: FileKind, size: u64, secs: i64) -> Attr {
    let t = Timestamp { secs, nsec: 0 };
    Attr {
        id,
        kind,
        mode: 0o644,
        uid: 0,
        gid: 0,
        size,
        mtime: t,
        atime: t,
        nlink: 1,
        versions: Versions { data: 0, meta: 0 },
        rdev: 0,
    }
}

/// What the cache shows (orphans left out: a start drops those that were
/// folded, and keeps until the next one those that were only logged).
#[derive(Clone, Debug, PartialEq)]
struct Snap {
    objs: BTreeMap<ObjectId, Cached>,
    dents: BTreeMap<(ObjectId, Vec<u8>), ObjectId>,
    parents: BTreeMap<ObjectId, Option<ObjectId>>,
    cml: Vec<(u64, CmlEntry)>,
    parked: Vec<(u64, String)>,
    meta: Vec<u64>,
    dirty: DirtyRanges,
    writers: Vec<(ObjectId, u32)>,
    data: BTreeMap<ObjectId, Vec<u8>>,
}

fn parked_text(p: &Parked) -> String {
    format!("{p:?}")
}

fn snap(c: &Cache) -> Result<Snap, CacheError> {
    let mut objs = BTreeMap::new();
    for id in c.ids()? {
        if let Some(o) = c.get(id)? {
            if o.attr.nlink > 0 {
                objs.insert(id, o);
            }
        }
    }
    let mut dents = BTreeMap::new();
    let mut parents = BTreeMap::new();
    for dir in std::iter::once(ObjectId::ROOT).chain(DIRS) {
        for (name, id) in c.children(dir)? {
            dents.insert((dir, name), id);
        }
        parents.insert(dir, c.parent_of(dir)?);
    }
    let mut data = BTreeMap::new();
    for (id, o) in &objs {
        if o.attr.kind == FileKind::File {
            if let Some(len) = c.data_len(*id)? {
                let mut buf = vec![0u8; len as usize];
                let n = c.data_read_at(*id, 0, &mut buf)?;
                buf.truncate(n);
                data.insert(*id, buf);
            }
        }
    }
    Ok(Snap {
        objs,
        dents,
        parents,
        cml: c.cml()?,
        parked: c.parked()?.iter().map(|(l, p)| (*l, parked_text(p))).collect(),
        meta: vec![c.meta("seq")?, c.meta("k1")?, c.meta("k2")?],
        dirty: c.dirty(),
        writers: c.open_writers(),
        data,
    })
}

/// Invariants of any state a cache comes back in.
fn check_sound(c: &Cache, s: &Snap) -> Result<(), String> {
    let mut inos = BTreeSet::new();
    let next = c.meta("next_ino").map_err(|e| e.to_string())?;
    for (id, o) in &s.objs {
        if !inos.insert(o.ino) {
            return Err(format!("inode number {} is given twice (again to {id})", o.ino));
        }
        if *id != ObjectId::ROOT && o.ino >= next {
            return Err(format!("{id} has inode number {} but the counter is at {next}", o.ino));
        }
        if o.attr.kind == FileKind::File {
            let len = s.data.get(id).map_or(0, |d| d.len() as u64);
            if len < o.attr.size {
                return Err(format!("{id}: size {} but its data file holds {len} bytes", o.attr.size));
            }
        }
    }
    // (a range past the size is cut by a truncate that follows it)
    for (id, ranges) in &s.dirty {
        let len = s.data.get(id).map_or(0, |d| d.len() as u64);
        let size = s.objs.get(id).map_or(0, |o| o.attr.size);
        for (off, n) in ranges {
            if (off + n).min(size) > len {
                return Err(format!("{id}: dirty range {off}+{n} but its data file holds {len} bytes"));
            }
        }
    }
    Ok(())
}

/// What differs between two states, by field.
fn diff(a: &Snap, b: &Snap) -> String {
    let mut out = Vec::new();
    macro_rules! f {
        ($($n:ident),*) => {$(
            if a.$n != b.$n { out.push(format!("{}: {:?}\n   vs {:?}", stringify!($n), a.$n, b.$n)); }
        )*};
    }
    f!(objs, dents, parents, cml, parked, meta, dirty, writers, data);
    out.join("\n")
}

/// The workload's knowledge of the cache, read back from it.
struct World {
    /// Ids that were forgotten: never brought back (a start drops orphans).
    retired: BTreeSet<ObjectId>,
    next_lsn: u64,
    clock: i64,
}

fn kind_of(id: ObjectId) -> FileKind {
    if DIRS.contains(&id) {
        FileKind::Dir
    } else {
        FileKind::File
    }
}

/// One call on the cache, chosen from what it holds now.
fn step(c: &Cache, w: &mut World, rng: &mut Rng) -> Result<String, CacheError> {
    w.clock += 1;
    let live: Vec<ObjectId> =
        c.ids()?.into_iter().filter(|id| !w.retired.contains(id) && *id != ObjectId::ROOT).collect();
    let files: Vec<ObjectId> = live.iter().copied().filter(|id| kind_of(*id) == FileKind::File).collect();
    let size = |id: ObjectId| -> Result<u64, CacheError> { Ok(c.get(id)?.map_or(0, |o| o.attr.size)) };
    match rng.below(100) {
        0..=29 => {
            // (a removal ends a batch: the entries the batch makes lead
            // to objects that exist, as the client's own changes do)
            let mut edits = Vec::new();
            for _ in 0..=rng.below(3) {
                let e = edit(c, w, rng, &live)?;
                let ends = matches!(e, Edit::Forget { .. } | Edit::Purge { .. });
                edits.push(e);
                if ends {
                    break;
                }
            }
            c.local(&edits)?;
            Ok(format!("local {edits:?}"))
        }
        30..=44 if !files.is_empty() => {
            let id = rng.pick(&files);
            let off = rng.below(3 * 4096);
            let len = 1 + rng.below(5000);
            let byte = (w.clock % 251) as u8 + 1;
            c.data_write_at(id, off, &vec![byte; len as usize])?;
            Ok(format!("data_write_at {id} {off}+{len}"))
        }
        45..=54 if !files.is_empty() => {
            // the rest of a write: its range, then its size
            let id = rng.pick(&files);
            let len = c.data_len(id)?.unwrap_or(0);
            if len == 0 {
                return Ok("nothing to claim".into());
            }
            let off = rng.below(len);
            let n = 1 + rng.below(len - off);
            if rng.chance(50) {
                c.log_dirty(id, off, n)?;
                Ok(format!("log_dirty {id} {off}+{n}"))
            } else {
                let mut a = attr(id, FileKind::File, size(id)?.max(off + n), w.clock);
                a.versions.meta = w.clock as u64;
                c.local(&[Edit::attr(a)])?;
                Ok(format!("size {id} {}", off + n))
            }
        }
        55..=59 if !files.is_empty() => {
            let id = rng.pick(&files);
            let at = rng.below(4 * 4096);
            match rng.below(3) {
                0 => {
                    // (shorter: the size first, so no state claims bytes the
                    // file lost; longer: the file first)
                    if at < size(id)? {
                        c.local(&[Edit::attr(attr(id, FileKind::File, at, w.clock))])?;
                        return Ok(format!("size {id} {at} (before a truncate)"));
                    }
                    c.data_set_len(id, at)?;
                    Ok(format!("truncate {id} {at}"))
                }
                1 => {
                    c.data_punch(id, at, 1 + rng.below(8192))?;
                    Ok(format!("punch {id} {at}"))
                }
                _ => {
                    c.data_allocate(id, at, 1 + rng.below(8192))?;
                    Ok(format!("allocate {id} {at}"))
                }
            }
        }
        60..=69 if !files.is_empty() => {
            let id = rng.pick(&files);
            let open = c.open_writers().iter().any(|(i, _)| *i == id) && rng.chance(50);
            c.log_writer(id, !open)?;
            Ok(format!("log_writer {id} {}", !open))
        }
        70..=79 => {
            let dirty = c.dirty();
            let Some((&id, ranges)) = dirty.iter().nth(rng.below(dirty.len() as u64 + 1) as usize) else {
                return Ok("nothing to seal".into());
            };
            let mut edits = Vec::new();
            for (off, len) in ranges {
                let op = Op::Write { id, base: 0, offset: *off, data: Vec::new() };
                edits.push(Edit::Cml(w.next_lsn, CmlEntry { op, len: *len, time: None }));
                w.next_lsn += 1;
            }
            edits.push(Edit::Sealed { id });
            c.local(&edits)?;
            Ok(format!("seal {id}"))
        }
        _ => {
            c.fold()?;
            Ok("fold".into())
        }
    }
}

/// One edit that keeps the namespace plausible.
fn edit(c: &Cache, w: &mut World, rng: &mut Rng, live: &[ObjectId]) -> Result<Edit, CacheError> {
    let all: Vec<ObjectId> = FILES.iter().chain(&DIRS).copied().filter(|id| !w.retired.contains(id)).collect();
    let dir = if rng.chance(50) { ObjectId::ROOT } else { rng.pick(&DIRS) };
    let name = rng.pick(&NAMES).to_vec();
    let cml: Vec<u64> = c.cml()?.into_iter().map(|(l, _)| l).collect();
    Ok(match rng.below(14) {
        0..=2 if !all.is_empty() => {
            let id = rng.pick(&all);
            let size = c.get(id)?.map_or(0, |o| o.attr.size);
            let xattrs = rng.chance(20).then(|| vec![(b"user.x".to_vec(), vec![w.clock as u8])]);
            Edit::Put { attr: attr(id, kind_of(id), size, w.clock), target: None, xattrs }
        }
        3..=4 if !live.is_empty() => Edit::Link { parent: dir, name, id: rng.pick(live) },
        5 => Edit::Unlink { parent: dir, name },
        6 if !live.is_empty() => Edit::UnlinkIf { parent: dir, name, id: rng.pick(live) },
        7 if !live.is_empty() => {
            let id = rng.pick(live);
            if rng.chance(50) {
                Edit::Ctime { id, time: Timestamp { secs: w.clock, nsec: 7 } }
            } else {
                Edit::Versions { id, versions: Versions { data: w.clock as u64, meta: w.clock as u64 } }
            }
        }
        8 if !live.is_empty() => {
            let id = rng.pick(live);
            if rng.chance(50) {
                w.retired.insert(id);
                Edit::Forget { id }
            } else {
                Edit::Purge { id }
            }
        }
        9 => {
            let id = rng.pick(&FILES);
            let op = Op::Truncate { id, base: 0, size: 0 };
            w.next_lsn += 1;
            Edit::Cml(w.next_lsn - 1, CmlEntry { op, len: 0, time: Some(Timestamp { secs: w.clock, nsec: 0 }) })
        }
        10 if !cml.is_empty() => {
            let lsn = rng.pick(&cml);
            if rng.chance(70) {
                Edit::CmlDone(lsn)
            } else {
                let op = Op::Truncate { id: rng.pick(&FILES), base: 0, size: 0 };
                Edit::Park(lsn, Parked { op, error: OpError::Invalid("refused".into()), kept: None })
            }
        }
        11 => Edit::Meta(if rng.chance(50) { "k1" } else { "k2" }.into(), w.clock as u64),
        12 => Edit::Seq(w.clock as u64),
        13 if rng.chance(10) => Edit::ClearEntries,
        _ => Edit::Seq(w.clock as u64),
    })
}

fn world_of(c: &Cache, retired: BTreeSet<ObjectId>, clock: i64) -> Result<World, CacheError> {
    let last = c.cml()?.last().map(|(l, _)| *l).max(c.parked()?.last().map(|(l, _)| *l));
    Ok(World { retired, next_lsn: last.map_or(1, |l| l + 1), clock })
}

/// Open a cache on what `store` holds and replay its log, a crash
/// sometimes falling inside that too (then again).
fn reopen(store: &MemStorage, how: Crash, rng: &mut Rng) -> Result<(Cache, MemStorage), String> {
    for _ in 0..4 {
        let ctl = store.clone();
        // (a kill inside a recovery, then another recovery, can trip an
        // assertion in redb's allocator: IZO_STORAGE_KILL_IN_RECOVERY=1
        // turns it on; see docs/design.md)
        let inside = how == Crash::PowerLoss || std::env::var("IZO_STORAGE_KILL_IN_RECOVERY").is_ok();
        if inside && rng.chance(30) {
            ctl.crash_after(rng.below(40), how);
        }
        let opened = Cache::open_on(ctl.clone()).and_then(|c| c.replay_log().map(|_| c));
        match opened {
            Ok(c) if !ctl.is_fenced() => {
                ctl.crash_after(u64::MAX / 2, Crash::Kill);
                return Ok((c, ctl));
            }
            Ok(_) => {}
            Err(e) if ctl.is_fenced() => drop(e),
            Err(e) => return Err(format!("reopening: {e}")),
        }
    }
    let ctl = store.clone();
    let c = Cache::open_on(ctl.clone()).map_err(|e| format!("reopening: {e}"))?;
    c.replay_log().map_err(|e| format!("replaying: {e}"))?;
    Ok((c, ctl))
}

/// One schedule: three runs of random calls, each ended by a crash.
fn schedule(seed: u64, how: Crash) -> Result<(), String> {
    let mut rng = Rng(seed);
    let store = MemStorage::new();
    // (a crash while redb creates the database is not covered: see
    // docs/design.md, "Storage seam")
    let mut cache = Cache::open_on(store.clone()).map_err(|e| format!("creating: {e}"))?;
    cache.replay_log().map_err(|e| format!("creating: {e}"))?;
    let mut ctl = store.clone();
    let mut retired = BTreeSet::new();
    let mut clock = 1_000;
    for run in 0..3 {
        let mut w = world_of(&cache, retired.clone(), clock).map_err(|e| e.to_string())?;
        // states[i]: after the i-th returned call; `folded`: index of the
        // state the last returned fold made durable
        let mut states = vec![snap(&cache).map_err(|e| e.to_string())?];
        let mut folded = 0;
        let mut calls = Vec::new();
        let steps = 10 + rng.below(50);
        ctl.crash_after(rng.below(steps * 12), how);
        let start = (store.fork(), Rng(rng.0), retired.clone(), clock);
        let mut interrupted = false;
        for _ in 0..steps {
            match step(&cache, &mut w, &mut rng) {
                // (a crash in a step whose error the call ignores: its state
                // is the twin's, as for an interrupted call)
                Ok(_) if ctl.is_fenced() => {
                    interrupted = true;
                    break;
                }
                Ok(what) => {
                    if what == "fold" {
                        folded = states.len();
                    }
                    calls.push(what);
                    states.push(snap(&cache).map_err(|e| e.to_string())?);
                }
                Err(_) if ctl.is_fenced() => {
                    interrupted = true;
                    break;
                }
                Err(e) => return Err(format!("run {run}: a call failed without a crash: {e}")),
            }
        }
        if interrupted {
            // the state the interrupted call would have left: a twin from
            // the run's start makes the same calls (same draws, same state)
            // and this one to the end
            let (fork, twin_rng, twin_retired, twin_clock) = start;
            let twin = Cache::open_on(fork).map_err(|e| format!("twin: {e}"))?;
            twin.replay_log().map_err(|e| format!("twin: {e}"))?;
            let mut twin_rng = twin_rng;
            let mut tw = world_of(&twin, twin_retired, twin_clock).map_err(|e| e.to_string())?;
            for i in 0..states.len() {
                let what = step(&twin, &mut tw, &mut twin_rng).map_err(|e| format!("twin: {e}"))?;
                if i + 1 < states.len() && calls[i] != what {
                    return Err(format!("the twin went another way at call {i}: {what} vs {}", calls[i]));
                }
                if i + 1 == states.len() {
                    calls.push(format!("(interrupted) {what}"));
                }
            }
            states.push(snap(&twin).map_err(|e| e.to_string())?);
        }
        if !interrupted {
            match how {
                Crash::Kill => ctl.kill(),
                Crash::PowerLoss => ctl.power_loss(),
            }
        }
        drop(cache);
        let (c, new_ctl) = reopen(&store, how, &mut rng)?;
        let got = snap(&c).map_err(|e| e.to_string())?;
        // k: the last returned call's state (the interrupted one's is k + 1)
        let k = states.len() - 1 - usize::from(interrupted);
        let last = states.len() - 1;
        let allowed: Vec<usize> = match how {
            Crash::Kill => (k..=last).collect(),
            Crash::PowerLoss => (folded..=last).collect(),
        };
        if !allowed.iter().any(|i| states[*i] == got) {
            // (the closest allowed state: fewest differing fields, latest first)
            let differing = |i: &usize| diff(&states[*i], &got).matches("\n   vs ").count();
            let at = allowed.iter().rev().copied().min_by_key(differing).unwrap_or(k);
            if std::env::var("IZO_STORAGE_DEBUG").is_ok() {
                for (i, c) in calls.iter().enumerate() {
                    eprintln!("{i}: {c}\n    parents {:?} dents {:?}", states[i + 1].parents, states[i + 1].dents);
                }
            }
            let equal: Vec<usize> = (0..states.len()).filter(|i| states[*i] == got).collect();
            return Err(format!(
                "run {run} ({how:?}{}): after {} calls (last fold at {folded}) the cache came back at none \
                 of the states {allowed:?} (but at {equal:?}); last calls: {:?}\ndiff from state {at}:\n{}",
                if interrupted { ", inside a call" } else { "" },
                k,
                &calls[calls.len().saturating_sub(4)..],
                diff(&states[at], &got)
            ));
        }
        check_sound(&c, &got).map_err(|e| format!("run {run} ({how:?}): {e}"))?;
        retired = w.retired;
        clock = w.clock;
        cache = c;
        ctl = new_ctl;
    }
    Ok(())
}

fn run(how: Crash) {
    if let Ok(seed) = std::env::var("IZO_STORAGE_SEED") {
        let seed: u64 = seed.parse().expect("IZO_STORAGE_SEED is a number");
        if let Err(e) = schedule(seed, how) {
            panic!("seed {seed}: {e}");
        }
        return;
    }
    let n: u64 = std::env::var("IZO_STORAGE_SCHEDULES").ok().and_then(|v| v.parse().ok()).unwrap_or(100);
    let base = 0x5eed_0000 + if how == Crash::Kill { 0 } else { 1 << 32 };
    for seed in base..base + n {
        let result = std::panic::catch_unwind(|| schedule(seed, how));
        let result = result.unwrap_or_else(|_| Err("panicked (above)".into()));
        if let Err(e) = result {
            panic!("seed {seed}: {e}\nreplay: IZO_STORAGE_SEED={seed} cargo nextest run -p izo-client --test storage");
        }
    }
}

#[test]
fn a_killed_cache_comes_back_with_every_returned_change() {
    run(Crash::Kill);
}

#[test]
fn a_cache_after_a_power_loss_comes_back_at_a_state_after_its_last_fold() {
    run(Crash::PowerLoss);
}

/// A fresh cache in memory with one file.
fn one_file() -> (Cache, MemStorage) {
    let store = MemStorage::new();
    let c = Cache::open_on(store.clone()).expect("open");
    c.replay_log().expect("replay");
    c.local(&[Edit::attr(attr(FILES[0], FileKind::File, 0, 1))]).expect("put");
    (c, store)
}

/// Storage steps `f` takes on a fresh [`one_file`] cache after `prepare`.
fn steps_of(prepare: impl Fn(&Cache), f: impl Fn(&Cache)) -> u64 {
    let (c, store) = one_file();
    prepare(&c);
    let before = store.steps();
    f(&c);
    store.steps() - before
}

/// Reopen after a crash and replay.
fn restarted(store: &MemStorage) -> Cache {
    let c = Cache::open_on(store.clone()).expect("reopen");
    c.replay_log().expect("replay");
    c
}

/// A fold logs the open writers again in its new log; a kill after its
/// commit and before the old log is removed replays both logs.
#[test]
fn a_writer_open_is_counted_once_after_a_kill_before_the_old_log_is_removed() {
    let open = |c: &Cache| c.log_writer(FILES[0], true).expect("open");
    let fold = |c: &Cache| c.fold().expect("fold");
    let n = steps_of(open, fold);
    let (c, store) = one_file();
    open(&c);
    // (the fold's last step removes the old log)
    store.crash_after(n - 1, Crash::Kill);
    let _ = c.fold();
    assert!(store.is_fenced(), "the kill fell inside the fold");
    drop(c);
    let c = restarted(&store);
    assert_eq!(c.open_writers(), vec![(FILES[0], 1)], "one open, counted once");
}

/// A fold's log stays until the next fold syncs its removal: a power loss
/// in between brings it back beside a database that already holds it.
/// Replayed over that later state, a ctime logged for an object before it
/// was known (a no-op then) would land on it.
#[test]
fn a_log_the_database_already_holds_is_not_replayed_after_a_power_loss() {
    let (c, store) = one_file();
    let id = FILES[1];
    c.local(&[Edit::Ctime { id, time: Timestamp { secs: 7, nsec: 0 } }]).expect("ctime");
    c.local(&[Edit::attr(attr(id, FileKind::File, 0, 2))]).expect("put");
    let before = c.get(id).expect("get").expect("the file").ctime;
    assert_eq!(before.secs, 2, "a new object's ctime is its mtime");
    c.fold().expect("fold");
    store.power_loss();
    drop(c);
    let c = restarted(&store);
    assert_eq!(c.get(id).expect("get").expect("the file").ctime, before, "the state before the power loss");
}

/// The in-memory storage behaves as the real files do, for the same calls.
#[test]
fn memory_storage_reads_back_what_disk_storage_reads_back() {
    use izo_client::storage::{Disk, Storage};
    let tmp = tempfile::tempdir().expect("temp dir");
    let disk = Disk::new(tmp.path()).expect("disk");
    let mem = MemStorage::new();
    let stores: [&dyn Storage; 2] = [&disk, &mem];
    let mut rng = Rng(7);
    for i in 0..300u64 {
        let id = rng.pick(&FILES);
        let (off, len) = (rng.below(20_000), 1 + rng.below(9_000));
        let choice = rng.below(7);
        for s in stores {
            match choice {
                0 | 1 => s.data_write_at(id, off, &vec![i as u8; len as usize]).expect("write"),
                2 => s.data_set_len(id, off).expect("set_len"),
                3 => s.data_punch(id, off, len).expect("punch"),
                4 => s.data_allocate(id, off, len).expect("allocate"),
                5 => s.data_remove(id).expect("remove"),
                _ => s.log_append(id.0 as u64, &[i as u8; 3]).expect("append"),
            }
        }
        for id in FILES {
            let lens: Vec<Option<u64>> = stores.iter().map(|s| s.data_len(id).expect("len")).collect();
            assert_eq!(lens[0], lens[1], "length of {id} after call {i}");
            let mut bufs = [vec![0u8; 32_000], vec![0u8; 32_000]];
            for (s, b) in stores.iter().zip(bufs.iter_mut()) {
                let n = s.data_read_at(id, 0, b).expect("read");
                b.truncate(n);
            }
            assert!(bufs[0] == bufs[1], "content of {id} after call {i}");
        }
        let gens: Vec<Vec<u64>> = stores.iter().map(|s| s.log_gens().expect("gens")).collect();
        assert_eq!(gens[0], gens[1], "log generations");
        for g in &gens[0] {
            assert_eq!(disk.log_read(*g).expect("log"), mem.log_read(*g).expect("log"), "log {g}");
        }
    }
}

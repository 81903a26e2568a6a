//! Retention: a subscriber behind it is sent to a snapshot; the snapshot is
//! consistent at one seq while writers keep going, and the stream resumes
//! right after that seq with nothing missed or repeated.

use crate::harness::*;
use izo_client::{Client, StreamEvent};
use izo_proto::*;
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedReceiver;

/// The namespace: (parent, name) → object.
type Names = BTreeMap<(ObjectId, Vec<u8>), ObjectId>;

/// What the test compares: every name, and the size of every regular file.
#[derive(Debug, Default, PartialEq, Eq)]
struct State {
    names: Names,
    sizes: BTreeMap<ObjectId, u64>,
}

impl State {
    fn of_snapshot(entries: &[SnapshotEntry]) -> State {
        let mut s = State::default();
        for e in entries {
            for (parent, name) in &e.links {
                let before = s.names.insert((*parent, name.clone()), e.attr.id);
                assert!(before.is_none(), "snapshot lists the name {:?} twice", String::from_utf8_lossy(name));
            }
            if e.attr.kind == FileKind::File {
                s.sizes.insert(e.attr.id, e.attr.size);
            }
        }
        s
    }

    fn linked(&self, id: ObjectId) -> bool {
        self.names.values().any(|&v| v == id)
    }

    /// Apply the namespace part of an op; sizes of files follow `size`.
    fn apply(&mut self, op: &Op, size: impl Fn(&State) -> Option<(ObjectId, u64)>) {
        let gone = |s: &mut State, id: Option<ObjectId>| {
            if let Some(id) = id {
                if !s.linked(id) {
                    s.sizes.remove(&id);
                }
            }
        };
        match op {
            Op::Create { parent, name, id, .. } => {
                self.names.insert((*parent, name.clone()), *id);
                self.sizes.insert(*id, 0);
            }
            Op::Mkdir { parent, name, id, .. }
            | Op::Symlink { parent, name, id, .. }
            | Op::Mknod { parent, name, id, .. } => {
                self.names.insert((*parent, name.clone()), *id);
            }
            Op::Link { id, parent, name } => {
                self.names.insert((*parent, name.clone()), *id);
            }
            Op::Unlink { parent, name, .. } | Op::Rmdir { parent, name, .. } => {
                let old = self.names.remove(&(*parent, name.clone()));
                gone(self, old);
            }
            Op::Rename { parent, name, new_parent, new_name, mode, .. } => {
                let src = self.names.remove(&(*parent, name.clone())).expect("rename of a name the state lacks");
                let dst = self.names.insert((*new_parent, new_name.clone()), src);
                match (mode, dst) {
                    (RenameMode::Exchange, Some(other)) => {
                        self.names.insert((*parent, name.clone()), other);
                    }
                    (_, replaced) => gone(self, replaced),
                }
            }
            _ => {}
        }
        if let Some((id, n)) = size(self) {
            if self.sizes.contains_key(&id) {
                self.sizes.insert(id, n);
            }
        }
    }
}

/// Size an op gives its file, computed from the op alone (for the model).
fn model_size(op: &Op, s: &State) -> Option<(ObjectId, u64)> {
    match op {
        Op::Write { id, offset, data, .. } => {
            let cur = s.sizes.get(id).copied().unwrap_or(0);
            Some((*id, cur.max(offset + data.len() as u64)))
        }
        Op::Truncate { id, size, .. } => Some((*id, *size)),
        _ => None,
    }
}

/// Next stream event, or a failure naming what was awaited.
async fn next(rx: &mut UnboundedReceiver<StreamEvent>, what: &str) -> StreamEvent {
    match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
        Ok(Some(ev)) => ev,
        Ok(None) => panic!("{what}: the stream ended"),
        Err(_) => panic!("{what}: nothing within 5 s"),
    }
}

/// A live file of the writer: name, parent, and the versions it last saw.
#[derive(Clone)]
struct Live {
    id: ObjectId,
    parent: ObjectId,
    name: Vec<u8>,
    versions: Versions,
}

/// Create, write, rename and unlink files through `c` until `stop`, pacing
/// the ops; returns every acked op with its seq.
async fn writer(c: Client, d: ObjectId, mut files: VecDeque<Live>, stop: Arc<AtomicBool>) -> Vec<(Seq, Op)> {
    let mut acked = Vec::new();
    let mut i = 0u64;
    while !stop.load(Ordering::Acquire) {
        i += 1;
        // per 8 ops: 3 creates, 2 writes, 2 renames, 1 unlink
        let (op, touched) = match i % 8 {
            0 | 3 | 5 => {
                let parent = if i.is_multiple_of(3) { d } else { ObjectId::ROOT };
                let f =
                    Live { id: ObjectId::new(), parent, name: name(&format!("w{i}")), versions: Versions::default() };
                let op = Op::Create { parent, name: f.name.clone(), id: f.id, mode: 0o644, uid: 0, gid: 0 };
                files.push_back(f);
                (op, files.len() - 1)
            }
            1 | 6 => {
                let k = files.len() - 1;
                let f = &files[k];
                let data = format!("{i}:{}", "x".repeat((i % 97) as usize)).into_bytes();
                (Op::Write { id: f.id, base: f.versions.data, offset: (i % 5) * 1000, data }, k)
            }
            2 | 7 => {
                let k = files.len() / 2;
                let f = &files[k];
                let new_parent = if f.parent == d { ObjectId::ROOT } else { d };
                let op = Op::Rename {
                    parent: f.parent,
                    name: f.name.clone(),
                    expect: Expect { id: f.id, base: f.versions },
                    new_parent,
                    new_name: name(&format!("r{i}")),
                    target: None,
                    mode: RenameMode::NoReplace,
                };
                (op, k)
            }
            _ => {
                // the oldest file: one of the initial creates at first
                let f = &files[0];
                let op = Op::Unlink {
                    parent: f.parent,
                    name: f.name.clone(),
                    expect: Expect { id: f.id, base: f.versions },
                };
                (op, 0)
            }
        };
        let a = c.mutate(op.clone()).await.unwrap_or_else(|e| panic!("writer op #{i} ({}): {e}", op.kind()));
        match &op {
            Op::Unlink { .. } => {
                files.pop_front();
            }
            Op::Rename { new_parent, new_name, .. } => {
                files[touched].parent = *new_parent;
                files[touched].name = new_name.clone();
            }
            _ => {}
        }
        if let (Some(attr), false) = (&a.attr, matches!(op, Op::Unlink { .. })) {
            files[touched].versions = attr.versions;
        }
        acked.push((a.seq, op));
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_behind_retention_resumes_from_a_consistent_snapshot_with_nothing_missed_or_repeated() {
    let s = InProc::start_with(Dirs::new(), |cfg| {
        cfg.retain_records = 50;
        cfg.checkpoint_ms = 50;
    })
    .await;
    let c = s.client().await;
    let root = ObjectId::ROOT;
    let d = ObjectId::new();
    let mut all: Vec<(Seq, Op)> = Vec::new();
    let mk = Op::Mkdir { parent: root, name: name("d"), id: d, mode: 0o755, uid: 0, gid: 0 };
    all.push((c.mutate(mk.clone()).await.expect("mkdir").seq, mk));
    let mut pend = Vec::new();
    for i in 0..300 {
        let op = Op::Create {
            parent: root,
            name: name(&format!("f{i:03}")),
            id: ObjectId::new(),
            mode: 0o644,
            uid: 0,
            gid: 0,
        };
        pend.push((c.submit(op.clone()).await.expect("submit"), op));
    }
    let mut files = VecDeque::new();
    for (p, op) in pend {
        let a = p.wait().await.expect("create");
        if let Op::Create { parent, name, id, .. } = &op {
            let versions = a.attr.as_ref().expect("attr of a new file").versions;
            files.push_back(Live { id: *id, parent: *parent, name: name.clone(), versions });
        }
        all.push((a.seq, op));
    }
    let head = all.iter().map(|(s, _)| *s).max().expect("seqs");
    assert_eq!(head, 301);

    // checkpoints run every 50 ms and retention prunes behind them down to
    // the last 50 records; wait until it has (a fresh connection per probe)
    let deadline = Instant::now() + Duration::from_secs(5);
    let oldest = loop {
        let probe = s.client().await;
        let mut rx = probe.subscribe(0).await.expect("probe subscribe");
        let ev = next(&mut rx, "probe from 0").await;
        probe.close();
        match ev {
            StreamEvent::SnapshotRequired { oldest } if oldest == head - 49 => break oldest,
            other => {
                assert!(Instant::now() < deadline, "retention did not prune to 50 records within 5 s: {other:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    // the boundary: from oldest - 1 streams, one further back does not
    let edge = s.client().await;
    let mut rx = edge.subscribe(oldest - 1).await.expect("subscribe at the edge");
    match next(&mut rx, "from oldest - 1").await {
        StreamEvent::Record(r) => assert_eq!(r.seq, oldest, "the stream starts at the oldest record kept"),
        other => panic!("subscribing from {} (oldest kept {oldest}): {other:?}", oldest - 1),
    }
    edge.close();
    let edge = s.client().await;
    let mut rx = edge.subscribe(oldest - 2).await.expect("subscribe behind the edge");
    assert_eq!(next(&mut rx, "from oldest - 2").await, StreamEvent::SnapshotRequired { oldest });
    edge.close();

    // the subscriber: from 0 it is told to read a snapshot
    let mut rx = c.subscribe(0).await.expect("subscribe from 0");
    match next(&mut rx, "subscriber from 0").await {
        StreamEvent::SnapshotRequired { oldest: o } => {
            assert!(o > 1, "retention dropped the first records");
            assert_eq!(o, oldest);
        }
        other => panic!("a subscriber behind retention got {other:?} instead of SnapshotRequired"),
    }

    // a writer keeps changing the namespace and file contents meanwhile
    let w = s.client().await;
    let stop = Arc::new(AtomicBool::new(false));
    let task = tokio::spawn(writer(w.clone(), d, files, stop.clone()));
    let t = Instant::now();
    while (w.answered_through() as usize) < 20 {
        assert!(t.elapsed() < Duration::from_secs(5), "the writer got only {} ops acked in 5 s", w.answered_through());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // snapshot, then subscribe at its seq; if retention overtook the seq in
    // between (allowed: retention never waits for a client), try again
    let mut retries = 0;
    let (entries, snap_seq, mut rx, first) = loop {
        let (entries, seq) = c.snapshot().await.expect("snapshot while the writer runs");
        let mut rx = c.subscribe(seq).await.expect("subscribe at the snapshot seq");
        match next(&mut rx, "first record after the snapshot").await {
            StreamEvent::Record(r) => break (entries, seq, rx, r),
            StreamEvent::SnapshotRequired { oldest } => {
                retries += 1;
                assert!(retries < 5, "snapshot seq {seq} fell behind retention (oldest {oldest}) {retries} times");
            }
        }
    };
    assert!(snap_seq > head, "the snapshot includes writer ops ({snap_seq} > {head})");
    assert_eq!(first.seq, snap_seq + 1, "the stream resumes right after the snapshot seq");
    let mut streamed = vec![first];
    while streamed.len() < 60 {
        match next(&mut rx, "records while the writer runs").await {
            StreamEvent::Record(r) => streamed.push(r),
            other => panic!("after {} records: {other:?}", streamed.len()),
        }
    }
    stop.store(true, Ordering::Release);
    let acked = task.await.expect("writer task");
    all.extend(acked.iter().cloned());
    let last = acked.iter().map(|(s, _)| *s).max().expect("writer ops");
    while streamed.last().map(|r| r.seq) < Some(last) {
        match next(&mut rx, "draining to the writer's last seq").await {
            StreamEvent::Record(r) => streamed.push(r),
            other => panic!("while draining: {other:?}"),
        }
    }
    // nothing after the last op, in particular no repeat
    if let Ok(Some(extra)) = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
        panic!("a record after the writer's last op ({last}): {extra:?}");
    }

    // consecutive: no gap, no repeat
    for (k, r) in streamed.iter().enumerate() {
        assert_eq!(r.seq, snap_seq + 1 + k as u64, "record #{k} of the stream");
    }
    // exactly the writer's ops after the snapshot seq, as acked
    let by_seq: BTreeMap<Seq, &Op> = all.iter().map(|(s, o)| (*s, o)).collect();
    assert_eq!(by_seq.len(), all.len(), "acked seqs are unique");
    for r in &streamed {
        assert_eq!(by_seq.get(&r.seq), Some(&&r.op), "record {} is the op acked at that seq", r.seq);
        assert!(matches!(r.origin, Origin::Replica(rep, _) if rep == w.replica()), "record {} is the writer's", r.seq);
    }
    let after: Vec<Seq> = acked.iter().map(|(s, _)| *s).filter(|&s| s > snap_seq).collect();
    assert_eq!(
        after,
        streamed.iter().map(|r| r.seq).collect::<Vec<_>>(),
        "every op acked after the snapshot is streamed"
    );
    assert!(after.len() >= 60, "the writer kept going after the snapshot ({} ops)", after.len());

    // the snapshot is the state after exactly the ops with seq <= its seq
    let at_snap = State::of_snapshot(&entries);
    let mut model = State::default();
    for (_, op) in by_seq.range(..=snap_seq) {
        model.apply(op, |s| model_size(op, s));
    }
    assert_eq!(at_snap, model, "snapshot at seq {snap_seq} vs. the acked ops through it");
    for e in &entries {
        let v = e.attr.versions;
        assert!(v.data <= snap_seq && v.meta <= snap_seq, "{} has versions {v:?} past seq {snap_seq}", e.attr.id);
    }

    // snapshot + stream = the server's final state
    let mut replayed = at_snap;
    for r in &streamed {
        let attr = r.attr.clone();
        replayed.apply(&r.op, |_| attr.as_ref().filter(|a| a.kind == FileKind::File).map(|a| (a.id, a.size)));
    }
    let (final_entries, final_seq) = c.snapshot().await.expect("final snapshot");
    assert_eq!(final_seq, last, "nothing but the writer changed the volume");
    assert_eq!(replayed, State::of_snapshot(&final_entries), "snapshot + streamed records vs. the final snapshot");
    println!(
        "retention: oldest kept {oldest} of {head}; snapshot at {snap_seq} ({} entries, {retries} retries); \
         streamed {} records through {last}",
        entries.len(),
        streamed.len()
    );
}

/// Retention by size: with a small byte limit the oldest records go at the
/// next checkpoint even though the count limit is far away, and a
/// subscriber from the start is sent to a snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_by_size_drops_the_oldest_records() {
    let s = InProc::start_with(Dirs::new(), |c| {
        c.retain_records = 1_000_000;
        c.retain_bytes = 64 << 10;
        c.checkpoint_ms = 50;
    })
    .await;
    let c = s.client().await;
    let f = ObjectId::new();
    c.mutate(create_in_root(f, "f")).await.expect("create");
    // 200 inline writes of 4 KiB: ~800 KiB of records against a 64 KiB limit
    for i in 0..200u64 {
        c.mutate(Op::Write { id: f, base: 0, offset: i * 4096, data: vec![i as u8; 4096] }).await.expect("write");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut rx = c.subscribe(0).await.expect("subscribe");
        match next(&mut rx, "from 0").await {
            // checkpoints prune as they come: wait until they caught up
            StreamEvent::SnapshotRequired { oldest } if oldest > 150 => {
                assert!(oldest <= 201, "records within the limit are kept (oldest {oldest} of 201)");
                break;
            }
            other => {
                let seen = format!("{other:?}");
                assert!(
                    Instant::now() < deadline,
                    "the oldest records were not dropped for size within 10 s: {seen:.120}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Resident set size of a process in bytes (VmRSS of /proc/PID/status).
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS in /proc/PID/status");
    kib << 10
}

/// What [`small_writes`] saw of the server: the largest `volume.redb` and
/// the server's RSS after a quarter of the writes and at the end.
struct Seen {
    biggest_file: u64,
    rss_at_quarter: u64,
    rss_at_end: u64,
}

const MIB: u64 = 1 << 20;

/// Write `total` bytes in 8 KiB writes over a 4 MiB region of one file
/// (so the export stays small and the journal does not), 64 in flight.
async fn small_writes(p: &Proc, dirs: &Dirs, tok: &str, total: u64) -> Seen {
    const WRITE: usize = 8 << 10;
    const WINDOW: usize = 64;
    let db = dirs.state.join("volume.redb");
    let file_size = || std::fs::metadata(&db).expect("stat volume.redb").len();
    let c = Client::connect(p.client_config(tok)).await.expect("client connects");
    let f = ObjectId::new();
    c.mutate(create_in_root(f, "f")).await.expect("create");
    let writes = total / WRITE as u64;
    let mut pending = VecDeque::new();
    let (mut biggest_file, mut rss_at_quarter) = (0, 0);
    let t = Instant::now();
    for i in 1..=writes {
        let offset = (i * WRITE as u64) % (4 * MIB);
        let op = Op::Write { id: f, base: 0, offset, data: vec![i as u8; WRITE] };
        pending.push_back(c.submit(op).await.expect("submit"));
        if pending.len() >= WINDOW {
            pending.pop_front().expect("a write in flight").wait().await.expect("write");
        }
        if i % 256 == 0 {
            biggest_file = biggest_file.max(file_size());
        }
        if i == writes / 4 {
            rss_at_quarter = rss(p.pid());
        }
    }
    for w in pending {
        w.wait().await.expect("write");
    }
    let seen = Seen { biggest_file: biggest_file.max(file_size()), rss_at_quarter, rss_at_end: rss(p.pid()) };
    println!(
        "{writes} writes of {WRITE} B in {:.1} s: volume.redb at most {} MiB (now {} MiB); server RSS {} MiB after \
         a quarter, {} MiB at the end",
        t.elapsed().as_secs_f64(),
        seen.biggest_file / MIB,
        file_size() / MIB,
        seen.rss_at_quarter / MIB,
        seen.rss_at_end / MIB,
    );
    c.close();
    seen
}

/// Server state outgrew its own limit (issue 12, point 4): with an 8 MiB
/// byte limit and twenty times that in small writes, `volume.redb` stays
/// within twice the limit plus a constant and the server's memory is flat.
///
/// The journal's records take at most the limit of the file's pages (they
/// count the pages redb gives them, and writers wait while retention
/// catches up), plus one batch (64 writes in flight: 1 MiB of pages). The
/// rest of the database (one file's metadata, redb's own tables) is under
/// 1 MiB, and redb doubles the file when it fills, so the file stays within
/// 2 × (limit + 2 MiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_file_stays_within_twice_the_retention_limit_under_small_writes() {
    const LIMIT: u64 = 8 * MIB;
    let dirs = Dirs::new();
    let tok = dirs.token(izo_server::auth::Rights::Rw);
    let p = Proc::start_args(&dirs, "127.0.0.1:0", &["--retain-bytes", &LIMIT.to_string(), "--checkpoint-ms", "100"]);
    let seen = small_writes(&p, &dirs, &tok, 20 * LIMIT).await;
    assert!(
        seen.biggest_file <= 2 * LIMIT + 4 * MIB,
        "volume.redb reached {} MiB with a {} MiB retention limit (bound: 2 × limit + 4 MiB)",
        seen.biggest_file / MIB,
        LIMIT / MIB
    );
    // the cache is full long before a quarter of the writes (40 MiB of
    // records); 8 MiB is room for the allocator's noise, not for the journal
    assert!(
        seen.rss_at_end <= seen.rss_at_quarter + 8 * MIB,
        "server RSS grew from {} MiB to {} MiB while the journal stayed within its limit",
        seen.rss_at_quarter / MIB,
        seen.rss_at_end / MIB
    );
    // retention did drop records: a subscriber from the start gets a snapshot
    let c = Client::connect(p.client_config(&tok)).await.expect("client connects");
    let mut rx = c.subscribe(0).await.expect("subscribe");
    match next(&mut rx, "subscriber from 0").await {
        StreamEvent::SnapshotRequired { oldest } => assert!(oldest > 1000, "retention kept from seq {oldest}"),
        other => panic!("a subscriber from 0 after 160 MiB of writes with an 8 MiB limit got {other:?}"),
    }
}

/// Server memory followed the journal's size (issue 12, point 4: 1.1 GB of
/// RSS): with the default 1 GiB limit, 320 MiB of journal pages grow the
/// file but not the server's memory once its 32 MiB page cache is full
/// (long before a quarter of the writes, 80 MiB of journal pages).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_memory_does_not_grow_with_its_journal() {
    let dirs = Dirs::new();
    let tok = dirs.token(izo_server::auth::Rights::Rw);
    let p = Proc::start_args(&dirs, "127.0.0.1:0", &[]);
    let seen = small_writes(&p, &dirs, &tok, 160 * MIB).await;
    assert!(seen.biggest_file >= 256 * MIB, "the journal grew (volume.redb {} MiB)", seen.biggest_file / MIB);
    assert!(
        seen.rss_at_end <= seen.rss_at_quarter + 8 * MIB,
        "server RSS grew from {} MiB to {} MiB with its journal",
        seen.rss_at_quarter / MIB,
        seen.rss_at_end / MIB
    );
}

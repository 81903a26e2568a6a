//! Crash test: one client streams pipelined mutations while the `izo serve`
//! process is SIGKILLed at random moments and restarted. After the client
//! has resent its unanswered ops, the journal has no seq gap and the export
//! equals a reference model fed every acked op in client-seq order.
//!
//! CI runs a short version; `scripts/crash-soak` runs the full count
//! (IZO_CRASH_OPS, IZO_CRASH_KILLS, IZO_CRASH_SEED).

use crate::harness::*;
use izo_client::{Client, Pending};
use izo_proto::*;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Small deterministic generator (xorshift64*), so a failing seed replays.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[derive(Clone, Copy, PartialEq)]
enum K {
    File,
    Dir,
}

/// What the generator believes exists once every submitted op succeeds.
struct Gen {
    rng: Rng,
    sizes: std::collections::HashMap<ObjectId, u64>,
    dirs: Vec<ObjectId>,
    names: Vec<(ObjectId, Vec<u8>, ObjectId, K)>,
}

const POOL: usize = 10;

impl Gen {
    fn find(&self, p: ObjectId, n: &[u8]) -> Option<usize> {
        self.names.iter().position(|(pp, nn, _, _)| *pp == p && nn == n)
    }

    fn pick_name(&mut self) -> (ObjectId, Vec<u8>) {
        let p = self.dirs[self.rng.below(self.dirs.len() as u64) as usize];
        (p, format!("n{}", self.rng.below(POOL as u64)).into_bytes())
    }

    fn pick_file(&mut self) -> Option<(ObjectId, Vec<u8>, ObjectId)> {
        let files: Vec<_> = self.names.iter().filter(|e| e.3 == K::File).cloned().collect();
        if files.is_empty() {
            return None;
        }
        let (p, n, id, _) = files[self.rng.below(files.len() as u64) as usize].clone();
        Some((p, n, id))
    }

    fn create(&mut self, p: ObjectId, n: Vec<u8>) -> Op {
        let id = ObjectId::new();
        self.names.push((p, n.clone(), id, K::File));
        Op::Create { parent: p, name: n, id, mode: 0o644, uid: 0, gid: 0 }
    }

    /// Next ops (one, or two for "rename then reuse the name").
    fn ops(&mut self) -> Vec<Op> {
        let roll = self.rng.below(100);
        let (p, n) = self.pick_name();
        let free = self.find(p, &n).is_none();
        match (roll, self.pick_file()) {
            (0..=24, _) | (_, None) if free => vec![self.create(p, n)],
            (25..=49, Some((_, _, id))) if self.rng.below(4) == 0 => {
                // an append (large ones go straight into the file)
                let at = self.sizes.get(&id).copied().unwrap_or(0);
                let len = 1 + self.rng.below(150_000);
                self.sizes.insert(id, at + len);
                vec![Op::Write { id, base: 0, offset: at, data: vec![self.rng.below(256) as u8; len as usize] }]
            }
            (25..=49, Some((_, _, id))) => {
                let big = self.rng.below(40) == 0;
                let len = if big { (3 << 19) + self.rng.below(4096) } else { 1 + self.rng.below(3000) };
                let off = self.rng.below(1 << 16);
                let byte = self.rng.below(256) as u8;
                let size = self.sizes.entry(id).or_insert(0);
                *size = (*size).max(off + len);
                vec![Op::Write { id, base: 0, offset: off, data: vec![byte; len as usize] }]
            }
            (50..=64, Some((sp, sn, id))) => {
                if sp == p && sn == n {
                    return vec![];
                }
                let target = self.find(p, &n);
                if let Some(t) = target {
                    // not onto a directory, nor onto another name of the same
                    // inode (a no-op in POSIX, which this generator does not model)
                    if self.names[t].3 == K::Dir || self.names[t].2 == id {
                        return vec![];
                    }
                }
                let tgt = target.map(|t| expect(self.names[t].2));
                if let Some(t) = target {
                    self.names.remove(t);
                }
                let s = self.find(sp, &sn).expect("source exists");
                self.names[s].0 = p;
                self.names[s].1 = n.clone();
                let mode =
                    if tgt.is_none() && self.rng.below(2) == 0 { RenameMode::NoReplace } else { RenameMode::Replace };
                let rename = Op::Rename {
                    parent: sp,
                    name: sn.clone(),
                    expect: expect(id),
                    new_parent: p,
                    new_name: n,
                    target: tgt,
                    mode,
                };
                if self.rng.below(2) == 0 {
                    let again = self.create(sp, sn);
                    vec![rename, again]
                } else {
                    vec![rename]
                }
            }
            (65..=71, Some((ap, an, a))) => {
                let Some((bp, bn, b)) = self.pick_file() else { return vec![] };
                if (ap, &an) == (bp, &bn) {
                    return vec![];
                }
                let (ia, ib) = (self.find(ap, &an).expect("a"), self.find(bp, &bn).expect("b"));
                self.names[ia].2 = b;
                self.names[ib].2 = a;
                let op = Op::Rename {
                    parent: ap,
                    name: an,
                    expect: expect(a),
                    new_parent: bp,
                    new_name: bn,
                    target: Some(expect(b)),
                    mode: RenameMode::Exchange,
                };
                vec![op]
            }
            (72..=79, Some((_, _, id))) if free => {
                self.names.push((p, n.clone(), id, K::File));
                vec![Op::Link { id, parent: p, name: n }]
            }
            (80..=93, Some((sp, sn, id))) => {
                let i = self.find(sp, &sn).expect("name");
                self.names.remove(i);
                vec![Op::Unlink { parent: sp, name: sn, expect: expect(id) }]
            }
            (94..=99, Some((_, _, id))) => {
                let size = self.rng.below(1 << 15);
                self.sizes.insert(id, size);
                vec![Op::Truncate { id, base: 0, size }]
            }
            _ => vec![],
        }
    }
}

/// Outcome of one crash run.
pub struct Run {
    pub acked: usize,
    pub kills: u32,
}

/// Kill the server at random moments and restart it on the same address.
#[allow(clippy::too_many_arguments)]
fn killer(
    dirs: Arc<Dirs>,
    slot: Arc<Mutex<Option<Proc>>>,
    addr: String,
    env: Vec<(String, String)>,
    kills: u32,
    seed: u64,
    stop: Arc<AtomicBool>,
    killed: Arc<AtomicU32>,
    client: Client,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut rng = Rng::new(seed ^ 0x9e37_79b9);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let mut next_kill = std::time::Instant::now() + Duration::from_millis(20 + rng.below(120));
        while !stop.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_micros(300));
            let mut g = slot.lock().expect("server slot");
            // a server that killed itself (test hook) is restarted too
            let died = g.as_mut().is_some_and(|p| p.child.try_wait().ok().flatten().is_some());
            let due = killed.load(Ordering::Acquire) < kills
                && std::time::Instant::now() >= next_kill
                && client.unanswered() > 0;
            if !died && !due {
                continue;
            }
            if due {
                std::thread::sleep(Duration::from_micros(rng.below(2000)));
                killed.fetch_add(1, Ordering::AcqRel);
                next_kill = std::time::Instant::now() + Duration::from_millis(20 + rng.below(120));
            }
            if let Some(mut p) = g.take() {
                p.sigkill();
            }
            *g = Some(Proc::start(&dirs, &addr, &env));
        }
    })
}

/// Stream `total` ops while killing the server `kills` times; compare with
/// the model. Err describes the first divergence.
pub async fn run_crash(total: usize, kills: u32, seed: u64, env: &[(&str, &str)]) -> Result<Run, String> {
    let dirs = Arc::new(Dirs::new());
    let token = dirs.token(izo_server::auth::Rights::Rw);
    let first = Proc::start(&dirs, "127.0.0.1:0", env);
    let addr = first.addr.clone();
    let mut cfg = first.client_config(&token);
    cfg.silence = Duration::from_secs(3);
    let slot = Arc::new(Mutex::new(Some(first)));
    let c = Client::connect(cfg).await.map_err(|e| format!("connect: {e}"))?;
    let mut model = model_for(&dirs.export);
    let mut gen = Gen { rng: Rng::new(seed), sizes: Default::default(), dirs: vec![ObjectId::ROOT], names: Vec::new() };
    let mut ops: Vec<Op> = Vec::new();
    for d in ["d1", "d2"] {
        let id = ObjectId::new();
        gen.dirs.push(id);
        gen.names.push((ObjectId::ROOT, name(d), id, K::Dir));
        ops.push(Op::Mkdir { parent: ObjectId::ROOT, name: name(d), id, mode: 0o755, uid: 0, gid: 0 });
    }
    while ops.len() < total {
        ops.extend(gen.ops());
    }
    let stop = Arc::new(AtomicBool::new(false));
    let killed = Arc::new(AtomicU32::new(0));
    let env_owned = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let k = killer(dirs.clone(), slot.clone(), addr, env_owned, kills, seed, stop.clone(), killed.clone(), c.clone());
    // stream the ops in small pipelined bursts so kills land mid-stream
    let mut pending: Vec<Pending> = Vec::with_capacity(ops.len());
    let mut rng = Rng::new(seed ^ 7);
    let per_kill = (ops.len() / (kills as usize + 1)).max(1);
    for (i, op) in ops.iter().enumerate() {
        pending.push(c.submit(op.clone()).await.map_err(|e| format!("submit: {e}"))?);
        if rng.below(8) == 0 {
            tokio::time::sleep(Duration::from_millis(1 + rng.below(4))).await;
        }
        // spread the kills over the stream: hold back while they are behind
        let due = (killed.load(Ordering::Acquire) as usize + 1) * per_kill;
        let before = killed.load(Ordering::Acquire);
        while i + 1 >= due && killed.load(Ordering::Acquire) == before && before < kills && c.unanswered() > 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let mut seqs = Vec::with_capacity(ops.len());
    let mut failure = None;
    for (op, p) in ops.iter().zip(pending) {
        let cseq = p.cseq;
        match tokio::time::timeout(Duration::from_secs(60), p.wait()).await {
            Ok(Ok(a)) => {
                seqs.push(a.seq);
                if let Err(e) = model.apply(op, a.time) {
                    failure.get_or_insert(format!("model refused acked op #{cseq} {}: {e}", op.kind()));
                }
            }
            Ok(Err(e)) => {
                failure.get_or_insert(format!("op #{cseq} {} failed: {e}", op.kind()));
            }
            Err(_) => {
                failure.get_or_insert(format!("op #{cseq} {} never answered", op.kind()));
            }
        }
    }
    stop.store(true, Ordering::Release);
    let _ = k.join();
    let kills_done = killed.load(Ordering::Acquire);
    if let Some(f) = failure {
        return Err(f);
    }
    seqs.sort_unstable();
    let expected: Vec<u64> = (1..=ops.len() as u64).collect();
    if seqs != expected {
        let dup = seqs.windows(2).find(|w| w[0] == w[1]).map(|w| w[0]);
        return Err(format!("journal seqs of acked ops are not 1..={} (first repeat: {dup:?})", ops.len()));
    }
    let want = model.digest();
    let got = izo_testkit::tree_digest(&dirs.export).map_err(|e| e.to_string())?;
    let diff = want.diff(&got);
    if !diff.is_empty() {
        return Err(format!("export differs from the model after {kills_done} kills:\n{}", diff.join("\n")));
    }
    drop(slot);
    Ok(Run { acked: ops.len(), kills: kills_done })
}

fn env_usize(k: &str, d: usize) -> usize {
    std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d)
}

fn seed() -> u64 {
    let s = env_usize("IZO_CRASH_SEED", 0) as u64;
    if s != 0 {
        return s;
    }
    let t =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1);
    eprintln!("crash seed {t} (set IZO_CRASH_SEED to replay)");
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_mutations_survive_server_sigkills_exactly_once() {
    let (ops, kills) = (env_usize("IZO_CRASH_OPS", 1000), env_usize("IZO_CRASH_KILLS", 5) as u32);
    let run =
        run_crash(ops, kills, seed(), &[("IZO_TEST_KILL_AFTER_COMMIT", "3")]).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(run.acked >= 1000, "at least 1,000 acked mutations");
    assert_eq!(run.kills, kills, "the server was killed {kills} times");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_records_since_the_checkpoint_are_redone_idempotently() {
    // No checkpoint while running: every restart redoes all data records of
    // the volume's life in order, as after a machine crash.
    let (ops, kills) = (env_usize("IZO_CRASH_OPS", 1000), env_usize("IZO_CRASH_KILLS", 5) as u32);
    let env = [("IZO_TEST_NO_CHECKPOINT", "1"), ("IZO_TEST_KILL_AFTER_COMMIT", "3")];
    run_crash(ops, kills, seed(), &env).await.unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_reply_cache_the_crash_test_fails() {
    // The first server process dies right after its first commit, before its
    // replies leave, so that batch is always resent: the control cannot miss
    // (random kills alone could, on a machine fast enough to commit the whole
    // stream in a few large batches between them).
    let marker = tempfile::tempdir().expect("temp dir");
    let once = marker.path().join("killed");
    let once = once.to_str().expect("utf-8 temp path");
    let env = [
        ("IZO_TEST_NO_REPLY_CACHE", "1"),
        ("IZO_TEST_KILL_AFTER_COMMIT", "30"),
        ("IZO_TEST_KILL_ONCE_AFTER_COMMIT", once),
    ];
    let r = run_crash(1000, 5, seed(), &env).await;
    assert!(r.is_err(), "resent ops applied twice must be detected");
    eprintln!("detected as expected: {}", r.err().unwrap_or_default());
}

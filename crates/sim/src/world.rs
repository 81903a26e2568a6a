//! The simulated world: replica engines over real caches, the real
//! server logic ([`SimServer`]), and a network that delays, reorders
//! (across connections, never within one), drops connections, partitions
//! and crashes, all driven by one list of events made from a seed.
//!
//! Each replica here is the engine plus a small shell that does what the
//! mount's shell does (`crates/client/src/local.rs`, `replica.rs`) with the
//! network replaced by queues: the cache, its log and data files are the
//! real ones (in a temp dir on tmpfs), the decisions are the engine's.

use crate::server::{Mutation, ServerOpts, SimServer};
use izo_client::cache::{Cache, Cached, Edit, Parked};
use izo_client::engine::{self, Data, Engine, Make, Need, Next, Now, Options, Refresh};
use izo_client::storage::MemStorage;
use izo_proto::*;
use izo_testkit::{digest_xattr, Digest, Kind, Node};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::Duration;

/// Small deterministic generator (xorshift64*).
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15).max(1))
    }
    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// One step of a schedule. Local ops name their targets by small numbers
/// resolved against the replica's namespace when they run, so any
/// subsequence of a schedule runs too (what shrinking needs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ev {
    /// A local op on replica `r`: kind `k`, targets `a`, `b`.
    Local(u8, u8, u16, u16),
    /// Replica `r`'s sender hands out what it may.
    Send(u8),
    /// The server takes up to `n` mutations of replica `r`'s connection
    /// as one batch.
    Deliver(u8, u8),
    /// Replica `r` takes up to `n` messages (answers, records).
    Receive(u8, u8),
    /// The server streams new records to replica `r`.
    Stream(u8),
    /// Replica `r`'s timers: seal, take ready attributes, housekeeping.
    Tick(u8),
    /// Replica `r` folds its log into a durable commit.
    Fold(u8),
    /// Replica `r`'s connection breaks (in-flight messages are lost).
    Drop(u8),
    /// Replica `r` (re)connects, unless partitioned.
    Connect(u8),
    /// The replicas in the mask are cut off until [`Ev::Heal`].
    Partition(u8),
    /// Every partition ends.
    Heal,
    /// Replica `r`'s daemon is SIGKILLed (`0`) or its machine loses power
    /// (`1`); it starts again when it next reaches the server.
    CrashReplica(u8, u8),
    /// The server loses power and restarts from its committed journal.
    CrashServer,
    /// The server's next batch fails before its commit (a transient
    /// refusal of every fresh op in it).
    FailBatch,
}

impl Ev {
    /// One token of the replay line.
    pub fn code(&self) -> String {
        match *self {
            Ev::Local(r, k, a, b) => format!("L{r}.{k}.{a}.{b}"),
            Ev::Send(r) => format!("S{r}"),
            Ev::Deliver(r, n) => format!("D{r}.{n}"),
            Ev::Receive(r, n) => format!("R{r}.{n}"),
            Ev::Stream(r) => format!("T{r}"),
            Ev::Tick(r) => format!("K{r}"),
            Ev::Fold(r) => format!("F{r}"),
            Ev::Drop(r) => format!("X{r}"),
            Ev::Connect(r) => format!("C{r}"),
            Ev::Partition(m) => format!("P{m}"),
            Ev::Heal => "H".into(),
            Ev::CrashReplica(r, h) => format!("Z{r}.{h}"),
            Ev::CrashServer => "Y".into(),
            Ev::FailBatch => "B".into(),
        }
    }

    /// Parse one token of a replay line.
    pub fn parse(t: &str) -> Option<Ev> {
        let (head, rest) = t.split_at(1);
        let n: Vec<u16> = if rest.is_empty() {
            Vec::new()
        } else {
            rest.split('.').map(|x| x.parse().ok()).collect::<Option<Vec<u16>>>()?
        };
        let b = |i: usize| n.get(i).map(|v| *v as u8);
        Some(match head {
            "L" => Ev::Local(b(0)?, b(1)?, *n.get(2)?, *n.get(3)?),
            "S" => Ev::Send(b(0)?),
            "D" => Ev::Deliver(b(0)?, b(1)?),
            "R" => Ev::Receive(b(0)?, b(1)?),
            "T" => Ev::Stream(b(0)?),
            "K" => Ev::Tick(b(0)?),
            "F" => Ev::Fold(b(0)?),
            "X" => Ev::Drop(b(0)?),
            "C" => Ev::Connect(b(0)?),
            "P" => Ev::Partition(b(0)?),
            "H" => Ev::Heal,
            "Z" => Ev::CrashReplica(b(0)?, b(1)?),
            "Y" => Ev::CrashServer,
            "B" => Ev::FailBatch,
            _ => return None,
        })
    }
}

/// A schedule from a seed: `ops` local ops on `replicas` replicas among
/// network and timer events, with at least one partition and one crash.
pub fn schedule(seed: u64, replicas: u8, ops: usize) -> Vec<Ev> {
    let mut rng = Rng::new(seed);
    let mut evs = Vec::new();
    let r = |rng: &mut Rng| rng.below(replicas as u64) as u8;
    let mut locals = 0;
    while locals < ops {
        let roll = rng.below(100);
        let e = match roll {
            0..=39 => {
                locals += 1;
                Ev::Local(r(&mut rng), rng.below(12) as u8, rng.below(64) as u16, rng.below(64) as u16)
            }
            40..=51 => Ev::Send(r(&mut rng)),
            52..=63 => Ev::Deliver(r(&mut rng), 1 + rng.below(4) as u8),
            64..=75 => Ev::Receive(r(&mut rng), 1 + rng.below(6) as u8),
            76..=83 => Ev::Stream(r(&mut rng)),
            84..=88 => Ev::Tick(r(&mut rng)),
            89..=90 => Ev::Fold(r(&mut rng)),
            91..=92 => Ev::Drop(r(&mut rng)),
            93..=95 => Ev::Connect(r(&mut rng)),
            96 => Ev::Partition(1 + rng.below((1u64 << replicas) - 1) as u8),
            97 => Ev::Heal,
            98 => Ev::CrashReplica(r(&mut rng), rng.below(2) as u8),
            99 if rng.below(2) == 0 => Ev::FailBatch,
            _ => Ev::CrashServer,
        };
        evs.push(e);
    }
    // at least one partition (healed later) and one crash of each kind
    let at = |rng: &mut Rng, n: usize| rng.below(n as u64 + 1) as usize;
    let p = at(&mut rng, evs.len());
    evs.insert(p, Ev::Partition(1 + rng.below((1u64 << replicas) - 1) as u8));
    let h = p + 1 + at(&mut rng, evs.len() - p - 1);
    evs.insert(h, Ev::Heal);
    let c = at(&mut rng, evs.len());
    evs.insert(c, Ev::CrashReplica(r(&mut rng), rng.below(2) as u8));
    let s = at(&mut rng, evs.len());
    evs.insert(s, Ev::CrashServer);
    evs
}

/// The replay line of a schedule.
pub fn replay_line(evs: &[Ev]) -> String {
    evs.iter().map(Ev::code).collect::<Vec<_>>().join(" ")
}

/// Parse a replay line.
pub fn parse_line(line: &str) -> Option<Vec<Ev>> {
    line.split_whitespace().map(Ev::parse).collect()
}

/// What a run may break on purpose (to prove the checks notice).
#[derive(Clone, Copy, Debug, Default)]
pub struct Breaks {
    /// The server answers no resend from its reply cache.
    pub no_reply_cache: bool,
    /// The engine cancels and joins ops even after sending them.
    pub cancel_sent: bool,
    /// The replica lets the server forget replies it has not folded yet.
    pub ack_unfolded: bool,
    /// The engines speak as to a server before protocol 6: a change above
    /// what the replica released that the server calls expired is taken
    /// as never recorded and queued again (today's server executes such a
    /// change instead, so "expired" means recorded).
    pub untracked_releases: bool,
}

/// Messages from the server to a replica.
#[derive(Clone, Debug)]
enum Down {
    Reply(u64, Result<Applied, OpError>),
    Record(Box<Record>),
}

/// One replica: its cache and engine, and what its connection layer holds.
struct Rep {
    id: ReplicaId,
    /// Where its cache lives (in memory; survives the daemon's crashes).
    store: MemStorage,
    cache: Option<Cache>,
    engine: Engine,
    /// Connected (queues live only while connected).
    up: bool,
    /// Which connection (a new number at each connect).
    conn: u64,
    to_server: VecDeque<Mutation>,
    from_server: VecDeque<Down>,
    /// Stream position of the connection's subscription.
    sub: Seq,
    /// The connection layer (izo_client::Client): sent, not answered.
    unanswered: BTreeMap<u64, (Op, Option<Timestamp>)>,
    answered_through: u64,
    /// Every answer through this lsn is folded (what the server may forget).
    durable: u64,
    next_cseq: u64,
    cursor: u64,
    /// Every lsn queued, and those the engine dropped before sending
    /// (cancelled, joined) or that needed no send (nothing left).
    queued: BTreeSet<u64>,
    dropped: BTreeSet<u64>,
    /// Lsns answered as applied (Ok with a seq) by the server.
    acked: BTreeSet<u64>,
    /// Test switch: tell the server it may forget replies not yet folded.
    breaks_durable: bool,
    /// Entries queued again as new ones: new lsn → the one it replaced.
    requeued: BTreeMap<u64, u64>,
    /// Entries queued when the machine lost power that did not come back
    /// (never synced: a power loss may take them, as it takes any write
    /// not fsynced).
    lost: BTreeSet<u64>,
}

/// What a replica last left of an object it changed: whether it has a
/// name, and a file's or symlink's size, content and mode.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Snap {
    exists: bool,
    kind: Option<FileKind>,
    size: u64,
    content: [u8; 32],
    mode: u32,
}

/// The world of one run.
pub struct World {
    server: SimServer,
    reps: Vec<Rep>,
    /// The replicas that changed each object.
    touched: HashMap<ObjectId, BTreeSet<usize>>,
    /// Each replica's last state of each object it changed.
    last: Vec<HashMap<ObjectId, Snap>>,
    /// Objects each replica changed since its last fold (a power loss may
    /// take those changes back: they are not checked).
    since_fold: Vec<BTreeSet<ObjectId>>,
    unsure: BTreeSet<ObjectId>,
    cut: u8,
    now: Now,
    breaks: Breaks,
    /// Local ops that ran (allowed by the local rules).
    pub ran: usize,
}

/// A run's failure: what broke, after which event.
#[derive(Debug)]
pub struct Failure {
    /// The event index it broke at (`None`: in the final checks).
    pub at: Option<usize>,
    /// What broke.
    pub why: String,
}

type Res<T> = Result<T, String>;

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl World {
    /// A world of `n` replicas.
    pub fn new(n: u8, breaks: Breaks) -> Res<World> {
        let mut reps = Vec::new();
        for i in 0..n {
            reps.push(Rep {
                id: ReplicaId(0x5eed_0000 + i as u128),
                store: MemStorage::new(),
                cache: None,
                engine: Engine::new(0, Options { break_never_cancel_sent: breaks.cancel_sent }),
                up: false,
                conn: 0,
                to_server: VecDeque::new(),
                from_server: VecDeque::new(),
                sub: 0,
                unanswered: BTreeMap::new(),
                answered_through: 0,
                durable: 0,
                next_cseq: 1,
                cursor: 0,
                queued: BTreeSet::new(),
                dropped: BTreeSet::new(),
                acked: BTreeSet::new(),
                breaks_durable: breaks.ack_unfolded,
                lost: BTreeSet::new(),
                requeued: BTreeMap::new(),
            });
        }
        let server =
            SimServer::new(ServerOpts { reply_cache: !breaks.no_reply_cache, ..ServerOpts::default() }).map_err(err)?;
        let now = Now { mono: Duration::from_secs(1), wall: Timestamp { secs: 1_700_000_000, nsec: 0 } };
        let n = reps.len();
        Ok(World {
            server,
            reps,
            touched: HashMap::new(),
            last: vec![HashMap::new(); n],
            since_fold: vec![BTreeSet::new(); n],
            unsure: BTreeSet::new(),
            cut: 0,
            now,
            breaks,
            ran: 0,
        })
    }

    fn tick_clock(&mut self, ms: u64) {
        self.now.mono += Duration::from_millis(ms);
        let t = self.now.wall;
        let ns = t.nsec as u64 + ms * 1_000_000 + 1;
        self.now.wall = Timestamp { secs: t.secs + (ns / 1_000_000_000) as i64, nsec: (ns % 1_000_000_000) as u32 };
    }

    /// Run a schedule, then heal everything and check the invariants. A
    /// schedule whose replicas were down or refused too much is topped up
    /// after the heal with local ops (drawn from the schedule's length, so
    /// a replay draws the same) until `min_ops` ran, and heals again.
    pub fn run_at_least(&mut self, evs: &[Ev], min_ops: usize) -> Result<(), Failure> {
        self.run_events(evs)?;
        self.settle().map_err(|why| Failure { at: None, why })?;
        let mut rng = Rng::new(0x70_70 ^ evs.len() as u64);
        let n = self.reps.len() as u64;
        let mut tries = 0;
        while self.ran < min_ops && tries < 20 * min_ops {
            tries += 1;
            let e = Ev::Local(rng.below(n) as u8, rng.below(12) as u8, rng.below(64) as u16, rng.below(64) as u16);
            self.tick_clock(10);
            self.step(e).map_err(|why| Failure { at: None, why: format!("top-up {}: {why}", e.code()) })?;
        }
        self.settle().map_err(|why| Failure { at: None, why })?;
        self.check().map_err(|why| Failure { at: None, why })
    }

    /// Run a schedule, then heal everything and check the invariants.
    pub fn run(&mut self, evs: &[Ev]) -> Result<(), Failure> {
        self.run_events(evs)?;
        self.settle().map_err(|why| Failure { at: None, why })?;
        self.check().map_err(|why| Failure { at: None, why })
    }

    fn run_events(&mut self, evs: &[Ev]) -> Result<(), Failure> {
        // every replica starts mounted (a crash later takes one down until
        // it reaches the server again)
        for r in 0..self.reps.len() {
            self.connect(r).map_err(|why| Failure { at: None, why: format!("start: {why}") })?;
        }
        for (i, e) in evs.iter().enumerate() {
            self.tick_clock(10);
            self.step(*e).map_err(|why| Failure { at: Some(i), why: format!("{}: {why}", e.code()) })?;
            if std::env::var_os("IZO_SIM_TRACE").is_some() {
                for (r, p) in self.reps.iter().enumerate() {
                    if let Some(c) = &p.cache {
                        let names: Vec<String> = c
                            .children(ObjectId::ROOT)
                            .unwrap_or_default()
                            .into_iter()
                            .map(|(n, id)| format!("{}={id}", String::from_utf8_lossy(&n)))
                            .collect();
                        eprintln!(
                            "after {}: replica {r}: {names:?} queued {:?}",
                            e.code(),
                            p.engine.entries().iter().map(|(l, e, s)| (*l, e.op.kind(), *s)).collect::<Vec<_>>()
                        );
                    }
                }
            }
        }
        Ok(())
    }

    fn step(&mut self, e: Ev) -> Res<()> {
        let n = self.reps.len() as u8;
        match e {
            Ev::Local(r, k, a, b) if r < n => self.local(r as usize, k, a, b),
            Ev::Send(r) if r < n => self.send(r as usize),
            Ev::Deliver(r, k) if r < n => self.deliver(r as usize, k as usize),
            Ev::Receive(r, k) if r < n => self.receive(r as usize, k as usize),
            Ev::Stream(r) if r < n => self.stream(r as usize),
            Ev::Tick(r) if r < n => self.timers(r as usize),
            Ev::Fold(r) if r < n => self.fold(r as usize),
            Ev::Drop(r) if r < n => {
                self.disconnect(r as usize);
                Ok(())
            }
            Ev::Connect(r) if r < n => self.connect(r as usize),
            Ev::Partition(m) => {
                self.cut |= m;
                for r in 0..n {
                    if m & (1 << r) != 0 {
                        self.disconnect(r as usize);
                    }
                }
                Ok(())
            }
            Ev::Heal => {
                self.cut = 0;
                Ok(())
            }
            Ev::CrashReplica(r, how) if r < n => self.crash_replica(r as usize, how == 1),
            Ev::FailBatch => {
                self.server.refuse_next_batch();
                Ok(())
            }
            Ev::CrashServer => {
                self.server.crash().map_err(err)?;
                for r in 0..self.reps.len() {
                    self.disconnect(r);
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn disconnect(&mut self, r: usize) {
        let p = &mut self.reps[r];
        p.up = false;
        p.to_server.clear();
        p.from_server.clear();
    }

    /// The daemon dies (a SIGKILL: every returned write survives) or the
    /// machine loses power (only what was synced survives); nothing is
    /// folded, and the connection layer's memory is gone.
    fn crash_replica(&mut self, r: usize, power: bool) -> Res<()> {
        self.disconnect(r);
        if power {
            self.unsure.extend(std::mem::take(&mut self.since_fold[r]));
        }
        let breaks = self.breaks;
        let p = &mut self.reps[r];
        p.cache = None;
        if power {
            // (those that come back are queued again at the restart)
            p.lost.extend(p.queued.iter().copied());
            p.store.power_loss();
        } else {
            p.store.kill();
        }
        p.engine = Engine::new(0, Options { break_never_cancel_sent: breaks.cancel_sent });
        p.unanswered.clear();
        p.answered_through = 0;
        p.durable = 0;
        p.next_cseq = 1;
        p.cursor = 0;
        Ok(())
    }

    /// Connect (a handshake; a replica that is down starts first, as a
    /// mount does once it reaches the server), resend what is unanswered,
    /// subscribe from the cache's position.
    fn connect(&mut self, r: usize) -> Res<()> {
        if self.cut & (1 << r) != 0 || self.reps[r].up {
            return Ok(());
        }
        let hello = self.server.hello(self.reps[r].id, self.now.wall).map_err(err)?;
        let p = &mut self.reps[r];
        p.next_cseq = p.next_cseq.max(hello.last_applied + 1);
        if p.cache.is_none() {
            let cache = Cache::open_on(p.store.clone()).map_err(err)?;
            let (dirty, mut touched) = cache.replay_log().map_err(err)?;
            touched.extend(cache.flagged_refreshes().map_err(err)?);
            let entries = cache.cml().map_err(err)?;
            let parked_next = cache.parked().map_err(err)?.last().map(|(l, _)| l + 1).unwrap_or(0);
            let seq = cache.seq().map_err(err)?;
            let mut e = Engine::new(seq, Options { break_never_cancel_sent: self.breaks.cancel_sent });
            // (the simulated server is today's: "expired" means recorded)
            e.set_releases_tracked(!self.breaks.untracked_releases);
            let floor = p.next_cseq.max(parked_next);
            let logged = cache.logged_lsn(floor).map_err(err)?;
            let edits = e.recover(&cache, entries, dirty, touched, floor, logged);
            if cache.meta(engine::RESYNC).map_err(err)? == 1 {
                e.resync_due();
            }
            cache.local(&edits).map_err(err)?;
            p.queued.extend(e.entries().iter().map(|(l, _, _)| *l));
            for (l, _, _) in e.entries() {
                p.lost.remove(&l);
            }
            p.durable = e.durable_mark();
            e.reported_durable(p.durable);
            if cache.meta("synced").map_err(err)? == 0 && seq == 0 {
                initial(&self.server, &cache).map_err(|e| format!("initial sync: {e}"))?;
                e.set_applied(cache.seq().map_err(err)?);
            }
            p.cache = Some(cache);
            p.engine = e;
        }
        p.up = true;
        p.conn += 1;
        // (the mount's connection sends nothing again itself: the sender
        // sends what went unanswered, in its log's order)
        for lsn in std::mem::take(&mut p.unanswered).into_keys() {
            p.engine.lost(lsn);
        }
        p.sub = p.cache.as_ref().map(|c| c.seq()).transpose().map_err(err)?.unwrap_or(0);
        Ok(())
    }

    fn send(&mut self, r: usize) -> Res<()> {
        let now = self.now;
        let p = &mut self.reps[r];
        loop {
            let Some(cache) = &p.cache else { return Ok(()) };
            let Next::Send { lsn, entry, was_sent } = p.engine.next_to_send(p.up, now) else {
                return Ok(());
            };
            let stamp = entry.time;
            let (len, op) = (entry.len, entry.op.clone());
            let built = match build(cache, entry) {
                // (sent before: again whatever the data file holds, as the
                // mount's sender does)
                Ok(None) if was_sent => {
                    let mut op = Engine::bases(cache, op);
                    if let Op::Write { data, .. } = &mut op {
                        *data = vec![0; len as usize];
                    }
                    Ok(Some(op))
                }
                b => b,
            };
            match built {
                Err(e) => {
                    p.engine.unsend(lsn, was_sent);
                    return Err(format!("reading change {lsn}: {e}"));
                }
                Ok(None) => {
                    p.cursor = lsn;
                    p.dropped.insert(lsn);
                    answered(p, lsn, Ok(None), now)?;
                }
                Ok(Some(op)) => {
                    p.cursor = lsn;
                    p.next_cseq = p.next_cseq.max(lsn + 1);
                    p.to_server.push_back(Mutation {
                        replica: p.id,
                        cseq: lsn,
                        acked_through: acked(p),
                        op: op.clone(),
                        stamp,
                        conn: p.conn,
                    });
                    p.unanswered.insert(lsn, (op, stamp));
                }
            }
        }
    }

    fn deliver(&mut self, r: usize, n: usize) -> Res<()> {
        let p = &mut self.reps[r];
        if !p.up || p.to_server.is_empty() {
            return Ok(());
        }
        let k = n.min(p.to_server.len());
        let batch: Vec<Mutation> = p.to_server.drain(..k).collect();
        let replies = self.server.mutate(&batch, self.now.wall);
        if replies.len() != batch.len() {
            return Err(format!("{} replies to a batch of {}", replies.len(), batch.len()));
        }
        for (m, rep) in batch.iter().zip(replies) {
            p.from_server.push_back(Down::Reply(m.cseq, rep));
        }
        Ok(())
    }

    fn stream(&mut self, r: usize) -> Res<()> {
        let p = &mut self.reps[r];
        if !p.up {
            return Ok(());
        }
        for rec in self.server.records_from(p.sub + 1, 64).map_err(err)? {
            p.sub = rec.seq;
            p.from_server.push_back(Down::Record(Box::new(rec)));
        }
        Ok(())
    }

    fn receive(&mut self, r: usize, n: usize) -> Res<()> {
        let now = self.now;
        for _ in 0..n {
            let p = &mut self.reps[r];
            let Some(msg) = p.from_server.pop_front() else { return Ok(()) };
            match msg {
                Down::Reply(cseq, res) => {
                    if p.unanswered.remove(&cseq).is_none() {
                        continue; // answered before (a resend's second answer)
                    }
                    let first_open = p.unanswered.keys().next().copied().unwrap_or(p.next_cseq);
                    p.answered_through = p.answered_through.max(first_open - 1);
                    if let Ok(a) = &res {
                        if a.seq > 0 {
                            p.acked.insert(cseq);
                        }
                    }
                    answered(p, cseq, res.map(Some), now)?;
                }
                Down::Record(rec) => {
                    // what else has arrived goes into the same transaction
                    let mut recs = vec![*rec];
                    while let Some(Down::Record(_)) = p.from_server.front() {
                        if let Some(Down::Record(next)) = p.from_server.pop_front() {
                            recs.push(*next);
                        }
                    }
                    apply_batch(&self.server, p, &recs, now)?;
                }
            }
        }
        Ok(())
    }

    fn timers(&mut self, r: usize) -> Res<()> {
        let now = self.now;
        let p = &mut self.reps[r];
        let Some(cache) = &p.cache else { return Ok(()) };
        if let Some(l) = p.engine.seal_all(cache, now).map_err(err)? {
            p.queued.extend(l.queued.iter().copied());
            log(cache, &mut p.engine, l)?;
        }
        let (edits, _) = p.engine.take_ready(cache).map_err(err)?;
        cache.local(&edits).map_err(err)?;
        if !p.up {
            return Ok(());
        }
        let (redo, refresh) = p.engine.housekeep();
        for (id, all) in refresh {
            refresh_one(&self.server, p, id, all)?;
        }
        if redo {
            resync(&self.server, p)?;
        }
        Ok(())
    }

    fn fold(&mut self, r: usize) -> Res<()> {
        let p = &mut self.reps[r];
        let Some(cache) = &p.cache else { return Ok(()) };
        let mark = p.engine.durable_mark();
        let edits = p.engine.fold_edits(cache).map_err(err)?;
        cache.local(&edits).map_err(err)?;
        cache.fold().map_err(err)?;
        p.durable = p.durable.max(mark);
        p.engine.reported_durable(mark);
        self.since_fold[r].clear();
        Ok(())
    }

    /// Heal: every partition ends, every replica connects, and the world
    /// runs until nothing moves.
    fn settle(&mut self) -> Res<()> {
        self.cut = 0;
        for round in 0..400 {
            self.tick_clock(1_000);
            for r in 0..self.reps.len() {
                self.connect(r)?;
                self.timers(r)?;
                self.send(r)?;
                while !self.reps[r].to_server.is_empty() {
                    self.deliver(r, 8)?;
                }
                self.stream(r)?;
                if std::env::var_os("IZO_SIM_TRACE").is_some() && round < 3 {
                    for d in &self.reps[r].from_server {
                        eprintln!("round {round} replica {r} gets {d:?}");
                    }
                }
                while !self.reps[r].from_server.is_empty() {
                    self.receive(r, 64)?;
                }
                if std::env::var_os("IZO_SIM_TRACE").is_some() && round < 3 {
                    if let Some(c) = &self.reps[r].cache {
                        eprintln!("round {round} replica {r}: {:?}", c.children(ObjectId::ROOT));
                    }
                }
            }
            let head = self.server.head();
            let quiet = self.reps.iter().all(|p| {
                p.engine.settled()
                    && p.unanswered.is_empty()
                    && p.to_server.is_empty()
                    && p.from_server.is_empty()
                    && p.engine.applied_seq() >= head
            });
            if quiet && round > 0 {
                // one more round: housekeeping after the last batch
                let mut again = false;
                for r in 0..self.reps.len() {
                    let (redo, refresh) = self.reps[r].engine.housekeep();
                    if redo || !refresh.is_empty() {
                        again = true;
                        let p = &mut self.reps[r];
                        for (id, all) in refresh {
                            refresh_one(&self.server, p, id, all)?;
                        }
                        if redo {
                            resync(&self.server, p)?;
                        }
                    }
                }
                if !again {
                    return Ok(());
                }
            }
        }
        let why: Vec<String> = self
            .reps
            .iter()
            .enumerate()
            .map(|(i, p)| {
                format!(
                    "replica {i}: {} queued {:?}, {} unanswered, applied {} of {}, sender {:?}, up {}",
                    p.engine.queued(),
                    p.engine.entries().iter().map(|(l, e, s)| (*l, e.op.kind(), *s)).collect::<Vec<_>>(),
                    p.unanswered.len(),
                    p.engine.applied_seq(),
                    self.server.head(),
                    p.engine.sender(),
                    p.up,
                )
            })
            .collect();
        Err(format!("the world did not settle: {}", why.join("; ")))
    }

    /// The invariants (see docs/design.md, "Invariants").
    fn check(&self) -> Res<()> {
        // each CML entry sent is applied at most once
        let mut seen = HashMap::new();
        for rec in self.server.records_from(0, usize::MAX).map_err(err)? {
            if let Origin::Replica(id, cseq) = rec.origin {
                if let Some(first) = seen.insert((id, cseq), rec.seq) {
                    return Err(format!(
                        "change {cseq} of replica {:x} was applied twice (records {first} and {})",
                        id.0, rec.seq
                    ));
                }
            }
        }
        if std::env::var_os("IZO_SIM_TRACE").is_some() {
            for rec in self.server.records_from(0, usize::MAX).map_err(err)? {
                eprintln!("record {} from {:?}: {}", rec.seq, rec.origin, rec.op.kind());
            }
        }
        let want = self.server.digest();
        for (i, p) in self.reps.iter().enumerate() {
            let cache = p.cache.as_ref().ok_or(format!("replica {i} is not running after the heal"))?;
            // every entry queued is accounted for: applied once, parked,
            // or dropped by the engine before it was ever sent
            let parked: BTreeSet<u64> = cache.parked().map_err(err)?.into_iter().map(|(l, _)| l).collect();
            // a change queued again (as never recorded) was not applied before
            for (new, old) in &p.requeued {
                if seen.contains_key(&(p.id, *new)) && seen.contains_key(&(p.id, *old)) {
                    return Err(format!("change {old} of replica {i} was applied twice (again as {new})"));
                }
            }
            for lsn in &parked {
                let mut at = *lsn;
                while let Some(old) = p.requeued.get(&at) {
                    if seen.contains_key(&(p.id, *old)) {
                        return Err(format!("change {old} of replica {i} was applied, and parked again as {lsn}"));
                    }
                    at = *old;
                }
            }
            for lsn in &p.queued {
                let applied = seen.contains_key(&(p.id, *lsn));
                if !applied && !parked.contains(lsn) && !p.dropped.contains(lsn) && !p.lost.contains(lsn) {
                    return Err(format!("change {lsn} of replica {i} was never applied nor parked"));
                }
            }
            // each replica's last state of every object only it changed
            // survives (in the tree, or parked)
            let parked_objs: BTreeSet<ObjectId> =
                cache.parked().map_err(err)?.into_iter().flat_map(|(_, pk)| op_objects(&pk.op)).collect();
            for (id, want) in &self.last[i] {
                let only_here = self.touched.get(id).is_some_and(|t| t.len() == 1);
                if !only_here || self.unsure.contains(id) || parked_objs.contains(id) {
                    continue;
                }
                let have = snap(cache, *id)?;
                if &have != want {
                    return Err(format!(
                        "replica {i}'s last change of {id} is lost: it left {want:?}, the volume has {have:?}"
                    ));
                }
            }
            let got = digest(cache).map_err(|e| format!("replica {i}: {e}"))?;
            if std::env::var_os("IZO_SIM_TRACE").is_some() {
                eprintln!(
                    "server: {:?}\nreplica {i}: {:?}",
                    want.nodes.keys().collect::<Vec<_>>(),
                    got.nodes.keys().collect::<Vec<_>>()
                );
            }
            let diff = want.diff(&got);
            if !diff.is_empty() {
                return Err(format!("replica {i} differs from the server:\n{}", diff.join("\n")));
            }
        }
        Ok(())
    }
}

/// What the server may forget replies through (as `Client` sends it once
/// the shell reports folds: `set_durable_through`).
fn acked(p: &Rep) -> u64 {
    if p.breaks_durable {
        return p.answered_through;
    }
    p.answered_through.min(p.durable)
}

/// Log a planned change, then acknowledge it.
fn log(cache: &Cache, e: &mut Engine, l: engine::Local) -> Res<()> {
    match cache.local(&l.edits) {
        Ok(()) => {
            e.advance(&l);
            Ok(())
        }
        Err(x) => {
            e.abandon(&l);
            Err(err(x))
        }
    }
}

/// The op as sent (as the mount's sender builds it).
fn build(cache: &Cache, e: izo_client::cache::CmlEntry) -> Res<Option<Op>> {
    let mut op = Engine::bases(cache, e.op);
    if let (Op::Write { id, offset, data, .. }, true) = (&mut op, e.len > 0) {
        if cache.data_len(*id).map_err(err)?.is_none() {
            return Ok(None); // removed since
        }
        let mut buf = vec![0u8; e.len as usize];
        let mut got = 0;
        while got < buf.len() {
            match cache.data_read_at(*id, *offset + got as u64, &mut buf[got..]).map_err(err)? {
                0 => break,
                n => got += n,
            }
        }
        if got == 0 {
            return Ok(None);
        }
        buf.truncate(got);
        *data = buf;
    }
    Ok(Some(op))
}

/// An answer reaches the engine (as the mount's `answered`).
fn answered(p: &mut Rep, lsn: u64, r: Result<Option<Applied>, OpError>, now: Now) -> Res<()> {
    let Some(cache) = &p.cache else { return Ok(()) };
    let Some(out) = p.engine.answered(lsn, r, now) else { return Ok(()) };
    let mut edits = out.now;
    for e in &edits {
        if let Edit::Cml(l, _) = e {
            p.queued.insert(*l);
            p.dropped.insert(lsn); // (retried as a new entry)
            p.requeued.insert(*l, lsn);
        }
    }
    if let Some((plsn, mut op, error, len)) = out.park {
        if let (Op::Write { id, offset, data, .. }, true) = (&mut op, len > 0) {
            let mut buf = vec![0u8; len as usize];
            let n = cache.data_read_at(*id, *offset, &mut buf).unwrap_or(0);
            buf.truncate(n);
            *data = buf;
        }
        edits.insert(0, Edit::Park(plsn, Parked { op, error, kept: None }));
    }
    cache.local(&edits).map_err(err)?;
    if out.ready {
        let (edits, _) = p.engine.take_ready(cache).map_err(err)?;
        cache.local(&edits).map_err(err)?;
    }
    Ok(())
}

/// Records land (as the mount's `prepare` and `apply_batch`).
fn apply_batch(server: &SimServer, p: &mut Rep, recs: &[Record], now: Now) -> Res<()> {
    let Some(cache) = &p.cache else { return Ok(()) };
    let Some(last) = recs.last() else { return Ok(()) };
    let mut planned = Vec::new();
    for r in recs {
        let own = p.engine.own(r, p.id);
        let mut pl = Engine::plan_record(cache, r, own).map_err(err)?;
        for d in std::mem::take(&mut pl.data) {
            if !p.engine.may_land(d.id()) {
                continue;
            }
            match d {
                Data::Write { id, offset, data } => cache.data_write_at(id, offset, &data).map_err(err)?,
                Data::Fetch { id, offset, len } => {
                    let Some(all) = server.read(id) else { continue };
                    let end = (offset + len).min(all.len() as u64);
                    if offset < end {
                        cache.data_write_at(id, offset, &all[offset as usize..end as usize]).map_err(err)?;
                    }
                }
                Data::Punch { id, offset, len } => cache.data_punch(id, offset, len).map_err(err)?,
                Data::Allocate { id, offset, len } => cache.data_allocate(id, offset, len).map_err(err)?,
                Data::SetLen { id, size } => cache.data_set_len(id, size).map_err(err)?,
            }
        }
        for n in std::mem::take(&mut pl.needs) {
            match n {
                Need::Xattrs { id, attr } => {
                    if let Ok(x) = server.store().xattrs(id) {
                        pl.edits.push(Edit::Put { attr, target: None, xattrs: Some(x) });
                    }
                }
                Need::Attr(id) => {
                    let a = server.store().getattr(id).ok();
                    pl.edits.extend(Engine::attr_answer(cache, id, a).map_err(err)?)
                }
            }
        }
        planned.push(pl);
    }
    let b = p.engine.apply_records(cache, planned, last.seq, now).map_err(err)?;
    cache.local(&b.edits).map_err(err)?;
    p.engine.set_applied(last.seq);
    Ok(())
}

/// Ask the server about an object again (as the mount's `refresh_one`).
fn refresh_one(server: &SimServer, p: &mut Rep, id: ObjectId, all: bool) -> Res<()> {
    let Some(cache) = &p.cache else { return Ok(()) };
    if !all && cache.get(id).map_err(err)?.is_none() {
        return Ok(());
    }
    let Ok(a) = server.store().getattr(id) else { return Ok(()) };
    if p.engine.refresh_answer(cache, id, all, &a).map_err(err)? == Refresh::Skip {
        return Ok(());
    }
    let x = if all { server.store().xattrs(id).ok() } else { None };
    if all && a.kind == FileKind::File {
        if let Some(bytes) = server.read(id) {
            cache.data_create(id).map_err(err)?;
            cache.data_write_at(id, 0, &bytes).map_err(err)?;
        }
    }
    cache.local(&[Edit::Put { attr: a, target: None, xattrs: x }, engine::refresh_flag(id, false)]).map_err(err)
}

/// Fill an empty cache from the server's snapshot.
fn initial(server: &SimServer, cache: &Cache) -> Res<()> {
    let (entries, seq) = server.snapshot().map_err(err)?;
    let mut edits = vec![Edit::ClearEntries];
    for o in entries {
        let e = o.entry;
        if e.attr.kind == FileKind::File {
            cache.data_create(e.attr.id).map_err(err)?;
            cache.data_write_at(e.attr.id, 0, &o.data.unwrap_or_default()).map_err(err)?;
        }
        edits.push(Edit::Put { attr: e.attr.clone(), target: e.target, xattrs: Some(e.xattrs) });
        for (parent, name) in e.links {
            edits.push(Edit::Link { parent, name, id: e.attr.id });
        }
    }
    edits.push(Edit::Seq(seq));
    edits.push(Edit::Meta("synced".into(), 1));
    cache.change(&edits).map_err(err)
}

/// Bring the cache to the server's snapshot (as the mount's `resync`).
fn resync(server: &SimServer, p: &mut Rep) -> Res<()> {
    let Some(cache) = &p.cache else { return Ok(()) };
    if !p.engine.settled() {
        return Ok(());
    }
    let (entries, seq) = server.snapshot().map_err(err)?;
    let mut edits = vec![Edit::ClearEntries];
    let keep: BTreeSet<ObjectId> = entries.iter().map(|o| o.entry.attr.id).collect();
    for o in entries {
        let e = o.entry;
        if e.attr.kind == FileKind::File {
            cache.data_create(e.attr.id).map_err(err)?;
            cache.data_write_at(e.attr.id, 0, &o.data.unwrap_or_default()).map_err(err)?;
        }
        edits.push(Edit::Put { attr: e.attr.clone(), target: e.target, xattrs: Some(e.xattrs) });
        for (parent, name) in e.links {
            edits.push(Edit::Link { parent, name, id: e.attr.id });
        }
    }
    for id in cache.ids().map_err(err)? {
        if !keep.contains(&id) {
            edits.push(Edit::Forget { id });
        }
    }
    edits.push(Edit::Seq(seq));
    edits.push(Edit::Meta(engine::RESYNC.into(), 0));
    cache.change(&edits).map_err(err)?;
    p.engine.resynced(seq);
    p.sub = p.sub.max(seq);
    // (the stream resumes after the snapshot)
    p.from_server.retain(|d| !matches!(d, Down::Record(r) if r.seq <= seq));
    Ok(())
}

/// Every object an op names.
fn op_objects(op: &Op) -> Vec<ObjectId> {
    let mut v = Vec::new();
    match op {
        Op::Create { parent, id, .. }
        | Op::Mkdir { parent, id, .. }
        | Op::Symlink { parent, id, .. }
        | Op::Mknod { parent, id, .. }
        | Op::Link { parent, id, .. } => v.extend([*parent, *id]),
        Op::Unlink { parent, expect, .. } | Op::Rmdir { parent, expect, .. } => v.extend([*parent, expect.id]),
        Op::Rename { parent, expect, new_parent, target, .. } => {
            v.extend([*parent, expect.id, *new_parent]);
            v.extend(target.iter().map(|t| t.id));
        }
        op => v.extend(op.changed_object()),
    }
    v
}

/// What a cache holds of an object (see [`Snap`]).
fn snap(cache: &Cache, id: ObjectId) -> Res<Snap> {
    let Some(o) = cache.get(id).map_err(err)? else {
        return Ok(Snap { exists: false, kind: None, size: 0, content: [0; 32], mode: 0 });
    };
    if o.attr.nlink == 0 {
        return Ok(Snap { exists: false, kind: None, size: 0, content: [0; 32], mode: 0 });
    }
    let n = node(cache, &o)?;
    let dir = o.attr.kind == FileKind::Dir;
    Ok(Snap {
        exists: true,
        kind: Some(o.attr.kind),
        size: if dir { 0 } else { n.size },
        content: if dir { [0; 32] } else { n.content },
        mode: n.mode,
    })
}

/// A replica's tree as the testkit describes trees.
fn digest(cache: &Cache) -> Res<Digest> {
    let mut nodes = BTreeMap::new();
    let mut names: HashMap<ObjectId, Vec<Vec<u8>>> = HashMap::new();
    let mut stack = vec![(ObjectId::ROOT, Vec::new())];
    while let Some((id, path)) = stack.pop() {
        let Some(o) = cache.get(id).map_err(err)? else { continue };
        let kind = Kind::from(o.attr.kind);
        if kind == Kind::Dir {
            for (name, child) in cache.children(id).map_err(err)? {
                let mut cp = path.clone();
                if !cp.is_empty() {
                    cp.push(b'/');
                }
                cp.extend_from_slice(&name);
                stack.push((child, cp));
            }
        } else if o.attr.nlink > 1 {
            names.entry(id).or_default().push(path.clone());
        }
        nodes.insert(path, node(cache, &o)?);
    }
    for paths in names.into_values() {
        if paths.len() < 2 {
            continue;
        }
        let Some(smallest) = paths.iter().min().cloned() else { continue };
        for p in paths {
            if let Some(n) = nodes.get_mut(&p) {
                n.link_group = Some(smallest.clone());
            }
        }
    }
    Ok(Digest { nodes })
}

fn node(cache: &Cache, o: &Cached) -> Res<Node> {
    let kind = Kind::from(o.attr.kind);
    let content = match kind {
        Kind::File => {
            let mut data = vec![0u8; o.attr.size as usize];
            let mut got = 0;
            while got < data.len() {
                match cache.data_read_at(o.attr.id, got as u64, &mut data[got..]).map_err(err)? {
                    0 => break,
                    n => got += n,
                }
            }
            *blake3::hash(&data).as_bytes()
        }
        Kind::Symlink => *blake3::hash(o.target.as_deref().unwrap_or_default()).as_bytes(),
        _ => [0; 32],
    };
    Ok(Node {
        kind,
        mode: if kind == Kind::Symlink { 0o777 } else { o.attr.mode },
        uid: o.attr.uid,
        gid: o.attr.gid,
        mtime: (o.attr.mtime.secs, o.attr.mtime.nsec),
        size: if kind == Kind::File { o.attr.size } else { 0 },
        content,
        xattrs: o.xattrs.iter().filter(|(k, _)| digest_xattr(k)).cloned().collect(),
        link_group: None,
    })
}

impl World {
    /// A local op on replica `r`, as the mount's shell does it.
    fn local(&mut self, r: usize, k: u8, a: u16, b: u16) -> Res<()> {
        let now = self.now;
        let p = &mut self.reps[r];
        let Some(cache) = &p.cache else { return Ok(()) };
        // the namespace the op picks from: the root and its directories
        let mut dirs = vec![ObjectId::ROOT];
        let mut names: Vec<(ObjectId, Vec<u8>, ObjectId)> = Vec::new();
        for (n, id) in cache.children(ObjectId::ROOT).map_err(err)? {
            if cache.get(id).map_err(err)?.is_some_and(|c| c.attr.kind == FileKind::Dir) {
                dirs.push(id);
                for (n2, id2) in cache.children(id).map_err(err)? {
                    names.push((id, n2, id2));
                }
            }
            names.push((ObjectId::ROOT, n, id));
        }
        let dir = dirs[a as usize % dirs.len()];
        // a new name: the first free one from `b` on (creates mostly succeed)
        let free = (0..6u16)
            .map(|i| format!("n{}", (b + i) % 6).into_bytes())
            .find(|n| cache.lookup(dir, n).ok().flatten().is_none());
        let name = match (k, free) {
            (0..=2 | 10, Some(n)) => n,
            _ => format!("n{}", b % 6).into_bytes(),
        };
        let pick = names.get(a as usize % names.len().max(1)).cloned();
        let mut files = Vec::new();
        for n in &names {
            if cache.get(n.2).map_err(err)?.is_some_and(|c| c.attr.kind == FileKind::File) {
                files.push(n.clone());
            }
        }
        let fpick = files.get(a as usize % files.len().max(1)).cloned();
        let before: BTreeSet<u64> = p.engine.entries().iter().map(|(l, _, _)| *l).collect();
        let planned = match (k, &pick) {
            (0..=2, _) => {
                let kind = match k {
                    0 => FileKind::File,
                    1 => FileKind::Dir,
                    _ => FileKind::Symlink,
                };
                let id = ObjectId::new();
                let m = Make {
                    parent: dir,
                    name: &name,
                    kind,
                    mode: 0o644,
                    uid: 0,
                    gid: 0,
                    target: (kind == FileKind::Symlink).then_some(b"t".as_slice()),
                    rdev: 0,
                    trusted: Some(false),
                };
                let l = p.engine.make(cache, m, id, now);
                if l.is_ok() && kind == FileKind::File {
                    cache.data_create(id).map_err(err)?;
                }
                l
            }
            (3..=5, _) => {
                let Some((_, _, id)) = &fpick else { return Ok(()) };
                // a write of a few bytes somewhere near the end
                let Some(o) = cache.get(*id).map_err(err)? else { return Ok(()) };
                if o.attr.kind != FileKind::File {
                    return Ok(());
                }
                let off = (b as u64 * 7) % (o.attr.size + 8);
                let data = vec![(a % 251) as u8 + 1; 1 + (b as usize % 40)];
                cache.data_write_at(*id, off, &data).map_err(err)?;
                if Engine::write_is_shared(cache, *id).map_err(err)? {
                    cache.log_dirty(*id, off, data.len() as u64).map_err(err)?;
                }
                p.engine.wrote(cache, *id, off, data.len() as u64, now)
            }
            (6, Some((_, _, id))) => {
                let Some(o) = cache.get(*id).map_err(err)? else { return Ok(()) };
                let (size, attrs) = match (o.attr.kind, b % 3) {
                    (FileKind::File, 0) => (Some(b as u64 % 50), SetAttrs::default()),
                    (_, 1) => (None, SetAttrs { mode: Some(0o600 + (a as u32 % 0o100)), ..Default::default() }),
                    _ => (
                        None,
                        SetAttrs { mtime: Some(Timestamp { secs: 1_000 + a as i64, nsec: 0 }), ..Default::default() },
                    ),
                };
                let l = p.engine.setattr(cache, *id, size, attrs, false, now);
                if let (Ok(_), Some(size)) = (&l, size) {
                    cache.data_set_len(*id, size).map_err(err)?;
                }
                l
            }
            (7 | 8, Some((parent, n, _))) => {
                let mode = if a.is_multiple_of(5) { RenameMode::NoReplace } else { RenameMode::Replace };
                p.engine.rename(cache, *parent, n, dir, &name, mode, now)
            }
            (9, Some((parent, n, id))) => {
                let is_dir = cache.get(*id).map_err(err)?.is_some_and(|c| c.attr.kind == FileKind::Dir);
                p.engine.remove(cache, *parent, n, is_dir, now)
            }
            (10, _) => {
                let Some((_, _, id)) = &fpick else { return Ok(()) };
                p.engine.link(cache, *id, dir, &name, now)
            }
            (11, Some((_, _, id))) => match p.engine.seal(cache, *id, now).map_err(err)? {
                Some(l) => Ok(l),
                None => return Ok(()),
            },
            _ => return Ok(()),
        };
        let Ok(l) = planned else { return Ok(()) }; // refused by the local rules
        self.ran += 1;
        let queued = l.queued.clone();
        let gone = l.gone;
        let mut changed: BTreeSet<ObjectId> = BTreeSet::new();
        for e in &l.edits {
            match e {
                Edit::Put { attr, .. } => {
                    changed.insert(attr.id);
                }
                Edit::Link { id, .. } | Edit::UnlinkIf { id, .. } | Edit::Forget { id } => {
                    changed.insert(*id);
                }
                _ => {}
            }
        }
        log(cache, &mut p.engine, l)?;
        for id in &changed {
            let s = snap(cache, *id)?;
            self.last[r].insert(*id, s);
            self.touched.entry(*id).or_default().insert(r);
            self.since_fold[r].insert(*id);
        }
        let after: BTreeSet<u64> = p.engine.entries().iter().map(|(l, _, _)| *l).collect();
        p.queued.extend(queued);
        // cancelled or joined before ever being sent
        for l in before.difference(&after) {
            p.dropped.insert(*l);
        }
        if let Some((id, _)) = gone {
            if cache.get(id).map_err(err)?.is_some_and(|c| c.attr.nlink == 0) {
                cache.purge(id).map_err(err)?;
                cache.data_remove(id).map_err(err)?;
            }
        }
        Ok(())
    }
}

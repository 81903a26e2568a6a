//! The deterministic simulation: thousands of schedules of three replica
//! engines and the real server logic, each from one seed, each with local
//! ops (offline ones too), at least one partition and one crash; after the
//! heal every invariant of docs/design.md's list holds.
//!
//! A failing seed prints a one-line reproduction (the shrunk schedule) to
//! run again with `IZO_SIM_REPLAY="…" cargo nextest run -p izo-sim replay`.
//! `scripts/sim-soak` runs many more (IZO_SIM_SCHEDULES).

use izo_sim::world::{parse_line, replay_line, schedule, Breaks, Failure, World};

const REPLICAS: u8 = 3;
const OPS: usize = 60;

fn env_u64(k: &str, d: u64) -> u64 {
    std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d)
}

/// Run one schedule in a fresh world.
fn run(evs: &[izo_sim::world::Ev], breaks: Breaks) -> Result<usize, Failure> {
    let mut w = World::new(REPLICAS, breaks).map_err(|why| Failure { at: None, why })?;
    w.run(evs).map(|()| w.ran)
}

/// The smallest sub-schedule that still fails (chunks, then single events).
fn shrink(evs: Vec<izo_sim::world::Ev>, breaks: Breaks) -> Vec<izo_sim::world::Ev> {
    let mut cur = evs;
    let mut chunk = cur.len() / 2;
    while chunk >= 1 {
        let mut i = 0;
        let mut progress = false;
        while i < cur.len() {
            let mut next = cur.clone();
            next.drain(i..(i + chunk).min(cur.len()));
            if run(&next, breaks).is_err() {
                cur = next;
                progress = true;
            } else {
                i += chunk;
            }
        }
        if !progress {
            chunk /= 2;
        }
    }
    cur
}

/// Run `n` seeds from `first`; the first failure, shrunk, with its line.
fn sweep(first: u64, n: u64, breaks: Breaks) -> Result<(u64, usize), String> {
    let mut ran = 0;
    for seed in first..first + n {
        let evs = schedule(seed, REPLICAS, OPS);
        match run(&evs, breaks) {
            Ok(ops) => ran += ops,
            Err(f) => {
                let small = shrink(evs, breaks);
                let why = run(&small, breaks).err().map(|f| f.why).unwrap_or(f.why);
                return Err(format!(
                    "seed {seed} fails: {why}\nreplay (shrunk to {} events): IZO_SIM_REPLAY=\"{}\" cargo nextest run -p \
                     izo-sim replay",
                    small.len(),
                    replay_line(&small)
                ));
            }
        }
    }
    Ok((n, ran))
}

#[test]
fn a_thousand_schedules_keep_every_invariant() {
    let n = env_u64("IZO_SIM_SCHEDULES", 1000);
    let first = env_u64("IZO_SIM_SEED", 1);
    let t = std::time::Instant::now();
    match sweep(first, n, Breaks::default()) {
        Ok((n, ops)) => {
            let s = t.elapsed().as_secs_f64();
            eprintln!("{n} schedules, {ops} local ops, in {s:.1} s ({:.0} schedules/s)", n as f64 / s);
            assert!(ops as u64 >= n * 20, "the schedules ran local ops ({ops})");
        }
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn without_the_reply_cache_the_simulation_fails() {
    let r = sweep(1, 200, Breaks { no_reply_cache: true, ..Breaks::default() });
    let e = r.expect_err("resent ops applied twice must be found");
    eprintln!("found as expected: {e}");
    assert!(e.contains("applied twice") || e.contains("differs"), "{e}");
}

#[test]
fn cancelling_a_sent_op_makes_the_simulation_fail() {
    let r = sweep(1, 200, Breaks { cancel_sent: true, ..Breaks::default() });
    let e = r.expect_err("a cancelled op the server applied must be found");
    eprintln!("found as expected: {e}");
    assert!(e.contains("is lost") || e.contains("differs"), "{e}");
}

#[test]
fn forgetting_replies_before_they_are_folded_makes_the_simulation_fail() {
    let r = sweep(1, 400, Breaks { ack_unfolded: true, ..Breaks::default() });
    let e = r.expect_err("a refusal lost to a power loss and then taken as applied must be found");
    eprintln!("found as expected: {e}");
}

#[test]
fn replay() {
    let Ok(line) = std::env::var("IZO_SIM_REPLAY") else {
        // (nothing to replay: the round trip of a line still holds)
        let evs = schedule(7, REPLICAS, OPS);
        assert_eq!(parse_line(&replay_line(&evs)), Some(evs));
        return;
    };
    let evs = parse_line(&line).expect("a replay line");
    if let Err(f) = run(&evs, Breaks::default()) {
        panic!("fails at event {:?}: {}", f.at, f.why);
    }
}

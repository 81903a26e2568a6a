//! Costs measured from outside the server: bytes on the wire, bytes the
//! server process writes (/proc/<pid>/io), and fsyncs seen by strace.

use crate::harness::*;
use izo_client::Client;
use izo_proto::*;
use izo_server::auth::Rights;
use std::collections::BTreeMap;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const MIB: u64 = 1 << 20;

/// The counters of /proc/<pid>/io (rchar, wchar, write_bytes, ...).
fn proc_io(pid: u32) -> BTreeMap<String, u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/io")).expect("read /proc/<server pid>/io");
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().parse().expect("numeric io counter")))
        .collect()
}

fn delta(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>, key: &str) -> u64 {
    after[key] - before[key]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_byte_write_to_a_1_gib_file_costs_under_2_mib_on_the_wire_and_no_file_copy() {
    let dirs = Dirs::new();
    let token = dirs.token(Rights::Rw);
    let p = Proc::start(&dirs, "127.0.0.1:0", &[]);
    let c = Client::connect(p.client_config(&token)).await.expect("client connects to izo serve");
    let id = ObjectId::new();
    let a = c.mutate(create_in_root(id, "big")).await.expect("create");
    let mut version = a.seq;
    // 1 GiB: sparse, with 8 MiB of real data spread over it (1 MiB every 128 MiB)
    let a = c.mutate(Op::Truncate { id, base: version, size: 1 << 30 }).await.expect("truncate to 1 GiB");
    version = a.seq;
    let chunk: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8 + 1).collect();
    for k in 0..8u64 {
        let a = c
            .mutate(Op::Write { id, base: version, offset: k * 128 * MIB, data: chunk.clone() })
            .await
            .unwrap_or_else(|e| panic!("write of 1 MiB at {k} x 128 MiB: {e}"));
        version = a.seq;
    }
    let last_write = Instant::now();
    let path = dirs.export.join("big");
    let meta0 = std::fs::metadata(&path).expect("stat big");
    assert_eq!(meta0.len(), 1 << 30);
    // Keep the server's housekeeping out of the measured window. Its volume
    // thread rehashes a file once it has been quiet for 1 s (all 1 GiB here):
    // rehash now through the query, let the 1 s pass, and put one op through
    // the volume thread behind any rehash it started.
    let (_, blocks) = c.block_hashes(id).await.expect("block hashes");
    assert_eq!(blocks.len(), 1024, "1 GiB in 1 MiB blocks");
    tokio::time::sleep((last_write + Duration::from_millis(1500)).saturating_duration_since(Instant::now())).await;
    let barrier = create_in_root(ObjectId::new(), "barrier");
    c.mutate(barrier).await.expect("barrier op");

    // It also checkpoints every 2 s (syncfs, then a commit, each counted in
    // `fsyncs`). A window in which the counter moved by more than the write's
    // own commit may hold one; measure again then.
    let at = 512 * MIB; // the first byte of the 5th data chunk
    let mut clean = None;
    for attempt in 0..5u8 {
        let new = 0xfe - attempt; // never the old byte (chunk[0] == 1)
        let f0 = stat(&c, "fsyncs").await;
        let (out0, in0, rc0) = c.wire_counters();
        let io0 = proc_io(p.pid());
        let t = Instant::now();
        let a = c.mutate(Op::Write { id, base: version, offset: at, data: vec![new] }).await.expect("1-byte write");
        let took = t.elapsed();
        let io1 = proc_io(p.pid());
        let (out1, in1, rc1) = c.wire_counters();
        let f1 = stat(&c, "fsyncs").await;
        assert_eq!(rc1, rc0, "no reconnect during the measurement");
        assert_eq!(a.attr.as_ref().map(|a| a.size), Some(1 << 30), "size unchanged");
        version = a.seq;
        if f1 - f0 <= 1 {
            clean = Some((new, took, out1 - out0, in1 - in0, io0, io1));
            break;
        }
        println!("attempt {attempt}: {} fsyncs in the window (a checkpoint); measuring again", f1 - f0);
    }
    let (new, took, out, inb, io0, io1) = clean.expect("5 windows in a row overlapped a checkpoint");
    let wire = out + inb;
    let (wchar, rchar) = (delta(&io0, &io1, "wchar"), delta(&io0, &io1, "rchar"));
    let write_bytes = delta(&io0, &io1, "write_bytes");
    println!(
        "1-byte write to 1 GiB: wire {wire} B (out {} in {}), server wchar {wchar} B, rchar {rchar} B, \
         write_bytes {write_bytes} B, ack in {took:?}",
        out, inb
    );
    assert!(wire < 2 * MIB, "a 1-byte write put {wire} bytes on the wire");
    assert!(wchar < 16 * MIB, "the server wrote {wchar} bytes (wchar) for a 1-byte write: a file copy?");
    assert!(write_bytes < 16 * MIB, "the server dirtied {write_bytes} bytes of page cache for a 1-byte write");
    assert!(rchar < 16 * MIB, "the server read {rchar} bytes (rchar) on the ack path of a 1-byte write");

    // the same inode was changed in place: no temp file renamed over it, no reflinked copy
    let meta1 = std::fs::metadata(&path).expect("stat big");
    assert_eq!(meta1.ino(), meta0.ino(), "the file was replaced by another inode");
    assert_eq!(meta1.len(), 1 << 30);
    assert!(
        meta1.blocks() <= meta0.blocks() + 128,
        "allocation grew from {} to {} blocks for a 1-byte write into allocated data",
        meta0.blocks(),
        meta1.blocks()
    );
    let f = std::fs::File::open(&path).expect("open big");
    let mut around = [0u8; 3];
    f.read_exact_at(&mut around, at - 1).expect("read around the byte");
    assert_eq!(around, [0, new, chunk[1]], "hole before, the new byte, the old data after");
    // and the client reads the same
    assert_eq!(c.read(id, at - 1, 3).await.expect("client read"), around);
}

/// The pid of the one child of `parent` (the traced `izo serve`).
fn child_of(parent: u32) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        for e in std::fs::read_dir("/proc").expect("ls /proc").flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
            // fields after the parenthesised command name: state, ppid, ...
            let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
            if rest.split_whitespace().nth(1).and_then(|p| p.parse::<u32>().ok()) == Some(parent) {
                return pid;
            }
        }
        assert!(Instant::now() < deadline, "strace (pid {parent}) has no child process");
        std::thread::sleep(Duration::from_millis(20));
    }
}

const SYNC_CALLS: [&str; 5] = ["fsync", "fdatasync", "syncfs", "sync_file_range", "msync"];

/// Sync calls started in [from, to] (epoch seconds) in an `strace -f -ttt` log.
fn sync_calls_between(log: &str, from: f64, to: f64) -> BTreeMap<&'static str, u64> {
    let mut n = BTreeMap::new();
    for line in log.lines() {
        // "<pid> <secs.micros> fsync(5 <unfinished ...>" or "... fsync(5) = 0";
        // "<... fsync resumed>" lines continue a call already counted.
        let mut it = line.split_whitespace();
        let (Some(_pid), Some(ts), Some(call)) = (it.next(), it.next(), it.next()) else { continue };
        let Ok(ts) = ts.parse::<f64>() else { continue };
        let Some(which) = SYNC_CALLS.iter().find(|c| call.starts_with(&format!("{c}("))) else { continue };
        if ts >= from && ts <= to {
            *n.entry(*which).or_insert(0) += 1;
        }
    }
    n
}

fn epoch() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_secs_f64()
}

fn have(cmd: &str) -> bool {
    std::process::Command::new("which").arg(cmd).output().map(|o| o.status.success()).unwrap_or(false)
}

/// Whether strace can trace here (ptrace may be forbidden in a container).
fn strace_works() -> Result<(), String> {
    let out = std::process::Command::new("strace")
        .args(["-f", "--seccomp-bpf", "-qq", "-e", "trace=fsync", "-o", "/dev/null", "true"])
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_pipelined_creates_use_at_most_50_server_fsyncs_counted_by_strace() {
    assert!(have("strace"), "strace is not installed (apt-get install strace); this test counts fsyncs with it");
    if let Err(e) = strace_works() {
        panic!("strace cannot trace here (needs ptrace and seccomp-bpf, strace >= 5.3): {e}");
    }
    let dirs = Dirs::new();
    let token = dirs.token(Rights::Rw);
    let log_dir = tempfile::tempdir().expect("temp dir for the strace log");
    let log = log_dir.path().join("strace.log");
    let log_s = log.to_str().expect("utf-8 temp path").to_string();
    let wrap =
        ["strace", "-f", "--seccomp-bpf", "-qq", "-ttt", "-e", "trace=fsync,fdatasync,syncfs,sync_file_range,msync"];
    let mut wrap: Vec<&str> = wrap.to_vec();
    wrap.extend(["-o", &log_s]);
    let mut p = Proc::start_cmd(&dirs, "127.0.0.1:0", &[], Some(&wrap), &[]);
    let strace_pid = p.pid();
    let izo_pid = child_of(strace_pid);
    let c = Client::connect(p.client_config(&token)).await.expect("client connects to the traced server");
    let d = ObjectId::new();
    c.mutate(Op::Mkdir { parent: ObjectId::ROOT, name: name("many"), id: d, mode: 0o755, uid: 0, gid: 0 })
        .await
        .expect("mkdir");
    let fsyncs0 = stat(&c, "fsyncs").await;
    let batches0 = stat(&c, "batches").await;

    let from = epoch();
    let t = Instant::now();
    let mut pend = Vec::with_capacity(1000);
    for i in 0..1000 {
        let op =
            Op::Create { parent: d, name: name(&format!("f{i:04}")), id: ObjectId::new(), mode: 0o644, uid: 0, gid: 0 };
        pend.push(c.submit(op).await.expect("submit"));
    }
    for (i, p) in pend.into_iter().enumerate() {
        p.wait().await.unwrap_or_else(|e| panic!("create #{i}: {e}"));
    }
    let took = t.elapsed();
    let fsyncs = stat(&c, "fsyncs").await - fsyncs0;
    let batches = stat(&c, "batches").await - batches0;
    let to = epoch();
    assert_eq!(std::fs::read_dir(dirs.export.join("many")).expect("ls many").count(), 1000);
    c.close();

    // SIGTERM the server (not strace): strace then writes out its log and exits
    assert_eq!(unsafe { libc::kill(izo_pid as i32, libc::SIGTERM) }, 0, "SIGTERM izo serve (pid {izo_pid})");
    let deadline = Instant::now() + Duration::from_secs(10);
    while p.child.try_wait().expect("wait for strace").is_none() {
        assert!(Instant::now() < deadline, "strace did not exit after its tracee was terminated");
        std::thread::sleep(Duration::from_millis(20));
    }
    let text = std::fs::read_to_string(&log).expect("read the strace log");
    let all = sync_calls_between(&text, 0.0, f64::MAX);
    assert!(all.values().sum::<u64>() > 0, "strace saw no sync call at all (is tracing working?):\n{text}");
    let calls = sync_calls_between(&text, from, to);
    let total: u64 = calls.values().sum();
    println!(
        "1000 pipelined creates in {took:?}: {total} sync calls by strace {calls:?} (whole run {all:?}), \
         server fsyncs counter +{fsyncs}, batches +{batches}"
    );
    assert!(total <= 50, "1,000 pipelined creates cost {total} sync calls: {calls:?}");
    assert!(total > 0, "the creates were acked without any sync call: not durable");
    // the server's own counter is no over-count of what the kernel saw (slack:
    // a checkpoint's syncfs may have entered just before the window opened)
    assert!(fsyncs <= total + 2, "server counts {fsyncs} fsyncs, strace saw {total}");
    assert!(fsyncs > 0 && batches > 0, "the server counted its commits ({fsyncs} fsyncs, {batches} batches)");
}

/// A Hello speaking versions `low..=high`, sent in a frame whose header
/// names `high` (as a client of that range would send it).
async fn hello_speaking(s: &InProc, low: u16, high: u16) -> (Raw, ServerMsg, Vec<u8>) {
    let mut r = Raw::connect(&s.addr, &s.server.fingerprint).await;
    let h = Hello {
        version: high,
        volume: "vol".into(),
        token: s.rw.clone(),
        replica: ReplicaId::random(),
        last_acked: 0,
        users: vec![],
        groups: vec![],
        min_version: low,
        incarnation: 0,
    };
    let mut f = encode_frame(&ClientMsg::Hello(h)).expect("encode");
    codec::set_frame_version(&mut f, high);
    r.send_bytes(&f).await;
    let (m, body) = r.recv_raw().await.expect("an answer to the Hello");
    (r, m, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_of_a_disjoint_version_range_is_refused_naming_both_ranges() {
    let s = InProc::start().await;
    let server = codec::show_range(codec::VERSIONS);
    for (low, high, older) in
        [(PROTOCOL_VERSION + 5, PROTOCOL_VERSION + 9, "server"), (1, MIN_PROTOCOL_VERSION - 1, "client")]
    {
        let (mut r, m, _) = hello_speaking(&s, low, high).await;
        match m {
            ServerMsg::Refused { reason: RefuseReason::Version, message } => {
                let client = format!("{low}..={high}");
                assert!(message.contains(&client), "the refusal names the client's range {client}: {message}");
                assert!(message.contains(&server), "the refusal names the server's range {server}: {message}");
                assert!(message.contains(&format!("upgrade the {older}")), "says which side to upgrade: {message}");
            }
            other => panic!("versions {low}..={high}: expected a version refusal, got {other:?}"),
        }
        assert!(r.recv().await.is_none(), "the connection closes after the refusal");
    }
    // a normal client is not disturbed
    let c = s.client().await;
    assert_eq!(c.welcome().expect("welcome").version, PROTOCOL_VERSION);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_with_a_higher_max_version_gets_the_servers_highest() {
    let s = InProc::start().await;
    let (mut r, m, body) = hello_speaking(&s, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION + 4).await;
    match m {
        ServerMsg::Welcome(w) => assert_eq!(w.version, PROTOCOL_VERSION, "the highest version both speak"),
        other => panic!("expected a Welcome, got {other:?}"),
    }
    assert_eq!(u16::from_be_bytes([body[0], body[1]]), PROTOCOL_VERSION, "the answer's header names it too");
    // the session goes on at that version
    r.send(&ClientMsg::Mutate { cseq: 1, acked_through: 0, op: create_in_root(ObjectId::new(), "negotiated") }).await;
    match r.recv().await {
        Some(ServerMsg::Reply { cseq: 1, result: Ok(_) }) => {}
        other => panic!("a mutation after the negotiation: {other:?}"),
    }
    assert!(s.dirs.export.join("negotiated").exists());
}

//! Out-of-band capture: other processes change the export (create, modify
//! one byte of a large file, rename, hard-link, delete, save like an editor,
//! chmod, xattrs, moves in and out), and the server journals each change as
//! `local` records that reach a subscriber within a second, until its view
//! equals the export. The same changes made while it is stopped are
//! journaled when it starts. A local edit racing a client op is a conflict.
//! It is event-driven: a fanotify mark, almost no CPU while idle on a
//! 100,000-file export, and a start-up scan that reads no file data.

use crate::harness::*;
use izo_client::{Client, ClientError, StreamEvent};
use izo_proto::*;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedReceiver;

/// Run a shell command in `dir` as another process.
fn sh(dir: &Path, cmd: &str) {
    let st = Command::new("sh").arg("-c").arg(cmd).current_dir(dir).status().expect("sh");
    assert!(st.success(), "`{cmd}` failed: {st:?}");
}

/// Set an xattr from a child process (the server drops its own pid's events).
fn setxattr_in_child(path: &Path, name: &str, value: &[u8]) {
    use std::os::unix::ffi::OsStrExt;
    let p = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("path");
    let n = std::ffi::CString::new(name).expect("name");
    // SAFETY: the child only makes two syscalls before _exit.
    unsafe {
        let pid = libc::fork();
        assert!(pid >= 0, "fork");
        if pid == 0 {
            let r = libc::setxattr(p.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0);
            libc::_exit(if r == 0 { 0 } else { 1 });
        }
        let mut status = 0;
        libc::waitpid(pid, &mut status, 0);
        assert_eq!(status, 0, "setxattr in the child");
    }
}

fn drain(rx: &mut UnboundedReceiver<StreamEvent>, into: &mut Vec<Record>) {
    while let Ok(ev) = rx.try_recv() {
        match ev {
            StreamEvent::Record(r) => into.push(*r),
            other => panic!("unexpected stream event {other:?}"),
        }
    }
}

/// Wait until the server's view equals the export and records arrived;
/// returns the records of this step. Panics after `limit`.
async fn converge(
    c: &Client,
    rx: &mut UnboundedReceiver<StreamEvent>,
    export: &Path,
    what: &str,
    limit: Duration,
) -> Vec<Record> {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut pause = Duration::from_millis(20);
    loop {
        tokio::time::sleep(pause).await;
        drain(rx, &mut got);
        let t = Instant::now();
        let want = izo_testkit::tree_digest(export).expect("digest of the export");
        let have = server_digest(c).await.unwrap_or_default();
        // comparing big trees is costly: poll no more than half the time
        pause = t.elapsed().max(Duration::from_millis(20));
        if !got.is_empty() && want == have {
            // records that trail the ones that made the views equal
            tokio::time::sleep(Duration::from_millis(100)).await;
            drain(rx, &mut got);
            return got;
        }
        assert!(
            start.elapsed() < limit,
            "{what}: the server's view did not reach the export within {limit:?}; records {got:#?}; diff {:#?}",
            want.diff(&have)
        );
    }
}

/// Kinds of the records, which must all be local.
fn kinds(recs: &[Record]) -> Vec<&'static str> {
    assert!(recs.iter().all(|r| r.origin == Origin::Local), "only local records: {recs:#?}");
    recs.iter().map(|r| r.op.kind()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_by_other_processes_reach_a_subscriber_within_a_second() {
    let s = InProc::start().await;
    let c = s.client().await;
    let mut rx = c.subscribe(0).await.expect("subscribe");
    let ex = s.dirs.export.clone();
    let second = Duration::from_secs(1);

    sh(&ex, "printf hello > a");
    let r = converge(&c, &mut rx, &ex, "create", second).await;
    assert!(kinds(&r).contains(&"create"), "{r:#?}");

    sh(&ex, "head -c 8388608 /dev/urandom > big");
    converge(&c, &mut rx, &ex, "large file", Duration::from_secs(3)).await;
    let big = c.lookup(ObjectId::ROOT, b"big").await.expect("big").id;
    sh(&ex, "printf x | dd of=big bs=1 seek=5000000 conv=notrunc status=none");
    let r = converge(&c, &mut rx, &ex, "one byte in a large file", second).await;
    let data: Vec<&Record> = r.iter().filter(|r| r.op.data_target() == Some(big)).collect();
    assert_eq!(data.len(), 1, "one record for the changed block: {r:#?}");
    match &data[0].op {
        Op::Write { offset, data: bytes, .. } => {
            assert_eq!(*offset, 4 * BLOCK_SIZE, "the block holding byte 5,000,000");
            assert!(bytes.is_empty(), "the bytes stay in the file");
            assert_eq!(data[0].elided, BLOCK_SIZE, "only that block is journaled");
        }
        other => panic!("expected a write, got {other:?}"),
    }

    sh(&ex, "mv a b");
    let r = converge(&c, &mut rx, &ex, "rename", second).await;
    assert_eq!(kinds(&r), ["rename"]);

    sh(&ex, "printf other > o && mv o b");
    converge(&c, &mut rx, &ex, "a new file", second).await;
    sh(&ex, "printf older > b2 && mv b2 b");
    let r = converge(&c, &mut rx, &ex, "rename over an existing name", second).await;
    assert!(
        r.iter().any(|r| matches!(&r.op, Op::Rename { target: Some(_), .. }) || r.op.kind() == "unlink"),
        "the old b is replaced: {r:#?}"
    );

    sh(&ex, "ln b c");
    let r = converge(&c, &mut rx, &ex, "hard link", second).await;
    assert_eq!(kinds(&r), ["link"]);

    sh(&ex, "rm c");
    let r = converge(&c, &mut rx, &ex, "delete", second).await;
    assert_eq!(kinds(&r), ["unlink"]);

    sh(&ex, "printf 'new text' > .b.swp && mv .b.swp b");
    converge(&c, &mut rx, &ex, "editor save (temp + rename)", second).await;
    let b = c.lookup(ObjectId::ROOT, b"b").await.expect("b");
    assert_eq!(c.read(b.id, 0, 100).await.expect("read b"), b"new text");

    sh(&ex, "mkdir -p d/e && printf x > d/e/f && ln -s ../b d/l && mkfifo d/p");
    converge(&c, &mut rx, &ex, "a new tree", second).await;

    sh(&ex, "chmod 600 b && touch -d '2001-02-03 04:05:06' b && chmod 750 d");
    let r = converge(&c, &mut rx, &ex, "chmod and touch", second).await;
    assert!(kinds(&r).iter().all(|k| *k == "setattr"), "{r:#?}");

    setxattr_in_child(&ex.join("b"), "user.colour", b"green");
    let r = converge(&c, &mut rx, &ex, "xattr", second).await;
    assert_eq!(kinds(&r), ["setxattr"]);

    sh(&ex, "mv d/e e && rm -r d");
    converge(&c, &mut rx, &ex, "move up and remove a tree", second).await;

    sh(&ex, "mv b ../outside");
    let r = converge(&c, &mut rx, &ex, "move out of the export", second).await;
    assert_eq!(kinds(&r), ["unlink"]);
    sh(&ex, "mv ../outside back");
    converge(&c, &mut rx, &ex, "move into the export", second).await;

    // a client writes a block, and another program edits that block before
    // the server has rehashed it: the edit is journaled, not absorbed
    let w = ObjectId::new();
    c.mutate(create_in_root(w, "w")).await.expect("create");
    c.mutate(Op::Write { id: w, base: 0, offset: 0, data: vec![1; 100_000] }).await.expect("write");
    sh(&ex, "printf 2 | dd of=w bs=1 seek=500 conv=notrunc status=none");
    let r = converge(&c, &mut rx, &ex, "a local edit of a block a client just wrote", Duration::from_secs(3)).await;
    assert!(r.iter().any(|r| r.op.data_target() == Some(w)), "{r:#?}");
    tokio::time::sleep(Duration::from_millis(1500)).await; // past the background rehash
    drain(&mut rx, &mut Vec::new());
    assert_eq!(Some(izo_testkit::tree_digest(&ex).expect("digest")), server_digest(&c).await);

    // the server's own changes are not journaled twice
    let before = stat(&c, "local_records").await;
    let id = ObjectId::new();
    c.mutate(create_in_root(id, "mine")).await.expect("create");
    c.mutate(Op::Write { id, base: 0, offset: 0, data: b"client".to_vec() }).await.expect("write");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(stat(&c, "local_records").await, before, "no local record for the server's own apply");
    assert_eq!(Some(izo_testkit::tree_digest(&ex).expect("digest")), server_digest(&c).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_edit_racing_a_client_op_is_a_conflict_not_an_overwrite() {
    let s = InProc::start().await;
    let c = s.client().await;
    let ex = s.dirs.export.clone();
    let f = ObjectId::new();
    c.mutate(create_in_root(f, "f")).await.expect("create");
    let a = c.mutate(Op::Write { id: f, base: 0, offset: 0, data: b"client v1".to_vec() }).await.expect("write");
    let base = a.attr.expect("attr").versions.data;
    for round in 0..20 {
        // another program edits f; the client, not knowing, writes at once
        sh(&ex, &format!("printf 'local edit {round}' > f"));
        let r = c.mutate(Op::Write { id: f, base, offset: 0, data: b"client v2".to_vec() }).await;
        assert!(
            matches!(r, Err(ClientError::Op(OpError::Conflict { .. }))),
            "round {round}: a write based on the old version must conflict, got {r:?}"
        );
        assert_eq!(std::fs::read(ex.join("f")).expect("read f"), format!("local edit {round}").as_bytes());
        let now = c.getattr(f).await.expect("getattr");
        assert_eq!(c.read(f, 0, 100).await.expect("read"), format!("local edit {round}").as_bytes());
        assert!(now.versions.data > base);
    }
    // an entry op: a name another program just made exists
    sh(&ex, "touch g");
    let r = c.mutate(create_in_root(ObjectId::new(), "g")).await;
    assert!(matches!(r, Err(ClientError::Op(OpError::Conflict { .. }))), "create over a local file: {r:?}");
    // and a removal the client did not see
    sh(&ex, "rm f");
    let r = c.mutate(Op::Unlink { parent: ObjectId::ROOT, name: name("f"), expect: expect(f) }).await;
    assert!(matches!(r, Err(ClientError::Op(OpError::Conflict { .. }))), "unlink of a removed file: {r:?}");
    assert!(!s.server.is_readonly(), "the volume stays writable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_made_while_the_server_is_stopped_are_journaled_at_start() {
    let dirs = Dirs::new();
    let token = dirs.token(izo_server::auth::Rights::Rw);
    let ex = dirs.export.clone();
    sh(&ex, "printf one > a && head -c 3145728 /dev/urandom > big && mkdir d && printf two > d/x");
    let mut p = Proc::start(&dirs, "127.0.0.1:0", &[]);
    let c = Client::connect(p.client_config(&token)).await.expect("client");
    let mut rx = c.subscribe(0).await.expect("subscribe");
    let r = converge(&c, &mut rx, &ex, "an existing export is imported", Duration::from_secs(5)).await;
    let head = r.last().expect("records").seq;
    c.close();
    p.sigterm();

    sh(
        &ex,
        "printf y | dd of=big bs=1 seek=2097152 conv=notrunc status=none && mv a b && ln b c && rm d/x \
         && printf new > n && mkdir e && printf z > e/z && chmod 700 d && mv d d2 && printf in > d2/new \
         && printf was > r1 && printf over > r2",
    );
    let p = Proc::start(&dirs, &p.addr, &[]);
    let c = Client::connect(p.client_config(&token)).await.expect("client");
    let mut rx = c.subscribe(head).await.expect("subscribe");
    let r = converge(&c, &mut rx, &ex, "changes made while stopped", Duration::from_secs(5)).await;
    let k = kinds(&r);
    for want in ["rename", "link", "unlink", "create", "mkdir", "setattr", "write"] {
        assert!(k.contains(&want), "a {want} record among {k:?}");
    }
    let big = c.lookup(ObjectId::ROOT, b"big").await.expect("big").id;
    let writes: Vec<&Record> = r.iter().filter(|r| r.op.data_target() == Some(big)).collect();
    assert_eq!(writes.len(), 1, "only the changed block of big: {writes:#?}");
    assert_eq!(writes[0].elided, BLOCK_SIZE);
    assert!(
        r.iter().any(|r| matches!(&r.op, Op::Rename { new_name, .. } if new_name.as_slice() == b"d2")),
        "a directory renamed while stopped is a rename: {r:#?}"
    );

    // a client writes, the server stops at once (before its background
    // rehash), and the written block is edited while it is stopped
    let head = r.last().expect("records").seq;
    let f = ObjectId::new();
    c.mutate(create_in_root(f, "fresh")).await.expect("create");
    c.mutate(Op::Write { id: f, base: 0, offset: 0, data: vec![3; 70_000] }).await.expect("write");
    c.close();
    let addr = p.addr.clone();
    let mut p = p;
    p.sigterm();
    sh(&ex, "printf 9 | dd of=fresh bs=1 seek=10 conv=notrunc status=none && mv r2 r1");
    let p = Proc::start(&dirs, &addr, &[]);
    let c = Client::connect(p.client_config(&token)).await.expect("client");
    let mut rx = c.subscribe(head).await.expect("subscribe");
    let r = converge(&c, &mut rx, &ex, "an offline edit of freshly written blocks", Duration::from_secs(5)).await;
    let r: Vec<Record> = r.into_iter().filter(|r| r.origin == Origin::Local).collect();
    assert!(r.iter().any(|r| r.op.data_target() == Some(f)), "the offline edit is journaled: {r:#?}");
    assert!(r.iter().any(|r| matches!(&r.op, Op::Rename { target: Some(_), .. })), "rename over r1: {r:#?}");

    // journaled changes survive a SIGKILL, and later ones are still found
    c.close();
    let mut p = p;
    p.sigkill();
    sh(&ex, "printf after-kill > k && rm -r e");
    let p = Proc::start(&dirs, &addr, &[]);
    let c = Client::connect(p.client_config(&token)).await.expect("client");
    let mut rx = c.subscribe(0).await.expect("subscribe");
    converge(&c, &mut rx, &ex, "after a SIGKILL", Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_programs_change_in_the_way_of_an_apply_is_kept_aside() {
    let dirs = Dirs::new();
    let token = dirs.token(izo_server::auth::Rights::Rw);
    let ex = dirs.export.clone();
    // the test changes the export between a commit and its apply
    let p = Proc::start(&dirs, "127.0.0.1:0", &[("IZO_TEST_APPLY_PAUSE_MS", "400")]);
    let c = Client::connect(p.client_config(&token)).await.expect("client");
    let x = ObjectId::new();
    let pending = c.submit(create_in_root(x, "x")).await.expect("submit");
    tokio::time::sleep(Duration::from_millis(150)).await;
    sh(&ex, "printf local > x");
    pending.wait().await.expect("the create was acked");
    let g = ObjectId::new();
    c.mutate(create_in_root(g, "g")).await.expect("create g");
    let pending = c.submit(Op::Write { id: g, base: 0, offset: 0, data: b"client".to_vec() }).await.expect("submit");
    tokio::time::sleep(Duration::from_millis(150)).await;
    sh(&ex, "rm g");
    pending.wait().await.expect("the write was acked");
    let mut rx = c.subscribe(0).await.expect("subscribe");
    converge(&c, &mut rx, &ex, "after the races", Duration::from_secs(5)).await;
    let aside: Vec<String> = std::fs::read_dir(&ex)
        .expect("readdir")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("x.izo-local-"))
        .collect();
    assert_eq!(aside.len(), 1, "the local x is kept aside: {aside:?}");
    assert_eq!(std::fs::read(ex.join(&aside[0])).expect("read"), b"local");
    assert!(ex.join("x").exists() && !ex.join("g").exists(), "the client's x is in place; the removal of g won");
    c.mutate(create_in_root(ObjectId::new(), "later")).await.expect("the volume stays writable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_overflow_is_caught_up_by_a_rescan() {
    let dirs = Dirs::new();
    let token = dirs.token(izo_server::auth::Rights::Rw);
    let ex = dirs.export.clone();
    // the reader reads nothing until `go` exists: 20,000 creates overflow
    // the kernel's queue of 16,384 events meanwhile
    let go = dirs.state.join("go");
    let p = Proc::start(&dirs, "127.0.0.1:0", &[("IZO_TEST_CAPTURE_STALL", go.to_str().expect("path"))]);
    let c = Client::connect(p.client_config(&token)).await.expect("client");
    let mut rx = c.subscribe(0).await.expect("subscribe");
    wait_stat(&c, "scans", 1, Duration::from_secs(10)).await;
    sh(&ex, "mkdir many && cd many && seq 1 20000 | xargs touch && printf changed > 17");
    std::fs::write(&go, b"").expect("go");
    let t = Instant::now();
    wait_stat(&c, "scans", 2, Duration::from_secs(30)).await;
    eprintln!("rescan done after {:?}", t.elapsed());
    let r = converge(&c, &mut rx, &ex, "after an overflow", Duration::from_secs(30)).await;
    assert!(stat(&c, "scans").await >= 2, "the overflow triggered a rescan");
    assert!(r.iter().filter(|r| r.op.kind() == "create").count() >= 20_000, "every file is journaled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rescan_rereads_every_file_and_a_normal_start_none() {
    let dirs = Dirs::new();
    let token = dirs.token(izo_server::auth::Rights::Rw);
    sh(&dirs.export, "for i in 1 2 3 4 5 6 7 8; do head -c 2097152 /dev/urandom > f$i; done");
    let data = 8 * 2 * (1 << 20);
    let mut p = Proc::start(&dirs, "127.0.0.1:0", &[]);
    let c = Client::connect(p.client_config(&token)).await.expect("client");
    wait_stat(&c, "scans", 1, Duration::from_secs(10)).await;
    // a clean stop declares changes older than a second journaled
    tokio::time::sleep(Duration::from_millis(1500)).await;
    c.close();
    let addr = p.addr.clone();
    p.sigterm();
    for (args, rereads) in [(&[][..], false), (&["--rescan"][..], true)] {
        let mut p = Proc::start_args(&dirs, &addr, args);
        let c = Client::connect(p.client_config(&token)).await.expect("client");
        wait_stat(&c, "scans", 1, Duration::from_secs(10)).await;
        let read = rchar(p.pid());
        assert_eq!(stat(&c, "local_records").await, 0, "{args:?}: nothing changed");
        if rereads {
            assert!(read >= data, "--rescan reread every file: rchar {read} < {data}");
        } else {
            assert!(read < data / 4, "a normal start reads no file: rchar {read}");
        }
        c.close();
        p.sigterm();
    }
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // fields after the parenthesised name: state is field 3; utime 14, stime 15
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
}

fn rchar(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).expect("io");
    io.lines().find_map(|l| l.strip_prefix("rchar: ")).expect("rchar").trim().parse().expect("number")
}

async fn wait_stat(c: &Client, key: &str, at_least: u64, limit: Duration) {
    let start = Instant::now();
    while stat(c, key).await < at_least {
        assert!(start.elapsed() < limit, "{key} did not reach {at_least} within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_is_event_driven_and_the_start_up_scan_reads_no_file_data() {
    // its own file system: no other test's events reach this server
    let fs = SmallFs::new(1536, &["-N", "131072"]);
    let mut dirs = Dirs::new();
    dirs.export = fs.mnt().join("vol");
    std::fs::create_dir(&dirs.export).expect("export");
    let token = dirs.token(izo_server::auth::Rights::Rw);
    let block = vec![7u8; 4096];
    for d in 0..100 {
        let dir = dirs.export.join(format!("d{d}"));
        std::fs::create_dir(&dir).expect("mkdir");
        for f in 0..1000 {
            std::fs::write(dir.join(format!("f{f}")), &block).expect("write");
        }
    }
    let mut p = Proc::start(&dirs, "127.0.0.1:0", &[]);
    let c = Client::connect(p.client_config(&token)).await.expect("client");
    wait_stat(&c, "scans", 1, Duration::from_secs(60)).await;
    assert!(stat(&c, "local_records").await >= 100_100, "the existing export was imported");
    c.close();
    drop(c);

    let pid = p.pid();
    let fdinfo: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .expect("fdinfo")
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .collect();
    assert!(
        fdinfo.iter().any(|i| i.lines().any(|l| l.starts_with("fanotify sdev:"))),
        "a fanotify filesystem mark is held"
    );

    // settle (checkpoint of the import), then 10 idle seconds
    tokio::time::sleep(Duration::from_secs(3)).await;
    let t0 = cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let used = (cpu_ticks(pid) - t0) as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    assert!(used < 0.2, "idle on a 100,000-file export the server used {used:.2} s of CPU in 10 s");

    // a clean stop, then a start on the unchanged export
    let addr = p.addr.clone();
    p.sigterm();
    let p = Proc::start(&dirs, &addr, &[]);
    let c = Client::connect(p.client_config(&token)).await.expect("client");
    wait_stat(&c, "scans", 1, Duration::from_secs(60)).await;
    assert_eq!(stat(&c, "local_records").await, 0, "nothing changed");
    let read = rchar(p.pid());
    let db = std::fs::metadata(dirs.state.join("volume.redb")).expect("db").len();
    eprintln!("start-up scan of 100,000 unchanged files: rchar {read} bytes, database {db} bytes, data 400 MB");
    assert!(read < db, "the start-up scan read {read} bytes; the metadata database is {db} bytes");
    assert!(db < 400 << 20, "the database ({db} bytes) is smaller than the export's data, or the bound says nothing");
}

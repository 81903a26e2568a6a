//! Replay: the server is killed right after committing an op (before
//! applying it) or right after applying it (before the applied marker
//! moves), for every op kind. On restart the tree reaches the op's
//! post-state before any client talks to it, no record is applied twice,
//! and the resent op gets its cached reply.

use crate::harness::*;
use izo_proto::*;
use std::time::{Duration, Instant};

fn ok(m: Option<ServerMsg>) -> Applied {
    match m {
        Some(ServerMsg::Reply { result: Ok(a), .. }) => a,
        other => panic!("expected an applied reply, got {other:?}"),
    }
}

fn wait_exit(p: &mut Proc) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if p.child.try_wait().ok().flatten().is_some() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// Run `setup`, then `ops` (sent together) on a server that crashes at
/// `hook`; check the replayed tree against the model.
async fn case(hook: &str, setup: Vec<Op>, ops: Vec<Op>) {
    let dirs = Dirs::new();
    let token = dirs.token(izo_server::auth::Rights::Rw);
    let replica = ReplicaId::random();
    let mut model = model_for(&dirs.export);
    let mut p = Proc::start(&dirs, "127.0.0.1:0", &[]);
    let addr = p.addr.clone();
    let (mut r, _) = Raw::hello(&addr, &p.fingerprint, &token, replica).await;
    let mut cseq = 0;
    for op in &setup {
        cseq += 1;
        r.send(&ClientMsg::Mutate { cseq, acked_through: cseq - 1, op: op.clone() }).await;
        let a = ok(r.recv().await);
        model.apply(op, a.time).unwrap_or_else(|e| panic!("{hook}: model refused setup {}: {e}", op.kind()));
    }
    drop(r);
    p.sigkill();
    // the crashing run
    let mut p = Proc::start(&dirs, &addr, &[("IZO_TEST_CRASH", hook)]);
    let (mut r, _) = Raw::hello(&addr, &p.fingerprint, &token, replica).await;
    let mut bytes = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        let m = ClientMsg::Mutate { cseq: cseq + 1 + i as u64, acked_through: cseq, op: op.clone() };
        bytes.extend(encode_frame(&m).expect("encode"));
    }
    r.send_bytes(&bytes).await;
    assert!(wait_exit(&mut p), "{hook}: the server did not crash at the hook");
    drop(r);
    drop(p);
    // restart: replay must reach the post-state on its own
    let p = Proc::start(&dirs, &addr, &[]);
    let replayed = izo_testkit::tree_digest(&dirs.export).expect("digest");
    let (mut r, w) = Raw::hello(&addr, &p.fingerprint, &token, replica).await;
    let head = match w {
        ServerMsg::Welcome(w) => w.head_seq,
        other => panic!("{other:?}"),
    };
    // Ops committed before the crash (seq <= head) must show in the replayed
    // tree; ops of a later batch were lost with the crash and run as new.
    let mut committed = model.clone();
    let mut hit = 0;
    for (i, op) in ops.iter().enumerate() {
        let m = ClientMsg::Mutate { cseq: cseq + 1 + i as u64, acked_through: cseq, op: op.clone() };
        r.send(&m).await;
        let a = ok(r.recv().await);
        model.apply(op, a.time).unwrap_or_else(|e| panic!("{hook}: model refused {}: {e}", op.kind()));
        if a.seq <= head {
            hit += 1;
            committed = model.clone();
        }
    }
    if hook.starts_with("precommit:") {
        assert_eq!(hit, 0, "{hook}: nothing of the crashed batch was committed");
    } else {
        assert!(hit >= 1, "{hook}: the crashing op was committed before the crash");
    }
    let diff = committed.digest().diff(&replayed);
    assert!(diff.is_empty(), "{hook}: replayed tree differs from the ops' post-state:\n{}", diff.join("\n"));
    let after = izo_testkit::tree_digest(&dirs.export).expect("digest");
    let diff = model.digest().diff(&after);
    assert!(diff.is_empty(), "{hook}: tree after the resends differs from the model:\n{}", diff.join("\n"));
    let c = izo_client::Client::connect(p.client_config(&token)).await.expect("client");
    let recorded = stat(&c, "records").await;
    assert_eq!(recorded, ops.len() as u64 - hit, "{hook}: only ops lost with the crash are recorded again");
}

struct Fx {
    f: ObjectId,
    g: ObjectId,
    d: ObjectId,
}

fn fx() -> Fx {
    Fx { f: ObjectId::new(), g: ObjectId::new(), d: ObjectId::new() }
}

fn rename(n: &str, id: ObjectId, to: &str, target: Option<ObjectId>, mode: RenameMode) -> Op {
    Op::Rename {
        parent: ObjectId::ROOT,
        name: name(n),
        expect: expect(id),
        new_parent: ObjectId::ROOT,
        new_name: name(to),
        target: target.map(expect),
        mode,
    }
}

/// Every op kind with what it needs to exist first.
fn cases() -> Vec<(&'static str, Vec<Op>, Vec<Op>)> {
    let root = ObjectId::ROOT;
    let x = fx();
    let mut v: Vec<(&'static str, Vec<Op>, Vec<Op>)> = vec![
        ("create", vec![], vec![create_in_root(x.f, "new")]),
        ("mkdir", vec![], vec![Op::Mkdir { parent: root, name: name("dir"), id: x.d, mode: 0o750, uid: 1, gid: 2 }]),
        (
            "symlink",
            vec![],
            vec![Op::Symlink { parent: root, name: name("ln"), id: x.g, target: name("t"), uid: 0, gid: 0 }],
        ),
        (
            "mknod",
            vec![],
            vec![Op::Mknod {
                parent: root,
                name: name("fifo"),
                id: x.f,
                kind: FileKind::Fifo,
                mode: 0o600,
                uid: 0,
                gid: 0,
                rdev: 0,
            }],
        ),
    ];
    let x = fx();
    v.push(("link", vec![create_in_root(x.f, "f")], vec![Op::Link { id: x.f, parent: root, name: name("f2") }]));
    let x = fx();
    v.push((
        "unlink",
        vec![create_in_root(x.f, "f")],
        vec![Op::Unlink { parent: root, name: name("f"), expect: expect(x.f) }],
    ));
    let x = fx();
    let mk = Op::Mkdir { parent: root, name: name("d"), id: x.d, mode: 0o755, uid: 0, gid: 0 };
    v.push(("rmdir", vec![mk], vec![Op::Rmdir { parent: root, name: name("d"), expect: expect(x.d) }]));
    let x = fx();
    v.push((
        "rename",
        vec![create_in_root(x.f, "a"), create_in_root(x.g, "b")],
        vec![rename("a", x.f, "b", Some(x.g), RenameMode::Replace)],
    ));
    let x = fx();
    v.push(("rename", vec![create_in_root(x.f, "a")], vec![rename("a", x.f, "c", None, RenameMode::NoReplace)]));
    let x = fx();
    v.push((
        "rename",
        vec![create_in_root(x.f, "a"), create_in_root(x.g, "b")],
        vec![rename("a", x.f, "b", Some(x.g), RenameMode::Exchange)],
    ));
    // the name reused right after a rename, in one batch
    let x = fx();
    v.push((
        "rename",
        vec![create_in_root(x.f, "a")],
        vec![rename("a", x.f, "b", None, RenameMode::Replace), create_in_root(x.g, "a")],
    ));
    let x = fx();
    v.push((
        "write",
        vec![create_in_root(x.f, "f")],
        vec![Op::Write { id: x.f, base: 0, offset: 5, data: b"data".to_vec() }],
    ));
    let x = fx();
    let big = vec![7u8; (3 << 19) + 11];
    v.push(("write", vec![create_in_root(x.f, "f")], vec![Op::Write { id: x.f, base: 0, offset: 1, data: big }]));
    // an append large enough to go straight into the file
    let x = fx();
    let w = Op::Write { id: x.f, base: 0, offset: 0, data: vec![5; 300] };
    v.push((
        "write",
        vec![create_in_root(x.f, "f"), w],
        vec![Op::Write { id: x.f, base: 0, offset: 300, data: vec![6; 70_000] }],
    ));
    let x = fx();
    let w = Op::Write { id: x.f, base: 0, offset: 0, data: vec![1; 9000] };
    v.push(("truncate", vec![create_in_root(x.f, "f"), w.clone()], vec![Op::Truncate { id: x.f, base: 0, size: 100 }]));
    let x = fx();
    v.push((
        "allocate",
        vec![create_in_root(x.f, "f")],
        vec![Op::Allocate { id: x.f, base: 0, offset: 0, len: 1 << 16 }],
    ));
    let x = fx();
    let w = Op::Write { id: x.f, base: 0, offset: 0, data: vec![1; 9000] };
    v.push((
        "punch-hole",
        vec![create_in_root(x.f, "f"), w],
        vec![Op::PunchHole { id: x.f, base: 0, offset: 0, len: 4096 }],
    ));
    let x = fx();
    let attrs = SetAttrs {
        mode: Some(0o600),
        uid: Some(5),
        gid: Some(6),
        mtime: Some(Timestamp { secs: 5, nsec: 6 }),
        atime: None,
    };
    v.push(("setattr", vec![create_in_root(x.f, "f")], vec![Op::SetAttr { id: x.f, base: 0, attrs }]));
    let x = fx();
    let sx = Op::SetXattr { id: x.f, base: 0, name: name("user.k"), value: b"v".to_vec() };
    v.push(("setxattr", vec![create_in_root(x.f, "f")], vec![sx.clone()]));
    let x = fx();
    let sx = Op::SetXattr { id: x.f, base: 0, name: name("user.k"), value: b"v".to_vec() };
    v.push((
        "removexattr",
        vec![create_in_root(x.f, "f"), sx],
        vec![Op::RemoveXattr { id: x.f, base: 0, name: name("user.k") }],
    ));
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_commit_and_apply_is_replayed_for_every_op_kind() {
    for (kind, setup, ops) in cases() {
        case(&format!("commit:{kind}"), setup, ops).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_apply_before_the_marker_never_applies_twice() {
    for (kind, setup, ops) in cases() {
        case(&format!("unmarked:{kind}"), setup, ops).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_written_before_a_commit_that_never_happened_is_cut_off() {
    let x = fx();
    let w = Op::Write { id: x.f, base: 0, offset: 0, data: vec![5; 300] };
    let append = Op::Write { id: x.f, base: 0, offset: 300, data: vec![6; 200_000] };
    case("precommit:write", vec![create_in_root(x.f, "f"), w], vec![append]).await;
}

/// Regression (review): a truncate applied and marked, then a direct append
/// committed but not yet marked; replay must not redo the truncate over the
/// appended bytes, which no record holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_append_after_a_truncate_survives_a_crash_before_the_marker() {
    let dirs = Dirs::new();
    let token = dirs.token(izo_server::auth::Rights::Rw);
    let replica = ReplicaId::random();
    let mut model = model_for(&dirs.export);
    let f = ObjectId::new();
    let setup = [create_in_root(f, "f"), Op::Write { id: f, base: 0, offset: 0, data: vec![1; 1 << 20] }];
    let mut p = Proc::start(&dirs, "127.0.0.1:0", &[]);
    let addr = p.addr.clone();
    let (mut r, _) = Raw::hello(&addr, &p.fingerprint, &token, replica).await;
    let mut cseq = 0;
    for op in setup {
        cseq += 1;
        r.send(&ClientMsg::Mutate { cseq, acked_through: cseq - 1, op: op.clone() }).await;
        model.apply(&op, ok(r.recv().await).time).expect("model");
    }
    drop(r);
    p.sigkill();
    // restart (the checkpoint now covers the setup), truncate, then append
    let mut p = Proc::start(&dirs, &addr, &[("IZO_TEST_CRASH", "commit:write")]);
    let (mut r, _) = Raw::hello(&addr, &p.fingerprint, &token, replica).await;
    let trunc = Op::Truncate { id: f, base: 0, size: 0 };
    cseq += 1;
    r.send(&ClientMsg::Mutate { cseq, acked_through: cseq - 1, op: trunc.clone() }).await;
    model.apply(&trunc, ok(r.recv().await).time).expect("model");
    let append = Op::Write { id: f, base: 0, offset: 0, data: vec![7; 128 << 10] };
    cseq += 1;
    r.send(&ClientMsg::Mutate { cseq, acked_through: cseq - 1, op: append.clone() }).await;
    assert!(wait_exit(&mut p), "crashed after committing the append");
    drop(r);
    drop(p);
    let p = Proc::start(&dirs, &addr, &[]);
    let (mut r, _) = Raw::hello(&addr, &p.fingerprint, &token, replica).await;
    r.send(&ClientMsg::Mutate { cseq, acked_through: cseq - 1, op: append.clone() }).await;
    model.apply(&append, ok(r.recv().await).time).expect("model");
    let diff = model.digest().diff(&izo_testkit::tree_digest(&dirs.export).expect("digest"));
    assert!(diff.is_empty(), "the appended bytes were lost:\n{}", diff.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_checkpoints_so_the_next_start_replays_nothing() {
    let dirs = Dirs::new();
    let token = dirs.token(izo_server::auth::Rights::Rw);
    let mut p = Proc::start(&dirs, "127.0.0.1:0", &[("IZO_TEST_NO_CHECKPOINT", "1")]);
    let addr = p.addr.clone();
    let c = izo_client::Client::connect(p.client_config(&token)).await.expect("client");
    let f = ObjectId::new();
    c.mutate(create_in_root(f, "f")).await.expect("create");
    // data records are what a restart would redo without a checkpoint
    for i in 0..50u64 {
        c.mutate(Op::Write { id: f, base: 0, offset: i * 100, data: vec![i as u8; 100] }).await.expect("write");
    }
    c.close();
    unsafe { libc::kill(p.pid() as i32, libc::SIGTERM) };
    let status = p.child.wait().expect("wait");
    assert!(status.success(), "izo serve exits cleanly on SIGTERM: {status:?}");
    let p = Proc::start(&dirs, &addr, &[]);
    let c = izo_client::Client::connect(p.client_config(&token)).await.expect("client");
    assert_eq!(
        stat(&c, "replayed").await + stat(&c, "replay_skipped").await,
        0,
        "nothing to replay after a clean stop"
    );
    assert_eq!(c.read(f, 0, 10_000).await.expect("read").len(), 5000);
}

//! Who may connect and what they may do: tokens, read-only rights, the
//! pinned certificate, and frames the server must refuse without letting
//! one bad peer disturb anyone else.

use crate::harness::*;
use izo_client::{Client, ClientError, StreamEvent};
use izo_proto::*;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// Connect with `token` and return the refusal the server gave.
async fn refusal(s: &InProc, token: &str) -> (RefuseReason, String) {
    match Client::connect(s.client_config(token)).await {
        Err(ClientError::Refused { reason, message }) => (reason, message),
        Ok(_) => panic!("a client with token {token:?} was let in"),
        Err(other) => panic!("token {token:?}: expected a refusal, got {other}"),
    }
}

/// A normal client still gets its mutations and queries through.
async fn still_serves(s: &InProc, tag: &str) {
    let c = s.client().await;
    let id = ObjectId::new();
    let op = create_in_root(id, tag);
    c.mutate(op).await.unwrap_or_else(|e| panic!("after {tag}: a normal client cannot create: {e}"));
    let got = c.lookup(ObjectId::ROOT, tag.as_bytes()).await.unwrap_or_else(|e| panic!("after {tag}: lookup: {e}"));
    assert_eq!(got.id, id, "after {tag}: lookup finds the new file");
    c.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_a_valid_token_is_refused_for_auth() {
    let s = InProc::start().await;
    let (reason, message) = refusal(&s, "").await;
    assert_eq!(reason, RefuseReason::Auth, "no token: {message}");
    let (reason, message) = refusal(&s, "izo_00000000000000000000000000000000000000000000000000").await;
    assert_eq!(reason, RefuseReason::Auth, "unknown token: {message}");
    // a real token with one character changed is just as unknown
    let mut forged = s.rw.clone();
    let last = forged.pop().expect("token is not empty");
    forged.push(if last == '0' { '1' } else { '0' });
    let (reason, message) = refusal(&s, &forged).await;
    assert_eq!(reason, RefuseReason::Auth, "forged token: {message}");
    // a valid token for another volume name does not open this one
    let mut cfg = s.client_config(&s.rw);
    cfg.volume = "elsewhere".into();
    match Client::connect(cfg).await {
        Err(ClientError::Refused { reason, message }) => {
            assert!(matches!(reason, RefuseReason::NoVolume | RefuseReason::Auth), "{reason:?}: {message}")
        }
        Ok(_) => panic!("a client was let into a volume the server does not export"),
        Err(other) => panic!("unknown volume: expected a refusal, got {other}"),
    }
    // nothing got in, and the real tokens work
    assert_eq!(stat(&s.client().await, "records").await, 0);
    let ro = Client::connect(s.client_config(&s.ro)).await.expect("ro token connects");
    assert!(!ro.welcome().expect("welcome").writable, "a read-only token is not told it may write");
    assert!(s.client().await.welcome().expect("welcome").writable);
}

/// Position of each `Op` variant; exhaustive, so a new variant must be added
/// to the read-only test below before this compiles.
fn variant(op: &Op) -> usize {
    match op {
        Op::Create { .. } => 0,
        Op::Mkdir { .. } => 1,
        Op::Symlink { .. } => 2,
        Op::Mknod { .. } => 3,
        Op::Link { .. } => 4,
        Op::Unlink { .. } => 5,
        Op::Rmdir { .. } => 6,
        Op::Rename { .. } => 7,
        Op::Write { .. } => 8,
        Op::Truncate { .. } => 9,
        Op::Allocate { .. } => 10,
        Op::PunchHole { .. } => 11,
        Op::SetAttr { .. } => 12,
        Op::SetXattr { .. } => 13,
        Op::RemoveXattr { .. } => 14,
        Op::Append { .. } => 15,
    }
}
const OP_VARIANTS: usize = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_token_can_query_everything_and_change_nothing() {
    let s = InProc::start().await;
    let rw = s.client().await;
    let root = ObjectId::ROOT;
    let (d, f, l, p) = (ObjectId::new(), ObjectId::new(), ObjectId::new(), ObjectId::new());
    rw.mutate(Op::Mkdir { parent: root, name: name("d"), id: d, mode: 0o755, uid: 0, gid: 0 }).await.expect("mkdir");
    rw.mutate(Op::Create { parent: root, name: name("f"), id: f, mode: 0o644, uid: 0, gid: 0 }).await.expect("create");
    rw.mutate(Op::Write { id: f, base: 0, offset: 0, data: b"precious".to_vec() }).await.expect("write");
    rw.mutate(Op::SetXattr { id: f, base: 0, name: name("user.k"), value: b"v".to_vec() }).await.expect("setxattr");
    let target = b"f".to_vec();
    rw.mutate(Op::Symlink { parent: root, name: name("l"), id: l, target: target.clone(), uid: 0, gid: 0 })
        .await
        .expect("symlink");
    rw.mutate(Op::Mknod {
        parent: d,
        name: name("p"),
        id: p,
        kind: FileKind::Fifo,
        mode: 0o600,
        uid: 0,
        gid: 0,
        rdev: 0,
    })
    .await
    .expect("mknod");

    let ro = Client::connect(s.client_config(&s.ro)).await.expect("ro token connects");
    let before = izo_testkit::tree_digest(&s.dirs.export).expect("digest before");
    let records_before = stat(&ro, "records").await;
    // every op is well-formed and its precondition holds: only the right is missing
    let fa = ro.getattr(f).await.expect("ro getattr f");
    let da = ro.getattr(d).await.expect("ro getattr d");
    let cur = |a: &Attr| Expect { id: a.id, base: a.versions };
    let ops = vec![
        Op::Create { parent: root, name: name("new"), id: ObjectId::new(), mode: 0o644, uid: 0, gid: 0 },
        Op::Mkdir { parent: root, name: name("newdir"), id: ObjectId::new(), mode: 0o755, uid: 0, gid: 0 },
        Op::Symlink { parent: root, name: name("newlink"), id: ObjectId::new(), target: name("x"), uid: 0, gid: 0 },
        Op::Mknod {
            parent: root,
            name: name("newfifo"),
            id: ObjectId::new(),
            kind: FileKind::Fifo,
            mode: 0o644,
            uid: 0,
            gid: 0,
            rdev: 0,
        },
        Op::Link { id: f, parent: d, name: name("f2") },
        Op::Unlink { parent: root, name: name("f"), expect: cur(&fa) },
        Op::Rmdir { parent: root, name: name("d"), expect: cur(&da) },
        Op::Rename {
            parent: root,
            name: name("f"),
            expect: cur(&fa),
            new_parent: d,
            new_name: name("moved"),
            target: None,
            mode: RenameMode::NoReplace,
        },
        Op::Write { id: f, base: fa.versions.data, offset: 0, data: b"CLOBBER".to_vec() },
        Op::Truncate { id: f, base: fa.versions.data, size: 0 },
        Op::Allocate { id: f, base: fa.versions.data, offset: 0, len: 1 << 20 },
        Op::PunchHole { id: f, base: fa.versions.data, offset: 0, len: 4096 },
        Op::SetAttr { id: f, base: fa.versions.meta, attrs: SetAttrs { mode: Some(0o777), ..Default::default() } },
        Op::SetXattr { id: f, base: fa.versions.meta, name: name("user.k"), value: b"changed".to_vec() },
        Op::RemoveXattr { id: f, base: fa.versions.meta, name: name("user.k") },
        Op::Append { id: f, base: fa.versions.data, local_offset: fa.size, data: b"APPENDED".to_vec() },
    ];
    let covered: BTreeSet<usize> = ops.iter().map(variant).collect();
    assert_eq!(covered.len(), OP_VARIANTS, "the test covers every op kind");
    for op in &ops {
        match ro.mutate(op.clone()).await {
            Err(ClientError::Op(OpError::Denied(_))) => {}
            other => panic!("{} with a read-only token: expected Denied, got {other:?}", op.kind()),
        }
    }
    // pipelined, too: a burst of denied ops gets one denial each
    let mut pend = Vec::new();
    for op in &ops {
        pend.push((op.kind(), ro.submit(op.clone()).await.expect("submit")));
    }
    for (kind, p) in pend {
        assert!(matches!(p.wait().await, Err(ClientError::Op(OpError::Denied(_)))), "pipelined {kind} is denied");
    }
    let after = izo_testkit::tree_digest(&s.dirs.export).expect("digest after");
    let diff = before.diff(&after);
    assert!(diff.is_empty(), "a read-only client changed the export:\n{}", diff.join("\n"));
    assert_eq!(stat(&ro, "records").await, records_before, "nothing was journaled for the read-only client");

    // queries all work with the read-only token
    assert_eq!(ro.lookup(root, b"f").await.expect("lookup").id, f);
    let names: BTreeSet<Vec<u8>> = ro.readdir(root).await.expect("readdir").into_iter().map(|e| e.name).collect();
    assert_eq!(names, [name("d"), name("f"), name("l")].into_iter().collect());
    assert_eq!(ro.read(f, 0, 100).await.expect("read"), b"precious");
    assert_eq!(ro.readlink(l).await.expect("readlink"), target);
    assert_eq!(ro.xattrs(f).await.expect("xattrs"), vec![(name("user.k"), b"v".to_vec())]);
    let (_, blocks) = ro.block_hashes(f).await.expect("block hashes");
    assert_eq!(blocks.len(), 1, "one block hash for an 8-byte file");
    let (entries, seq) = ro.snapshot().await.expect("snapshot");
    assert_eq!(entries.len(), 5, "root, d, f, l, p");
    assert_eq!(seq, records_before);
    let mut sub = ro.subscribe(0).await.expect("subscribe");
    let first = tokio::time::timeout(Duration::from_secs(5), sub.recv()).await.expect("a record within 5 s");
    match first {
        Some(StreamEvent::Record(r)) => assert_eq!(r.seq, 1, "the stream starts at the first record"),
        other => panic!("read-only subscriber got {other:?}"),
    }
    // the same ops are fine with the read-write token (checked with one of them)
    let w = ops.iter().find(|o| matches!(o, Op::Write { .. })).expect("write op").clone();
    rw.mutate(w).await.expect("the rw client may do what the ro client may not");
    assert_eq!(std::fs::read(s.dirs.export.join("f")).expect("f"), b"CLOBBERs", "7 bytes written over \"precious\"");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_pinned_fingerprint_fails_the_connect_and_the_right_one_works() {
    let s = InProc::start().await;
    let wrong = format!("SHA256:{}", "00".repeat(32));
    let mut cfg = s.client_config(&s.rw);
    cfg.fingerprint = Some(wrong.clone());
    match Client::connect(cfg).await {
        Err(ClientError::Fingerprint(m)) => {
            assert_eq!((m.presented.as_str(), m.pinned.as_str()), (s.server.fingerprint.as_str(), wrong.as_str()));
            let why = m.to_string();
            assert!(why.contains("fingerprint"), "the error names the fingerprint mismatch: {why}");
            assert!(why.contains(&s.server.fingerprint), "the error shows what the server presented: {why}");
        }
        Ok(_) => panic!("connected to a server whose certificate does not match the pin"),
        Err(other) => panic!("expected a connect error, got {other}"),
    }
    // the pinned one works, in either case
    let c = Client::connect(s.client_config(&s.rw)).await.expect("right fingerprint connects");
    assert_eq!(c.server_fingerprint().as_deref(), Some(s.server.fingerprint.as_str()));
    let mut cfg = s.client_config(&s.rw);
    cfg.fingerprint = Some(format!("SHA256:{}", s.server.fingerprint["SHA256:".len()..].to_uppercase()));
    Client::connect(cfg).await.expect("fingerprint comparison ignores hex case");
    // no pin: trust on first use, and the client reports what it saw
    let mut cfg = s.client_config(&s.rw);
    cfg.fingerprint = None;
    let tofu = Client::connect(cfg).await.expect("trust on first use");
    assert_eq!(tofu.server_fingerprint().as_deref(), Some(s.server.fingerprint.as_str()));
}

/// Read the server's answer to an offending frame: a refusal, then close.
async fn refused_then_closed(r: &mut Raw, what: &str) -> RefuseReason {
    let reason = match r.recv().await {
        Some(ServerMsg::Refused { reason, message }) => {
            assert!(!message.is_empty(), "{what}: the refusal explains itself");
            reason
        }
        other => panic!("{what}: expected a refusal, got {other:?}"),
    };
    assert!(r.recv().await.is_none(), "{what}: the server closes the connection after refusing");
    reason
}

/// A frame with the given version header and body.
fn frame(version: u16, body: &[u8]) -> Vec<u8> {
    let mut f = ((2 + body.len()) as u32).to_be_bytes().to_vec();
    f.extend_from_slice(&version.to_be_bytes());
    f.extend_from_slice(body);
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_are_refused_by_name_and_everyone_else_keeps_working() {
    let s = InProc::start().await;
    let fp = s.server.fingerprint.clone();
    // a client connected before the abuse must stay connected through it
    let bystander = s.client().await;
    let mut sub = bystander.subscribe(0).await.expect("subscribe");

    // another protocol version, as the very first frame
    let mut r = Raw::connect(&s.addr, &fp).await;
    r.send_bytes(&frame(99, b"hello from the future")).await;
    assert_eq!(refused_then_closed(&mut r, "version 99").await, RefuseReason::Version);
    still_serves(&s, "after-version").await;

    // the current version with a body that is not a message
    let mut r = Raw::connect(&s.addr, &fp).await;
    r.send_bytes(&frame(PROTOCOL_VERSION, &[0xff; 32])).await;
    assert_eq!(refused_then_closed(&mut r, "garbage first frame").await, RefuseReason::BadFrame);
    still_serves(&s, "after-garbage").await;

    // a length prefix over the 8 MiB limit, with no body following: refused
    // from the prefix alone, without waiting for (or allocating) the body
    for len in [codec::MAX_FRAME as u32 + 1, u32::MAX] {
        let mut r = Raw::connect(&s.addr, &fp).await;
        r.send_bytes(&len.to_be_bytes()).await;
        let what = format!("length prefix {len}");
        assert_eq!(refused_then_closed(&mut r, &what).await, RefuseReason::BadFrame);
    }
    still_serves(&s, "after-oversize").await;

    // a well-formed message that is not a Hello
    let mut r = Raw::connect(&s.addr, &fp).await;
    r.send(&ClientMsg::Ping { nonce: 7 }).await;
    assert_eq!(refused_then_closed(&mut r, "ping before hello").await, RefuseReason::Protocol);

    // the same offences after a good handshake
    let offences: [(&str, Vec<u8>, RefuseReason); 3] = [
        ("version 99 mid-session", frame(99, &[0; 8]), RefuseReason::BadFrame),
        ("garbage mid-session", frame(PROTOCOL_VERSION, &[0xff; 32]), RefuseReason::BadFrame),
        ("oversize mid-session", (codec::MAX_FRAME as u32 + 1).to_be_bytes().to_vec(), RefuseReason::BadFrame),
    ];
    for (what, bytes, want) in offences {
        let (mut r, w) = Raw::hello(&s.addr, &fp, &s.rw, ReplicaId::random()).await;
        assert!(matches!(w, ServerMsg::Welcome(_)), "{what}: handshake: {w:?}");
        r.send_bytes(&bytes).await;
        let got = refused_then_closed(&mut r, what).await;
        // a foreign version mid-session is a bad frame or a version refusal; both are clear
        assert!(got == want || (what.starts_with("version") && got == RefuseReason::Version), "{what}: {got:?}");
    }
    still_serves(&s, "after-mid-session").await;

    // the bystander never noticed: same connection, and its stream saw every create
    bystander
        .mutate(Op::Create {
            parent: ObjectId::ROOT,
            name: name("bystander"),
            id: ObjectId::new(),
            mode: 0o644,
            uid: 0,
            gid: 0,
        })
        .await
        .expect("the bystander still writes");
    let mut seen = 0;
    while seen < 5 {
        match tokio::time::timeout(Duration::from_secs(5), sub.recv()).await {
            Ok(Some(StreamEvent::Record(_))) => seen += 1,
            other => panic!("the bystander's stream after {seen} records: {other:?}"),
        }
    }
    assert_eq!(bystander.wire_counters().2, 0, "the bystander never had to reconnect");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_id_cannot_be_used_by_another_token() {
    let s = InProc::start().await;
    let replica = ReplicaId::random();
    let (_r, w) = Raw::hello(&s.addr, &s.server.fingerprint, &s.rw, replica).await;
    assert!(matches!(w, ServerMsg::Welcome(_)), "{w:?}");
    // replica ids appear in the record stream; another token must not take one over
    let (_r2, w2) = Raw::hello(&s.addr, &s.server.fingerprint, &s.ro, replica).await;
    match w2 {
        ServerMsg::Refused { reason: RefuseReason::Auth, message } => {
            assert!(message.contains("another token"), "{message}")
        }
        other => panic!("expected an auth refusal, got {other:?}"),
    }
    // the owner keeps using it
    let (_r3, w3) = Raw::hello(&s.addr, &s.server.fingerprint, &s.rw, replica).await;
    assert!(matches!(w3, ServerMsg::Welcome(_)), "{w3:?}");
}

/// A Hello claiming replies through `last_acked` under `incarnation`.
async fn hello_claiming(s: &InProc, token: &str, replica: ReplicaId, last_acked: u64, incarnation: u128) -> ServerMsg {
    Raw::hello_claiming(&s.addr, &s.server.fingerprint, token, replica, last_acked, incarnation).await.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unproven_claim_refuses_only_that_replica_and_keeps_the_incarnation() {
    let s = InProc::start().await;
    let before = s.server.incarnation();
    let replica = ReplicaId::random();
    let (mut r, _) = Raw::hello(&s.addr, &s.server.fingerprint, &s.rw, replica).await;
    let op = create_in_root(ObjectId::new(), "a");
    r.send(&ClientMsg::Mutate { cseq: 1, acked_through: 0, op }).await;
    assert!(matches!(r.recv().await, Some(ServerMsg::Reply { result: Ok(_), .. })));
    drop(r);
    // a client that saw replies through 1 meets a server that applied 1: fine
    match Raw::hello_acked(&s.addr, &s.server.fingerprint, &s.rw, replica, 1).await.1 {
        ServerMsg::Welcome(w) => assert_eq!(w.incarnation, before, "no rollback, same incarnation"),
        other => panic!("{other:?}"),
    }
    // one that says it saw replies through 5 proves nothing: refused, alone
    for inc in [0, before] {
        match hello_claiming(&s, &s.rw, replica, 5, inc).await {
            ServerMsg::Refused { reason: RefuseReason::ReplicaAhead, message } => {
                assert!(message.contains("--accept-rollback"), "the refusal says what an operator can do: {message}");
            }
            other => panic!("an unproven claim (incarnation {inc:x}): expected a refusal, got {other:?}"),
        }
    }
    assert_eq!(s.server.incarnation(), before, "the volume keeps its incarnation");
    let c = s.client().await;
    assert_eq!(c.welcome().expect("welcome").incarnation, before, "other clients see the same incarnation");
    still_serves(&s, "after-claim").await;
    // the replica itself is let in again once it claims what the server has
    match Raw::hello_acked(&s.addr, &s.server.fingerprint, &s.rw, replica, 1).await.1 {
        ServerMsg::Welcome(w) => assert_eq!((w.incarnation, w.last_applied), (before, 1)),
        other => panic!("{other:?}"),
    }
    // a read-only replica's replies are never recorded (its writes are
    // refused): whatever it claims, it is let in and changes nothing
    match hello_claiming(&s, &s.ro, ReplicaId::random(), 3, before).await {
        ServerMsg::Welcome(w) => assert_eq!(w.incarnation, before),
        other => panic!("a read-only replica after a refused write: {other:?}"),
    }
    // a claim about another incarnation says nothing about this one
    match hello_claiming(&s, &s.rw, replica, 9, before ^ 1).await {
        ServerMsg::Welcome(w) => assert_eq!(w.incarnation, before, "let in to resync"),
        other => panic!("a claim under another incarnation: {other:?}"),
    }
    assert_eq!(s.server.incarnation(), before);
}

/// A Client speaking as `replica` (as a remount of one cache would).
async fn client_as(p: &Proc, token: &str, replica: ReplicaId) -> Result<Client, ClientError> {
    let mut cfg = p.client_config(token);
    cfg.replica = replica;
    Client::connect(cfg).await
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    let _ = std::fs::remove_dir_all(to);
    let ok = std::process::Command::new("cp").arg("-a").arg(from).arg(to).status().expect("cp").success();
    assert!(ok, "cp -a {} {}", from.display(), to.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_state_dir_gets_a_new_incarnation_only_with_accept_rollback() {
    let dirs = Dirs::new();
    let token = dirs.token(izo_server::auth::Rights::Rw);
    let replica = ReplicaId::random();
    let backup = dirs._tmp.path().join("state-backup");
    let mut p = Proc::start(&dirs, "127.0.0.1:0", &[]);
    let c = client_as(&p, &token, replica).await.expect("connect");
    c.mutate(create_in_root(ObjectId::new(), "one")).await.expect("create one");
    c.close();
    p.sigterm();
    copy_dir(&dirs.state, &backup);
    let mut p = Proc::start(&dirs, "127.0.0.1:0", &[]);
    let c = client_as(&p, &token, replica).await.expect("connect");
    let before = c.welcome().expect("welcome").incarnation;
    c.mutate(create_in_root(ObjectId::new(), "two")).await.expect("create two");
    c.mutate(create_in_root(ObjectId::new(), "three")).await.expect("create three");
    let claim = c.answered_through();
    assert_eq!(claim, 3);
    c.close();
    p.sigterm();
    // the operator restores the state dir from the backup
    copy_dir(&backup, &dirs.state);
    let mut p = Proc::start(&dirs, "127.0.0.1:0", &[]);
    let (_, answer) = Raw::hello_acked(&p.addr, &p.fingerprint, &token, replica, claim).await;
    assert!(
        matches!(answer, ServerMsg::Refused { reason: RefuseReason::ReplicaAhead, .. }),
        "without --accept-rollback the replica is refused: {answer:?}"
    );
    let other = Client::connect(p.client_config(&token)).await.expect("another client connects");
    assert_eq!(other.welcome().expect("welcome").incarnation, before, "and the volume is unchanged");
    other.close();
    p.sigterm();
    // the operator accepts the restore: a new incarnation, and the replica is let in to resync
    let p = Proc::start_args(&dirs, "127.0.0.1:0", &["--accept-rollback"]);
    let other = Client::connect(p.client_config(&token)).await.expect("another client connects");
    let after = other.welcome().expect("welcome").incarnation;
    assert_ne!(after, before, "an accepted restore takes a new incarnation");
    let (_, answer) = Raw::hello_acked(&p.addr, &p.fingerprint, &token, replica, claim).await;
    match answer {
        ServerMsg::Welcome(w) => assert_eq!((w.incarnation, w.last_applied), (after, 1)),
        other => panic!("with --accept-rollback the replica is let in: {other:?}"),
    }
}

/// VmRSS of a process in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/<pid>/status");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS line");
    line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("VmRSS value")
}

/// A TLS connection that sends a length prefix of `len` and `body` bytes of
/// it, and stays open.
async fn unfinished_frame(addr: &str, fp: &str, len: u32, body: usize) -> Raw {
    let mut r = Raw::connect(addr, fp).await;
    use tokio::io::AsyncWriteExt;
    let _ = r.wr.write_all(&len.to_be_bytes()).await;
    let _ = r.wr.write_all(&vec![0x5a; body]).await;
    let _ = r.wr.flush().await;
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_connections_hold_little_memory_and_a_normal_client_still_works() {
    let dirs = Dirs::new();
    let token = dirs.token(izo_server::auth::Rights::Rw);
    let p = Proc::start(&dirs, "127.0.0.1:0", &[]);
    // settle (first connection, runtime threads) before measuring
    let c = Client::connect(p.client_config(&token)).await.expect("connect");
    c.mutate(create_in_root(ObjectId::new(), "warm")).await.expect("create");
    c.close();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let base = rss_kib(p.pid());
    // frames announcing 8 MiB with 4 MiB of it sent, and frames that fit the
    // pre-handshake bound but never end
    let mut held = Vec::new();
    for _ in 0..32 {
        held.push(unfinished_frame(&p.addr, &p.fingerprint, 8 << 20, 4 << 20).await);
    }
    for _ in 0..16 {
        held.push(unfinished_frame(&p.addr, &p.fingerprint, 60 << 10, 30 << 10).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let grown = rss_kib(p.pid()).saturating_sub(base);
    assert!(grown < 40 << 10, "48 unfinished frames grew the server by {} MiB", grown >> 10);
    // a normal client gets in and works meanwhile
    let c = Client::connect(p.client_config(&token)).await.expect("a normal client connects");
    c.mutate(create_in_root(ObjectId::new(), "meanwhile")).await.expect("and writes");
    c.close();
    // the oversized frames were refused at once, the others at the handshake deadline
    let started = Instant::now();
    for r in held.iter_mut() {
        while let Some(m) = r.recv().await {
            assert!(matches!(m, ServerMsg::Refused { .. }), "an unauthenticated connection got {m:?}");
        }
    }
    assert!(started.elapsed() < Duration::from_secs(8), "every unfinished handshake is closed within its deadline");
    drop(held);
    // at most 64 connections may be in their handshake: a 65th is closed at once
    let mut idle = Vec::new();
    for _ in 0..64 {
        idle.push(tokio::net::TcpStream::connect(&p.addr).await.expect("tcp"));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut extra = tokio::net::TcpStream::connect(&p.addr).await.expect("tcp");
    let mut b = [0u8; 1];
    use tokio::io::AsyncReadExt;
    let n = tokio::time::timeout(Duration::from_secs(2), extra.read(&mut b)).await;
    assert!(matches!(n, Ok(Ok(0)) | Ok(Err(_))), "a connection past the cap is closed at once: {n:?}");
    drop(idle);
    // once they are gone, clients connect again
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Client::connect(p.client_config(&token)).await {
            Ok(c) => {
                c.mutate(create_in_root(ObjectId::new(), "after")).await.expect("writes after the flood");
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "no client gets in after the flood: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Run `izo serve` expecting it to fail soon; its stderr.
fn serve_fails(export: &std::path::Path, state: &std::path::Path, listen: &str) -> String {
    let mut child = std::process::Command::new(izo_bin())
        .arg("serve")
        .arg(export)
        .arg("--state")
        .arg(state)
        .args(["--listen", listen, "--volume", "vol"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn izo serve");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("a second izo serve on {} / {} kept running", export.display(), state.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    use std::io::Read;
    child.stderr.take().expect("stderr").read_to_string(&mut err).expect("stderr");
    assert!(!status.success(), "a second izo serve exits non-zero: {err}");
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_a_live_export_or_state_changes_nothing_and_names_the_first() {
    let dirs = Dirs::new();
    let token = dirs.token(izo_server::auth::Rights::Rw);
    let p = Proc::start(&dirs, "127.0.0.1:0", &[]);
    let c = Client::connect(p.client_config(&token)).await.expect("connect");
    let id = ObjectId::new();
    c.mutate(create_in_root(id, "precious")).await.expect("create");
    let data = b"acknowledged bytes".to_vec();
    c.mutate(Op::Write { id, base: 0, offset: 0, data: data.clone() }).await.expect("write");
    let marker = || {
        let names: Vec<String> = std::fs::read_dir(dirs.export.join(".izo-stage"))
            .expect("stage dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("applied."))
            .collect();
        names
    };
    let marked = marker();
    let other_state = dirs._tmp.path().join("other-state");
    let other_export = dirs._tmp.path().join("other-export");
    std::fs::create_dir_all(&other_export).expect("mkdir");
    let pid = format!("pid {}", p.pid());
    for (what, export, state, listen) in [
        ("other state, same busy port", &dirs.export, &other_state, p.addr.as_str()),
        ("other state, another port", &dirs.export, &other_state, "127.0.0.1:0"),
        ("same state, another export", &other_export, &dirs.state, "127.0.0.1:0"),
        ("same state and export", &dirs.export, &dirs.state, "127.0.0.1:0"),
    ] {
        let err = serve_fails(export, state, listen);
        assert!(err.contains(&pid), "{what}: the refusal names the running server ({pid}): {err}");
        assert!(err.contains(&p.addr), "{what}: and where it listens ({}): {err}", p.addr);
        assert_eq!(marker(), marked, "{what}: the applied marker is untouched");
    }
    assert!(!other_state.join("volume.redb").exists(), "the second server opened no journal");
    // the first server keeps serving, with everything acknowledged intact
    assert_eq!(std::fs::read(dirs.export.join("precious")).expect("precious"), data);
    assert_eq!(c.read(id, 0, 100).await.expect("read back"), data);
    let more = b"and more".to_vec();
    let a = c.getattr(id).await.expect("getattr");
    c.mutate(Op::Write { id, base: a.versions.data, offset: data.len() as u64, data: more.clone() })
        .await
        .expect("the volume is still writable");
    assert_eq!(std::fs::read(dirs.export.join("precious")).expect("precious"), [data, more].concat());
    assert_eq!(c.wire_counters().2, 0, "the client never lost its connection");
}

/// `izo token ARGS` with its exit status, stdout and stderr.
fn izo_token(args: &[&std::ffi::OsStr]) -> (bool, String, String) {
    let out = std::process::Command::new(izo_bin()).arg("token").args(args).output().expect("run izo token");
    let text = |b: &[u8]| String::from_utf8_lossy(b).trim().to_string();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_create_refuses_a_state_that_holds_no_such_volume() {
    let s = InProc::start().await;
    let state = s.dirs.state.as_os_str();
    let empty = s.dirs._tmp.path().join("empty-state");
    std::fs::create_dir_all(&empty).expect("mkdir");
    let missing = s.dirs._tmp.path().join("no-such-state");
    let unknown = format!("izo-test-{:x}", ReplicaId::random().0);
    for (what, args, hint) in [
        ("no --state", vec!["create".as_ref(), "--volume".as_ref(), unknown.as_ref()], "--state"),
        ("an empty state dir", vec!["create".as_ref(), "--state".as_ref(), empty.as_os_str()], "holds no volume"),
        ("a missing state dir", vec!["create".as_ref(), "--state".as_ref(), missing.as_os_str()], "holds no volume"),
        (
            "another volume",
            vec!["create".as_ref(), "--state".as_ref(), state, "--volume".as_ref(), "other".as_ref()],
            "--volume vol",
        ),
    ] {
        let (ok, out, err) = izo_token(&args);
        assert!(!ok, "{what}: token create must fail, printed {out:?}");
        assert!(out.is_empty(), "{what}: no token printed: {out}");
        assert!(err.contains(hint), "{what}: the error says what to do ({hint}): {err}");
    }
    assert!(!empty.join("tokens.toml").exists() && !missing.exists(), "nothing was written");
    let default_dir = izo_server::config::default_state_base().join(&unknown);
    assert!(!default_dir.exists(), "no default state dir was created");
    // the state dir of the running server works, with or without --volume
    for args in [
        vec!["create".as_ref(), "--state".as_ref(), state],
        vec!["create".as_ref(), "--state".as_ref(), state, "--volume".as_ref(), "vol".as_ref()],
    ] {
        let (ok, token, err) = izo_token(&args);
        assert!(ok, "token create on the server's state: {err}");
        let c = Client::connect(s.client_config(&token)).await.expect("the new token connects");
        c.close();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_token_keeps_its_replicas_and_the_old_secret_is_refused() {
    let s = InProc::start().await;
    let state = s.dirs.state.as_os_str();
    let (ok, old, err) =
        izo_token(&["create".as_ref(), "--state".as_ref(), state, "--label".as_ref(), "laptop".as_ref()]);
    assert!(ok, "token create: {err}");
    let replica = ReplicaId::random();
    let mut cfg = s.client_config(&old);
    cfg.replica = replica;
    let c = Client::connect(cfg).await.expect("connect with the first secret");
    c.mutate(create_in_root(ObjectId::new(), "before-rotation")).await.expect("create");
    c.close();
    let (ok, new, err) = izo_token(&["rotate".as_ref(), "laptop".as_ref(), "--state".as_ref(), state]);
    assert!(ok, "token rotate: {err}");
    assert_ne!(new, old);
    let (ok, list, err) = izo_token(&["list".as_ref(), "--state".as_ref(), state]);
    assert!(ok, "token list: {err}");
    assert!(!list.contains(&new) && !list.contains(&old), "no secret is listed: {list}");
    // the same cache (replica id) with the new secret: accepted, its seqs kept
    let mut cfg = s.client_config(&new);
    cfg.replica = replica;
    let c = Client::connect(cfg).await.expect("the rotated token keeps the replica");
    assert_eq!(c.welcome().expect("welcome").last_applied, 1, "the replica's progress is kept");
    c.mutate(create_in_root(ObjectId::new(), "after-rotation")).await.expect("create after rotation");
    c.close();
    // the old secret is refused
    let (reason, message) = refusal(&s, &old).await;
    assert_eq!(reason, RefuseReason::Auth, "the old secret: {message}");
    // rotating by id works as well, and another token still cannot take the replica
    let id = list.lines().find(|l| l.ends_with("laptop")).and_then(|l| l.split('\t').next()).expect("id").to_string();
    let (ok, newer, err) = izo_token(&["rotate".as_ref(), id.as_ref(), "--state".as_ref(), state]);
    assert!(ok, "rotate by id: {err}");
    let mut cfg = s.client_config(&newer);
    cfg.replica = replica;
    Client::connect(cfg).await.expect("rotated by id");
    let (_r, w) = Raw::hello(&s.addr, &s.server.fingerprint, &s.rw, replica).await;
    assert!(matches!(w, ServerMsg::Refused { reason: RefuseReason::Auth, .. }), "{w:?}");
}

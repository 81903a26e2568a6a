//! Who may connect and what they may do: tokens, read-only rights, the
//! pinned certificate, and frames the server must refuse without letting
//! one bad peer disturb anyone else.

use crate::harness::*;
use izo_client::{Client, ClientError, StreamEvent};
use izo_proto::*;
use std::collections::BTreeSet;
use std::time::Duration;

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
    }
}
const OP_VARIANTS: usize = 15;

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
    rw.mutate(Op::Mknod { parent: d, name: name("p"), id: p, kind: FileKind::Fifo, mode: 0o600, uid: 0, gid: 0 })
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_rolled_back_behind_a_client_takes_a_new_incarnation() {
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
    // ...but one that saw replies through 5 proves the server lost acked state
    let after = match Raw::hello_acked(&s.addr, &s.server.fingerprint, &s.rw, replica, 5).await.1 {
        ServerMsg::Welcome(w) => w.incarnation,
        other => panic!("{other:?}"),
    };
    assert_ne!(after, before, "a rolled-back server takes a new incarnation");
    assert_eq!(s.server.incarnation(), after);
    // and every client sees it from then on
    let c = s.client().await;
    assert_eq!(c.welcome().expect("welcome").incarnation, after);
}

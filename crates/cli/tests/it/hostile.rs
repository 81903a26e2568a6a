//! Hostile input: arbitrary bytes and well-formed but nonsensical messages.
//! The server never panics, keeps serving another client throughout, and
//! the volume changes only by the ops it accepted, exactly as the reference
//! model predicts (refused ops leave no trace).

use crate::crash::Rng;
use crate::harness::*;
use izo_proto::*;

fn bytes(rng: &mut Rng, max: u64) -> Vec<u8> {
    (0..rng.below(max + 1)).map(|_| rng.below(256) as u8).collect()
}

/// A name that is sometimes fine and often not.
fn any_name(rng: &mut Rng) -> Vec<u8> {
    match rng.below(9) {
        0 => b"..".to_vec(),
        1 => b".".to_vec(),
        2 => b"a/b".to_vec(),
        3 => b"nul\0byte".to_vec(),
        4 => vec![b'x'; 256],
        5 => Vec::new(),
        6 => b".izo-stage".to_vec(),
        _ => format!("n{}", rng.below(6)).into_bytes(),
    }
}

/// A number that is either small (may be accepted) or absurd.
fn any_num(rng: &mut Rng) -> u64 {
    match rng.below(5) {
        0 => u64::MAX - rng.below(10),
        1 => i64::MAX as u64 + rng.below(10),
        _ => rng.below(200_000),
    }
}

fn any_id(rng: &mut Rng, known: &[ObjectId]) -> ObjectId {
    if rng.below(3) == 0 || known.is_empty() {
        ObjectId(rng.next() as u128 | ((rng.next() as u128) << 64))
    } else {
        known[rng.below(known.len() as u64) as usize]
    }
}

fn any_op(rng: &mut Rng, known: &[ObjectId]) -> Op {
    let (p, id, n) = (any_id(rng, known), any_id(rng, known), any_name(rng));
    let e = Expect { id: any_id(rng, known), base: Versions { data: rng.below(3), meta: rng.below(3) } };
    let (mode, uid, gid) = (rng.below(1 << 16) as u32, rng.below(3) as u32, rng.below(3) as u32);
    let fresh = ObjectId::new();
    match rng.below(15) {
        0 => Op::Create { parent: p, name: n, id: fresh, mode, uid, gid },
        1 => Op::Mkdir { parent: p, name: n, id: fresh, mode, uid, gid },
        2 => Op::Symlink { parent: p, name: n, id: fresh, target: bytes(rng, 20), uid, gid },
        3 => {
            let kind = [FileKind::Fifo, FileKind::Socket, FileKind::File, FileKind::Dir][rng.below(4) as usize];
            Op::Mknod { parent: p, name: n, id: fresh, kind, mode, uid, gid, rdev: 0 }
        }
        4 => Op::Link { id, parent: p, name: n },
        5 => Op::Unlink { parent: p, name: n, expect: e },
        6 => Op::Rmdir { parent: p, name: n, expect: e },
        7 => {
            let mode = [RenameMode::Replace, RenameMode::NoReplace, RenameMode::Exchange][rng.below(3) as usize];
            let target = (rng.below(2) == 0).then(|| Expect { id: any_id(rng, known), base: Versions::default() });
            Op::Rename {
                parent: p,
                name: n,
                expect: e,
                new_parent: any_id(rng, known),
                new_name: any_name(rng),
                target,
                mode,
            }
        }
        8 => Op::Write { id, base: rng.below(3), offset: any_num(rng), data: bytes(rng, 300) },
        9 => Op::Truncate { id, base: rng.below(3), size: any_num(rng) },
        10 => Op::Allocate { id, base: rng.below(3), offset: any_num(rng), len: any_num(rng) },
        11 => Op::PunchHole { id, base: rng.below(3), offset: any_num(rng), len: any_num(rng) },
        12 => {
            let mtime = (rng.below(2) == 0)
                .then(|| Timestamp { secs: rng.next() as i64 >> 20, nsec: rng.below(1_000_000_000) as u32 });
            let attrs =
                SetAttrs { mode: (rng.below(2) == 0).then_some(mode), uid: Some(uid), gid: None, mtime, atime: None };
            Op::SetAttr { id, base: rng.below(3), attrs }
        }
        13 => Op::SetXattr {
            id,
            base: rng.below(3),
            name: [b"user.".to_vec(), bytes(rng, 4)].concat(),
            value: bytes(rng, 40),
        },
        _ => Op::RemoveXattr { id, base: rng.below(3), name: any_name(rng) },
    }
}

fn any_query(rng: &mut Rng, known: &[ObjectId]) -> Query {
    let id = any_id(rng, known);
    match rng.below(7) {
        6 => {
            let n = rng.below(40) as usize;
            Query::ReadFiles { files: (0..n).map(|_| (any_id(rng, known), any_num(rng))).collect() }
        }
        0 => Query::Lookup { parent: id, name: any_name(rng) },
        1 => Query::GetAttr { id },
        2 => Query::ReadDir { id, cookie: any_num(rng), max: rng.next() as u32 },
        3 => Query::Read { id, offset: any_num(rng), len: any_num(rng) },
        4 => Query::ReadLink { id },
        _ => Query::ListXattr { id },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nonsense_never_panics_never_corrupts_and_others_keep_being_served() {
    // Trusted, so ops land as sent and the model needs no owner policy
    // (the policy has its own tests in owners.rs).
    let s = InProc::start_with(Dirs::new(), |c| c.trusted = true).await;
    let good = s.client().await;
    let mut model = model_for(&s.dirs.export);
    let mut rng = Rng::new(std::env::var("IZO_HOSTILE_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0xbad5eed));
    let mut known = vec![ObjectId::ROOT];
    let fuzzer = ReplicaId::random();
    let (mut r, _) = Raw::hello(&s.addr, &s.server.fingerprint, &s.rw, fuzzer).await;
    let mut cseq = 0;
    let rounds = std::env::var("IZO_HOSTILE_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(600);
    for round in 0..rounds {
        match rng.below(10) {
            // garbage bytes on a connection of their own
            0 => {
                let mut bad = Raw::connect(&s.addr, &s.server.fingerprint).await;
                let mut junk = bytes(&mut rng, 64);
                if rng.below(2) == 0 {
                    junk.splice(0..0, (junk.len() as u32 + rng.below(3) as u32).to_be_bytes());
                }
                bad.send_bytes(&junk).await;
                drop(bad);
            }
            1 | 2 => {
                let qid = round as u64;
                r.send(&ClientMsg::Query { qid, query: any_query(&mut rng, &known) }).await;
                // streamed answers end with End or an error; either is fine
                loop {
                    match r.recv().await {
                        Some(ServerMsg::Answer {
                            result:
                                Ok(
                                    QueryReply::Data { .. }
                                    | QueryReply::Hole { .. }
                                    | QueryReply::File { .. }
                                    | QueryReply::Missing { .. },
                                ),
                            ..
                        }) => continue,
                        Some(ServerMsg::Answer { .. }) => break,
                        other => panic!("round {round}: query answered {other:?}"),
                    }
                }
            }
            _ => {
                cseq += 1;
                let op = any_op(&mut rng, &known);
                r.send(&ClientMsg::Mutate { cseq, acked_through: cseq - 1, op: op.clone() }).await;
                match r.recv().await {
                    Some(ServerMsg::Reply { result: Ok(a), .. }) => {
                        if let Err(e) = model.apply(&op, a.time) {
                            panic!("round {round}: the server accepted {op:?} which the model refuses: {e}");
                        }
                        if let Op::Create { id, .. }
                        | Op::Mkdir { id, .. }
                        | Op::Symlink { id, .. }
                        | Op::Mknod { id, .. } = op
                        {
                            known.push(id);
                        }
                    }
                    Some(ServerMsg::Reply { result: Err(_), .. }) => {}
                    other => panic!("round {round}: mutation answered {other:?}"),
                }
            }
        }
        if round % 100 == 0 {
            // another client is served normally throughout
            let id = ObjectId::new();
            let n = format!("good-{round}");
            let op = create_in_root(id, &n);
            let a = good.mutate(op.clone()).await.expect("the good client is served");
            model.apply(&op, a.time).expect("model");
            let w = Op::Write { id, base: 0, offset: 0, data: b"still here".to_vec() };
            let a = good.mutate(w.clone()).await.expect("write served");
            model.apply(&w, a.time).expect("model");
            assert_eq!(good.read(id, 0, 100).await.expect("read"), b"still here");
        }
    }
    let got = izo_testkit::tree_digest(&s.dirs.export).expect("digest");
    let diff = model.digest().diff(&got);
    assert!(diff.is_empty(), "the volume differs from the accepted ops:\n{}", diff.join("\n"));
    assert!(!s.server.is_readonly(), "no apply failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_client_is_bounded_and_others_keep_being_served() {
    let s = InProc::start().await;
    let good = s.client().await;
    let flood = ReplicaId::random();
    let (mut r, _) = Raw::hello(&s.addr, &s.server.fingerprint, &s.rw, flood).await;
    // far more unanswered mutations than the window, and a pile of queries,
    // written without reading a single answer
    let mut burst = Vec::new();
    for cseq in 1..=6000u64 {
        let op = Op::Create {
            parent: ObjectId::ROOT,
            name: name(&format!("f{cseq}")),
            id: ObjectId::new(),
            mode: 0o644,
            uid: 0,
            gid: 0,
        };
        burst.extend(encode_frame(&ClientMsg::Mutate { cseq, acked_through: 0, op }).expect("encode"));
        if cseq % 3 == 0 {
            let q = Query::ReadDir { id: ObjectId::ROOT, cookie: 0, max: 4096 };
            burst.extend(encode_frame(&ClientMsg::Query { qid: cseq, query: q }).expect("encode"));
        }
    }
    let writer = tokio::spawn(async move {
        r.send_bytes(&burst).await;
        r
    });
    // meanwhile another client gets prompt answers
    for i in 0..20 {
        let t = std::time::Instant::now();
        let op = Op::Create {
            parent: ObjectId::ROOT,
            name: name(&format!("good{i}")),
            id: ObjectId::new(),
            mode: 0o644,
            uid: 0,
            gid: 0,
        };
        good.mutate(op).await.expect("the other client is served");
        // (a bound for a hang, not a pace: on a loaded machine one op may
        // wait behind a few of the flood's group commits)
        assert!(t.elapsed() < std::time::Duration::from_secs(30), "an op of the other client took {:?}", t.elapsed());
    }
    let mut r = writer.await.expect("flood written");
    // the flood's answers: every mutation gets a reply, some refused as over the window
    let (mut replies, mut over) = (0, 0);
    while replies < 6000 {
        match r.recv().await {
            Some(ServerMsg::Reply { result, .. }) => {
                replies += 1;
                if let Err(OpError::Transient(m)) = result {
                    assert!(m.contains("unanswered"), "{m}");
                    over += 1;
                }
            }
            Some(ServerMsg::Answer { .. }) => {}
            other => panic!("after {replies} replies: {other:?}"),
        }
    }
    assert!(!s.server.is_readonly());
    eprintln!("{over} of 6000 mutations refused as over the window");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xattrs_beyond_what_an_inode_holds_are_refused_before_the_ack() {
    let s = InProc::start().await;
    let c = s.client().await;
    let f = ObjectId::new();
    c.mutate(create_in_root(f, "f")).await.expect("create");
    // one value larger than an ext4 inode's xattr space
    let big = Op::SetXattr { id: f, base: 0, name: name("user.big"), value: vec![1; 60_000] };
    assert!(matches!(c.mutate(big).await, Err(izo_client::ClientError::Op(OpError::XattrRoom(_)))));
    // many small ones until the inode is full: the refusal comes before the ack
    let mut set = 0;
    for i in 0..100 {
        let op = Op::SetXattr { id: f, base: 0, name: name(&format!("user.k{i}")), value: vec![2; 500] };
        match c.mutate(op).await {
            Ok(_) => set += 1,
            Err(izo_client::ClientError::Op(OpError::XattrRoom(m))) => {
                assert!(m.contains("per file"), "{m}");
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!((3..100).contains(&set), "{set} attributes of 500 bytes went in");
    assert!(!s.server.is_readonly(), "no xattr failed at apply");
    let on_disk = izo_testkit::tree_digest(&s.dirs.export).expect("digest");
    assert_eq!(on_disk.nodes.get(&name("f")).expect("f").xattrs.len(), set);
}

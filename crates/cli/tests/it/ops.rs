//! Every op over real TLS: effects on the export, preconditions, the reply
//! cache, non-UTF-8 names, sparse files, concurrent replicas, readdir paging.

use crate::harness::*;
use izo_client::{ClientError, FileSegment, Segment};
use izo_proto::*;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;

fn digest_eq(model: &izo_testkit::Model, export: &std::path::Path) {
    let want = model.digest();
    let got = izo_testkit::tree_digest(export).expect("digest export");
    let diff = want.diff(&got);
    assert!(diff.is_empty(), "export differs from the model:\n{}", diff.join("\n"));
}

/// Apply `op` on the server and on the model, with the server's time.
async fn both(c: &izo_client::Client, m: &mut izo_testkit::Model, op: Op) -> Applied {
    let a = c.mutate(op.clone()).await.unwrap_or_else(|e| panic!("{} failed: {e}", op.kind()));
    m.apply(&op, a.time).unwrap_or_else(|e| panic!("model refused {}: {e}", op.kind()));
    a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_op_lands_in_the_export_as_the_model_predicts() {
    let s = InProc::start().await;
    let c = s.client().await;
    let mut m = model_for(&s.dirs.export);
    let root = ObjectId::ROOT;
    let (d, f, g) = (ObjectId::new(), ObjectId::new(), ObjectId::new());
    let (l, fifo, sock, d2) = (ObjectId::new(), ObjectId::new(), ObjectId::new(), ObjectId::new());
    both(&c, &mut m, Op::Mkdir { parent: root, name: name("d"), id: d, mode: 0o750, uid: 12, gid: 34 }).await;
    both(&c, &mut m, Op::Create { parent: d, name: name("f"), id: f, mode: 0o640, uid: 1000, gid: 1000 }).await;
    both(&c, &mut m, Op::Write { id: f, base: 0, offset: 0, data: b"hello world".to_vec() }).await;
    both(&c, &mut m, Op::Write { id: f, base: 0, offset: 6, data: b"there".to_vec() }).await;
    both(&c, &mut m, Op::Truncate { id: f, base: 0, size: 8 }).await;
    both(&c, &mut m, Op::Allocate { id: f, base: 0, offset: 0, len: 20_000 }).await;
    both(&c, &mut m, Op::PunchHole { id: f, base: 0, offset: 0, len: 4096 }).await;
    both(&c, &mut m, Op::Symlink { parent: d, name: name("l"), id: l, target: b"../nowhere".to_vec(), uid: 5, gid: 6 })
        .await;
    both(
        &c,
        &mut m,
        Op::Mknod { parent: d, name: name("p"), id: fifo, kind: FileKind::Fifo, mode: 0o600, uid: 0, gid: 0, rdev: 0 },
    )
    .await;
    both(
        &c,
        &mut m,
        Op::Mknod {
            parent: d,
            name: name("s"),
            id: sock,
            kind: FileKind::Socket,
            mode: 0o644,
            uid: 0,
            gid: 0,
            rdev: 0,
        },
    )
    .await;
    let a = both(&c, &mut m, Op::Link { id: f, parent: root, name: name("f-link") }).await;
    assert_eq!(a.attr.expect("attr").nlink, 2);
    let mtime = Timestamp { secs: 1_000_000_000, nsec: 123_456_789 };
    let attrs = SetAttrs { mode: Some(0o750), uid: Some(7), gid: Some(8), mtime: Some(mtime), atime: None };
    both(&c, &mut m, Op::SetAttr { id: f, base: 0, attrs }).await;
    both(&c, &mut m, Op::SetAttr { id: l, base: 0, attrs: SetAttrs { mtime: Some(mtime), ..Default::default() } })
        .await;
    both(&c, &mut m, Op::SetXattr { id: f, base: 0, name: name("user.color"), value: b"blue".to_vec() }).await;
    both(&c, &mut m, Op::SetXattr { id: d, base: 0, name: name("user.gone"), value: b"x".to_vec() }).await;
    both(&c, &mut m, Op::RemoveXattr { id: d, base: 0, name: name("user.gone") }).await;
    both(&c, &mut m, Op::Create { parent: root, name: name("g"), id: g, mode: 0o644, uid: 0, gid: 0 }).await;
    // rename over an existing target, then NOREPLACE, then EXCHANGE
    let over = Op::Rename {
        parent: d,
        name: name("f"),
        expect: expect(f),
        new_parent: root,
        new_name: name("g"),
        target: Some(expect(g)),
        mode: RenameMode::Replace,
    };
    both(&c, &mut m, over).await;
    both(&c, &mut m, Op::Mkdir { parent: root, name: name("d2"), id: d2, mode: 0o700, uid: 0, gid: 0 }).await;
    let nr = Op::Rename {
        parent: root,
        name: name("g"),
        expect: expect(f),
        new_parent: d2,
        new_name: name("moved"),
        target: None,
        mode: RenameMode::NoReplace,
    };
    both(&c, &mut m, nr).await;
    let ex = Op::Rename {
        parent: d2,
        name: name("moved"),
        expect: expect(f),
        new_parent: d,
        new_name: name("l"),
        target: Some(expect(l)),
        mode: RenameMode::Exchange,
    };
    both(&c, &mut m, ex).await;
    digest_eq(&m, &s.dirs.export);
    // what the client sees agrees with the export
    let meta = std::fs::symlink_metadata(s.dirs.export.join("d/l")).expect("exchanged file");
    assert_eq!(meta.mode() & 0o7777, 0o750);
    assert_eq!((meta.uid(), meta.gid()), (7, 8));
    assert_eq!(c.lookup(d, b"l").await.expect("lookup").id, f);
    assert_eq!(c.readlink(l).await.expect("readlink"), b"../nowhere");
    assert_eq!(c.xattrs(f).await.expect("xattrs"), vec![(name("user.color"), b"blue".to_vec())]);
    let back = c.read(f, 0, 1 << 20).await.expect("read");
    assert!(back == m.content(f).expect("model content"), "read-back differs from the model ({} bytes)", back.len());
    // removals
    both(&c, &mut m, Op::Unlink { parent: d2, name: name("moved"), expect: expect(l) }).await;
    both(&c, &mut m, Op::Unlink { parent: d, name: name("p"), expect: expect(fifo) }).await;
    both(&c, &mut m, Op::Rmdir { parent: root, name: name("d2"), expect: expect(d2) }).await;
    digest_eq(&m, &s.dirs.export);
    assert!(matches!(c.getattr(d2).await, Err(ClientError::Op(OpError::NotFound(_)))));
}

fn is_conflict(r: Result<Applied, ClientError>) -> Option<Attr> {
    match r {
        Err(ClientError::Op(OpError::Conflict { current, .. })) => current,
        other => panic!("expected a conflict, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_failed_precondition_is_a_conflict_with_current_versions() {
    let s = InProc::start().await;
    let a = s.client().await;
    let b = s.client().await;
    let root = ObjectId::ROOT;
    let (f, d, x) = (ObjectId::new(), ObjectId::new(), ObjectId::new());
    a.mutate(Op::Create { parent: root, name: name("f"), id: f, mode: 0o644, uid: 0, gid: 0 }).await.expect("create");
    a.mutate(Op::Mkdir { parent: root, name: name("d"), id: d, mode: 0o755, uid: 0, gid: 0 }).await.expect("mkdir");
    let seen = b.getattr(f).await.expect("b sees f");
    let w = a.mutate(Op::Write { id: f, base: 0, offset: 0, data: b"a".to_vec() }).await.expect("a writes");
    let a2 = a.mutate(Op::SetAttr { id: f, base: 0, attrs: SetAttrs { mode: Some(0o600), ..Default::default() } });
    a2.await.expect("a chmods");
    let cur = w.seq;
    let stale = seen.versions;
    // name taken: create, mkdir, symlink, mknod, link, rename NOREPLACE
    let taken = [
        Op::Create { parent: root, name: name("f"), id: x, mode: 0o644, uid: 0, gid: 0 },
        Op::Mkdir { parent: root, name: name("f"), id: x, mode: 0o755, uid: 0, gid: 0 },
        Op::Symlink { parent: root, name: name("f"), id: x, target: name("t"), uid: 0, gid: 0 },
        Op::Mknod { parent: root, name: name("f"), id: x, kind: FileKind::Fifo, mode: 0o644, uid: 0, gid: 0, rdev: 0 },
        Op::Link { id: f, parent: root, name: name("d") },
        Op::Rename {
            parent: root,
            name: name("d"),
            expect: expect(d),
            new_parent: root,
            new_name: name("f"),
            target: None,
            mode: RenameMode::NoReplace,
        },
    ];
    for op in taken {
        let kind = op.kind();
        let cur_attr = is_conflict(b.mutate(op).await).unwrap_or_else(|| panic!("{kind}: current attr"));
        assert!(cur_attr.id == f || cur_attr.id == d, "{kind} names the occupant");
    }
    // stale bases from replica b: data ops, meta ops, removal, rename target
    let stale_ops = [
        Op::Write { id: f, base: stale.data, offset: 0, data: b"b".to_vec() },
        Op::Truncate { id: f, base: stale.data, size: 0 },
        Op::Allocate { id: f, base: stale.data, offset: 0, len: 10 },
        Op::PunchHole { id: f, base: stale.data, offset: 0, len: 10 },
        Op::SetAttr { id: f, base: stale.meta, attrs: SetAttrs { uid: Some(3), ..Default::default() } },
        Op::SetXattr { id: f, base: stale.meta, name: name("user.a"), value: vec![1] },
        Op::Unlink { parent: root, name: name("f"), expect: Expect { id: f, base: stale } },
        Op::Rename {
            parent: root,
            name: name("d"),
            expect: expect(d),
            new_parent: root,
            new_name: name("f"),
            target: Some(Expect { id: f, base: stale }),
            mode: RenameMode::Replace,
        },
    ];
    for op in stale_ops {
        let kind = op.kind();
        let cur_attr = is_conflict(b.mutate(op).await).unwrap_or_else(|| panic!("{kind}: current attr"));
        assert_eq!(cur_attr.id, f, "{kind}");
        assert_eq!(cur_attr.versions.data, cur, "{kind} reports the current data version");
    }
    // removexattr needs the xattr; with it present but a stale base: conflict
    a.mutate(Op::SetXattr { id: f, base: 0, name: name("user.k"), value: vec![1] }).await.expect("a sets xattr");
    is_conflict(b.mutate(Op::RemoveXattr { id: f, base: stale.meta, name: name("user.k") }).await);
    // removal of a name that points elsewhere
    is_conflict(b.mutate(Op::Rmdir { parent: root, name: name("d"), expect: expect(x) }).await);
    // the losing ops changed nothing
    assert_eq!(std::fs::read(s.dirs.export.join("f")).expect("f"), b"a");
    assert!(!s.dirs.export.join("x").exists());
    // with a fresh base the same op goes through
    let now = b.getattr(f).await.expect("getattr");
    b.mutate(Op::Write { id: f, base: now.versions.data, offset: 1, data: b"b".to_vec() })
        .await
        .expect("rebased write");
    assert_eq!(std::fs::read(s.dirs.export.join("f")).expect("f"), b"ab");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resent_op_is_answered_from_the_reply_cache() {
    let s = InProc::start().await;
    let replica = ReplicaId::random();
    let (mut r, w) = Raw::hello(&s.addr, &s.server.fingerprint, &s.rw, replica).await;
    assert!(matches!(w, ServerMsg::Welcome(_)), "{w:?}");
    let id = ObjectId::new();
    let op = create_in_root(id, "once");
    let msg = ClientMsg::Mutate { cseq: 1, acked_through: 0, op };
    r.send(&msg).await;
    let (first, first_raw) = r.recv_raw().await.expect("reply");
    assert!(matches!(first, ServerMsg::Reply { cseq: 1, result: Ok(_) }), "{first:?}");
    // a new connection of the same replica resends the same op
    drop(r);
    let (mut r2, w2) = Raw::hello(&s.addr, &s.server.fingerprint, &s.rw, replica).await;
    match w2 {
        ServerMsg::Welcome(w) => assert_eq!(w.last_applied, 1),
        other => panic!("{other:?}"),
    }
    r2.send(&msg).await;
    let (_, again_raw) = r2.recv_raw().await.expect("cached reply");
    assert_eq!(again_raw, first_raw, "the resend gets byte-for-byte the same answer");
    let c = s.client().await;
    assert_eq!(stat(&c, "reply_cache_hits").await, 1);
    assert_eq!(stat(&c, "records").await, 1, "applied once");
    let names: Vec<_> = std::fs::read_dir(&s.dirs.export).expect("ls").flatten().map(|e| e.file_name()).collect();
    assert_eq!(names.iter().filter(|n| n.as_bytes() == b"once").count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_utf8_name_round_trips() {
    let s = InProc::start().await;
    let c = s.client().await;
    let raw = b"caf\xe9-\xff\xfe".to_vec();
    let id = ObjectId::new();
    c.mutate(Op::Create { parent: ObjectId::ROOT, name: raw.clone(), id, mode: 0o644, uid: 0, gid: 0 })
        .await
        .expect("create");
    let entries = c.readdir(ObjectId::ROOT).await.expect("readdir");
    assert_eq!(entries.iter().map(|e| e.name.clone()).collect::<Vec<_>>(), vec![raw.clone()]);
    assert_eq!(c.lookup(ObjectId::ROOT, &raw).await.expect("lookup").id, id);
    let on_disk = std::ffi::OsStr::from_bytes(&raw);
    assert!(s.dirs.export.join(on_disk).exists(), "the export holds the exact bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sparse_file_keeps_its_holes_on_the_server() {
    let s = InProc::start().await;
    let c = s.client().await;
    let id = ObjectId::new();
    c.mutate(create_in_root(id, "sparse")).await.expect("create");
    let far = 256u64 << 20;
    c.mutate(Op::Write { id, base: 0, offset: 0, data: vec![1; 4096] }).await.expect("head");
    c.mutate(Op::Write { id, base: 0, offset: far, data: vec![2; 4096] }).await.expect("tail");
    let meta = std::fs::metadata(s.dirs.export.join("sparse")).expect("stat");
    assert_eq!(meta.len(), far + 4096);
    assert!(meta.blocks() * 512 < 1 << 20, "only the written blocks are allocated: {} blocks", meta.blocks());
    let mut segs = Vec::new();
    c.read_with(id, 0, far + 4096, |s| {
        segs.push(match s {
            Segment::Data(o, b) => (o, b.len() as u64, true),
            Segment::Hole(o, l) => (o, l, false),
        });
        Ok(())
    })
    .await
    .expect("read");
    let data: u64 = segs.iter().filter(|s| s.2).map(|s| s.1).sum();
    assert!(data <= 2 << 20, "holes are not shipped as data: {data} data bytes");
    assert!(segs.iter().any(|s| !s.2 && s.1 >= far - (1 << 20)), "one big hole: {segs:?}");
    c.mutate(Op::PunchHole { id, base: 0, offset: 0, len: 4096 }).await.expect("punch");
    let meta = std::fs::metadata(s.dirs.export.join("sparse")).expect("stat");
    assert!(meta.blocks() * 512 <= 64 << 10, "punched range released: {} blocks", meta.blocks());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_adding_names_to_one_directory_do_not_conflict() {
    let s = InProc::start().await;
    let (a, b) = (s.client().await, s.client().await);
    let d = ObjectId::new();
    a.mutate(Op::Mkdir { parent: ObjectId::ROOT, name: name("shared"), id: d, mode: 0o755, uid: 0, gid: 0 })
        .await
        .expect("mkdir");
    let mut pend = Vec::new();
    for i in 0..200 {
        let (c, who) = if i % 2 == 0 { (&a, "a") } else { (&b, "b") };
        let op = Op::Create {
            parent: d,
            name: name(&format!("{who}-{i}")),
            id: ObjectId::new(),
            mode: 0o644,
            uid: 0,
            gid: 0,
        };
        pend.push(c.submit(op).await.expect("submit"));
    }
    for p in pend {
        p.wait().await.expect("no conflict");
    }
    assert_eq!(c_count(&a, d).await, 200);
    assert_eq!(std::fs::read_dir(s.dirs.export.join("shared")).expect("ls").count(), 200);
}

async fn c_count(c: &izo_client::Client, d: ObjectId) -> usize {
    c.readdir(d).await.expect("readdir").len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readdir_cookies_stay_valid_while_the_directory_changes() {
    let s = InProc::start().await;
    let c = s.client().await;
    let d = ObjectId::new();
    c.mutate(Op::Mkdir { parent: ObjectId::ROOT, name: name("big"), id: d, mode: 0o755, uid: 0, gid: 0 })
        .await
        .expect("mkdir");
    let mut ids = Vec::new();
    let mut pend = Vec::new();
    for i in 0..600 {
        let id = ObjectId::new();
        ids.push(id);
        pend.push(
            c.submit(Op::Create { parent: d, name: name(&format!("n{i:04}")), id, mode: 0o644, uid: 0, gid: 0 })
                .await
                .expect("submit"),
        );
    }
    for p in pend {
        p.wait().await.expect("create");
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut cookie = 0;
    let mut round = 0;
    loop {
        let (page, done) = c.readdir_page(d, cookie, 100).await.expect("page");
        for e in &page {
            assert!(seen.insert(e.name.clone()), "entry listed twice: {:?}", String::from_utf8_lossy(&e.name));
        }
        cookie = page.last().map(|e| e.cookie).unwrap_or(cookie);
        // change the directory between pages: remove a listed and an unlisted name, add one
        let gone = format!("n{:04}", 599 - round);
        let op = Op::Unlink { parent: d, name: name(&gone), expect: expect(ids[599 - round]) };
        c.mutate(op).await.expect("unlink");
        c.mutate(Op::Create {
            parent: d,
            name: name(&format!("new{round}")),
            id: ObjectId::new(),
            mode: 0o644,
            uid: 0,
            gid: 0,
        })
        .await
        .expect("create");
        round += 1;
        if done {
            break;
        }
    }
    // every name that existed throughout was listed exactly once
    for i in 0..(600 - round) {
        assert!(seen.contains(&name(&format!("n{i:04}"))), "n{i:04} missing");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_hashes_describe_each_mib_of_content_including_holes() {
    let s = InProc::start().await;
    let c = s.client().await;
    let id = ObjectId::new();
    c.mutate(create_in_root(id, "h")).await.expect("create");
    let block = BLOCK_SIZE as usize;
    c.mutate(Op::Write { id, base: 0, offset: 10, data: vec![3; block] }).await.expect("write");
    c.mutate(Op::Write { id, base: 0, offset: 3 * BLOCK_SIZE + 5, data: b"tail".to_vec() }).await.expect("write");
    let (version, hashes) = c.block_hashes(id).await.expect("hashes");
    assert_eq!(version, c.getattr(id).await.expect("attr").versions.data, "hashes describe the current version");
    let content = std::fs::read(s.dirs.export.join("h")).expect("read export");
    let want: Vec<[u8; 32]> = content.chunks(block).map(|b| *blake3::hash(b).as_bytes()).collect();
    assert_eq!(hashes.len(), 4);
    assert!(hashes == want, "block hashes differ from the content's");
    // a one-byte change marks only its block stale
    c.mutate(Op::Write { id, base: 0, offset: 2 * BLOCK_SIZE, data: vec![9] }).await.expect("write");
    let (_, again) = c.block_hashes(id).await.expect("hashes");
    let changed: Vec<usize> = (0..4).filter(|&i| again[i] != hashes[i]).collect();
    assert_eq!(changed, vec![2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_hashes_follow_random_writes_truncates_and_holes() {
    let s = InProc::start().await;
    let c = s.client().await;
    let mut rng = crate::crash::Rng::new(0x5eed);
    for round in 0..4 {
        let id = ObjectId::new();
        let n = format!("r{round}");
        c.mutate(create_in_root(id, &n)).await.expect("create");
        for _ in 0..25 {
            let off = rng.below(5 * BLOCK_SIZE);
            let op = match rng.below(4) {
                0 => Op::Truncate { id, base: 0, size: rng.below(5 * BLOCK_SIZE) },
                1 => Op::PunchHole { id, base: 0, offset: off, len: 1 + rng.below(2 * BLOCK_SIZE) },
                _ => Op::Write {
                    id,
                    base: 0,
                    offset: off,
                    data: vec![rng.below(256) as u8; 1 + rng.below(70_000) as usize],
                },
            };
            c.mutate(op).await.expect("data op");
            if rng.below(5) == 0 {
                c.block_hashes(id).await.expect("hashes mid-way");
            }
        }
        let (_, hashes) = c.block_hashes(id).await.expect("hashes");
        let content = std::fs::read(s.dirs.export.join(&n)).expect("read export");
        let want: Vec<[u8; 32]> = content.chunks(BLOCK_SIZE as usize).map(|b| *blake3::hash(b).as_bytes()).collect();
        assert!(hashes == want, "round {round}: hashes of {} blocks differ from the content", want.len());
    }
}

/// One ReadFiles query brings many files, each announced with the length
/// sent, then its bytes (holes as holes); a file that is gone or a
/// directory is reported missing and the rest still comes; a length past
/// the end is cut at the end; too many files in one query is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_read_files_query_brings_many_files_with_their_holes() {
    let s = InProc::start().await;
    let c = s.client().await;
    let mut want: Vec<(ObjectId, Vec<u8>)> = Vec::new();
    for i in 0..40u32 {
        let id = ObjectId::new();
        c.mutate(create_in_root(id, &format!("f{i}"))).await.expect("create");
        let data: Vec<u8> = (0..(i * 997) as usize).map(|j| (j as u32 * 7 + i) as u8).collect();
        if !data.is_empty() {
            c.mutate(Op::Write { id, base: 0, offset: 0, data: data.clone() }).await.expect("write");
        }
        want.push((id, data));
    }
    // a sparse one: 4 KiB, a 64 MiB hole, 4 KiB
    let sparse = ObjectId::new();
    c.mutate(create_in_root(sparse, "sparse")).await.expect("create sparse");
    let far = 64u64 << 20;
    c.mutate(Op::Write { id: sparse, base: 0, offset: 0, data: vec![1; 4096] }).await.expect("head");
    c.mutate(Op::Write { id: sparse, base: 0, offset: far, data: vec![2; 4096] }).await.expect("tail");
    let dir = ObjectId::new();
    c.mutate(Op::Mkdir { parent: ObjectId::ROOT, name: b"d".to_vec(), id: dir, mode: 0o755, uid: 0, gid: 0 })
        .await
        .expect("mkdir");
    let gone = ObjectId::new();
    // removed from the export behind the server's back, just before the read
    let removed = ObjectId::new();
    c.mutate(create_in_root(removed, "removed")).await.expect("create removed");
    c.mutate(Op::Write { id: removed, base: 0, offset: 0, data: vec![7; 5000] }).await.expect("write removed");
    std::fs::remove_file(s.dirs.export.join("removed")).expect("rm in the export");

    let mut ask: Vec<(ObjectId, u64)> = want.iter().map(|(id, d)| (*id, d.len() as u64)).collect();
    ask.insert(3, (gone, 10));
    ask.insert(7, (dir, 10));
    ask.insert(11, (removed, 5000));
    ask.push((sparse, far + 4096));
    // past the end: cut at the end
    ask.push((want[5].0, 1 << 30));
    let mut got: Vec<(ObjectId, u64, Vec<u8>)> = Vec::new();
    let mut missing = Vec::new();
    let mut holes = 0u64;
    c.read_files(ask, |seg| {
        match seg {
            FileSegment::Start { id, size } => got.push((id, size, Vec::new())),
            FileSegment::Missing(id) => missing.push(id),
            FileSegment::Seg(Segment::Data(at, b)) => {
                let cur = &mut got.last_mut().expect("data after a start").2;
                assert!(at as usize >= cur.len(), "segments in order");
                cur.resize(at as usize, 0);
                cur.extend_from_slice(&b);
            }
            FileSegment::Seg(Segment::Hole(at, n)) => {
                holes += n;
                let cur = &mut got.last_mut().expect("hole after a start").2;
                cur.resize((at + n) as usize, 0);
            }
        }
        Ok(())
    })
    .await
    .expect("read files");
    // the removed file: missing (its inode is gone) or its committed bytes
    // (the inode still lives: the capture journals the removal after), and
    // the rest of the batch comes either way
    let as_missing = missing.iter().filter(|&&m| m == removed).count();
    let as_file: Vec<_> = got.iter().filter(|g| g.0 == removed).collect();
    match (as_missing, as_file.as_slice()) {
        (1, []) => {}
        (0, [(_, size, bytes)]) => assert!(*size == 5000 && bytes == &vec![7u8; 5000], "the removed file's bytes"),
        other => panic!("the removed file came as {other:?}"),
    }
    missing.retain(|&m| m != removed);
    got.retain(|g| g.0 != removed);
    assert_eq!(missing, vec![gone, dir], "the gone file and the directory, in order");
    assert_eq!(got.len(), want.len() + 2, "every file announced once");
    for ((id, data), (gid, size, bytes)) in want.iter().zip(&got) {
        assert_eq!(id, gid, "files come in the order asked");
        assert_eq!(*size, data.len() as u64, "{id}: the length sent");
        assert_eq!(bytes, data, "{id}: the bytes");
    }
    let (sid, ssize, sbytes) = &got[want.len()];
    assert_eq!((*sid, *ssize), (sparse, far + 4096));
    assert!(holes >= far - (1 << 20), "the hole came as a hole ({holes} bytes of holes)");
    assert_eq!(sbytes.len() as u64, far + 4096);
    assert!(sbytes[..4096].iter().all(|&b| b == 1) && sbytes[far as usize..].iter().all(|&b| b == 2));
    assert_eq!(got[want.len() + 1].1, want[5].1.len() as u64, "a length past the end is cut at the end");
    assert_eq!(got[want.len() + 1].2, want[5].1);

    let too_many = vec![(want[0].0, 1); MAX_READ_FILES + 1];
    match c.read_files(too_many, |_| Ok(())).await {
        Err(ClientError::Op(OpError::Invalid(m))) => assert!(m.contains("at most"), "{m}"),
        other => panic!("{} files in one query: {other:?}", MAX_READ_FILES + 1),
    }
}

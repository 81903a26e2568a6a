//! Micro-benchmarks (criterion): the hot paths under every mutation.
//!
//! * `frame`: encoding and decoding a `Mutate` frame carrying a 4 KiB write
//!   (what a client sends per sealed write chunk) and a create.
//! * `journal`: appending records to the journal with group commit: a batch
//!   of N creates executed and committed durably in one transaction (N = 1,
//!   the worst case, and N = 64, what a busy server commits at once).
//! * `cml`: a client modification log append, as a FUSE write pays it: one
//!   log frame (`write(2)`) plus the in-memory layer update, and the dirty
//!   range record of a `write(2)`.
//!
//! Run: `cargo bench -p izo --bench micro` (`-- --quick` for a short run).
//! Files go to a temp dir under /var/tmp.

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use izo_client::cache::{Cache, CmlEntry, Edit};
use izo_journal::Store;
use izo_proto::*;
use std::hint::black_box;

fn frame(c: &mut Criterion) {
    let write = ClientMsg::Mutate {
        cseq: 42,
        acked_through: 41,
        op: Op::Write { id: ObjectId::new(), base: 7, offset: 1 << 20, data: vec![0xa5; 4096] },
    };
    let create = ClientMsg::Mutate {
        cseq: 43,
        acked_through: 42,
        op: Op::Create {
            parent: ObjectId::ROOT,
            name: b"a-file-name.c".to_vec(),
            id: ObjectId::new(),
            mode: 0o644,
            uid: 0,
            gid: 0,
        },
    };
    let mut g = c.benchmark_group("frame");
    for (name, msg) in [("write-4k", &write), ("create", &create)] {
        let bytes = encode_frame(msg).expect("encode");
        g.throughput(Throughput::Bytes(bytes.len() as u64));
        g.bench_with_input(BenchmarkId::new("encode", name), msg, |b, m| {
            b.iter(|| encode_frame(black_box(m)).expect("encode"))
        });
        // the body after the 4-byte length
        g.bench_with_input(BenchmarkId::new("decode", name), &bytes[4..], |b, body| {
            b.iter(|| decode_frame::<ClientMsg>(black_box(body)).expect("decode"))
        });
    }
    g.finish();
}

fn journal(c: &mut Criterion) {
    let dir = tempfile::Builder::new().prefix("izo-micro-").tempdir_in("/var/tmp").expect("temp dir");
    let store = Store::open(&dir.path().join("j.redb"), (0o755, 0, 0, Timestamp::now())).expect("store");
    let who = ReplicaId::random();
    let mut cseq = 0u64;
    let mut g = c.benchmark_group("journal");
    for n in [1u64, 64] {
        g.throughput(Throughput::Elements(n));
        g.bench_function(BenchmarkId::new("append-creates-durable", n), |b| {
            b.iter(|| {
                let mut batch = store.batch().expect("batch");
                for _ in 0..n {
                    cseq += 1;
                    let op = Op::Create {
                        parent: ObjectId::ROOT,
                        name: format!("f{cseq}").into_bytes(),
                        id: ObjectId::new(),
                        mode: 0o644,
                        uid: 0,
                        gid: 0,
                    };
                    batch.execute(Origin::Replica(who, cseq), &op, Timestamp::now()).expect("execute");
                }
                batch.commit(true).expect("commit")
            })
        });
    }
    g.finish();
}

fn cml(c: &mut Criterion) {
    let dir = tempfile::Builder::new().prefix("izo-micro-").tempdir_in("/var/tmp").expect("temp dir");
    let cache = Cache::open(dir.path()).expect("cache");
    cache.replay_log().expect("replay");
    let id = ObjectId::new();
    let mut lsn = 0u64;
    let mut g = c.benchmark_group("cml");
    g.throughput(Throughput::Elements(1));
    g.bench_function("append-op", |b| {
        b.iter_batched(
            || {
                lsn += 1;
                let op = Op::SetAttr { id, base: 0, attrs: SetAttrs { mode: Some(0o600), ..SetAttrs::default() } };
                vec![Edit::Cml(lsn, CmlEntry { op, len: 0, time: None })]
            },
            |edits| cache.local(&edits).expect("append"),
            BatchSize::SmallInput,
        )
    });
    let mut off = 0u64;
    g.bench_function("dirty-range", |b| {
        b.iter(|| {
            off += 4096;
            cache.log_dirty(id, off, 4096).expect("log")
        })
    });
    g.finish();
    // (folds keep the log and the layer bounded between groups)
    cache.fold().expect("fold");
}

criterion_group!(benches, frame, journal, cml);
criterion_main!(benches);

//! A full disk is a transient error before the ack, never a failed apply:
//! on a small loop-mounted ext4 the server refuses writes once its space
//! budget is spent, stays writable, and takes writes again once space is
//! freed.

use crate::harness::*;
use izo_client::ClientError;
use izo_proto::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_refused_before_the_ack_and_the_volume_stays_writable() {
    let fs = SmallFs::new(256, &[]);
    let dirs = Dirs::new();
    let export = fs.mnt().join("vol");
    std::fs::create_dir(&export).expect("export");
    let s = InProc::start_with(dirs, |c| c.export = export.clone()).await;
    let c = s.client().await;
    let mut model = model_for(&export);
    let id = ObjectId::new();
    let op = create_in_root(id, "big");
    let a = c.mutate(op.clone()).await.expect("create");
    model.apply(&op, a.time).expect("model");
    let mut written = 0u64;
    let refused = loop {
        // rewrites of the first MiB alternate with appends: both take space
        let offset = if written % 3 == 1 { 0 } else { written << 20 };
        let op = Op::Write { id, base: 0, offset, data: vec![written as u8; 1 << 20] };
        match c.mutate(op.clone()).await {
            Ok(a) => {
                model.apply(&op, a.time).expect("model");
                written += 1;
                assert!(written < 400, "a 256 MiB file system never filled up");
            }
            Err(e) => break e,
        }
    };
    assert!(written >= 50, "only {written} MiB went in before the refusal");
    match &refused {
        ClientError::Op(e @ OpError::NoSpace(_)) => assert!(e.is_transient(), "a full export is retried: {e}"),
        other => panic!("expected a NoSpace refusal, got {other:?}"),
    }
    assert!(!s.server.is_readonly(), "the refusal came before the ack, not from a failed apply");
    let got = izo_testkit::tree_digest(&export).expect("digest");
    let diff = model.digest().diff(&got);
    assert!(diff.is_empty(), "the export holds exactly the accepted writes:\n{}", diff.join("\n"));
    // freeing space makes writes go through again
    let op = Op::Truncate { id, base: 0, size: 0 };
    c.mutate(op).await.expect("truncate frees the space");
    c.mutate(Op::Write { id, base: 0, offset: 0, data: vec![1; 1 << 20] }).await.expect("writes go through again");
}

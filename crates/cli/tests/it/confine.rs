//! Confinement: no name, symlink or swap race lets a client op read, write
//! or create anything outside the export. Clients address objects by id and
//! names are single components, so paths are never resolved; the server
//! reaches inodes by file handle and works on directory fds.

use crate::harness::*;
use izo_client::ClientError;
use izo_proto::*;
use std::os::unix::fs::symlink;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A directory beside the export holding a file `secret` = "keep".
fn outside_with_secret(s: &InProc) -> std::path::PathBuf {
    let outside = s.dirs._tmp.path().join("outside");
    std::fs::create_dir(&outside).expect("outside");
    std::fs::write(outside.join("secret"), b"keep").expect("secret");
    outside
}

fn outside_is_untouched(dir: &std::path::Path, secret: &[u8]) {
    let names: Vec<_> = std::fs::read_dir(dir).expect("ls outside").flatten().map(|e| e.file_name()).collect();
    assert_eq!(names.len(), 1, "nothing was created outside the export: {names:?}");
    assert_eq!(std::fs::read(dir.join("secret")).expect("secret"), secret, "nothing outside was written");
}

fn refused(r: Result<Applied, ClientError>) -> OpError {
    match r {
        Err(ClientError::Op(e)) => e,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_dot_absolute_and_slashed_names_are_refused() {
    let s = InProc::start().await;
    let outside = outside_with_secret(&s);
    let c = s.client().await;
    let root = ObjectId::ROOT;
    for bad in [&b".."[..], b".", b"../outside/x", b"/tmp/x", b"a/b", b"x\0y", b""] {
        let op = Op::Create { parent: root, name: bad.to_vec(), id: ObjectId::new(), mode: 0o644, uid: 0, gid: 0 };
        assert!(matches!(refused(c.mutate(op).await), OpError::BadName(_)), "{:?}", String::from_utf8_lossy(bad));
        let op = Op::Mkdir { parent: root, name: bad.to_vec(), id: ObjectId::new(), mode: 0o755, uid: 0, gid: 0 };
        assert!(matches!(refused(c.mutate(op).await), OpError::BadName(_)));
    }
    let f = ObjectId::new();
    c.mutate(Op::Create { parent: root, name: name("f"), id: f, mode: 0o644, uid: 0, gid: 0 }).await.expect("create");
    let mv = Op::Rename {
        parent: root,
        name: name("f"),
        expect: expect(f),
        new_parent: root,
        new_name: b"../outside/stolen".to_vec(),
        target: None,
        mode: RenameMode::Replace,
    };
    assert!(matches!(refused(c.mutate(mv).await), OpError::BadName(_)));
    let ln = Op::Link { id: f, parent: root, name: b"../outside/linked".to_vec() };
    assert!(matches!(refused(c.mutate(ln).await), OpError::BadName(_)));
    assert!(c.lookup(root, b"..").await.is_err(), "lookup of .. finds nothing");
    outside_is_untouched(&outside, b"keep");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlink_pointing_outside_is_never_followed() {
    let s = InProc::start().await;
    let outside = outside_with_secret(&s);
    let c = s.client().await;
    let root = ObjectId::ROOT;
    // a client-made symlink to the outside directory and one to the secret
    let (ld, lf) = (ObjectId::new(), ObjectId::new());
    let target = outside.as_os_str().as_encoded_bytes().to_vec();
    c.mutate(Op::Symlink { parent: root, name: name("esc"), id: ld, target: target.clone(), uid: 0, gid: 0 })
        .await
        .expect("symlink");
    let secret = [target.clone(), b"/secret".to_vec()].concat();
    c.mutate(Op::Symlink { parent: root, name: name("sec"), id: lf, target: secret, uid: 0, gid: 0 })
        .await
        .expect("symlink");
    // one made locally in the export is unknown to the server, so unreachable
    symlink(&outside, s.dirs.export.join("local-esc")).expect("local symlink");
    assert!(c.lookup(root, b"local-esc").await.is_err());
    // using a symlink as a directory or a file is refused
    let op = Op::Create { parent: ld, name: name("x"), id: ObjectId::new(), mode: 0o644, uid: 0, gid: 0 };
    assert!(matches!(refused(c.mutate(op).await), OpError::NotDir(_)));
    assert!(matches!(
        refused(c.mutate(Op::Write { id: lf, base: 0, offset: 0, data: b"pwned".to_vec() }).await),
        OpError::Invalid(_)
    ));
    assert!(matches!(refused(c.mutate(Op::Truncate { id: lf, base: 0, size: 0 }).await), OpError::Invalid(_)));
    assert!(c.read(lf, 0, 100).await.is_err(), "reading through a symlink is refused");
    assert!(c.readdir(ld).await.is_err(), "listing through a symlink is refused");
    // attribute changes act on the link itself, never the target
    let attrs = SetAttrs { uid: Some(4321), ..Default::default() };
    c.mutate(Op::SetAttr { id: lf, base: 0, attrs }).await.expect("chown of the link");
    use std::os::unix::fs::MetadataExt;
    assert_ne!(std::fs::metadata(outside.join("secret")).expect("secret").uid(), 4321);
    outside_is_untouched(&outside, b"keep");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapping_a_directory_for_a_symlink_during_ops_reaches_nothing_outside() {
    let s = InProc::start().await;
    let outside = outside_with_secret(&s);
    let c = s.client().await;
    let d = ObjectId::new();
    c.mutate(Op::Mkdir { parent: ObjectId::ROOT, name: name("d"), id: d, mode: 0o755, uid: 0, gid: 0 })
        .await
        .expect("mkdir");
    let f = ObjectId::new();
    c.mutate(Op::Create { parent: d, name: name("f"), id: f, mode: 0o644, uid: 0, gid: 0 }).await.expect("create");
    // a local process swaps d for a symlink to the outside, again and again
    let stop = Arc::new(AtomicBool::new(false));
    let swaps = {
        let (stop, export, outside) = (stop.clone(), s.dirs.export.clone(), outside.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Acquire) {
                if std::fs::rename(export.join("d"), export.join("d.real")).is_ok() {
                    let _ = symlink(&outside, export.join("d"));
                    std::thread::yield_now();
                    let _ = std::fs::remove_file(export.join("d"));
                    let _ = std::fs::rename(export.join("d.real"), export.join("d"));
                    n += 1;
                }
            }
            n
        })
    };
    let mut pend = Vec::new();
    for i in 0..300 {
        let op =
            Op::Create { parent: d, name: name(&format!("n{i}")), id: ObjectId::new(), mode: 0o644, uid: 0, gid: 0 };
        pend.push(c.submit(op).await.expect("submit"));
        pend.push(
            c.submit(Op::Write { id: f, base: 0, offset: i * 5, data: b"write".to_vec() }).await.expect("submit"),
        );
    }
    for p in pend {
        p.wait().await.expect("ops on d by id succeed whatever its name points to");
    }
    for _ in 0..50 {
        assert!(c.read(f, 0, 1500).await.expect("read").starts_with(b"write"));
    }
    stop.store(true, Ordering::Release);
    let n = swaps.join().expect("swapper");
    assert!(n > 0, "the swap race actually ran");
    outside_is_untouched(&outside, b"keep");
    let real = std::fs::read_dir(s.dirs.export.join("d")).expect("ls d").count();
    assert_eq!(real, 301, "every create landed in the real directory");
}

//! A restored server state (`izo serve --accept-rollback`) never deletes
//! what a replica holds that the server lost: the replica resyncs to the
//! restored volume and keeps its newer versions as parked changes, named
//! by path, with their bytes.

use crate::harness::*;
use std::path::Path;

fn cp(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    let st = std::process::Command::new("cp").arg("-a").arg(from).arg(to).status().expect("run cp");
    assert!(st.success(), "cp -a {} {}", from.display(), to.display());
}

fn sync(mnt: &Path) -> (bool, String) {
    let out = std::process::Command::new(izo_bin()).arg("sync").arg(mnt).output().expect("izo sync");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_accepted_rollback_a_replica_keeps_what_the_server_lost_as_parked_changes() {
    sweep_mounts();
    let dirs = Dirs::new();
    let tok = dirs.token(izo_server::auth::Rights::Rw);
    let backup = dirs._tmp.path().join("state-backup");
    tokio::task::spawn_blocking(move || {
        let mut p = Proc::start(&dirs, "127.0.0.1:0", &[]);
        let mut m = MountProc::start(&p.addr, &p.fingerprint, &tok);
        let (mnt, cache) = (m.mnt.clone(), m.cache.clone());
        std::fs::write(mnt.join("a.txt"), b"first").expect("write");
        izo_sync(&mnt);
        m.stop();
        p.sigterm();
        cp(&dirs.state, &backup);
        // after the backup: a newer version of a.txt and a new b.txt, both acked
        let mut p = Proc::start(&dirs, "127.0.0.1:0", &[]);
        let mut m = MountProc::start_at(&p.addr, &p.fingerprint, &tok, &mnt, &cache);
        std::fs::write(mnt.join("a.txt"), b"second, newer").expect("write");
        std::fs::write(mnt.join("b.txt"), b"only here").expect("write");
        izo_sync(&mnt);
        m.stop();
        p.sigterm();
        // the operator restores the server from the backup (its state, and
        // the export's files in place) and accepts the rollback
        cp(&backup, &dirs.state);
        std::fs::write(dirs.export.join("a.txt"), b"first").expect("restore a.txt");
        std::fs::remove_file(dirs.export.join("b.txt")).expect("restore: no b.txt");
        let p = Proc::start_args(&dirs, "127.0.0.1:0", &["--accept-rollback"]);
        let m = MountProc::start_at(&p.addr, &p.fingerprint, &tok, &mnt, &cache);
        // the replica shows the restored volume ...
        assert_eq!(std::fs::read(mnt.join("a.txt")).expect("a.txt"), b"first");
        assert!(!mnt.join("b.txt").exists(), "b.txt is not in the restored volume");
        // ... and keeps what the server lost, named by path, with its bytes
        let (ok, said) = sync(&mnt);
        assert!(!ok, "izo sync fails while kept versions wait: {said}");
        for path in ["/a.txt", "/b.txt"] {
            assert!(said.contains(path), "izo sync names {path}: {said}");
        }
        let kept = cache.join("kept");
        let mut held: Vec<Vec<u8>> = std::fs::read_dir(&kept)
            .expect("the kept directory")
            .map(|e| std::fs::read(e.expect("entry").path()).expect("read kept"))
            .collect();
        held.sort();
        assert_eq!(held, vec![b"only here".to_vec(), b"second, newer".to_vec()]);
        drop(m);
        drop(p);
    })
    .await
    .expect("rollback test");
}

/// A change made here and not yet sent when the server's state is replaced
/// was made against a volume the server no longer has: it is parked with
/// its bytes, named by `izo sync`, never applied to the restored volume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_queued_before_the_volume_is_replaced_is_parked_not_sent() {
    sweep_mounts();
    let dirs = Dirs::new();
    let tok = dirs.token(izo_server::auth::Rights::Rw);
    let backup = dirs._tmp.path().join("state-backup");
    tokio::task::spawn_blocking(move || {
        let mut p = Proc::start(&dirs, "127.0.0.1:0", &[]);
        let mut m = MountProc::start(&p.addr, &p.fingerprint, &tok);
        let (mnt, cache) = (m.mnt.clone(), m.cache.clone());
        std::fs::write(mnt.join("a.txt"), b"first").expect("write");
        izo_sync(&mnt);
        m.stop();
        p.sigterm();
        cp(&dirs.state, &backup);
        // the server goes away; a change made here waits in the log
        let mut p = Proc::start(&dirs, "127.0.0.1:0", &[]);
        let mut m = MountProc::start_at(&p.addr, &p.fingerprint, &tok, &mnt, &cache);
        p.sigterm();
        std::fs::write(mnt.join("a.txt"), b"made offline").expect("offline write");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(mnt.join("a.txt"), std::fs::Permissions::from_mode(0o600)).expect("offline chmod");
        std::fs::create_dir(mnt.join("new-dir")).expect("offline mkdir");
        m.stop();
        // the operator restores the server's state and accepts the rollback
        cp(&backup, &dirs.state);
        let p = Proc::start_args(&dirs, "127.0.0.1:0", &["--accept-rollback"]);
        let m = MountProc::start_at(&p.addr, &p.fingerprint, &tok, &mnt, &cache);
        let (ok, said) = sync(&mnt);
        assert!(!ok, "izo sync fails while the parked change waits: {said}");
        assert!(said.contains("/a.txt"), "izo sync names the file: {said}");
        assert_eq!(
            std::fs::read(dirs.export.join("a.txt")).expect("export a.txt"),
            b"first",
            "the restored volume did not take a change made against the state it replaced"
        );
        let mode = std::fs::metadata(dirs.export.join("a.txt")).expect("export a.txt").permissions().mode() & 0o7777;
        assert_eq!(mode, 0o644, "the offline chmod was not applied to the restored volume");
        assert!(!dirs.export.join("new-dir").exists(), "nor the offline mkdir");
        assert_eq!(std::fs::read(mnt.join("a.txt")).expect("a.txt"), b"first", "the replica shows the restored volume");
        let kept: Vec<Vec<u8>> = std::fs::read_dir(cache.join("kept"))
            .map(|d| d.filter_map(|e| std::fs::read(e.ok()?.path()).ok()).collect())
            .unwrap_or_default();
        let parked = std::process::Command::new(izo_bin()).arg("status").arg(&mnt).output().expect("izo status");
        let status = String::from_utf8_lossy(&parked.stdout).to_string();
        assert!(
            kept.iter().any(|k| k == b"made offline") || status.contains("made before the volume was restored"),
            "the offline bytes are kept (kept files: {kept:?}; status: {status})"
        );
        drop(m);
        drop(p);
    })
    .await
    .expect("rollback test");
}

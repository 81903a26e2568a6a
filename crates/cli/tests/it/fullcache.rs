//! A replica whose cache disk fills up: the writer hears ENOSPC (never
//! EIO) before anything is logged, space can be freed from inside the
//! mount, the stream resumes by itself once there is room, later writes
//! are durable, and nothing acknowledged is lost.

use crate::harness::*;
use crate::mount::converge;
use std::io::Write;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_cache_disk_is_enospc_rm_frees_it_and_the_stream_resumes() {
    sweep_mounts();
    let dirs = Dirs::new();
    let tok = dirs.token(izo_server::auth::Rights::Rw);
    let p = Proc::start(&dirs, "127.0.0.1:0", &[]);
    let (addr, fp) = (p.addr.clone(), p.fingerprint.clone());
    let ex = dirs.export.clone();
    tokio::task::spawn_blocking(move || {
        let _p = p;
        let small = SmallFs::new(32, &["-m", "0"]);
        let dir = tempfile::Builder::new().prefix("izo-mnt-").tempdir().expect("dir");
        let mnt = dir.path().join("mnt");
        let cache = small.mnt().join("cache");
        let mut a = MountProc::start_at(&addr, &fp, &tok, &mnt, &cache);
        let b = MountProc::start(&addr, &fp, &tok);
        let reserve = cache.join("reserve");
        assert_eq!(std::fs::metadata(&reserve).map(|m| m.len()).ok(), Some(8 << 20), "a reserve is held back");
        std::fs::write(mnt.join("before"), b"acked before the disk filled").expect("write");
        izo_sync(&mnt);
        std::fs::write(mnt.join("small"), b"a small file").expect("write");
        // something else fills the cache's disk to the last block
        let filler = small.mnt().join("filler");
        {
            let mut f = std::fs::File::create(&filler).expect("filler");
            let chunk = vec![0u8; 1 << 16];
            while f.write_all(&chunk).is_ok() {}
            let _ = f.sync_all();
        }
        // a write through the mount: ENOSPC, never EIO
        let mut f = std::fs::File::create(mnt.join("big")).expect("create big");
        let chunk = vec![7u8; 1 << 20];
        let mut written = 0u64;
        let err = loop {
            match f.write_all(&chunk) {
                Ok(()) => written += chunk.len() as u64,
                Err(e) => break e,
            }
            assert!(written < 64 << 20, "a 32 MiB disk took {written} bytes");
        };
        eprintln!("filled after {written} bytes: {err}");
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "the writer hears ENOSPC: {err}");
        drop(f);
        // another replica changes the volume meanwhile
        std::fs::write(b.mnt.join("from-b"), vec![1u8; 64 << 10]).expect("write on B");
        izo_sync(&b.mnt);
        // (the log is folded into the database every second: a fold meets
        // the full disk too)
        // changes until even the log has no room: ENOSPC
        let mut refused = None;
        for i in 0..3000 {
            if let Err(e) = std::fs::write(mnt.join(format!("while-full-{i}")), b"") {
                refused = Some((i, e));
                break;
            }
        }
        eprintln!("metadata while full: {refused:?}");
        if let Some((_, e)) = &refused {
            assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "a change the cache has no room for is ENOSPC: {e}");
        }
        let made = refused.as_ref().map(|(i, _)| *i).expect("the disk never filled");
        std::thread::sleep(Duration::from_millis(2200));
        // what waits, and why, is said
        let status = izo_out(&["status".as_ref(), mnt.as_os_str()]);
        assert!(status.contains("cache problem: cache disk full:") && status.contains("MiB needed"), "{status}");
        let out = std::process::Command::new(izo_bin())
            .args(["sync", "--timeout", "2"])
            .arg(&mnt)
            .output()
            .expect("izo sync");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("cache disk full"), "izo sync on a full cache: {err}");
        // a delete through the mount works on the full disk (the reserve is for it)
        let t = Instant::now();
        std::fs::remove_file(mnt.join("small")).expect("rm on a full cache");
        std::fs::remove_file(mnt.join("big")).expect("rm on a full cache");
        assert!(t.elapsed() < Duration::from_secs(2));
        // space is freed: everything resumes by itself
        std::fs::remove_file(&filler).expect("free the disk");
        // the stream resumes by itself, writes work again and are durable
        eventually(|| assert!(mnt.join("from-b").exists(), "B's file reached the full replica"));
        std::fs::write(mnt.join("after"), b"written after space was freed").expect("write after");
        izo_sync(&mnt);
        // the database takes commits again (not refused after its I/O error)
        std::thread::sleep(Duration::from_millis(1500));
        std::fs::write(mnt.join("after2"), b"folded").expect("write after");
        std::thread::sleep(Duration::from_millis(1500));
        let status = izo_out(&["status".as_ref(), mnt.as_os_str()]);
        assert!(!status.contains("cache problem"), "after space was freed: {status}");
        eventually(|| assert!(reserve.exists(), "the reserve is taken again once there is room"));
        a.kill();
        let a = MountProc::start_at(&addr, &fp, &tok, &mnt, &cache);
        converge(&[&ex, &a.mnt, &b.mnt], "after the disk filled and was freed");
        assert_eq!(std::fs::read(ex.join("before")).expect("before"), b"acked before the disk filled");
        assert_eq!(std::fs::read(ex.join("after")).expect("after"), b"written after space was freed");
        assert!(!ex.join("big").exists());
        for i in 0..made {
            assert!(ex.join(format!("while-full-{i}")).exists(), "while-full-{i} was acked: never lost");
        }
        assert!(!ex.join(format!("while-full-{made}")).exists(), "the refused create never happened");
    })
    .await
    .expect("full cache test");
}

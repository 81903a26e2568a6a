//! The mtime a replica stamps is the one every replica and the export
//! keep (DESIGN "Times"): the server's record coming back never moves it,
//! and an implicit stamp never goes backwards.

use crate::harness::*;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

fn mtime(p: &Path) -> (i64, i64) {
    let m = std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    (m.mtime(), m.mtime_nsec())
}

/// Wait until `p` shows `want` (the server applies after it answers).
fn export_shows(p: &Path, want: (i64, i64), what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while mtime(p) != want {
        assert!(std::time::Instant::now() < deadline, "{what}: the export shows {:?}, not {want:?}", mtime(p));
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mtime_a_write_stamped_stays_when_the_server_record_comes_back() {
    sweep_mounts();
    let s = InProc::start().await;
    let (addr, fp, tok, ex) = (s.addr.clone(), s.server.fingerprint.clone(), s.rw.clone(), s.dirs.export.clone());
    tokio::task::spawn_blocking(move || {
        let a = MountProc::start(&addr, &fp, &tok);
        let b = MountProc::start(&addr, &fp, &tok);
        std::fs::create_dir(a.mnt.join("d")).expect("mkdir");
        for i in 0..4 {
            let f = a.mnt.join(format!("d/f{i}"));
            std::fs::write(&f, format!("content {i}")).expect("write");
            let stamped = mtime(&f);
            let dir_stamped = mtime(&a.mnt.join("d"));
            // later writes to the same file, then rename within the dir
            std::fs::OpenOptions::new().append(true).open(&f).expect("open").set_len(3).expect("truncate");
            let truncated = mtime(&f);
            assert!(truncated >= stamped, "an implicit mtime never goes backwards");
            izo_sync(&a.mnt);
            std::thread::sleep(Duration::from_millis(100));
            assert_eq!(mtime(&f), truncated, "f{i} on the writing replica after the record came back");
            assert!(mtime(&a.mnt.join("d")) >= dir_stamped, "d after the record came back");
            export_shows(&ex.join(format!("d/f{i}")), truncated, &format!("f{i}"));
            export_shows(&ex.join("d"), mtime(&a.mnt.join("d")), "d");
            let deadline = std::time::Instant::now() + Duration::from_secs(15);
            while mtime(&b.mnt.join(format!("d/f{i}"))) != truncated {
                assert!(std::time::Instant::now() < deadline, "f{i} on the other replica");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        // an explicit mtime in the future, then a write: the write's stamp
        // is just after it on every copy, never before
        let f = a.mnt.join("future");
        std::fs::write(&f, b"x").expect("write");
        let future = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(4_000_000_000);
        std::fs::OpenOptions::new().write(true).open(&f).and_then(|h| h.set_modified(future)).expect("utimens");
        std::fs::OpenOptions::new().append(true).open(&f).expect("open").set_len(0).expect("truncate");
        let after = mtime(&f);
        assert_eq!(after, (4_000_000_000, 1), "one nanosecond after the future mtime");
        izo_sync(&a.mnt);
        export_shows(&ex.join("future"), after, "future");
    })
    .await
    .expect("mtime test");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_stamps_the_time_it_was_made() {
    sweep_mounts();
    let s = InProc::start().await;
    let (addr, fp, tok, ex) = (s.addr.clone(), s.server.fingerprint.clone(), s.rw.clone(), s.dirs.export.clone());
    tokio::task::spawn_blocking(move || {
        let a = MountProc::start(&addr, &fp, &tok);
        let f = a.mnt.join("log");
        std::fs::write(&f, b"line 1\n").expect("write");
        let old = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(978_307_200);
        std::fs::OpenOptions::new().write(true).open(&f).and_then(|h| h.set_modified(old)).expect("utimens");
        izo_sync(&a.mnt);
        let before =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs() as i64;
        use std::io::Write;
        std::fs::OpenOptions::new().append(true).open(&f).and_then(|mut h| h.write_all(b"line 2\n")).expect("append");
        let stamped = mtime(&f);
        assert!(stamped.0 >= before, "the append is stamped now ({stamped:?}), not just after the old mtime");
        izo_sync(&a.mnt);
        export_shows(&ex.join("log"), stamped, "log");
        assert_eq!(std::fs::read(ex.join("log")).expect("read"), b"line 1\nline 2\n");
    })
    .await
    .expect("append mtime test");
}

//! Every mutating call that returned survives a SIGKILL of the client
//! daemon (DESIGN "Consistency contract"): on the remounted replica and,
//! once synced, on the server. Each kind of call is checked on its own
//! file, connected (sent or not when the kill comes) and with the server
//! away (nothing sent before the kill).

use crate::harness::*;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

/// 2001-01-01T00:00:00Z, what `touch -d 2001-01-01` sets (in UTC).
const Y2001: i64 = 978_307_200;

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path")
}

fn set_times(p: &Path, secs: i64) {
    let t = [libc::timespec { tv_sec: secs, tv_nsec: 0 }, libc::timespec { tv_sec: secs, tv_nsec: 0 }];
    // SAFETY: a NUL-terminated path and two timespecs.
    let r = unsafe { libc::utimensat(libc::AT_FDCWD, c(p).as_ptr(), t.as_ptr(), 0) };
    assert_eq!(r, 0, "utimensat {}: {}", p.display(), std::io::Error::last_os_error());
}

fn xattr(p: &Path, name: &str) -> Option<Vec<u8>> {
    let n = CString::new(name).expect("name");
    let mut buf = vec![0u8; 256];
    // SAFETY: valid C strings and buffer.
    let r = unsafe { libc::getxattr(c(p).as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (r >= 0).then(|| buf[..r as usize].to_vec())
}

/// One call of each kind, each on its own name under `d`; returns the
/// writer beside a passthrough reader, left open at the kill.
fn change_everything(d: &Path, online: bool) -> (std::fs::File, std::fs::File) {
    // times: a new file with an explicit mtime (touch -d), and a written
    // file whose mtime is set afterwards (what tar does for every file)
    let st =
        std::process::Command::new("touch").args(["-d", "2001-01-01 00:00:00 UTC"]).arg(d.join("touched")).status();
    assert!(st.expect("run touch").success());
    std::fs::write(d.join("written"), b"tar wrote this").expect("write");
    set_times(&d.join("written"), Y2001);
    std::fs::set_permissions(d.join("mode"), std::fs::Permissions::from_mode(0o600)).expect("chmod");
    std::os::unix::fs::chown(d.join("owner"), Some(1234), Some(5678)).expect("chown");
    if online {
        // (offline, setxattr waits for the server today: local-first xattrs
        // belong to disconnected operation)
        let (n, v) = (CString::new("user.k").expect("name"), b"value");
        // SAFETY: valid C strings and buffer.
        let r = unsafe { libc::setxattr(c(&d.join("xattr")).as_ptr(), n.as_ptr(), v.as_ptr().cast(), v.len(), 0) };
        assert_eq!(r, 0, "setxattr: {}", std::io::Error::last_os_error());
    }
    std::fs::rename(d.join("old-name"), d.join("new-name")).expect("rename");
    std::fs::hard_link(d.join("linked"), d.join("second-link")).expect("link");
    std::os::unix::fs::symlink("somewhere/else", d.join("symlink")).expect("symlink");
    std::fs::OpenOptions::new().write(true).open(d.join("truncated")).expect("open").set_len(3).expect("truncate");
    let f = std::fs::OpenOptions::new().write(true).open(d.join("allocated")).expect("open");
    // SAFETY: plain syscall on an open fd.
    let r = unsafe { libc::fallocate(std::os::fd::AsRawFd::as_raw_fd(&f), 0, 0, 1 << 20) };
    assert_eq!(r, 0, "fallocate: {}", std::io::Error::last_os_error());
    // a writer beside a passthrough reader: its writes reach the cache file
    // without the daemon seeing them
    let reader = std::fs::File::open(d.join("beside-reader")).expect("open for reading");
    let writer = std::fs::OpenOptions::new().write(true).open(d.join("beside-reader")).expect("open for writing");
    std::os::unix::fs::FileExt::write_all_at(&writer, b"NEW", 0).expect("write beside the reader");
    (reader, writer)
}

/// What [`change_everything`] did, checked in tree `d`.
fn check_everything(d: &Path, what: &str, online: bool) {
    let md = |n: &str| std::fs::symlink_metadata(d.join(n)).unwrap_or_else(|e| panic!("{what}: {n}: {e}"));
    assert_eq!(md("touched").mtime(), Y2001, "{what}: touch -d");
    assert_eq!(md("written").mtime(), Y2001, "{what}: utimensat after a write");
    assert_eq!(std::fs::read(d.join("written")).expect("read"), b"tar wrote this", "{what}: written bytes");
    assert_eq!(md("mode").mode() & 0o7777, 0o600, "{what}: chmod");
    assert_eq!((md("owner").uid(), md("owner").gid()), (1234, 5678), "{what}: chown");
    if online {
        assert_eq!(xattr(&d.join("xattr"), "user.k").as_deref(), Some(&b"value"[..]), "{what}: setxattr");
    }
    assert!(d.join("new-name").exists() && !d.join("old-name").exists(), "{what}: rename");
    assert_eq!(md("second-link").ino(), md("linked").ino(), "{what}: link");
    assert_eq!(md("linked").nlink(), 2, "{what}: link count");
    let target = std::fs::read_link(d.join("symlink")).unwrap_or_else(|e| panic!("{what}: symlink: {e}"));
    assert_eq!(target, Path::new("somewhere/else"), "{what}: symlink");
    assert_eq!(std::fs::read(d.join("truncated")).expect("read"), b"abc", "{what}: truncate");
    assert_eq!(md("allocated").len(), 1 << 20, "{what}: fallocate");
    assert_eq!(
        std::fs::read(d.join("beside-reader")).expect("read"),
        b"NEWold content",
        "{what}: passthrough-side write"
    );
}

fn seed(export: &Path) {
    for n in ["mode", "owner", "xattr", "old-name", "linked", "allocated"] {
        std::fs::write(export.join(n), n).expect("seed");
    }
    std::fs::write(export.join("truncated"), b"abcdefgh").expect("seed");
    std::fs::write(export.join("beside-reader"), b"oldold content").expect("seed");
}

async fn killed_and_remounted(server_away_at_kill: bool) {
    sweep_mounts();
    let dirs = Dirs::new();
    seed(&dirs.export);
    let s = Proc::start(&dirs, "127.0.0.1:0", &[]);
    let tok = dirs.token(izo_server::auth::Rights::Rw);
    let (addr, fp, ex) = (s.addr.clone(), s.fingerprint.clone(), dirs.export.clone());
    let pid = s.pid();
    tokio::task::spawn_blocking(move || {
        let mut m = MountProc::start(&addr, &fp, &tok);
        let mnt = m.mnt.clone();
        if server_away_at_kill {
            server_away(pid);
        }
        let open = change_everything(&mnt, !server_away_at_kill);
        m.kill();
        drop(open);
        if server_away_at_kill {
            // SAFETY: plain syscall on a child's pid.
            unsafe { libc::kill(pid as i32, libc::SIGCONT) };
        }
        let cache = m.cache.clone();
        let m = MountProc::start_at(&addr, &fp, &tok, &mnt, &cache);
        check_everything(&m.mnt, "the remounted replica", !server_away_at_kill);
        izo_sync(&m.mnt);
        check_everything(&m.mnt, "the replica after izo sync", !server_away_at_kill);
        // (the server applies to its export right after it answers)
        eventually(|| check_everything(&ex, "the export", !server_away_at_kill));
        drop(s);
    })
    .await
    .expect("sigkill test");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_returned_change_survives_a_sigkill_of_the_client_while_connected() {
    killed_and_remounted(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_returned_change_survives_a_sigkill_of_the_client_while_the_server_is_away() {
    killed_and_remounted(true).await;
}

/// Found by trying it: after a kill that came once the changes' records
/// were applied here (but not yet folded), the remounted replica's stream
/// position was the database's, not the replayed log's, so `izo sync`
/// waited for records it already had until some later record came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn izo_sync_right_after_a_remount_knows_the_replayed_stream_position() {
    sweep_mounts();
    let dirs = Dirs::new();
    let s = Proc::start(&dirs, "127.0.0.1:0", &[]);
    let tok = dirs.token(izo_server::auth::Rights::Rw);
    let (addr, fp) = (s.addr.clone(), s.fingerprint.clone());
    tokio::task::spawn_blocking(move || {
        let mut m = MountProc::start(&addr, &fp, &tok);
        let mnt = m.mnt.clone();
        std::fs::write(mnt.join("f"), b"data").expect("write");
        set_times(&mnt.join("f"), Y2001);
        // the records of those changes are applied here, in the log only
        izo_sync(&mnt);
        m.kill();
        let cache = m.cache.clone();
        let m = MountProc::start_at(&addr, &fp, &tok, &mnt, &cache);
        let t = std::time::Instant::now();
        izo_sync(&m.mnt);
        assert!(t.elapsed() < std::time::Duration::from_secs(5), "izo sync took {:?}", t.elapsed());
        drop(s);
    })
    .await
    .expect("remount sync test");
}

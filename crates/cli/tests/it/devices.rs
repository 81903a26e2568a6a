//! Device nodes: made through a mount of a `--trusted` volume, they reach
//! the export and every replica with their device numbers; the mount is
//! `nodev,nosuid` unless `izo mount --dev` / `--suid`; a default volume
//! refuses them with EPERM and does not replicate those found in its export.

use crate::harness::*;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::time::{Duration, Instant};

fn mknod(p: &Path, kind: libc::mode_t, major: u32, minor: u32) -> std::io::Result<()> {
    let c = CString::new(p.as_os_str().as_bytes()).expect("path");
    // SAFETY: a valid C string.
    match unsafe { libc::mknod(c.as_ptr(), kind | 0o666, libc::makedev(major, minor)) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// (is a block device, is a char device, major, minor) of `p`, waiting up
/// to 15 s for it to appear.
fn device_at(p: &Path) -> (bool, bool, u32, u32) {
    let start = Instant::now();
    loop {
        if let Ok(m) = std::fs::symlink_metadata(p) {
            let (ft, rdev) = (m.file_type(), m.rdev());
            return (ft.is_block_device(), ft.is_char_device(), libc::major(rdev), libc::minor(rdev));
        }
        assert!(start.elapsed() < Duration::from_secs(15), "{} did not appear", p.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The mount options of the intermezzo mount at `mnt`, as mountinfo shows them.
fn mount_options(mnt: &Path) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let line = info
        .lines()
        .find(|l| l.split(' ').nth(4).map(Path::new) == Some(mnt) && l.contains(" - fuse.izo "))
        .unwrap_or_else(|| panic!("{} is not mounted", mnt.display()));
    line.split(' ').nth(5).expect("options").split(',').map(str::to_string).collect()
}

const BLOCK: (bool, bool, u32, u32) = (true, false, 7, 0);
const NULL: (bool, bool, u32, u32) = (false, true, 1, 3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_nodes_on_a_trusted_volume_reach_the_export_and_a_second_replica() {
    sweep_mounts();
    let dirs = Dirs::new();
    // one already in the export: the start-up scan records it
    mknod(&dirs.export.join("tty"), libc::S_IFCHR, 5, 0).expect("mknod in the export");
    let s = InProc::start_with(dirs, |c| c.trusted = true).await;
    let fp = s.server.fingerprint.clone();
    let (addr, tok) = (s.addr.clone(), s.rw.clone());
    let ex = s.dirs.export.clone();
    tokio::task::spawn_blocking(move || {
        let a = MountProc::start(&addr, &fp, &tok);
        let b = MountProc::start_with(&addr, &fp, &tok, &["--dev", "--suid"]);
        let (ma, mb) = (a.mnt.clone(), b.mnt.clone());
        let opts = mount_options(&ma);
        assert!(opts.contains(&"nodev".into()) && opts.contains(&"nosuid".into()), "default mount: {opts:?}");
        let opts = mount_options(&mb);
        assert!(!opts.contains(&"nodev".into()) && !opts.contains(&"nosuid".into()), "--dev --suid: {opts:?}");

        assert_eq!(device_at(&ma.join("tty")), (false, true, 5, 0), "a device node of the export, on the mount");
        mknod(&ma.join("loop"), libc::S_IFBLK, 7, 0).expect("mknod of a block device on a trusted volume");
        mknod(&ma.join("null"), libc::S_IFCHR, 1, 3).expect("mknod of a char device on a trusted volume");
        for (at, what) in [(&ma, "the mount"), (&ex, "the export"), (&mb, "the second replica")] {
            assert_eq!(device_at(&at.join("loop")), BLOCK, "block device on {what}");
            assert_eq!(device_at(&at.join("null")), NULL, "char device on {what}");
        }
        // made in the export by another program while the server runs: captured
        let made = std::process::Command::new("mknod").arg(ex.join("zero")).args(["c", "1", "5"]).status();
        assert!(made.expect("run mknod").success(), "mknod in the export");
        assert_eq!(device_at(&mb.join("zero")), (false, true, 1, 5), "a captured device node on a replica");

        let nodev = std::fs::OpenOptions::new().write(true).open(ma.join("null")).map(drop);
        let err = nodev.expect_err("a nodev mount does not open devices");
        assert_eq!(err.raw_os_error(), Some(libc::EACCES), "nodev: {err}");
        std::fs::write(mb.join("null"), b"into the void").expect("--dev: the node opens /dev/null");
        assert_eq!(std::fs::read(mb.join("null")).expect("read /dev/null's twin"), b"");
        std::fs::remove_file(mb.join("loop")).expect("unlink a device node");
        let start = Instant::now();
        while ex.join("loop").symlink_metadata().is_ok() || ma.join("loop").symlink_metadata().is_ok() {
            assert!(start.elapsed() < Duration::from_secs(15), "the unlink did not replicate");
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await
    .expect("mount steps");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_default_volume_refuses_device_nodes_with_eperm() {
    sweep_mounts();
    let dirs = Dirs::new();
    mknod(&dirs.export.join("tty"), libc::S_IFCHR, 5, 0).expect("mknod in the export");
    let s = InProc::start_with(dirs, |_| {}).await;
    let fp = s.server.fingerprint.clone();
    let (addr, tok) = (s.addr.clone(), s.rw.clone());
    let ex = s.dirs.export.clone();
    tokio::task::spawn_blocking(move || {
        let a = MountProc::start_with(&addr, &fp, &tok, &["--dev"]);
        let ma = a.mnt.clone();
        for (kind, name) in [(libc::S_IFBLK, "loop"), (libc::S_IFCHR, "null")] {
            let err = mknod(&ma.join(name), kind, 1, 3).expect_err("a default volume refuses device nodes");
            assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{name}: {err}");
            assert!(ma.join(name).symlink_metadata().is_err(), "{name} is not on the mount");
        }
        mknod(&ma.join("fifo"), libc::S_IFIFO, 0, 0).expect("fifos are made on any volume");
        let start = Instant::now();
        while ex.join("fifo").symlink_metadata().is_err() {
            assert!(start.elapsed() < Duration::from_secs(15), "the fifo did not reach the export");
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(ex.join("null").symlink_metadata().is_err() && ex.join("loop").symlink_metadata().is_err());
        assert!(ma.join("tty").symlink_metadata().is_err(), "a device node in the export is not replicated");
        let status = izo_out(&["status".as_ref(), ma.as_os_str()]);
        assert!(status.contains(", 0 refused (parked)"), "nothing was queued to be refused later: {status}");
    })
    .await
    .expect("mount steps");
}

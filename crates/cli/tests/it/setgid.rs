//! Group-shared directories: a setgid directory passes its group on to
//! what is made in it, and its setgid bit to subdirectories, on the mount
//! and in the export, also on an untrusted volume (whose stripping of
//! set-id bits is for executables, not a directory's setgid).

use crate::harness::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

fn check(root: &Path, what: &str) {
    let md = |n: &str| std::fs::symlink_metadata(root.join(n)).unwrap_or_else(|e| panic!("{what}: {n}: {e}"));
    assert_eq!(md("shared").mode() & 0o7777, 0o2775, "{what}: chmod 2775 keeps the setgid bit");
    assert_eq!(md("shared/file").gid(), 4321, "{what}: a file takes the directory's group");
    assert_eq!(md("shared/link").gid(), 4321, "{what}: a symlink takes the directory's group");
    assert_eq!(md("shared/sub").gid(), 4321, "{what}: a subdirectory takes the directory's group");
    assert_ne!(md("shared/sub").mode() & libc::S_ISGID, 0, "{what}: a subdirectory inherits setgid");
    assert_eq!(md("shared/file").mode() & libc::S_ISGID, 0, "{what}: a file does not");
    assert_eq!(md("plain/file").gid(), 0, "{what}: outside it the caller's group");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_setgid_directory_passes_its_group_on_even_on_an_untrusted_volume() {
    sweep_mounts();
    let s = InProc::start().await;
    let (addr, fp, tok, ex) = (s.addr.clone(), s.server.fingerprint.clone(), s.rw.clone(), s.dirs.export.clone());
    tokio::task::spawn_blocking(move || {
        let m = MountProc::start(&addr, &fp, &tok);
        let d = m.mnt.join("shared");
        std::fs::create_dir(&d).expect("mkdir");
        std::os::unix::fs::chown(&d, None, Some(4321)).expect("chgrp");
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o2775)).expect("chmod 2775");
        std::fs::write(d.join("file"), b"x").expect("create in it");
        std::os::unix::fs::symlink("file", d.join("link")).expect("symlink in it");
        std::fs::create_dir(d.join("sub")).expect("mkdir in it");
        std::fs::create_dir(m.mnt.join("plain")).expect("mkdir");
        std::fs::write(m.mnt.join("plain/file"), b"y").expect("create");
        check(&m.mnt, "the mount");
        izo_sync(&m.mnt);
        eventually(|| check(&ex, "the export"));
    })
    .await
    .expect("setgid test");
}

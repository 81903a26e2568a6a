//! Disconnected operation as a laptop on a train sees it: the server is
//! stopped, two replicas go on working (git with reflogs, `>>` appends to
//! one log file from both, xattrs, directory moves), one is even rebooted
//! offline, and when the server returns everything reaches it and every
//! replica ends with the same tree.

use crate::harness::*;
use crate::mount::{converge, setxattr, xattr_get};
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// `git` in `dir` with a clean default configuration (reflogs on), which
/// must succeed; its stdout.
fn git(home: &Path, dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("HOME", home)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_AUTHOR_NAME", "A")
        .env("GIT_AUTHOR_EMAIL", "a@example.invalid")
        .env("GIT_COMMITTER_NAME", "A")
        .env("GIT_COMMITTER_EMAIL", "a@example.invalid")
        .output()
        .expect("run git");
    assert!(
        out.status.success(),
        "git {args:?} in {}: {}{}",
        dir.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One `>>` append (one write(2)), which must succeed at once.
fn append(p: &Path, line: &str) {
    let t = Instant::now();
    let mut f = std::fs::OpenOptions::new().append(true).open(p).expect("open for append");
    f.write_all(line.as_bytes()).expect("append");
    assert!(t.elapsed() < Duration::from_secs(1), "an append took {:?}", t.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_laptop_works_offline_with_git_appends_and_xattrs_and_everything_converges() {
    sweep_mounts();
    let dirs = Dirs::new();
    let tok = dirs.token(izo_server::auth::Rights::Rw);
    let mut p = Proc::start(&dirs, "127.0.0.1:0", &[]);
    let (addr, fp) = (p.addr.clone(), p.fingerprint.clone());
    let ex = dirs.export.clone();
    let home = tempfile::tempdir().expect("home");
    let dirs = tokio::task::spawn_blocking(move || {
        let h = home.path();
        let mut a = MountProc::start(&addr, &fp, &tok);
        let b = MountProc::start(&addr, &fp, &tok);
        let (ma, mb) = (a.mnt.clone(), b.mnt.clone());
        // online: a repository with two directories, a log, a file of B's
        let repo = ma.join("repo");
        for d in ["src/a", "src/b"] {
            std::fs::create_dir_all(repo.join(d)).expect("mkdir");
        }
        for i in 0..3 {
            std::fs::write(repo.join(format!("src/a/f{i}.txt")), format!("a{i}\n")).expect("write");
            std::fs::write(repo.join(format!("src/b/g{i}.txt")), format!("b{i}\n")).expect("write");
        }
        git(h, &repo, &["init", "-q", "-b", "main"]);
        git(h, &repo, &["add", "-A"]);
        git(h, &repo, &["commit", "-q", "-m", "first"]);
        std::fs::write(ma.join("app.log"), b"start\n").expect("log");
        std::fs::write(ma.join("notes.txt"), b"notes\n").expect("notes");
        izo_sync(&ma);
        izo_sync(&mb);

        // the server stops: both replicas work on
        p.sigterm();
        std::thread::sleep(Duration::from_millis(300));
        let mut a_lines = Vec::new();
        let mut b_lines = Vec::new();
        for i in 0..20 {
            let dir = if i < 12 { "src/a" } else { "src/moved" };
            std::fs::write(repo.join(format!("{dir}/f{}.txt", i % 3)), format!("a{i} changed offline\n"))
                .expect("edit");
            git(h, &repo, &["add", "-A"]);
            git(h, &repo, &["commit", "-q", "-m", &format!("offline {i}")]);
            if i == 8 {
                git(h, &repo, &["branch", "topic"]);
            }
            if i == 11 {
                // a directory holding files changed offline moves
                git(h, &repo, &["mv", "src/a", "src/moved"]);
                git(h, &repo, &["commit", "-q", "-m", "move src/a"]);
            }
            let line = format!("A {i}\n");
            append(&ma.join("app.log"), &line);
            a_lines.push(line);
            let line = format!("B {i}\n");
            append(&mb.join("app.log"), &line);
            b_lines.push(line);
            if i % 5 == 0 {
                std::fs::write(mb.join("notes.txt"), format!("notes by B {i}\n")).expect("B edits");
            }
        }
        setxattr(&repo.join("src/moved/f0.txt"), "user.tag", b"offline").expect("setxattr offline");
        assert_eq!(xattr_get(&repo.join("src/moved/f0.txt"), "user.tag").as_deref(), Some(&b"offline"[..]));

        // A reboots while the server is still away: it mounts from its cache
        let cache = a.cache.clone();
        a.stop();
        let t = Instant::now();
        let a = MountProc::start_at(&addr, &fp, &tok, &ma, &cache);
        assert!(t.elapsed() < Duration::from_secs(10), "the offline mount took {:?}", t.elapsed());
        let status = izo_out(&["status".as_ref(), ma.as_os_str()]);
        assert!(status.contains("not connected"), "status after an offline mount: {status}");
        git(h, &repo, &["commit", "-q", "--allow-empty", "-m", "after the reboot"]);
        let line = "A after the reboot\n".to_string();
        append(&ma.join("app.log"), &line);
        a_lines.push(line);

        // the server returns: everything reaches it, every replica agrees
        let p = Proc::start(&dirs, &addr, &[]);
        let settle = || {
            izo_sync(&ma);
            izo_sync(&mb);
            izo_sync(&ma);
        };
        izo_sync_within(&ma, Duration::from_secs(30));
        settle();
        converge(&[&ex, &ma, &mb], "after the server returned");
        let log = String::from_utf8(std::fs::read(ex.join("app.log")).expect("log")).expect("utf-8");
        for l in a_lines.iter().chain(&b_lines) {
            assert_eq!(log.matches(l.as_str()).count(), 1, "line {l:?} once in the log:\n{log}");
        }
        assert!(log.starts_with("start\n"), "{log}");
        let want = git(h, &ex.join("repo"), &["log", "--oneline", "--all"]);
        assert_eq!(want.lines().count(), 23, "every commit: {want}");
        for m in [&ma, &mb, &ex] {
            git(h, &m.join("repo"), &["fsck", "--strict"]);
            assert_eq!(git(h, &m.join("repo"), &["log", "--oneline", "--all"]), want, "git log in {}", m.display());
        }
        assert_eq!(xattr_get(&ex.join("repo/src/moved/f0.txt"), "user.tag").as_deref(), Some(&b"offline"[..]));
        drop((a, b, p));
        dirs
    })
    .await
    .expect("laptop test");
    drop(dirs);
}

/// An O_EXCL create (a lock file) is the server's decision while it
/// answers: a name another replica took there is EEXIST here even before
/// this replica heard of it (this replica follows no stream, so it never
/// does); a free name is on the server when the call returns. With the
/// server away the create is made here within about a second, and sent
/// once the server answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_o_excl_create_asks_the_server_while_connected_and_is_local_once_it_is_away() {
    let dirs = Dirs::new();
    let tok = dirs.token(izo_server::auth::Rights::Rw);
    let p = Proc::start(&dirs, "127.0.0.1:0", &[]);
    let other = izo_client::Client::connect(p.client_config(&tok)).await.expect("another replica");
    let root = izo_proto::ObjectId::ROOT;
    let create = |n: &str| izo_proto::Op::Create {
        parent: root,
        name: n.as_bytes().to_vec(),
        id: izo_proto::ObjectId::new(),
        mode: 0o644,
        uid: 0,
        gid: 0,
    };
    let cache = tempfile::tempdir().expect("cache");
    let opts = izo_client::start::StartOpts {
        addr: p.addr.clone(),
        volume: "vol".into(),
        token: tok.clone(),
        fingerprint: Some(p.fingerprint.clone()),
        cache_dir: cache.path().to_path_buf(),
        sync_close: false,
    };
    let started = izo_client::start::start(opts, |_| {}).await.expect("start");
    let r = started.replica.clone();
    // (the sender only: this replica hears nothing of the other's changes)
    tokio::spawn(r.clone().send());
    other.mutate(create("taken.lock")).await.expect("the other replica takes the lock");
    let pid = p.pid();
    let rt = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let _p = p;
        let ino = r.root_ino();
        let e = r.create_excl(ino, b"taken.lock", 0o644, 0, 0).map(|_| ()).expect_err("a taken lock");
        assert!(matches!(e, izo_client::replica::ReplicaError::Exists), "{e:?}");
        assert!(r.lookup(ino, b"taken.lock").is_err(), "nothing of it made here");
        r.create_excl(ino, b"mine.lock", 0o644, 0, 0).expect("a free lock");
        rt.block_on(other.lookup(root, b"mine.lock")).expect("on the server when the call returned");
        // the server stops answering: made here after the usual deadline
        server_away(pid);
        let t = Instant::now();
        r.create_excl(ino, b"offline.lock", 0o644, 0, 0).expect("an offline lock");
        assert!(t.elapsed() < Duration::from_secs(3), "took {:?}", t.elapsed());
        r.lookup(ino, b"offline.lock").expect("made here");
        unsafe { libc::kill(pid as i32, libc::SIGCONT) };
        let t = Instant::now();
        while rt.block_on(other.lookup(root, b"offline.lock")).is_err() {
            assert!(t.elapsed() < Duration::from_secs(20), "the offline lock never reached the server");
            std::thread::sleep(Duration::from_millis(100));
        }
    })
    .await
    .expect("o_excl test");
}

/// `izo sync` and `izo status` say what the wait is for: with the server
/// away, since when and how much is kept here; and the control socket
/// answers as soon as the mount appears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_and_status_tell_an_unreachable_server_and_the_socket_answers_once_mounted() {
    sweep_mounts();
    let dirs = Dirs::new();
    let tok = dirs.token(izo_server::auth::Rights::Rw);
    let mut p = Proc::start(&dirs, "127.0.0.1:0", &[]);
    let (addr, fp) = (p.addr.clone(), p.fingerprint.clone());
    let dirs = tokio::task::spawn_blocking(move || {
        // a mount that is there answers izo sync at once
        let dir = tempfile::Builder::new().prefix("izo-mnt-").tempdir().expect("dir");
        let (mnt, cache) = (dir.path().join("mnt"), dir.path().join("cache"));
        std::fs::create_dir_all(&mnt).expect("mount point");
        let mut child = mount_command(&addr, &tok, &mnt, &cache, &["--fingerprint", &fp])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("izo mount");
        let t = Instant::now();
        let mounted = || {
            std::fs::read_to_string("/proc/self/mountinfo")
                .expect("mountinfo")
                .lines()
                .any(|l| l.split(' ').nth(4) == Some(mnt.to_str().expect("utf-8")))
        };
        while !mounted() {
            assert!(t.elapsed() < Duration::from_secs(30), "never mounted");
            std::thread::sleep(Duration::from_millis(5));
        }
        izo_out(&["sync".as_ref(), mnt.as_os_str()]);

        // the server goes away: what is kept here, and since when
        std::fs::write(mnt.join("f"), b"x").expect("write");
        izo_out(&["sync".as_ref(), mnt.as_os_str()]);
        p.sigterm();
        std::thread::sleep(Duration::from_millis(300));
        for i in 0..3 {
            std::fs::write(mnt.join(format!("offline{i}")), b"kept").expect("write offline");
        }
        let out = Command::new(izo_bin()).args(["sync", "--timeout", "1"]).arg(&mnt).output().expect("izo sync");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "a sync without the server fails: {err}");
        assert!(err.contains("unreachable since") && err.contains("changes made here"), "{err}");
        let status = izo_out(&["status".as_ref(), mnt.as_os_str()]);
        assert!(status.contains("not connected since"), "{status}");
        assert!(status.contains("the oldest was made"), "{status}");
        let pending = status.lines().find(|l| l.starts_with("pending:")).expect("pending line");
        assert!(pending.starts_with("pending: 6 changes") || pending.starts_with("pending: 3 changes"), "{pending}");
        // it returns: connected, and how long it was away
        let p = Proc::start(&dirs, &addr, &[]);
        izo_sync_within(&mnt, Duration::from_secs(30));
        let status = izo_out(&["status".as_ref(), mnt.as_os_str()]);
        assert!(status.contains("connected since") && status.contains("s offline since the mount"), "{status}");
        assert!(status.contains("pending: 0 changes"), "{status}");
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let _ = child.wait();
        drop(p);
        dirs
    })
    .await
    .expect("sync test");
    drop(dirs);
}

/// A cache restored from a copy taken earlier (a backup, a VM snapshot):
/// the server has applied changes of this replica the copy never saw.
/// Found at the first connection, before anything is sent: nothing is
/// applied twice (a change queued in the copy and applied since is not
/// applied again), nothing made after the copy is lost or overwritten (an
/// append made on the restored cache lands after the newer ones), and the
/// replica continues under a fresh id and agrees with the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_restored_from_a_copy_applies_nothing_twice_and_loses_nothing() {
    sweep_mounts();
    let dirs = Dirs::new();
    let tok = dirs.token(izo_server::auth::Rights::Rw);
    let mut p = Proc::start(&dirs, "127.0.0.1:0", &[]);
    let (addr, fp) = (p.addr.clone(), p.fingerprint.clone());
    let ex = dirs.export.clone();
    let dirs = tokio::task::spawn_blocking(move || {
        let mut a = MountProc::start(&addr, &fp, &tok);
        let (ma, cache) = (a.mnt.clone(), a.cache.clone());
        std::fs::write(ma.join("log"), b"L0\n").expect("log");
        izo_sync(&ma);
        // offline: an append waits in the queue when the copy is taken
        p.sigterm();
        std::thread::sleep(Duration::from_millis(300));
        append(&ma.join("log"), "L1\n");
        std::fs::write(ma.join("queued"), b"queued at the copy").expect("write");
        a.stop();
        let copy = cache.with_extension("copy");
        let cp = |from: &Path, to: &Path| {
            let _ = std::fs::remove_dir_all(to);
            let ok = Command::new("cp").arg("-a").arg(from).arg(to).status().expect("cp").success();
            assert!(ok, "cp -a {} {}", from.display(), to.display());
        };
        cp(&cache, &copy);
        // the server returns: the queue goes, and more is done after the copy
        let p = Proc::start(&dirs, &addr, &[]);
        let a = MountProc::start_at(&addr, &fp, &tok, &ma, &cache);
        izo_sync(&ma);
        append(&ma.join("log"), "L2\n");
        for i in 0..5 {
            std::fs::write(ma.join(format!("after-copy-{i}")), format!("made after the copy {i}")).expect("write");
        }
        izo_sync(&ma);
        drop(a);
        // the copy comes back, and the server is away again: changes made
        // on the restored cache offline
        drop(p);
        cp(&copy, &cache);
        let a = MountProc::start_at(&addr, &fp, &tok, &ma, &cache);
        append(&ma.join("log"), "L3\n");
        std::fs::write(ma.join("on-the-restored-cache"), b"made offline after the restore").expect("write");
        let p = Proc::start(&dirs, &addr, &[]);
        izo_sync_within(&ma, Duration::from_secs(30));
        izo_sync(&ma);
        converge(&[&ex, &ma], "after the restored cache met the server");
        let log = std::fs::read_to_string(ex.join("log")).expect("log");
        assert_eq!(log, "L0\nL1\nL2\nL3\n", "L1 once, L2 not overwritten, L3 after it");
        assert_eq!(std::fs::read(ex.join("queued")).expect("queued"), b"queued at the copy");
        for i in 0..5 {
            assert_eq!(
                std::fs::read_to_string(ex.join(format!("after-copy-{i}"))).expect("after the copy"),
                format!("made after the copy {i}")
            );
        }
        assert_eq!(
            std::fs::read(ex.join("on-the-restored-cache")).expect("offline after the restore"),
            b"made offline after the restore"
        );
        let status = izo_out(&["status".as_ref(), ma.as_os_str()]);
        assert!(status.contains("0 refused"), "nothing refused: {status}");
        drop((a, p));
        dirs
    })
    .await
    .expect("restore test");
    drop(dirs);
}

//! Replicate mode through real FUSE mounts: a server and two `izo mount`
//! clients. What one client does is seen on the other and in the export;
//! hard links keep one inode number; inode numbers survive a remount; a
//! random sequence of file-system calls behaves on the mount as on a local
//! directory.

use crate::harness::*;
use izo_testkit::{tree_digest, Digest};
use std::ffi::{CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

fn digest(p: &Path) -> Digest {
    tree_digest(p).unwrap_or_else(|e| panic!("digest of {}: {e:#}", p.display()))
}

/// Wait until every tree has the digest of the first (a tree changing
/// under the walk counts as not there yet).
pub(crate) fn converge(trees: &[&Path], what: &str) {
    let start = Instant::now();
    loop {
        let want = digest(trees[0]);
        let diffs: Vec<Vec<String>> = trees[1..]
            .iter()
            .map(|t| match tree_digest(t) {
                Ok(d) => want.diff(&d),
                Err(e) => vec![format!("{}: {e:#}", t.display())],
            })
            .collect();
        if diffs.iter().all(|d| d.is_empty()) {
            return;
        }
        // (the server applies to its export after it answers: on a starved
        // machine that lags by seconds)
        assert!(start.elapsed() < Duration::from_secs(15), "{what}: trees differ after 15 s: {diffs:#?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn renameat2(dir: &Path, a: &str, b: &str, flags: u32) -> std::io::Result<()> {
    let ca = CString::new(dir.join(a).as_os_str().as_bytes()).expect("path");
    let cb = CString::new(dir.join(b).as_os_str().as_bytes()).expect("path");
    // SAFETY: both paths are NUL-terminated.
    let r = unsafe { libc::renameat2(libc::AT_FDCWD, ca.as_ptr(), libc::AT_FDCWD, cb.as_ptr(), flags) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

pub(crate) fn setxattr(p: &Path, name: &str, value: &[u8]) -> std::io::Result<()> {
    let cp = CString::new(p.as_os_str().as_bytes()).expect("path");
    let cn = CString::new(name).expect("name");
    // SAFETY: valid C strings and buffer.
    let r = unsafe { libc::setxattr(cp.as_ptr(), cn.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// [`server_away`], then wait until the mount at `mnt` says it is not
/// connected (on a loaded machine noticing the silence may take longer).
fn server_away_from(pid: u32, mnt: &Path) {
    server_away(pid);
    let start = Instant::now();
    while !izo_out(&["status".as_ref(), mnt.as_os_str()]).contains("not connected") {
        assert!(start.elapsed() < Duration::from_secs(15), "the mount never noticed the server was away");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub(crate) fn xattr_get(p: &Path, name: &str) -> Option<Vec<u8>> {
    let cp = CString::new(p.as_os_str().as_bytes()).expect("path");
    let cn = CString::new(name).expect("name");
    let mut buf = vec![0u8; 4096];
    // SAFETY: valid C strings and buffer.
    let r = unsafe { libc::getxattr(cp.as_ptr(), cn.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (r >= 0).then(|| buf[..r as usize].to_vec())
}

async fn server_with(files: &[(&str, &[u8])]) -> InProc {
    sweep_mounts();
    let dirs = Dirs::new();
    for (n, data) in files {
        std::fs::write(dirs.export.join(n), data).expect("write");
    }
    InProc::start_with(dirs, |_| {}).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_follow_each_other_through_the_server() {
    let s = server_with(&[("pre", b"existing file")]).await;
    let fp = s.server.fingerprint.clone();
    let (addr, tok) = (s.addr.clone(), s.rw.clone());
    let ex = s.dirs.export.clone();
    tokio::task::spawn_blocking(move || {
        let a = MountProc::start(&addr, &fp, &tok);
        let b = MountProc::start(&addr, &fp, &tok);
        let (ma, mb) = (a.mnt.clone(), b.mnt.clone());
        assert_eq!(std::fs::read(ma.join("pre")).expect("pre"), b"existing file", "initial replication");

        std::fs::write(ma.join("a"), b"alpha").expect("write");
        std::fs::create_dir(ma.join("d")).expect("mkdir");
        std::fs::write(ma.join("d/f"), vec![7u8; 300_000]).expect("write big");
        std::fs::hard_link(ma.join("d/f"), ma.join("h")).expect("link");
        std::os::unix::fs::symlink("a", ma.join("s")).expect("symlink");
        std::fs::rename(ma.join("a"), ma.join("a2")).expect("rename");
        std::fs::write(ma.join("x"), b"x").expect("write x");
        renameat2(&ma, "x", "a2", libc::RENAME_EXCHANGE).expect("exchange");
        assert_eq!(
            renameat2(&ma, "x", "a2", libc::RENAME_NOREPLACE).map_err(|e| e.raw_os_error()),
            Err(Some(libc::EEXIST)),
            "no-replace onto an existing name"
        );
        std::fs::set_permissions(ma.join("a2"), std::fs::Permissions::from_mode(0o640)).expect("chmod");
        std::fs::OpenOptions::new().write(true).open(ma.join("d/f")).and_then(|f| f.set_len(1000)).expect("truncate");
        setxattr(&ma.join("pre"), "user.colour", b"green").expect("setxattr");
        std::fs::write(ma.join(OsStr::from_bytes(b"caf\xe9")), b"latin-1 name").expect("non-UTF-8 name");
        std::fs::remove_file(ma.join("s")).expect("unlink");

        let f = std::fs::metadata(ma.join("d/f")).expect("stat f");
        let h = std::fs::metadata(ma.join("h")).expect("stat h");
        assert_eq!((f.ino(), f.nlink()), (h.ino(), 2), "one inode, two names");
        assert_eq!(std::fs::read(ma.join("a2")).expect("read a2"), b"x", "exchanged");
        assert_eq!(std::fs::read(ma.join("x")).expect("read x"), b"alpha", "exchanged");

        converge(&[&ma, &mb, &ex], "after changes on A");
        let hb = std::fs::metadata(mb.join("h")).expect("stat h on B");
        let fb = std::fs::metadata(mb.join("d/f")).expect("stat f on B");
        assert_eq!((fb.ino(), hb.nlink()), (hb.ino(), 2), "hard link on B");
        assert_eq!(std::fs::read(mb.join(OsStr::from_bytes(b"caf\xe9"))).expect("read"), b"latin-1 name");

        // a file removed while open keeps working through its descriptor
        {
            use std::io::{Read, Seek, SeekFrom, Write};
            std::fs::write(ma.join("open"), b"12345").expect("write open");
            let mut fd = std::fs::OpenOptions::new().read(true).write(true).open(ma.join("open")).expect("open");
            std::fs::remove_file(ma.join("open")).expect("unlink while open");
            fd.seek(SeekFrom::End(0)).expect("seek");
            fd.write_all(b"678").expect("write to an unlinked file");
            fd.seek(SeekFrom::Start(0)).expect("seek");
            let mut back = String::new();
            fd.read_to_string(&mut back).expect("read an unlinked file");
            assert_eq!(back, "12345678");
            assert_eq!(fd.metadata().expect("fstat").len(), 8);
            assert!(!ma.join("open").exists());
        }

        // fallocate: a punched hole shows on both replicas and to SEEK_HOLE
        {
            use std::os::fd::AsRawFd;
            std::fs::write(ma.join("sparse"), vec![9u8; 3 << 20]).expect("write sparse");
            let f = std::fs::OpenOptions::new().write(true).open(ma.join("sparse")).expect("open");
            let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            // SAFETY: plain syscalls on an open fd.
            unsafe {
                assert_eq!(libc::fallocate(f.as_raw_fd(), mode, 1 << 20, 1 << 20), 0, "punch a hole");
                assert_eq!(libc::lseek(f.as_raw_fd(), 0, libc::SEEK_HOLE), 1 << 20, "SEEK_HOLE finds it");
                assert_eq!(libc::lseek(f.as_raw_fd(), 1 << 20, libc::SEEK_DATA), 2 << 20, "SEEK_DATA after it");
                assert_eq!(libc::fallocate(f.as_raw_fd(), 0, 0, 4 << 20), 0, "allocate grows the file");
            }
            assert_eq!(f.metadata().expect("fstat").len(), 4 << 20);
        }
        converge(&[&ma, &mb, &ex], "after fallocate");

        // and the other way, with a removal of a tree
        std::fs::remove_file(mb.join("d/f")).expect("unlink on B");
        std::fs::remove_dir(mb.join("d")).expect("rmdir on B");
        std::fs::write(mb.join("from-b"), b"b").expect("write on B");
        converge(&[&mb, &ma, &ex], "after changes on B");
        assert_eq!(std::fs::metadata(ma.join("h")).expect("h").nlink(), 1, "nlink follows on A");
    })
    .await
    .expect("mount test");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inode_numbers_and_the_stream_position_survive_a_remount() {
    let s = server_with(&[]).await;
    let fp = s.server.fingerprint.clone();
    let (addr, tok) = (s.addr.clone(), s.rw.clone());
    tokio::task::spawn_blocking(move || {
        let mut a = MountProc::start(&addr, &fp, &tok);
        let b = MountProc::start(&addr, &fp, &tok);
        let (ma, mb) = (a.mnt.clone(), b.mnt.clone());
        for i in 0..20 {
            std::fs::write(ma.join(format!("f{i}")), format!("{i}")).expect("write");
        }
        std::fs::hard_link(ma.join("f3"), ma.join("link")).expect("link");
        let inos: Vec<u64> =
            (0..20).map(|i| std::fs::metadata(ma.join(format!("f{i}"))).expect("stat").ino()).collect();
        a.stop();
        // changed while A is unmounted: A catches up from its stream position
        std::fs::write(mb.join("while-away"), b"new").expect("write on B");
        std::fs::remove_file(mb.join("f0")).expect("unlink on B");
        let cache = a.cache.clone();
        let a2 = MountProc::start_at(&addr, &fp, &tok, &ma, &cache);
        converge(&[&mb, &a2.mnt], "after the remount");
        for (i, ino) in inos.iter().enumerate().skip(1) {
            let now = std::fs::metadata(ma.join(format!("f{i}"))).expect("stat").ino();
            assert_eq!(now, *ino, "f{i} keeps its inode number across the remount");
        }
        assert_eq!(std::fs::metadata(ma.join("link")).expect("link").ino(), inos[3]);
    })
    .await
    .expect("remount test");
}

/// A tiny deterministic generator (the sequence is printed on failure).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn pick<'a>(&mut self, from: &'a [&'a str]) -> &'a str {
        from[(self.next() % from.len() as u64) as usize]
    }
}

/// One random call, done the same way under `root`; its result as text.
fn step(root: &Path, op: &str, a: &str, b: &str, n: u64) -> String {
    use std::io::{Seek, SeekFrom, Write};
    let p = |x: &str| root.join(x);
    let r: std::io::Result<String> = (|| {
        Ok(match op {
            "write" => {
                let data: Vec<u8> = (0..(n % 5000)).map(|i| (i * 7 + n) as u8).collect();
                std::fs::write(p(a), data)?;
                String::new()
            }
            "append" => {
                let mut f = std::fs::OpenOptions::new().append(true).open(p(a))?;
                f.write_all(&vec![n as u8; (n % 3000) as usize])?;
                String::new()
            }
            "patch" => {
                let mut f = std::fs::OpenOptions::new().write(true).open(p(a))?;
                f.seek(SeekFrom::Start(n % 4000))?;
                f.write_all(b"patch")?;
                String::new()
            }
            "truncate" => {
                std::fs::OpenOptions::new().write(true).open(p(a))?.set_len(n % 6000)?;
                String::new()
            }
            "read" => format!("{:?}", blake3_of(&std::fs::read(p(a))?)),
            "mkdir" => {
                std::fs::create_dir(p(a))?;
                String::new()
            }
            "rmdir" => {
                std::fs::remove_dir(p(a))?;
                String::new()
            }
            "unlink" => {
                std::fs::remove_file(p(a))?;
                String::new()
            }
            "rename" => {
                std::fs::rename(p(a), p(b))?;
                String::new()
            }
            "link" => {
                std::fs::hard_link(p(a), p(b))?;
                String::new()
            }
            "symlink" => {
                std::os::unix::fs::symlink(b, p(a))?;
                String::new()
            }
            "chmod" => {
                std::fs::set_permissions(p(a), std::fs::Permissions::from_mode(0o600 | (n as u32 & 0o077)))?;
                String::new()
            }
            "list" => {
                let mut names: Vec<String> = std::fs::read_dir(p(a))?
                    .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                    .collect::<Result<_, _>>()?;
                names.sort();
                names.join(",")
            }
            _ => unreachable!(),
        })
    })();
    match r {
        Ok(s) => format!("ok {s}"),
        Err(e) => format!("err {:?}", e.raw_os_error()),
    }
}

/// Bytes the mount at `m` fetched from the server since it started (`izo status`).
fn fetched_bytes(m: &Path) -> u64 {
    let st = std::process::Command::new(izo_bin()).arg("status").arg(m).output().expect("izo status");
    let st = String::from_utf8_lossy(&st.stdout).into_owned();
    st.lines()
        .find_map(|l| l.strip_prefix("fetched: "))
        .and_then(|l| l.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no fetched line in {st}"))
}

fn blake3_of(b: &[u8]) -> String {
    blake3::hash(b).to_hex().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_calls_on_the_mount_behave_as_on_a_local_directory() {
    let s = server_with(&[]).await;
    let fp = s.server.fingerprint.clone();
    let (addr, tok) = (s.addr.clone(), s.rw.clone());
    tokio::task::spawn_blocking(move || {
        let a = MountProc::start(&addr, &fp, &tok);
        let b = MountProc::start(&addr, &fp, &tok);
        let local = tempfile::tempdir().expect("local dir");
        let root_mode = std::fs::metadata(&a.mnt).expect("stat mount").permissions();
        std::fs::set_permissions(local.path(), root_mode).expect("chmod local root");
        let seed = std::env::var("IZO_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed_1234_u64);
        let mut rng = Rng(seed);
        let ops = [
            "write", "write", "append", "patch", "truncate", "read", "mkdir", "rmdir", "unlink", "rename", "link",
            "symlink", "chmod", "list",
        ];
        let names = ["a", "b", "c", "d", "d/a", "d/b", "e", "e/x", "d/e"];
        let mut log = Vec::new();
        for i in 0..300 {
            let (op, x, y, n) = (rng.pick(&ops), rng.pick(&names), rng.pick(&names), rng.next());
            let want = step(local.path(), op, x, y, n);
            let got = step(&a.mnt, op, x, y, n);
            log.push(format!("{i}: {op} {x} {y} {n} -> {want}"));
            assert_eq!(
                got,
                want,
                "step {i} ({op} {x} {y}) differs on the mount; seed {seed}; steps:\n{}",
                log.join("\n")
            );
            if i % 25 == 24 {
                let (l, m) = (digest(local.path()), digest(&a.mnt));
                let d = l.without_mtimes().diff(&m.without_mtimes());
                assert!(d.is_empty(), "after step {i}, seed {seed}: {d:#?}\nsteps:\n{}", log.join("\n"));
            }
        }
        converge(&[&a.mnt, &b.mnt], "the second replica after the random calls");
    })
    .await
    .expect("differential test");
}

#[test]
fn the_demo_mounts_a_client_and_its_changes_reach_the_export() {
    sweep_mounts();
    let dir = tempfile::Builder::new().prefix("izo-mnt-demo-").tempdir().expect("temp dir");
    let out = std::process::Command::new(izo_bin())
        .args(["demo", "--once", "--dir"])
        .arg(dir.path())
        .output()
        .expect("run izo demo");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "izo demo --once failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("mounted at"), "{text}");
    assert_eq!(
        std::fs::read(dir.path().join("export/notes/greeting.txt")).expect("export"),
        b"hello from intermezzo\n"
    );
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(!info.contains(&*dir.path().join("mnt").to_string_lossy()), "unmounted at the end");
}

/// `izo demo` starts its client as `izo mount` does: run again on the same
/// directory, its cache speaks as the same replica (it used to take a new
/// random id at every start, so the server's reply cache could not know
/// its queued changes).
#[test]
fn a_demo_run_again_on_its_directory_speaks_as_the_same_replica() {
    sweep_mounts();
    let dir = tempfile::Builder::new().prefix("izo-mnt-demo-").tempdir().expect("temp dir");
    for run in ["first", "second"] {
        let out = std::process::Command::new(izo_bin())
            .args(["demo", "--once", "--dir"])
            .arg(dir.path())
            .output()
            .expect("run izo demo");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "the {run} izo demo --once failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let path = dir.path().join("state/volume.redb");
    let store = izo_journal::Store::open(&path, (0o755, 0, 0, izo_proto::Timestamp::default())).expect("journal");
    let records = store.records_from(1, 100_000).expect("records");
    let replicas: std::collections::BTreeSet<_> = records
        .iter()
        .filter_map(|r| match r.record.origin {
            izo_proto::Origin::Replica(id, _) => Some(id),
            izo_proto::Origin::Local => None,
        })
        .collect();
    assert!(records.len() > 8, "both runs changed the volume ({} records)", records.len());
    assert_eq!(replicas.len(), 1, "every change came from one replica: {replicas:?}");
}

fn run(dir: &Path, cmd: &str) {
    let out = std::process::Command::new("sh").arg("-c").arg(cmd).current_dir(dir).output().expect("sh");
    assert!(
        out.status.success(),
        "`{cmd}` in {} failed: {}{}",
        dir.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// W1 (../shared/bench/w1.sh; scripts/test builds it when missing).
fn w1() -> std::path::PathBuf {
    let dir = std::env::var("IZO_WORKLOADS").unwrap_or_else(|_| "/var/tmp/izo-workloads".into());
    let p = Path::new(&dir).join("w1.tar");
    assert!(p.exists(), "W1 is missing at {}: run ../shared/bench/w1.sh (scripts/test does)", p.display());
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untar_rsync_git_and_a_rust_build_work_in_the_mount() {
    let s = server_with(&[]).await;
    let fp = s.server.fingerprint.clone();
    let (addr, tok) = (s.addr.clone(), s.rw.clone());
    let ex = s.dirs.export.clone();
    tokio::task::spawn_blocking(move || {
        let a = MountProc::start(&addr, &fp, &tok);
        let b = MountProc::start(&addr, &fp, &tok);
        let (ma, mb) = (a.mnt.clone(), b.mnt.clone());
        let native = tempfile::tempdir().expect("native dir");
        let w1 = w1();
        let w1 = w1.display();
        // all of W1 (21,000 entries, 181 MB), in the mount and natively
        std::fs::create_dir(ma.join("untar")).expect("mkdir");
        std::fs::create_dir(native.path().join("untar")).expect("mkdir");
        let t = Instant::now();
        run(&ma.join("untar"), &format!("tar xf {w1}"));
        eprintln!("untar of W1 into the mount: {:?}", t.elapsed());
        run(&native.path().join("untar"), &format!("tar xf {w1}"));
        let (m, n) = (digest(&ma.join("untar")), digest(&native.path().join("untar")));
        assert!(m.diff(&n).is_empty(), "untar in the mount differs from native: {:#?}", m.diff(&n));

        // rsync -a in and out
        run(&ma, &format!("rsync -a {}/untar/kernel/ rsync-in/", native.path().display()));
        let out = tempfile::tempdir().expect("rsync out");
        run(&ma, &format!("rsync -a rsync-in/ {}/", out.path().display()));
        let (i, o) = (digest(&ma.join("rsync-in")), digest(out.path()));
        let k = digest(&native.path().join("untar/kernel"));
        assert!(i.diff(&k).is_empty() && o.diff(&k).is_empty(), "rsync: {:#?} {:#?}", i.diff(&k), o.diff(&k));

        // git
        run(
            &ma,
            "git init -q repo && cp -r rsync-in/sched repo/ && cd repo && git add -A \
             && git -c user.email=t@example.org -c user.name=t commit -qm import \
             && echo change >> sched/core.c && git status --short | grep -q core.c \
             && git -c user.email=t@example.org -c user.name=t commit -qam change && git gc -q && git fsck --strict",
        );

        // a Rust crate: rustc and the linker write (and mmap) their output here
        run(&ma, "cargo new -q --vcs none hello && cd hello && CARGO_TARGET_DIR=target cargo build -q --offline");
        let out = std::process::Command::new(ma.join("hello/target/debug/hello")).output().expect("run the binary");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "Hello, world!\n");

        izo_out(&["sync".as_ref(), ma.as_os_str()]);
        izo_out(&["sync".as_ref(), mb.as_os_str()]);
        converge(&[&ma, &mb, &ex], "the other replica and the export after the workloads");
    })
    .await
    .expect("workload test");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn izo_sync_is_a_barrier_and_izo_status_reports_the_mount() {
    let s = server_with(&[]).await;
    let fp = s.server.fingerprint.clone();
    let (addr, tok) = (s.addr.clone(), s.rw.clone());
    tokio::task::spawn_blocking(move || {
        let a = MountProc::start(&addr, &fp, &tok);
        let b = MountProc::start(&addr, &fp, &tok);
        let (ma, mb) = (a.mnt.clone(), b.mnt.clone());
        for round in 0..5 {
            for i in 0..20 {
                std::fs::write(ma.join(format!("r{round}-{i}")), format!("{round} {i}")).expect("write on A");
            }
            // `izo sync` on A returns once the server has A's writes; after
            // `izo sync` on B, B has them: no waiting
            let out = izo_out(&["sync".as_ref(), ma.as_os_str()]);
            assert!(out.contains("synced"), "{out}");
            let out = izo_out(&["sync".as_ref(), mb.as_os_str()]);
            assert!(out.contains("synced"), "{out}");
            let (da, db) = (digest(&ma), digest(&mb));
            assert!(da.diff(&db).is_empty(), "round {round}: B differs right after izo sync: {:#?}", da.diff(&db));
        }
        let st = izo_out(&["status".as_ref(), ma.join("r0-1").as_os_str()]);
        for want in ["connected", "applied through seq", "up to date", "cache:", "not answered yet"] {
            assert!(st.contains(want), "status lacks {want:?}: {st}");
        }
        // outside any mount: a clear error
        let out = std::process::Command::new(izo_bin()).args(["sync", "/"]).output().expect("run izo");
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("not inside an intermezzo mount"));
    })
    .await
    .expect("sync test");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_sigkill_of_the_client_every_returned_write_is_there_and_little_is_refetched() {
    let s = server_with(&[]).await;
    let fp = s.server.fingerprint.clone();
    let (addr, tok) = (s.addr.clone(), s.rw.clone());
    let ex = s.dirs.export.clone();
    tokio::task::spawn_blocking(move || {
        let mut a = MountProc::start(&addr, &fp, &tok);
        let ma = a.mnt.clone();
        let content = |i: usize| -> Vec<u8> { (0..100_000).map(|j| (i * 31 + j / 7) as u8).collect() };
        let done = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let writer = {
            let (ma, done) = (ma.clone(), done.clone());
            std::thread::spawn(move || {
                for i in 0..100_000 {
                    // a write that returned is recorded; the first failure ends the run
                    if std::fs::write(ma.join(format!("w{i}")), content(i)).is_err() {
                        return;
                    }
                    done.lock().expect("lock").push(i);
                }
            })
        };
        std::thread::sleep(Duration::from_millis(1500));
        a.kill();
        writer.join().expect("writer");
        let done = done.lock().expect("lock").clone();
        assert!(done.len() > 5, "the writer got going before the kill ({} files)", done.len());
        let written = done.len() as u64 * 100_000;
        let cache = a.cache.clone();
        let a = MountProc::start_at(&addr, &fp, &tok, &ma, &cache);
        let out = std::process::Command::new(izo_bin()).arg("sync").arg(&a.mnt).output().expect("izo sync");
        assert!(out.status.success(), "izo sync: {}", String::from_utf8_lossy(&out.stderr));
        for i in &done {
            let want = content(*i);
            assert_eq!(std::fs::read(ma.join(format!("w{i}"))).expect("read after remount"), want, "w{i} on the mount");
            assert_eq!(std::fs::read(ex.join(format!("w{i}"))).expect("read export"), want, "w{i} on the server");
        }
        converge(&[&ex, &ma], "the remounted replica and the export");
        let fetched = fetched_bytes(&ma);
        assert!(fetched < written / 4, "after the restart {fetched} bytes were fetched of {written} written");
    })
    .await
    .expect("crash test");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_behind_retention_resyncs_from_a_snapshot_fetching_only_changed_blocks() {
    sweep_mounts();
    let s = InProc::start_with(Dirs::new(), |c| {
        c.retain_records = 20;
        c.checkpoint_ms = 100;
    })
    .await;
    let fp = s.server.fingerprint.clone();
    let (addr, tok) = (s.addr.clone(), s.rw.clone());
    let ex = s.dirs.export.clone();
    tokio::task::spawn_blocking(move || {
        let a = MountProc::start(&addr, &fp, &tok);
        let mut b = MountProc::start(&addr, &fp, &tok);
        let (ma, mb) = (a.mnt.clone(), b.mnt.clone());
        let big: Vec<u8> = (0..(4u32 << 20)).map(|i| (i / 4096) as u8 ^ (i as u8)).collect();
        std::fs::write(ma.join("big"), &big).expect("big");
        for i in 0..10 {
            std::fs::write(ma.join(format!("s{i}")), format!("small {i}")).expect("small");
        }
        converge(&[&ma, &mb], "before B stops");
        b.stop();
        // while B is away: one block of big changes, many small changes
        {
            use std::io::{Seek, SeekFrom, Write};
            let mut f = std::fs::OpenOptions::new().write(true).open(ma.join("big")).expect("open big");
            f.seek(SeekFrom::Start((2 << 20) + 100)).expect("seek");
            f.write_all(b"changed while B was away").expect("write");
        }
        for i in 0..60 {
            std::fs::write(ma.join(format!("n{i}")), format!("new {i}")).expect("new");
        }
        std::fs::remove_file(ma.join("s0")).expect("rm");
        std::fs::rename(ma.join("s1"), ma.join("s1-renamed")).expect("mv");
        // retention drops the records B would need (checkpoints every 100 ms)
        std::thread::sleep(Duration::from_millis(1500));
        let cache = b.cache.clone();
        let b = MountProc::start_at(&addr, &fp, &tok, &mb, &cache);
        converge(&[&ma, &b.mnt, &ex], "B after the resync");
        let fetched = fetched_bytes(&b.mnt);
        assert!(fetched <= (1 << 20) + 4096, "only the changed block of big and the small files: fetched {fetched}");
        assert!(fetched >= 1 << 20, "the changed block was fetched: {fetched}");
    })
    .await
    .expect("resync test");
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_stay_whole_while_the_directory_changes_and_the_remaining_ops_replicate() {
    let s = server_with(&[]).await;
    let fp = s.server.fingerprint.clone();
    let (addr, tok) = (s.addr.clone(), s.rw.clone());
    let ex = s.dirs.export.clone();
    tokio::task::spawn_blocking(move || {
        let a = MountProc::start(&addr, &fp, &tok);
        let b = MountProc::start(&addr, &fp, &tok);
        let (ma, mb) = (a.mnt.clone(), b.mnt.clone());
        std::fs::create_dir(ma.join("big")).expect("mkdir");
        for i in 0..1500 {
            std::fs::write(ma.join(format!("big/keep{i:04}")), b"").expect("create");
        }
        converge(&[&ma, &mb], "the directory on B");
        // B adds and removes names while A lists the directory, many times
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let churn = {
            let (mb, stop) = (mb.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let p = mb.join(format!("big/churn{}", i % 50));
                    let _ = if i % 2 == 0 { std::fs::write(&p, b"x") } else { std::fs::remove_file(&p) };
                    i += 1;
                }
            })
        };
        for round in 0..10 {
            let mut keep: Vec<String> = std::fs::read_dir(ma.join("big"))
                .expect("readdir")
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("keep"))
                .collect();
            let n = keep.len();
            keep.sort();
            keep.dedup();
            assert_eq!((n, keep.len()), (1500, 1500), "round {round}: every entry exactly once");
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        churn.join().expect("churn");

        // fifo, chown, utimens with UTIME_OMIT / UTIME_NOW, xattr get/list/remove
        assert_eq!(unsafe { libc::mkfifo(cstr(&ma.join("fifo")).as_ptr(), 0o640) }, 0, "mkfifo");
        std::fs::write(ma.join("t"), b"t").expect("write t");
        std::os::unix::fs::chown(ma.join("t"), Some(1234), Some(4321)).expect("chown");
        let times = [
            libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT },
            libc::timespec { tv_sec: 1_000_000_000, tv_nsec: 5 },
        ];
        let r = unsafe { libc::utimensat(libc::AT_FDCWD, cstr(&ma.join("t")).as_ptr(), times.as_ptr(), 0) };
        assert_eq!(r, 0, "utimensat");
        assert_eq!(std::fs::metadata(ma.join("t")).expect("stat").mtime(), 1_000_000_000);
        setxattr(&ma.join("t"), "user.a", b"1").expect("setxattr a");
        setxattr(&ma.join("t"), "user.b", b"22").expect("setxattr b");
        let mut buf = [0u8; 64];
        let n =
            unsafe { libc::getxattr(cstr(&ma.join("t")).as_ptr(), c"user.b".as_ptr(), buf.as_mut_ptr().cast(), 64) };
        assert_eq!(&buf[..n as usize], b"22", "getxattr");
        let n = unsafe { libc::listxattr(cstr(&ma.join("t")).as_ptr(), buf.as_mut_ptr().cast(), 64) };
        assert_eq!(&buf[..n as usize], b"user.a\0user.b\0", "listxattr");
        assert_eq!(unsafe { libc::removexattr(cstr(&ma.join("t")).as_ptr(), c"user.a".as_ptr()) }, 0);
        let missing = unsafe { libc::removexattr(cstr(&ma.join("t")).as_ptr(), c"user.a".as_ptr()) };
        assert_eq!((missing, std::io::Error::last_os_error().raw_os_error()), (-1, Some(libc::ENODATA)));
        let times = [libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_NOW }; 2];
        let r = unsafe { libc::utimensat(libc::AT_FDCWD, cstr(&ma.join("t")).as_ptr(), times.as_ptr(), 0) };
        assert_eq!(r, 0, "utimensat now");
        let age = std::time::SystemTime::now()
            .duration_since(std::fs::metadata(ma.join("t")).expect("stat").modified().expect("mtime"))
            .unwrap_or_default();
        assert!(age < Duration::from_secs(5), "UTIME_NOW sets the mtime to now");
        assert_eq!(
            std::fs::remove_dir(ma.join("big")).map_err(|e| e.raw_os_error()),
            Err(Some(libc::ENOTEMPTY)),
            "rmdir of a non-empty directory"
        );
        converge(&[&ma, &mb, &ex], "after the remaining ops");
        let m = std::fs::metadata(mb.join("t")).expect("stat on B");
        assert_eq!((m.uid(), m.gid()), (1234, 4321), "owner on B");
    })
    .await
    .expect("listing test");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_from_two_replicas_interleave_and_a_stopped_server_queues_changes() {
    sweep_mounts();
    let dirs = Dirs::new();
    let tok = dirs.token(izo_server::auth::Rights::Rw);
    let p = Proc::start(&dirs, "127.0.0.1:0", &[]);
    let (addr, fp, pid) = (p.addr.clone(), p.fingerprint.clone(), p.pid());
    let ex = dirs.export.clone();
    tokio::task::spawn_blocking(move || {
        let _p = p;
        let a = MountProc::start(&addr, &fp, &tok);
        let b = MountProc::start(&addr, &fp, &tok);
        let (ma, mb) = (a.mnt.clone(), b.mnt.clone());
        let izo_sync = |m: &Path| {
            let out = std::process::Command::new(izo_bin()).arg("sync").arg(m).output().expect("izo sync");
            assert!(out.status.success(), "izo sync: {}", String::from_utf8_lossy(&out.stderr));
        };
        // O_APPEND: A's second append lands after B's, not over it
        {
            use std::io::Write;
            let mut fa = std::fs::OpenOptions::new().create(true).append(true).open(ma.join("log")).expect("open A");
            fa.write_all(b"A1\n").expect("A1");
            // (made on A first: on the server once A synced, then on B)
            izo_sync(&ma);
            izo_sync(&mb);
            let mut fb = std::fs::OpenOptions::new().append(true).open(mb.join("log")).expect("open B");
            fb.write_all(b"B1\n").expect("B1");
            drop(fb);
            izo_sync(&ma);
            fa.write_all(b"A2\n").expect("A2");
        }
        // (appends are made here first, and sent like any change)
        izo_sync(&ma);
        assert_eq!(std::fs::read(ex.join("log")).expect("export"), b"A1\nB1\nA2\n");
        converge(&[&ex, &ma, &mb], "after the appends");

        // a removed file's cache data goes at once, or at its last close
        std::fs::write(ma.join("gone"), vec![1u8; 3 << 20]).expect("write");
        let held = std::fs::File::open(ma.join("gone")).expect("open");
        std::fs::remove_file(ma.join("gone")).expect("rm");
        let data_bytes = |m: &MountProc| -> u64 {
            std::fs::read_dir(m.cache.join("data"))
                .expect("data dir")
                .map(|e| e.expect("e").metadata().expect("m").len())
                .sum()
        };
        assert!(data_bytes(&a) >= 3 << 20, "kept while open");
        drop(held);
        std::thread::sleep(Duration::from_millis(300));
        assert!(data_bytes(&a) < 1 << 20, "freed at the last close");
        izo_sync(&mb);
        assert!(data_bytes(&b) < 1 << 20, "freed on the other replica, where it was not open");

        // xattr flags
        setxattr(&ma.join("log"), "user.k", b"v").expect("set");
        let c = cstr(&ma.join("log"));
        let r = unsafe { libc::setxattr(c.as_ptr(), c"user.k".as_ptr(), b"w".as_ptr().cast(), 1, libc::XATTR_CREATE) };
        assert_eq!((r, std::io::Error::last_os_error().raw_os_error()), (-1, Some(libc::EEXIST)));
        let r = unsafe { libc::setxattr(c.as_ptr(), c"user.n".as_ptr(), b"w".as_ptr().cast(), 1, libc::XATTR_REPLACE) };
        assert_eq!((r, std::io::Error::last_os_error().raw_os_error()), (-1, Some(libc::ENODATA)));

        // the server stops answering: changes are made here at once and
        // sent when it answers again (appends and xattrs too); cached reads
        // work
        server_away(pid);
        let t = std::time::Instant::now();
        std::fs::create_dir(ma.join("while-down")).expect("mkdir with the server stopped");
        std::fs::write(ma.join("while-down/f"), b"written offline").expect("write with the server stopped");
        setxattr(&ma.join("log"), "user.offline", b"x").expect("setxattr with the server stopped");
        {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new().append(true).open(ma.join("log")).expect("open for append");
            f.write_all(b"A3\n").expect("append with the server stopped");
        }
        assert!(t.elapsed() < Duration::from_secs(1), "local changes are fast: {:?}", t.elapsed());
        assert_eq!(xattr_get(&ma.join("log"), "user.offline").as_deref(), Some(&b"x"[..]), "set here at once");
        let t = std::time::Instant::now();
        assert_eq!(std::fs::read(ma.join("log")).expect("cached read"), b"A1\nB1\nA2\nA3\n");
        assert!(t.elapsed() < Duration::from_secs(1), "cached read fast: {:?}", t.elapsed());
        unsafe { libc::kill(pid as i32, libc::SIGCONT) };
        std::thread::sleep(Duration::from_millis(1500));
        izo_sync(&ma);
        assert_eq!(std::fs::read(ex.join("while-down/f")).expect("sent after the server resumed"), b"written offline");
        assert_eq!(xattr_get(&ex.join("log"), "user.offline").as_deref(), Some(&b"x"[..]), "sent when it resumed");
        assert_eq!(std::fs::read(ex.join("log")).expect("log"), b"A1\nB1\nA2\nA3\n");
        std::fs::write(ma.join("after"), b"back").expect("works again after the server resumes");
    })
    .await
    .expect("append test");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_replaced_state_is_a_new_incarnation_and_the_cache_resyncs() {
    sweep_mounts();
    let dirs = Dirs::new();
    let tok = dirs.token(izo_server::auth::Rights::Rw);
    let mut p = Proc::start(&dirs, "127.0.0.1:0", &[]);
    let (addr, fp) = (p.addr.clone(), p.fingerprint.clone());
    let ex = dirs.export.clone();
    let state = dirs.state.clone();
    let dirs = tokio::task::spawn_blocking(move || {
        let mut a = MountProc::start(&addr, &fp, &tok);
        let ma = a.mnt.clone();
        for i in 0..30 {
            std::fs::write(ma.join(format!("f{i}")), format!("{i}")).expect("write");
        }
        a.stop();
        p.sigterm();
        // the server's state dir is recreated over the same export
        std::fs::remove_dir_all(&state).expect("rm state");
        let tok = dirs.token(izo_server::auth::Rights::Rw);
        let p = Proc::start(&dirs, &addr, &[]);
        let a = MountProc::start_at(&addr, &p.fingerprint, &tok, &ma, &a.cache);
        converge(&[&ex, &ma], "the cache after the new incarnation");
        std::fs::write(ma.join("new"), b"after").expect("write after the resync");
        std::fs::OpenOptions::new()
            .append(true)
            .open(ma.join("f3"))
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"+"))
            .expect("append to a file of the new incarnation");
        converge(&[&ex, &ma], "after writes");
        assert_eq!(std::fs::read(ex.join("f3")).expect("f3"), b"3+");
        drop(a);
        drop(p);
        dirs
    })
    .await
    .expect("incarnation test");
    drop(dirs);
}

/// The number before `word` in `izo status` output ("3 answered").
fn status_count(status: &str, word: &str) -> u64 {
    let at = status.find(word).unwrap_or_else(|| panic!("status lacks {word:?}: {status}"));
    let n: String = status[..at]
        .trim_end()
        .chars()
        .rev()
        .take_while(|c| c.is_ascii_digit())
        .collect::<String>()
        .chars()
        .rev()
        .collect();
    n.parse().unwrap_or_else(|_| panic!("no count before {word:?}: {status}"))
}

/// Changes made while the server is away wait in the client's modification
/// log: a thousand small writes to one file go as one write, a file created
/// and removed meanwhile never reaches the server, fsync returns with local
/// durability, and a SIGKILL of the daemon loses none of it: the remount
/// sends everything once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_changes_coalesce_cancel_and_survive_a_sigkill() {
    sweep_mounts();
    let dirs = Dirs::new();
    let tok = dirs.token(izo_server::auth::Rights::Rw);
    let p = Proc::start(&dirs, "127.0.0.1:0", &[]);
    let (addr, fp, pid) = (p.addr.clone(), p.fingerprint.clone(), p.pid());
    let ex = dirs.export.clone();
    tokio::task::spawn_blocking(move || {
        let _p = p;
        let mut a = MountProc::start(&addr, &fp, &tok);
        let b = MountProc::start(&addr, &fp, &tok);
        let (ma, mb) = (a.mnt.clone(), b.mnt.clone());
        server_away(pid);
        let t = Instant::now();
        let mut want = Vec::new();
        {
            use std::io::Write;
            let mut f = std::fs::File::create(ma.join("big")).expect("create big");
            for i in 0..1000u32 {
                let chunk = format!("line {i:05} of a file written in small pieces\n");
                f.write_all(chunk.as_bytes()).expect("write");
                want.extend_from_slice(chunk.as_bytes());
            }
            let ts = Instant::now();
            f.sync_all().expect("fsync while the server is away");
            assert!(ts.elapsed() < Duration::from_millis(1500), "fsync waited {:?}", ts.elapsed());
        }
        std::fs::write(ma.join("scratch"), b"temporary").expect("create scratch");
        std::fs::remove_file(ma.join("scratch")).expect("remove scratch");
        std::fs::create_dir(ma.join("d")).expect("mkdir");
        std::fs::write(ma.join("d/f"), b"moved while offline").expect("write d/f");
        std::fs::rename(ma.join("d/f"), ma.join("d/g")).expect("rename");
        assert!(t.elapsed() < Duration::from_secs(3), "offline changes took {:?}", t.elapsed());
        // the daemon dies with all of it unsent
        let cache = a.cache.clone();
        a.kill();
        unsafe { libc::kill(pid as i32, libc::SIGCONT) };
        let a = MountProc::start_at(&addr, &fp, &tok, &ma, &cache);
        izo_out(&["sync".as_ref(), a.mnt.as_os_str()]);
        assert_eq!(std::fs::read(ex.join("big")).expect("big on the server"), want);
        assert_eq!(std::fs::read(ex.join("d/g")).expect("d/g on the server"), b"moved while offline");
        assert!(!ex.join("scratch").exists(), "the cancelled file reached the server");
        assert!(!ex.join("d/f").exists(), "the old name reached the server");
        let st = izo_out(&["status".as_ref(), a.mnt.as_os_str()]);
        let sent = status_count(&st, "answered,");
        // create + write of big, mkdir, create + write + rename in d (a
        // truncate or mode change at most besides): never one per write(2)
        assert!(sent <= 8, "{sent} ops sent for 1,000 writes and a cancelled file: {st}");
        assert_eq!(status_count(&st, "refused"), 0, "nothing applied twice or refused: {st}");
        izo_out(&["sync".as_ref(), mb.as_os_str()]);
        converge(&[&ex, &ma, &mb], "after the remount sent the offline changes");
    })
    .await
    .expect("offline test");
}

/// Both replicas change one file while the server is away: the first to
/// reach it wins, the other's change is refused as a conflict, parked with
/// its bytes (listed by `izo status`), and that replica resyncs to the
/// winner; all three trees converge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflicting_offline_change_is_parked_with_its_bytes_and_the_replicas_converge() {
    sweep_mounts();
    let dirs = Dirs::new();
    let tok = dirs.token(izo_server::auth::Rights::Rw);
    std::fs::write(dirs.export.join("shared"), b"original").expect("seed");
    let p = Proc::start(&dirs, "127.0.0.1:0", &[]);
    let (addr, fp, pid) = (p.addr.clone(), p.fingerprint.clone(), p.pid());
    let ex = dirs.export.clone();
    tokio::task::spawn_blocking(move || {
        let _p = p;
        let a = MountProc::start(&addr, &fp, &tok);
        let b = MountProc::start(&addr, &fp, &tok);
        let (ma, mb) = (a.mnt.clone(), b.mnt.clone());
        server_away(pid);
        std::fs::write(ma.join("shared"), b"version from A").expect("write on A");
        std::fs::write(mb.join("shared"), b"version from B, longer").expect("write on B");
        unsafe { libc::kill(pid as i32, libc::SIGCONT) };
        let sync = |m: &Path| std::process::Command::new(izo_bin()).arg("sync").arg(m).output().expect("izo sync");
        let (sa, sb) = (sync(&ma), sync(&mb));
        let on_server = std::fs::read(ex.join("shared")).expect("server copy");
        let (loser, lost, (lost_sync, won_sync)) = if on_server == b"version from A" {
            (&mb, &b"version from B, longer"[..], (sb, sa))
        } else {
            assert_eq!(on_server, b"version from B, longer", "the server has one of the two versions");
            (&ma, &b"version from A"[..], (sa, sb))
        };
        // izo sync says which change did not make it, by path
        assert!(won_sync.status.success(), "the winner syncs: {}", String::from_utf8_lossy(&won_sync.stderr));
        let err = String::from_utf8_lossy(&lost_sync.stderr);
        assert!(!lost_sync.status.success() && err.contains("/shared: write"), "the loser's sync fails: {err}");
        let st = izo_out(&["status".as_ref(), loser.as_os_str()]);
        assert!(status_count(&st, "refused") >= 1, "the loser's change was refused: {st}");
        let kept = format!("({} bytes kept)", lost.len());
        assert!(st.contains("parked") && st.contains(&kept), "the refused write is kept with its bytes: {st}");
        converge(&[&ex, &ma, &mb], "after the conflict");
    })
    .await
    .expect("conflict test");
}

/// fsync returns once the server has the file (while connected); close
/// does not wait unless the mount has `--sync-close`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsync_waits_for_the_server_and_sync_close_makes_close_wait() {
    let s = server_with(&[]).await;
    let fp = s.server.fingerprint.clone();
    let (addr, tok) = (s.addr.clone(), s.rw.clone());
    let ex = s.dirs.export.clone();
    tokio::task::spawn_blocking(move || {
        let a = MountProc::start(&addr, &fp, &tok);
        let c = MountProc::start_with(&addr, &fp, &tok, &["--sync-close"]);
        for i in 0..10 {
            use std::io::Write;
            let name = format!("fsynced-{i}");
            let mut f = std::fs::File::create(a.mnt.join(&name)).expect("create");
            f.write_all(name.as_bytes()).expect("write");
            f.sync_all().expect("fsync");
            assert_eq!(std::fs::read(ex.join(&name)).expect("on the server after fsync"), name.as_bytes());
            let name = format!("closed-{i}");
            std::fs::write(c.mnt.join(&name), name.as_bytes()).expect("write and close");
            assert_eq!(std::fs::read(ex.join(&name)).expect("on the server after close"), name.as_bytes());
        }
    })
    .await
    .expect("fsync test");
}

/// Found by review: an offline removal, and an editor-style save (write a
/// temporary file, rename it over the old one), of files that came from
/// the server must reach it once it answers — the removed objects are gone
/// from the cache by then, so their ops carry the bases taken when queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_removal_and_replacement_of_server_files_reach_the_server() {
    sweep_mounts();
    let dirs = Dirs::new();
    let tok = dirs.token(izo_server::auth::Rights::Rw);
    std::fs::write(dirs.export.join("victim"), b"original").expect("seed");
    std::fs::write(dirs.export.join("target"), b"old target").expect("seed");
    let p = Proc::start(&dirs, "127.0.0.1:0", &[]);
    let (addr, fp, pid) = (p.addr.clone(), p.fingerprint.clone(), p.pid());
    let ex = dirs.export.clone();
    tokio::task::spawn_blocking(move || {
        let _p = p;
        let a = MountProc::start(&addr, &fp, &tok);
        let ma = a.mnt.clone();
        server_away(pid);
        std::fs::remove_file(ma.join("victim")).expect("rm offline");
        std::fs::write(ma.join("tmp"), b"new content").expect("write tmp");
        std::fs::rename(ma.join("tmp"), ma.join("target")).expect("rename over");
        unsafe { libc::kill(pid as i32, libc::SIGCONT) };
        izo_out(&["sync".as_ref(), ma.as_os_str()]);
        assert!(!ex.join("victim").exists(), "the offline rm reached the server");
        assert_eq!(std::fs::read(ex.join("target")).expect("target"), b"new content");
        let st = izo_out(&["status".as_ref(), ma.as_os_str()]);
        assert_eq!(status_count(&st, "refused"), 0, "{st}");
        converge(&[&ex, &ma], "after the offline removal and replacement");
    })
    .await
    .expect("offline removal test");
}

/// Found by review: a change from another replica that arrives while this
/// replica has an unanswered change to the same file (here a chmod, which
/// the server accepts: it only checks the attribute version) is held back,
/// not lost: once the file is idle it is fetched, so content, size and mode
/// agree everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_change_held_back_while_busy_arrives_once_idle() {
    sweep_mounts();
    let dirs = Dirs::new();
    let tok = dirs.token(izo_server::auth::Rights::Rw);
    std::fs::write(dirs.export.join("f"), b"original").expect("seed");
    let p = Proc::start(&dirs, "127.0.0.1:0", &[]);
    let (addr, fp, pid) = (p.addr.clone(), p.fingerprint.clone(), p.pid());
    let ex = dirs.export.clone();
    tokio::task::spawn_blocking(move || {
        let _p = p;
        let a = MountProc::start(&addr, &fp, &tok);
        let b = MountProc::start(&addr, &fp, &tok);
        let (ma, mb) = (a.mnt.clone(), b.mnt.clone());
        server_away(pid);
        std::fs::set_permissions(ma.join("f"), std::fs::Permissions::from_mode(0o600)).expect("chmod on A");
        // A's daemon is held while B's write is applied first
        let apid = a.child.id() as i32;
        unsafe { libc::kill(apid, libc::SIGSTOP) };
        unsafe { libc::kill(pid as i32, libc::SIGCONT) };
        std::thread::sleep(Duration::from_millis(1500));
        std::fs::write(mb.join("f"), b"changed by B").expect("write on B");
        izo_out(&["sync".as_ref(), mb.as_os_str()]);
        unsafe { libc::kill(apid, libc::SIGCONT) };
        std::thread::sleep(Duration::from_millis(1500)); // A reconnects
        izo_out(&["sync".as_ref(), ma.as_os_str()]);
        izo_out(&["sync".as_ref(), mb.as_os_str()]);
        converge(&[&ex, &ma, &mb], "after the held-back change");
        assert_eq!(std::fs::read(ma.join("f")).expect("f on A"), b"changed by B");
        assert_eq!(std::fs::metadata(ma.join("f")).expect("stat").mode() & 0o777, 0o600);
    })
    .await
    .expect("held-back test");
}

/// Found by review: an O_APPEND write (which waits for the server's answer)
/// made just as the server stops answering returns within about a second,
/// and whatever it returned, the replica and the server agree afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_as_the_server_stops_returns_fast_and_the_replica_agrees_after() {
    sweep_mounts();
    let dirs = Dirs::new();
    let tok = dirs.token(izo_server::auth::Rights::Rw);
    std::fs::write(dirs.export.join("log"), b"L0\n").expect("seed");
    let p = Proc::start(&dirs, "127.0.0.1:0", &[]);
    let (addr, fp, pid) = (p.addr.clone(), p.fingerprint.clone(), p.pid());
    let ex = dirs.export.clone();
    tokio::task::spawn_blocking(move || {
        let _p = p;
        let a = MountProc::start(&addr, &fp, &tok);
        let ma = a.mnt.clone();
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(ma.join("log")).expect("open");
        unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
        let t = Instant::now();
        let r = f.write_all(b"L1\n");
        assert!(t.elapsed() < Duration::from_millis(2500), "the append took {:?}", t.elapsed());
        drop(f);
        unsafe { libc::kill(pid as i32, libc::SIGCONT) };
        std::thread::sleep(Duration::from_millis(1500));
        izo_out(&["sync".as_ref(), ma.as_os_str()]);
        converge(&[&ex, &ma], "after the append");
        let want: &[u8] = if r.is_ok() { b"L0\nL1\n" } else { b"L0\n" };
        assert_eq!(std::fs::read(ex.join("log")).expect("log"), want, "append returned {r:?}");
    })
    .await
    .expect("append test");
}

/// Found by review: a replica that fell behind retention while it had a
/// change on the way catches up through a snapshot (its change included).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_behind_retention_with_a_change_on_the_way_catches_up() {
    sweep_mounts();
    let dirs = Dirs::new();
    let tok = dirs.token(izo_server::auth::Rights::Rw);
    let p = Proc::start_args(&dirs, "127.0.0.1:0", &["--retain-records", "20", "--checkpoint-ms", "100"]);
    let (addr, fp, pid) = (p.addr.clone(), p.fingerprint.clone(), p.pid());
    let ex = dirs.export.clone();
    tokio::task::spawn_blocking(move || {
        let _p = p;
        let a = MountProc::start(&addr, &fp, &tok);
        let b = MountProc::start(&addr, &fp, &tok);
        let (ma, mb) = (a.mnt.clone(), b.mnt.clone());
        server_away(pid);
        std::fs::write(mb.join("bfile"), b"from B offline").expect("write on B");
        let bpid = b.child.id() as i32;
        unsafe { libc::kill(bpid, libc::SIGSTOP) };
        unsafe { libc::kill(pid as i32, libc::SIGCONT) };
        std::thread::sleep(Duration::from_millis(1500));
        for i in 0..60 {
            std::fs::write(ma.join(format!("n{i}")), format!("new {i}")).expect("write on A");
        }
        izo_out(&["sync".as_ref(), ma.as_os_str()]);
        std::thread::sleep(Duration::from_millis(500)); // retention passes B's position
        unsafe { libc::kill(bpid, libc::SIGCONT) };
        std::thread::sleep(Duration::from_millis(1500)); // B reconnects
        izo_out(&["sync".as_ref(), mb.as_os_str()]);
        izo_out(&["sync".as_ref(), ma.as_os_str()]);
        converge(&[&ex, &ma, &mb], "after B caught up");
        assert_eq!(std::fs::read(ex.join("bfile")).expect("bfile"), b"from B offline");
    })
    .await
    .expect("retention test");
}

/// The mount clears set-id bits itself (it takes FUSE_HANDLE_KILLPRIV, so
/// the kernel stops asking for fresh attributes before each chown): a
/// chown clears set-user-ID, and set-group-ID of a group-executable file;
/// an unprivileged write clears them, root's does not; the server gets the
/// same modes. And tar's utimens, chown, chmod of each file it makes, done
/// while the server is away, reach it as one op per file with the last
/// value of each attribute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_id_bits_are_cleared_as_the_kernel_would_and_attribute_runs_join() {
    sweep_mounts();
    let dirs = Dirs::new();
    let tok = dirs.token(izo_server::auth::Rights::Rw);
    // (a trusted volume: the server keeps set-id bits)
    let p = Proc::start_args(&dirs, "127.0.0.1:0", &["--trusted"]);
    let (addr, fp, pid) = (p.addr.clone(), p.fingerprint.clone(), p.pid());
    let ex = dirs.export.clone();
    tokio::task::spawn_blocking(move || {
        let _p = p;
        let a = MountProc::start(&addr, &fp, &tok);
        let ma = a.mnt.clone();
        // (an unprivileged user must reach the mount point)
        let parent = ma.parent().expect("mount point's parent");
        std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755)).expect("chmod parent");
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o7777;
        let made = [
            ("suid", 0o4755),
            ("sgid-x", 0o6775),
            ("sgid-nox", 0o2644),
            ("open", 0o4777),
            ("rootw", 0o4755),
            ("pt", 0o4777),
            ("nochown", 0o4755),
        ];
        for (f, m) in made {
            std::fs::write(ma.join(f), b"0123456789").expect("write");
            std::fs::set_permissions(ma.join(f), std::fs::Permissions::from_mode(m)).expect("chmod");
            assert_eq!(mode(&ma.join(f)), m, "{f} as made");
        }
        for f in ["suid", "sgid-x", "sgid-nox"] {
            std::os::unix::fs::chown(ma.join(f), Some(1), Some(1)).expect("chown");
        }
        // chown(f, -1, -1) clears them too
        let c = CString::new(ma.join("nochown").as_os_str().as_bytes()).expect("path");
        // SAFETY: a NUL-terminated path; -1 leaves owner and group.
        assert_eq!(unsafe { libc::chown(c.as_ptr(), u32::MAX, u32::MAX) }, 0, "chown -1:-1");
        let nobody_writes = |f: &str| {
            let out = std::process::Command::new("setpriv")
                .args(["--reuid=65534", "--regid=65534", "--clear-groups", "dd", "conv=notrunc", "status=none"])
                .arg(format!("of={}", ma.join(f).display()))
                .stdin(std::process::Stdio::piped())
                .spawn()
                .and_then(|mut c| {
                    use std::io::Write;
                    c.stdin.take().expect("stdin").write_all(b"x")?;
                    c.wait_with_output()
                })
                .expect("setpriv dd");
            assert!(out.status.success(), "unprivileged write to {f}: {out:?}");
        };
        nobody_writes("open");
        // a write passed through to the cache file (a reader holds a
        // passthrough open): the kernel's signal still reaches the mount
        let pt0 = served(&ma, "passthrough_opens");
        let reader = std::fs::File::open(ma.join("pt")).expect("open pt for reading");
        assert_eq!(served(&ma, "passthrough_opens"), pt0 + 1, "pt's reader is passed through");
        nobody_writes("pt");
        drop(reader);
        {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new().write(true).open(ma.join("rootw")).expect("open rootw");
            f.write_all(b"y").expect("root's write");
        }
        izo_out(&["sync".as_ref(), ma.as_os_str()]);
        let want = [
            ("suid", 0o755),
            ("sgid-x", 0o775),
            ("sgid-nox", 0o2644),
            ("open", 0o777),
            ("rootw", 0o4755),
            ("pt", 0o777),
            ("nochown", 0o755),
        ];
        for (f, m) in want {
            // (the kernel may hold the old mode for its attribute timeout)
            let t = Instant::now();
            while mode(&ma.join(f)) != m && t.elapsed() < Duration::from_secs(2) {
                std::thread::sleep(Duration::from_millis(20));
            }
            assert_eq!(format!("{:o}", mode(&ma.join(f))), format!("{m:o}"), "{f} on the mount");
            assert_eq!(format!("{:o}", mode(&ex.join(f))), format!("{m:o}"), "{f} on the server");
        }
        assert_eq!(std::fs::read(ex.join("open")).expect("open"), b"x123456789");
        // a chown costs no GETATTR round trip (the kernel asks for fresh
        // attributes before each one unless the mount clears the bits)
        let getattrs = || served(&ma, "getattr");
        let h = std::fs::File::open(ma.join("suid")).expect("open suid");
        let g0 = getattrs();
        for i in 0..20 {
            std::os::unix::fs::fchown(&h, Some(10 + i), None).expect("fchown");
        }
        let g = getattrs() - g0;
        assert!(g < 5, "{g} GETATTR requests for 20 chowns");

        // tar's pattern, offline: create, write, utimens, chown, chmod
        // (the chowns above answered first: they are not counted below)
        izo_sync(&ma);
        let before = status_count(&izo_out(&["status".as_ref(), ma.as_os_str()]), "answered,");
        server_away_from(pid, &ma);
        let n = 50u32;
        for i in 0..n {
            let f = ma.join(format!("t{i}"));
            std::fs::write(&f, format!("file {i}")).expect("write");
            let t = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + i as u64);
            std::fs::File::options().write(true).open(&f).and_then(|h| h.set_modified(t)).expect("utimens");
            std::os::unix::fs::chown(&f, Some(1000 + i), Some(2000 + i)).expect("chown");
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600 + (i % 8) * 0o10)).expect("chmod");
        }
        unsafe { libc::kill(pid as i32, libc::SIGCONT) };
        izo_out(&["sync".as_ref(), ma.as_os_str()]);
        let sent = status_count(&izo_out(&["status".as_ref(), ma.as_os_str()]), "answered,") - before;
        assert!(
            sent <= 3 * n as u64,
            "{sent} ops for {n} files made the way tar makes them (create, write, one setattr each)"
        );
        for i in 0..n {
            let m = std::fs::metadata(ex.join(format!("t{i}"))).expect("on the server");
            assert_eq!((m.uid(), m.gid()), (1000 + i, 2000 + i), "t{i}'s owner on the server");
            assert_eq!(m.mode() & 0o7777, 0o600 + (i % 8) * 0o10, "t{i}'s mode on the server");
            assert_eq!(m.mtime(), 1_000_000 + i as i64, "t{i}'s mtime on the server");
        }
        converge(&[&ex, &ma], "after the offline attribute runs");
    })
    .await
    .expect("set-id test");
}

/// A file written and renamed before it is closed (`write; rename;
/// close`) reaches the server in that order: the journal holds its bytes
/// before its new name, so no replica ever sees the new name empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_reach_the_server_before_a_rename_of_the_written_file() {
    sweep_mounts();
    let dirs = Dirs::new();
    let tok = dirs.token(izo_server::auth::Rights::Rw);
    let p = Proc::start(&dirs, "127.0.0.1:0", &[]);
    let (addr, fp) = (p.addr.clone(), p.fingerprint.clone());
    let (ex, state) = (dirs.export.clone(), dirs.state.clone());
    tokio::task::spawn_blocking(move || {
        let a = MountProc::start(&addr, &fp, &tok);
        let ma = a.mnt.clone();
        {
            use std::io::Write;
            let mut f = std::fs::File::create(ma.join("f.tmp")).expect("create f.tmp");
            f.write_all(b"the new content").expect("write");
            std::fs::rename(ma.join("f.tmp"), ma.join("f")).expect("rename while open");
            // closed only here
        }
        izo_out(&["sync".as_ref(), ma.as_os_str()]);
        assert_eq!(std::fs::read(ex.join("f")).expect("f on the server"), b"the new content");
        drop(a);
        drop(p); // (the journal is read with the server stopped)
        let out =
            std::process::Command::new(izo_bin()).arg("log").arg("--state").arg(&state).output().expect("izo log");
        assert!(out.status.success(), "izo log: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout);
        let at = |kind: &str| text.lines().position(|l| l.contains(&format!(" {kind} {{")));
        let (write, rename) = (at("Write"), at("Rename"));
        assert!(write.is_some() && rename.is_some(), "a write and a rename in the journal:\n{text}");
        assert!(write < rename, "the bytes are journaled before the new name:\n{text}");
    })
    .await
    .expect("rename order test");
}

/// Poll `izo status` of `mnt` until `ok` holds (20 s at most).
fn wait_status(mnt: &Path, what: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st = izo_out(&["status".as_ref(), mnt.as_os_str()]);
        if ok(&st) {
            return st;
        }
        assert!(Instant::now() < deadline, "{what}: izo status still says\n{st}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Give every token of a server's state `rights` (`ro` or `rw`).
fn set_token_rights(state: &Path, rights: &str) {
    let file = state.join("tokens.toml");
    let text = std::fs::read_to_string(&file).expect("tokens.toml");
    let text = text
        .replace("rights = \"rw\"", &format!("rights = \"{rights}\""))
        .replace("rights = \"ro\"", &format!("rights = \"{rights}\""));
    std::fs::write(&file, text).expect("write tokens.toml");
}

/// Assert that a change failed with EROFS.
fn erofs(what: &str, r: std::io::Result<()>) {
    let e = r.err().unwrap_or_else(|| panic!("{what} succeeded on a read-only mount"));
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{what}: {e}");
}

/// Every kind of change, each of which must fail with EROFS.
fn every_change_is_refused(mnt: &Path) {
    erofs("touch of a new file", std::fs::File::create(mnt.join("new")).map(drop));
    erofs("write", std::fs::write(mnt.join("f"), b"changed"));
    erofs("rm", std::fs::remove_file(mnt.join("f")));
    erofs("mkdir", std::fs::create_dir(mnt.join("d")));
    erofs("chmod", std::fs::set_permissions(mnt.join("f"), std::fs::Permissions::from_mode(0o600)));
    erofs("setfattr", setxattr(&mnt.join("f"), "user.k", b"v"));
    erofs("rename", std::fs::rename(mnt.join("f"), mnt.join("g")));
    erofs("symlink", std::os::unix::fs::symlink("f", mnt.join("l")));
}

/// Nothing was queued, sent or parked by the refused changes.
fn nothing_queued_or_parked(mnt: &Path) {
    let st = izo_out(&["status".as_ref(), mnt.as_os_str()]);
    assert_eq!(status_count(&st, "changes made here"), 0, "nothing queued: {st}");
    assert_eq!(status_count(&st, "refused"), 0, "nothing refused by the server: {st}");
    assert!(!st.contains("parked (refused"), "nothing parked: {st}");
}

/// Found by trying it: a read-only token gave a writable mount whose
/// changes vanished a moment later. The mount is read-only (`ro` in its
/// options), every change fails with EROFS at once, nothing is queued or
/// parked, and reads work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_token_gives_a_read_only_mount() {
    let s = server_with(&[("f", b"kept")]).await;
    let (addr, fp, tok, ex) = (s.addr.clone(), s.server.fingerprint.clone(), s.ro.clone(), s.dirs.export.clone());
    tokio::task::spawn_blocking(move || {
        let m = MountProc::start(&addr, &fp, &tok);
        let opts = mount_options(&m.mnt).expect("mounted");
        assert!(opts.split(',').any(|o| o == "ro"), "read-only in the mount options: {opts}");
        assert_eq!(std::fs::read(m.mnt.join("f")).expect("read"), b"kept");
        every_change_is_refused(&m.mnt);
        nothing_queued_or_parked(&m.mnt);
        let st = izo_out(&["status".as_ref(), m.mnt.as_os_str()]);
        assert!(st.contains("read-only"), "status says the mount is read-only: {st}");
        let names: Vec<_> = std::fs::read_dir(&ex)
            .expect("export")
            .map(|e| e.expect("entry").file_name())
            .filter(|n| !n.as_bytes().starts_with(b".izo-"))
            .collect();
        assert_eq!(names, ["f"], "the export is as it was");
        assert_eq!(std::fs::read(ex.join("f")).expect("f"), b"kept");
    })
    .await
    .expect("read-only test");
}

/// A token whose rights became read-only while a replica was mounted
/// (seen at the reconnect after a server restart): the replica refuses
/// every change with EROFS at once instead of queueing what the server
/// would refuse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_made_read_only_refuses_changes_at_once_after_the_reconnect() {
    sweep_mounts();
    let dirs = Dirs::new();
    let tok = dirs.token(izo_server::auth::Rights::Rw);
    std::fs::write(dirs.export.join("f"), b"one").expect("seed");
    let mut p = Proc::start(&dirs, "127.0.0.1:0", &[]);
    let (addr, fp) = (p.addr.clone(), p.fingerprint.clone());
    tokio::task::spawn_blocking(move || {
        let m = MountProc::start(&addr, &fp, &tok);
        p.sigterm();
        set_token_rights(&dirs.state, "ro");
        let _p = Proc::start(&dirs, &addr, &[]);
        wait_status(&m.mnt, "reconnected with a read-only token", |st| st.contains("connection: connected (read-only"));
        every_change_is_refused(&m.mnt);
        nothing_queued_or_parked(&m.mnt);
        assert_eq!(std::fs::read(dirs.export.join("f")).expect("f"), b"one");
    })
    .await
    .expect("rights change test");
}

/// Found by trying it: without `--fingerprint` the client checked no
/// certificate at all. Now the first mount trusts the certificate it sees
/// and remembers it in the cache; a server with another certificate on
/// the same address is refused, by the running mount (it stays
/// disconnected, says why, and sends it nothing) and by a remount (whose
/// error says how to accept it); `--fingerprint NEW` accepts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_fingerprint_the_first_certificate_is_trusted_and_a_changed_one_refused() {
    sweep_mounts();
    let dirs = Dirs::new();
    let tok = dirs.token(izo_server::auth::Rights::Rw);
    let mut p = Proc::start(&dirs, "127.0.0.1:0", &[]);
    let (addr, first) = (p.addr.clone(), p.fingerprint.clone());
    tokio::task::spawn_blocking(move || {
        let tmp = tempfile::Builder::new().prefix("izo-mnt-").tempdir().expect("temp dir");
        let (mnt, cache) = (tmp.path().join("mnt"), tmp.path().join("cache"));
        std::fs::create_dir(&mnt).expect("mount point");
        let mut m = MountProc::spawn(&addr, &tok, &mnt, &cache, &[]);
        let pin = cache.join("server-fingerprint");
        let pinned = || std::fs::read_to_string(&pin).map(|s| s.trim().to_string()).ok();
        assert_eq!(pinned().as_deref(), Some(first.as_str()), "the first certificate is remembered in the cache");
        std::fs::write(mnt.join("a"), b"for the real server").expect("write");
        izo_out(&["sync".as_ref(), mnt.as_os_str()]);
        // another server (a new state dir: a new certificate) on the address
        p.sigterm();
        let other = Dirs::new();
        let tok2 = other.token(izo_server::auth::Rights::Rw);
        let q = Proc::start(&other, &addr, &[]);
        assert_ne!(q.fingerprint, first);
        let st = wait_status(&mnt, "the mount refuses the new certificate", |st| {
            st.contains("not connected") && st.contains(&q.fingerprint)
        });
        assert!(st.contains(&first), "status names the trusted certificate too: {st}");
        std::fs::write(mnt.join("b"), b"not for another server").expect("write while refused");
        std::thread::sleep(Duration::from_secs(3));
        assert!(!other.export.join("b").exists(), "a change reached a server with another certificate");
        m.stop();
        let err = mount_fails(&addr, &tok2, &mnt, &cache, &[]);
        let accept = format!("--fingerprint {}", q.fingerprint);
        assert!(err.contains(&accept) && err.contains(&pin.display().to_string()), "how to accept it: {err}");
        assert_eq!(pinned().as_deref(), Some(first.as_str()), "a refused certificate is not remembered");
        let m = MountProc::spawn(&addr, &tok2, &mnt, &cache, &["--fingerprint", &q.fingerprint]);
        assert_eq!(pinned().as_deref(), Some(q.fingerprint.as_str()), "the accepted certificate is remembered");
        drop(m);
    })
    .await
    .expect("fingerprint test");
}

/// Found by trying it: a second mount over a live one was allowed (and
/// stopping it took both down), and a missing mount point was reported
/// after the whole replication as needing /dev/fuse and root. A mount
/// point that is a mount, missing or not empty (without `--nonempty`) is
/// refused with a hint that fits, before any cache is made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mount_point_that_is_a_mount_missing_or_not_empty_is_refused_before_replicating() {
    let s = server_with(&[("f", b"data")]).await;
    let (addr, fp, tok) = (s.addr.clone(), s.server.fingerprint.clone(), s.rw.clone());
    tokio::task::spawn_blocking(move || {
        let a = MountProc::start(&addr, &fp, &tok);
        let tmp = tempfile::Builder::new().prefix("izo-mnt-").tempdir().expect("temp dir");
        let flags = ["--fingerprint", fp.as_str()];
        let cache = |n: &str| tmp.path().join(n);
        let err = mount_fails(&addr, &tok, &a.mnt, &cache("c1"), &flags);
        let by = format!("already an intermezzo mount (by PID {})", a.child.id());
        assert!(err.contains(&by), "over a live mount: {err}");
        assert!(!cache("c1").exists(), "refused before its cache was made");
        assert_eq!(std::fs::read(a.mnt.join("f")).expect("the first mount still serves"), b"data");
        let err = mount_fails(&addr, &tok, &tmp.path().join("nowhere"), &cache("c2"), &flags);
        assert!(err.contains("does not exist: create the directory") && !err.contains("root"), "missing: {err}");
        assert!(!cache("c2").exists(), "refused before its cache was made");
        let full = tmp.path().join("full");
        std::fs::create_dir(&full).expect("mkdir");
        std::fs::write(full.join("x"), b"hidden while mounted").expect("write");
        let err = mount_fails(&addr, &tok, &full, &cache("c3"), &flags);
        assert!(err.contains("not empty") && err.contains("--nonempty"), "not empty: {err}");
        let b = MountProc::spawn(&addr, &tok, &full, &cache("c4"), &["--fingerprint", &fp, "--nonempty"]);
        assert_eq!(std::fs::read(full.join("f")).expect("mounted over it when asked"), b"data");
        drop(b);
        assert_eq!(std::fs::read(full.join("x")).expect("its own file after the unmount"), b"hidden while mounted");
        assert_eq!(std::fs::read(a.mnt.join("f")).expect("the first mount still serves"), b"data");
    })
    .await
    .expect("mount point test");
}

/// Found by trying it: mounts unmounted themselves when the server went
/// away or refused them after a restart. A replica whose token the
/// restarted server no longer knows keeps its mount, serves what it has,
/// and `izo status` says what is wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mount_keeps_serving_its_cache_when_the_restarted_server_refuses_it() {
    sweep_mounts();
    let dirs = Dirs::new();
    let tok = dirs.token(izo_server::auth::Rights::Rw);
    let mut p = Proc::start(&dirs, "127.0.0.1:0", &[]);
    let (addr, fp) = (p.addr.clone(), p.fingerprint.clone());
    tokio::task::spawn_blocking(move || {
        let mut m = MountProc::start(&addr, &fp, &tok);
        std::fs::write(m.mnt.join("a"), b"cached here").expect("write");
        izo_out(&["sync".as_ref(), m.mnt.as_os_str()]);
        p.sigterm();
        std::fs::remove_file(dirs.state.join("tokens.toml")).expect("the token is revoked");
        let _p = Proc::start(&dirs, &addr, &[]);
        let st = wait_status(&m.mnt, "the refusal is shown", |st| st.contains("not connected") && st.contains("Auth"));
        assert!(st.contains("token"), "status says what to do: {st}");
        std::thread::sleep(Duration::from_secs(3));
        assert!(m.child.try_wait().expect("wait").is_none(), "the daemon is still running");
        assert_eq!(std::fs::read(m.mnt.join("a")).expect("read from the cache"), b"cached here");
        wait_status(&m.mnt, "still refused", |st| st.contains("not connected"));
    })
    .await
    .expect("refused mount test");
}

/// Found by trying it: `izo sync` exited 0 while the server had refused
/// changes. Changes made while the server was away, refused once it is
/// back (the token became read-only): `izo sync` fails and names them by
/// path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn izo_sync_fails_and_names_by_path_the_changes_the_server_refused() {
    sweep_mounts();
    let dirs = Dirs::new();
    let tok = dirs.token(izo_server::auth::Rights::Rw);
    std::fs::write(dirs.export.join("f"), b"one").expect("seed");
    let mut p = Proc::start(&dirs, "127.0.0.1:0", &[]);
    let (addr, fp) = (p.addr.clone(), p.fingerprint.clone());
    tokio::task::spawn_blocking(move || {
        let m = MountProc::start(&addr, &fp, &tok);
        p.sigterm();
        std::fs::write(m.mnt.join("f"), b"two").expect("write while the server is away");
        std::fs::write(m.mnt.join("new"), b"fresh").expect("create while the server is away");
        set_token_rights(&dirs.state, "ro");
        let _p = Proc::start(&dirs, &addr, &[]);
        let out = std::process::Command::new(izo_bin()).arg("sync").arg(&m.mnt).output().expect("izo sync");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "izo sync fails: {err}");
        assert!(err.contains("refused") && err.contains("/f: ") && err.contains("/new: create"), "by path: {err}");
        let st = izo_out(&["status".as_ref(), m.mnt.as_os_str()]);
        assert!(status_count(&st, "refused") >= 2 && st.contains("/new: create"), "status lists them: {st}");
        assert_eq!(std::fs::read(dirs.export.join("f")).expect("f"), b"one");
        assert!(!dirs.export.join("new").exists());
    })
    .await
    .expect("refused sync test");
}

/// Found by trying it: a SIGKILLed daemon left its control socket in
/// /run/izo. The next daemon to start removes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_daemon_leaves_no_control_socket_behind_at_the_next_start() {
    let s = server_with(&[]).await;
    let (addr, fp, tok) = (s.addr.clone(), s.server.fingerprint.clone(), s.rw.clone());
    tokio::task::spawn_blocking(move || {
        let mut a = MountProc::start(&addr, &fp, &tok);
        let sock = Path::new("/run/izo").join(format!("{}.sock", a.child.id()));
        assert!(sock.exists(), "{} while the daemon runs", sock.display());
        // (left behind by the kill; a mount of a test beside this one may
        // sweep it first)
        a.kill();
        let _b = MountProc::start(&addr, &fp, &tok);
        assert!(!sock.exists(), "{} is swept at the next start", sock.display());
    })
    .await
    .expect("socket sweep test");
}

/// A client mounted right after a server's first start on a populated
/// export (W1, about 21k entries) has the whole tree when `izo mount` says
/// it is mounted: the snapshot waits for the first scan to journal the
/// export, instead of holding a part of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_mount_of_a_populated_export_gets_the_whole_tree_at_once() {
    sweep_mounts();
    let dirs = Dirs::new();
    let ok = std::process::Command::new("tar")
        .arg("-xf")
        .arg(w1())
        .arg("-C")
        .arg(&dirs.export)
        .status()
        .expect("tar")
        .success();
    assert!(ok, "untar W1 into the export");
    let tok = dirs.token(izo_server::auth::Rights::Rw);
    let p = Proc::start(&dirs, "127.0.0.1:0", &[]);
    let (addr, fp) = (p.addr.clone(), p.fingerprint.clone());
    let ex = dirs.export.clone();
    tokio::task::spawn_blocking(move || {
        let _p = p;
        let a = MountProc::start(&addr, &fp, &tok);
        // no waiting: what the export holds is in the mount now
        let want = digest(&ex);
        let got = digest(&a.mnt);
        let diff = want.diff(&got);
        assert!(
            diff.is_empty(),
            "the mount lacks part of the export at once: {} differences, e.g. {:?}",
            diff.len(),
            &diff[..diff.len().min(5)]
        );
    })
    .await
    .expect("first mount test");
}

//! Test harness: servers in-process or as `izo serve` child processes on
//! 127.0.0.1, tokens, and clients with the server's pinned fingerprint.

use izo_client::{Client, ClientConfig};
use izo_proto::*;
use izo_server::auth::{Rights, Tokens};
use izo_server::{Server, ServerConfig};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Temp dirs of one volume: export and state.
pub struct Dirs {
    pub _tmp: tempfile::TempDir,
    pub export: PathBuf,
    pub state: PathBuf,
}

impl Drop for Dirs {
    fn drop(&mut self) {
        if std::env::var_os("IZO_TEST_KEEP").is_some() {
            let t = std::mem::replace(&mut self._tmp, tempfile::tempdir().expect("temp dir"));
            let _ = t.keep();
        }
    }
}

impl Dirs {
    pub fn new() -> Dirs {
        let tmp = tempfile::Builder::new().prefix("izo-it-").tempdir().expect("temp dir");
        let export = tmp.path().join("vol");
        let state = tmp.path().join("state");
        std::fs::create_dir_all(&export).expect("mkdir export");
        if std::env::var_os("IZO_TEST_KEEP").is_some() {
            eprintln!("keeping test dir {}", tmp.path().display());
        }
        Dirs { _tmp: tmp, export, state }
    }

    pub fn token(&self, rights: Rights) -> String {
        std::fs::create_dir_all(&self.state).expect("state dir");
        Tokens::new(&self.state).create("vol", rights, "test").expect("token")
    }
}

/// A server running inside the test process.
pub struct InProc {
    pub dirs: Dirs,
    pub server: Arc<Server>,
    pub addr: String,
    pub rw: String,
    pub ro: String,
}

pub fn config(dirs: &Dirs) -> ServerConfig {
    ServerConfig {
        export: dirs.export.clone(),
        state_dir: Some(dirs.state.clone()),
        listen: "127.0.0.1:0".into(),
        ..ServerConfig::default()
    }
}

impl InProc {
    pub async fn start() -> InProc {
        Self::start_with(Dirs::new(), |_| {}).await
    }

    pub async fn start_with(dirs: Dirs, tweak: impl FnOnce(&mut ServerConfig)) -> InProc {
        // IZO_LOG=debug shows the in-process server's log in a failing test.
        let filter = tracing_subscriber::EnvFilter::try_from_env("IZO_LOG").unwrap_or_else(|_| "off".into());
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
        let mut cfg = config(&dirs);
        tweak(&mut cfg);
        let server = Server::open(&cfg).expect("server opens");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        tokio::spawn(server.clone().serve(listener));
        let rw = dirs.token(Rights::Rw);
        let ro = dirs.token(Rights::Ro);
        InProc { dirs, server, addr, rw, ro }
    }

    pub fn client_config(&self, token: &str) -> ClientConfig {
        let mut c = ClientConfig::new(self.addr.clone(), "vol", token);
        c.fingerprint = Some(self.server.fingerprint.clone());
        c.silence = Duration::from_secs(5);
        c
    }

    pub async fn client(&self) -> Client {
        Client::connect(self.client_config(&self.rw)).await.expect("client connects")
    }
}

/// Path of the `izo` binary under test.
pub fn izo_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_izo"))
}

/// Run `izo ARGS`; its standard output (the test fails if it fails).
pub fn izo_out(args: &[&std::ffi::OsStr]) -> String {
    let out = std::process::Command::new(izo_bin()).args(args).output().expect("run izo");
    assert!(out.status.success(), "izo {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A request counter of the mount (`izo status`: "requests served: read N, ...").
pub fn served(mnt: &Path, what: &str) -> u64 {
    let st = izo_out(&["status".as_ref(), mnt.as_os_str()]);
    let line = st.lines().find(|l| l.starts_with("requests served:")).unwrap_or_else(|| panic!("no counters: {st}"));
    line.trim_start_matches("requests served:")
        .split(',')
        .filter_map(|kv| kv.trim().split_once(' '))
        .find(|(k, _)| *k == what)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or_else(|| panic!("no {what} counter: {line}"))
}

/// An `izo serve` child process.
pub struct Proc {
    pub child: Child,
    pub addr: String,
    pub fingerprint: String,
}

impl Proc {
    /// Start `izo serve` on `listen` with extra env; waits for its banner.
    pub fn start(dirs: &Dirs, listen: &str, env: &[(&str, &str)]) -> Proc {
        Self::start_cmd(dirs, listen, env, None, &[])
    }

    /// `izo serve` with extra arguments.
    pub fn start_args(dirs: &Dirs, listen: &str, args: &[&str]) -> Proc {
        Self::start_cmd(dirs, listen, &[], None, args)
    }

    pub fn start_cmd(dirs: &Dirs, listen: &str, env: &[(&str, &str)], wrap: Option<&[&str]>, args: &[&str]) -> Proc {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut cmd = match wrap {
                Some(w) => {
                    let mut c = Command::new(w[0]);
                    c.args(&w[1..]).arg(izo_bin());
                    c
                }
                None => Command::new(izo_bin()),
            };
            cmd.arg("serve")
                .arg(&dirs.export)
                .arg("--state")
                .arg(&dirs.state)
                .arg("--listen")
                .arg(listen)
                .arg("--volume")
                .arg("vol")
                .args(args)
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit());
            for (k, v) in env {
                cmd.env(k, v);
            }
            let mut child = cmd.spawn().expect("spawn izo serve");
            let stdout = child.stdout.take().expect("stdout");
            let mut lines = BufReader::new(stdout).lines();
            let (mut addr, mut fp) = (None, None);
            for line in lines.by_ref() {
                let Ok(line) = line else { break };
                if let Some(a) = line.strip_prefix("izo: listening on ") {
                    addr = Some(a.trim().to_string());
                }
                if let Some(f) = line.strip_prefix("izo: certificate fingerprint ") {
                    fp = Some(f.trim().to_string());
                }
                if line.starts_with("izo: state in") {
                    break;
                }
            }
            // Keep draining stdout so the child never blocks on a full pipe.
            std::thread::spawn(move || for _ in lines {});
            if let (Some(addr), Some(fingerprint)) = (addr, fp) {
                return Proc { child, addr, fingerprint };
            }
            let _ = child.kill();
            let _ = child.wait();
            assert!(Instant::now() < deadline, "izo serve did not start on {listen}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stop cleanly (SIGTERM) and wait for the exit.
    pub fn sigterm(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().expect("wait for izo serve");
        assert!(status.success(), "izo serve exits cleanly on SIGTERM: {status:?}");
    }

    pub fn sigkill(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
        let _ = self.child.wait();
    }

    pub fn client_config(&self, token: &str) -> ClientConfig {
        let mut c = ClientConfig::new(self.addr.clone(), "vol", token);
        c.fingerprint = Some(self.fingerprint.clone());
        c
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Root attributes of an export, for a reference model.
pub fn model_for(export: &Path) -> izo_testkit::Model {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(export).expect("stat export");
    let t = Timestamp { secs: m.mtime(), nsec: m.mtime_nsec() as u32 };
    izo_testkit::Model::new(m.mode() & 0o7777, m.uid(), m.gid(), t)
}

/// A create of a plain root-owned file in the volume root.
pub fn create_in_root(id: ObjectId, n: &str) -> Op {
    Op::Create { parent: ObjectId::ROOT, name: name(n), id, mode: 0o644, uid: 0, gid: 0 }
}

pub fn expect(id: ObjectId) -> Expect {
    Expect { id, base: Versions::default() }
}

pub fn name(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

/// Value of a server counter.
pub async fn stat(c: &Client, key: &str) -> u64 {
    let s = c.server_stats().await.expect("stats");
    s.into_iter().find(|(k, _)| k == key).map(|(_, v)| v).expect("counter exists")
}

/// A bare protocol connection: frames in and out, no resend logic. Used to
/// resend an op by hand and to send malformed or foreign-version frames.
pub struct Raw {
    pub rd: tokio::io::ReadHalf<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
    pub wr: tokio::io::WriteHalf<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
}

impl Raw {
    pub async fn connect(addr: &str, fingerprint: &str) -> Raw {
        let seen = Arc::new(std::sync::Mutex::new(None));
        let conn = izo_client::tls::connector(Some(fingerprint.to_string()), seen).expect("connector");
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("tcp");
        let name = rustls::pki_types::ServerName::try_from("intermezzo").expect("name");
        let tls = conn.connect(name, tcp).await.expect("tls");
        let (rd, wr) = tokio::io::split(tls);
        Raw { rd, wr }
    }

    pub async fn hello(addr: &str, fingerprint: &str, token: &str, replica: ReplicaId) -> (Raw, ServerMsg) {
        Self::hello_acked(addr, fingerprint, token, replica, 0).await
    }

    /// A handshake claiming replies through `last_acked` are held.
    pub async fn hello_acked(
        addr: &str,
        fingerprint: &str,
        token: &str,
        replica: ReplicaId,
        last_acked: u64,
    ) -> (Raw, ServerMsg) {
        Self::hello_claiming(addr, fingerprint, token, replica, last_acked, 0).await
    }

    /// A handshake claiming replies through `last_acked` under `incarnation`.
    pub async fn hello_claiming(
        addr: &str,
        fingerprint: &str,
        token: &str,
        replica: ReplicaId,
        last_acked: u64,
        incarnation: u128,
    ) -> (Raw, ServerMsg) {
        let mut r = Raw::connect(addr, fingerprint).await;
        let h = Hello {
            version: PROTOCOL_VERSION,
            volume: "vol".into(),
            token: token.into(),
            replica,
            last_acked,
            users: vec![],
            groups: vec![],
            min_version: MIN_PROTOCOL_VERSION,
            incarnation,
        };
        r.send(&ClientMsg::Hello(h)).await;
        let w = r.recv().await.expect("welcome");
        (r, w)
    }

    pub async fn send_bytes(&mut self, b: &[u8]) {
        use tokio::io::AsyncWriteExt;
        self.wr.write_all(b).await.expect("write");
        self.wr.flush().await.expect("flush");
    }

    pub async fn send(&mut self, m: &ClientMsg) {
        let f = encode_frame(m).expect("encode");
        self.send_bytes(&f).await;
    }

    /// Next message other than Pong; None on close. Returns raw body too.
    pub async fn recv_raw(&mut self) -> Option<(ServerMsg, Vec<u8>)> {
        use tokio::io::AsyncReadExt;
        loop {
            let mut len = [0u8; 4];
            let fut = self.rd.read_exact(&mut len);
            tokio::time::timeout(Duration::from_secs(10), fut).await.ok()?.ok()?;
            let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
            self.rd.read_exact(&mut body).await.ok()?;
            let m: ServerMsg = decode_frame(&body).ok()?;
            if !matches!(m, ServerMsg::Pong { .. }) {
                return Some((m, body));
            }
        }
    }

    pub async fn recv(&mut self) -> Option<ServerMsg> {
        self.recv_raw().await.map(|(m, _)| m)
    }
}

/// A loop-mounted journaled ext4 image, unmounted on drop.
pub struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    /// A file system of `mib` MiB made with extra `mkfs.ext4` arguments.
    pub fn new(mib: u64, mkfs_args: &[&str]) -> SmallFs {
        let dir = tempfile::Builder::new().prefix("izo-smallfs-").tempdir().expect("temp dir");
        let img = dir.path().join("fs.img");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).expect("mnt");
        std::fs::File::create(&img).and_then(|f| f.set_len(mib << 20)).expect("image");
        let ok = |c: &mut Command| c.status().map(|s| s.success()).unwrap_or(false);
        assert!(
            ok(Command::new("mkfs.ext4").args(["-q", "-F"]).args(mkfs_args).arg(&img)),
            "mkfs.ext4 (e2fsprogs) is needed"
        );
        assert!(ok(Command::new("mount").args(["-o", "loop"]).arg(&img).arg(&mnt)), "loop mount needs root");
        SmallFs { dir }
    }

    /// Where it is mounted.
    pub fn mnt(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.mnt()).status();
    }
}

/// Digest of the volume as the server describes it (names, attributes,
/// content read back, xattrs, hard links), comparable with `tree_digest` of
/// the export. `None` if a query failed (the view was changing under it).
pub async fn server_digest(c: &Client) -> Option<izo_testkit::Digest> {
    use izo_testkit::{digest_xattr, Digest, Kind, Node};
    let mut d = Digest::default();
    let mut names: std::collections::HashMap<ObjectId, Vec<Vec<u8>>> = Default::default();
    let mut stack = vec![(ObjectId::ROOT, Vec::new())];
    while let Some((id, path)) = stack.pop() {
        let a = c.getattr(id).await.ok()?;
        let content = match a.kind {
            FileKind::File => *blake3::hash(&c.read(id, 0, a.size).await.ok()?).as_bytes(),
            FileKind::Symlink => *blake3::hash(&c.readlink(id).await.ok()?).as_bytes(),
            _ => [0; 32],
        };
        let xattrs = match a.kind {
            FileKind::File | FileKind::Dir => {
                c.xattrs(id).await.ok()?.into_iter().filter(|(n, _)| digest_xattr(n)).collect()
            }
            _ => Default::default(),
        };
        let node = Node {
            kind: Kind::from(a.kind),
            mode: a.mode,
            uid: a.uid,
            gid: a.gid,
            mtime: (a.mtime.secs, a.mtime.nsec),
            size: if a.kind == FileKind::File { a.size } else { 0 },
            content,
            xattrs,
            link_group: None,
        };
        if a.kind == FileKind::Dir {
            for e in c.readdir(id).await.ok()? {
                let mut p = path.clone();
                if !p.is_empty() {
                    p.push(b'/');
                }
                p.extend_from_slice(&e.name);
                stack.push((e.attr.id, p));
            }
        } else {
            names.entry(id).or_default().push(path.clone());
        }
        d.nodes.insert(path, node);
    }
    for paths in names.into_values().filter(|p| p.len() > 1) {
        let smallest = paths.iter().min().cloned();
        for p in &paths {
            if let Some(n) = d.nodes.get_mut(p) {
                n.link_group = smallest.clone();
            }
        }
    }
    Some(d)
}

pub fn mount_command(addr: &str, token: &str, mnt: &Path, cache: &Path, flags: &[&str]) -> Command {
    let mut c = Command::new(izo_bin());
    c.arg("mount").arg(format!("{addr}/vol")).arg(mnt).args(["--token", token, "--cache"]).arg(cache).args(flags);
    c
}

/// Run an `izo mount` that must fail (within 30 s, without mounting): its
/// standard error. One that mounts after all is stopped and fails the test.
pub fn mount_fails(addr: &str, token: &str, mnt: &Path, cache: &Path, flags: &[&str]) -> String {
    let mut child = mount_command(addr, token, mnt, cache, flags)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn izo mount");
    let mut stderr = child.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for izo mount") {
            break st;
        }
        if Instant::now() > deadline {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
            panic!("izo mount on {} was not refused (it is still running)", mnt.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let err = reader.join().expect("stderr reader");
    assert!(!status.success(), "izo mount on {} succeeded: {err}", mnt.display());
    err
}

/// The per-mount options (`ro,nosuid,...`) of the FUSE mount at `mnt`.
pub fn mount_options(mnt: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.get(4).map(Path::new) == Some(mnt) && l.contains(" - fuse.izo ")).then(|| f.get(5).map(|o| o.to_string()))?
    })
}

/// An `izo mount` child process on a temporary mount point.
pub struct MountProc {
    pub child: Child,
    pub mnt: PathBuf,
    pub cache: PathBuf,
    _dir: Option<tempfile::TempDir>,
    /// Cleared when the mount is gone; the watchdog aborts it otherwise.
    alive: Arc<std::sync::atomic::AtomicBool>,
}

/// Longest a test may keep a mount: after that the watchdog aborts the
/// FUSE connection, so a hung request fails the test instead of hanging
/// the suite (FUSE-PITFALLS 37, 38).
const MOUNT_WATCHDOG: Duration = Duration::from_secs(240);

/// The FUSE connection number (the minor of `0:N` in mountinfo) of the
/// mount at `mnt`, if mounted.
fn fuse_connection(mnt: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.get(4).map(Path::new) == Some(mnt) && l.contains(" - fuse.izo "))
            .then(|| f.get(2).and_then(|d| d.split_once(':')).map(|(_, minor)| minor.to_string()))?
    })
}

/// Abort the FUSE connection of `mnt` (every request fails with ENOTCONN),
/// then detach it. Never touches the mount point itself.
pub fn abort_mount(mnt: &Path) {
    let Some(conn) = fuse_connection(mnt) else { return };
    let ctl = Path::new("/sys/fs/fuse/connections");
    if !ctl.join(&conn).exists() {
        let _ = Command::new("mount").args(["-t", "fusectl", "none"]).arg(ctl).stderr(Stdio::null()).status();
    }
    let _ = std::fs::write(ctl.join(&conn).join("abort"), b"1");
    let _ = Command::new("umount").arg("-l").arg(mnt).stderr(Stdio::null()).status();
}

/// Unmount leftovers of earlier runs: intermezzo mounts whose daemon (its
/// pid is in the mount source, `izo:PID`) is gone. Live mounts of tests
/// running beside this one are left alone; no mount point is touched.
pub fn sweep_mounts() {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return };
    for line in info.lines() {
        let mp = line.split(' ').nth(4).unwrap_or_default();
        let Some((_, after)) = line.split_once(" - fuse.izo ") else { continue };
        let pid = after.split(' ').next().and_then(|src| src.strip_prefix("izo:"));
        let dead = pid.is_some_and(|p| !Path::new("/proc").join(p).exists());
        if dead && mp.contains("izo-mnt-") {
            let _ = Command::new("umount").arg("-l").arg(mp).status();
        }
    }
}

impl MountProc {
    /// Mount the volume of `server` (address, fingerprint, token) with a
    /// fresh cache.
    pub fn start(addr: &str, fingerprint: &str, token: &str) -> MountProc {
        let dir = tempfile::Builder::new().prefix("izo-mnt-").tempdir().expect("temp dir");
        let cache = dir.path().join("cache");
        let mut m = Self::start_at(addr, fingerprint, token, &dir.path().join("mnt"), &cache);
        m._dir = Some(dir);
        m
    }

    /// Mount with a fresh cache and extra `izo mount` flags.
    pub fn start_with(addr: &str, fingerprint: &str, token: &str, extra: &[&str]) -> MountProc {
        let dir = tempfile::Builder::new().prefix("izo-mnt-").tempdir().expect("temp dir");
        let cache = dir.path().join("cache");
        let mut m = Self::launch(addr, fingerprint, token, &dir.path().join("mnt"), &cache, extra);
        m._dir = Some(dir);
        m
    }

    /// Mount with a given mount point and cache (a remount).
    pub fn start_at(addr: &str, fingerprint: &str, token: &str, mnt: &Path, cache: &Path) -> MountProc {
        Self::launch(addr, fingerprint, token, mnt, cache, &[])
    }

    fn launch(addr: &str, fingerprint: &str, token: &str, mnt: &Path, cache: &Path, extra: &[&str]) -> MountProc {
        std::fs::create_dir_all(mnt).expect("mount point");
        let mut args = vec!["--fingerprint", fingerprint];
        args.extend_from_slice(extra);
        Self::spawn(addr, token, mnt, cache, &args)
    }

    /// `izo mount` with exactly these flags besides the token and cache
    /// (no `--fingerprint` unless given), on an existing mount point.
    pub fn spawn(addr: &str, token: &str, mnt: &Path, cache: &Path, flags: &[&str]) -> MountProc {
        let mut child = mount_command(addr, token, mnt, cache, flags)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn izo mount");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let mounted = lines.by_ref().map_while(Result::ok).any(|l| l.starts_with("izo: mounted"));
        std::thread::spawn(move || for _ in lines {});
        if !mounted {
            let _ = child.kill();
            panic!("izo mount did not mount {}: {:?}", mnt.display(), child.wait());
        }
        let alive = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (watch, at) = (alive.clone(), mnt.to_path_buf());
        std::thread::spawn(move || {
            let start = Instant::now();
            while watch.load(std::sync::atomic::Ordering::Relaxed) {
                if start.elapsed() > MOUNT_WATCHDOG {
                    eprintln!("watchdog: aborting the mount at {} after {MOUNT_WATCHDOG:?}", at.display());
                    abort_mount(&at);
                    return;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        MountProc { child, mnt: mnt.to_path_buf(), cache: cache.to_path_buf(), _dir: None, alive }
    }

    /// SIGKILL the daemon and clear its dead mount.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        abort_mount(&self.mnt);
        self.alive.store(false, std::sync::atomic::Ordering::Relaxed);
    }

    /// Unmount (SIGTERM) and wait; lazy-unmount if the daemon is stuck.
    pub fn stop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // a daemon that did not unmount leaves a mount to abort
        abort_mount(&self.mnt);
        self.alive.store(false, std::sync::atomic::Ordering::Relaxed);
        if fuse_connection(&self.mnt).is_some() {
            eprintln!("warning: {} is still mounted after teardown", self.mnt.display());
        }
    }
}

impl Drop for MountProc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.stop();
        }
    }
}

/// `izo sync` on a mount, again until it succeeds (a server that just
/// came back), for at most `limit`; its last failure is the test's.
pub fn izo_sync_within(mnt: &Path, limit: Duration) {
    let t = Instant::now();
    loop {
        let out = Command::new(izo_bin()).args(["sync", "--timeout", "5"]).arg(mnt).output().expect("izo sync");
        if out.status.success() {
            return;
        }
        assert!(t.elapsed() < limit, "{} never synced: {}", mnt.display(), String::from_utf8_lossy(&out.stderr));
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `izo sync` on a mount; it must succeed.
pub fn izo_sync(mnt: &Path) {
    izo_out(&["sync".as_ref(), mnt.as_os_str()]);
}

/// Run `check` until it passes, for at most 15 s (the server applies to its
/// export right after it answers); its last failure is the test's.
pub fn eventually(check: impl Fn() + std::panic::RefUnwindSafe) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match std::panic::catch_unwind(&check) {
            Ok(()) => return,
            Err(e) if Instant::now() > deadline => std::panic::resume_unwind(e),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Stop the server process (SIGSTOP) and wait until its clients have
/// noticed the silence (750 ms) and count as disconnected.
pub fn server_away(pid: u32) {
    // SAFETY: plain syscall on a child's pid.
    unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
    std::thread::sleep(Duration::from_millis(1500));
}

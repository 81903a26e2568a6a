//! A real network cut between a mount and its server: the server runs in a
//! network namespace of its own, joined to this one by a veth pair (entered
//! with `nsenter --net`: `ip netns exec` would also hide FUSE mounts). The
//! link goes down, and separately an nftables rule drops the server's
//! port, for 20 s each, while a workload runs on the mount: every call
//! returns, fast, and none fails; once healed, the replica and the server
//! agree.

use crate::harness::*;
use crate::mount::{converge, setxattr};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).stderr(Stdio::piped()).output().expect("run");
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A network namespace with a veth pair to this one: `host` here, `peer`
/// inside (10.213.N.1 and .2/30). Removed on drop, with any rule added.
struct Netns {
    name: String,
    host: String,
    peer_addr: String,
    table: Option<String>,
}

impl Netns {
    fn new() -> Netns {
        let n = std::process::id() % 250;
        let name = format!("izo-test-{}", std::process::id());
        let host = format!("izoh{n}");
        let peer = format!("izop{n}");
        let _ = Command::new("ip").args(["netns", "del", &name]).stderr(Stdio::null()).status();
        let _ = Command::new("ip").args(["link", "del", &host]).stderr(Stdio::null()).status();
        run(&["ip", "netns", "add", &name]);
        run(&["ip", "link", "add", &host, "type", "veth", "peer", "name", &peer]);
        run(&["ip", "link", "set", &peer, "netns", &name]);
        run(&["ip", "addr", "add", &format!("10.213.{n}.1/30"), "dev", &host]);
        run(&["ip", "link", "set", &host, "up"]);
        let ns = format!("--net=/run/netns/{name}");
        run(&["nsenter", &ns, "ip", "addr", "add", &format!("10.213.{n}.2/30"), "dev", &peer]);
        run(&["nsenter", &ns, "ip", "link", "set", &peer, "up"]);
        run(&["nsenter", &ns, "ip", "link", "set", "lo", "up"]);
        Netns { name, host, peer_addr: format!("10.213.{n}.2"), table: None }
    }

    fn enter(&self) -> String {
        format!("--net=/run/netns/{}", self.name)
    }

    fn link(&self, up: bool) {
        run(&["ip", "link", "set", &self.host, if up { "up" } else { "down" }]);
    }

    /// Drop (or stop dropping) every packet to and from `port` here.
    fn drop_port(&mut self, port: &str, on: bool) {
        let table = format!("izo_test_{}", std::process::id());
        if on {
            run(&["nft", "add", "table", "inet", &table]);
            for (chain, hook, dir) in [("out", "output", "dport"), ("in", "input", "sport")] {
                let spec = format!("{{ type filter hook {hook} priority 0; policy accept; }}");
                run(&["nft", "add", "chain", "inet", &table, chain, &spec]);
                run(&["nft", "add", "rule", "inet", &table, chain, "tcp", dir, port, "drop"]);
            }
            self.table = Some(table);
        } else if let Some(t) = self.table.take() {
            run(&["nft", "delete", "table", "inet", &t]);
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Some(t) = self.table.take() {
            let _ = Command::new("nft").args(["delete", "table", "inet", &t]).status();
        }
        let _ = Command::new("ip").args(["link", "del", &self.host]).stderr(Stdio::null()).status();
        let _ = Command::new("ip").args(["netns", "del", &self.name]).stderr(Stdio::null()).status();
    }
}

/// The slowest call of each kind, and how many ran.
#[derive(Default, Debug)]
struct Timings {
    slowest: Vec<(&'static str, Duration)>,
    calls: u64,
}

impl Timings {
    fn time<T>(&mut self, what: &'static str, f: impl FnOnce() -> std::io::Result<T>) -> T {
        let t = Instant::now();
        let r = f();
        let d = t.elapsed();
        self.calls += 1;
        match self.slowest.iter_mut().find(|(w, _)| *w == what) {
            Some((_, s)) => *s = (*s).max(d),
            None => self.slowest.push((what, d)),
        }
        r.unwrap_or_else(|e| panic!("{what} failed during the cut: {e}"))
    }
}

/// The workload for `secs` seconds: every kind of call, on files made
/// before the cut and during it.
fn workload(m: &Path, tag: &str, secs: u64, t: &mut Timings) {
    let d = m.join(tag);
    t.time("mkdir", || std::fs::create_dir(&d));
    let started = Instant::now();
    let mut i = 0;
    while started.elapsed() < Duration::from_secs(secs) {
        t.time("stat", || std::fs::metadata(m.join("before")));
        t.time("read", || std::fs::read(m.join("before")));
        let f = d.join(format!("f{i}"));
        t.time("create+write", || std::fs::write(&f, format!("{tag} {i}")));
        let lock = d.join(format!("lock{i}"));
        t.time("O_EXCL create", || {
            std::fs::OpenOptions::new().write(true).create_new(true).mode(0o644).open(&lock).map(drop)
        });
        t.time("append", || {
            std::fs::OpenOptions::new().append(true).open(m.join("log"))?.write_all(format!("{tag} {i}\n").as_bytes())
        });
        let g = d.join(format!("g{i}"));
        t.time("rename", || std::fs::rename(&f, &g));
        t.time("mkdir", || std::fs::create_dir(d.join(format!("d{i}"))));
        t.time("setxattr", || setxattr(&g, "user.tag", tag.as_bytes()));
        t.time("fsync", || std::fs::OpenOptions::new().write(true).open(&g)?.sync_all());
        i += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_link_or_a_dropped_port_never_blocks_or_fails_a_call_and_all_converge() {
    sweep_mounts();
    let mut ns = Netns::new();
    let dirs = Dirs::new();
    let tok = dirs.token(izo_server::auth::Rights::Rw);
    let listen = format!("{}:0", ns.peer_addr);
    let enter = ns.enter();
    let p = Proc::start_cmd(&dirs, &listen, &[], Some(&["nsenter", &enter]), &[]);
    let (addr, fp) = (p.addr.clone(), p.fingerprint.clone());
    let port = addr.rsplit(':').next().expect("port").to_string();
    let ex = dirs.export.clone();
    tokio::task::spawn_blocking(move || {
        let _p = p;
        let a = MountProc::start(&addr, &fp, &tok);
        let m = a.mnt.clone();
        std::fs::write(m.join("before"), b"made before the cut").expect("write");
        std::fs::write(m.join("log"), b"").expect("log");
        izo_sync(&m);
        let mut t = Timings::default();
        // the link goes down for 20 s
        ns.link(false);
        workload(&m, "link-down", 20, &mut t);
        ns.link(true);
        // the server's port is dropped for 20 s
        ns.drop_port(&port, true);
        workload(&m, "port-dropped", 20, &mut t);
        ns.drop_port(&port, false);
        eprintln!("{} calls; slowest: {:?}", t.calls, t.slowest);
        for (what, d) in &t.slowest {
            // (an O_EXCL create waits the usual second for the server's
            // answer before it is made here; fsync waits up to a second
            // beyond its local flush)
            let limit = match *what {
                "O_EXCL create" | "fsync" => Duration::from_millis(1500),
                _ => Duration::from_secs(1),
            };
            assert!(*d <= limit, "{what} took {d:?} during the cut");
        }
        // healed: everything reaches the server
        izo_sync_within(&m, Duration::from_secs(60));
        converge(&[&ex, &m], "after the heal");
        let log = std::fs::read_to_string(ex.join("log")).expect("log");
        assert!(log.contains("link-down 0\n") && log.contains("port-dropped 0\n"), "{log}");
    })
    .await
    .expect("partition test");
}

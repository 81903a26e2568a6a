//! First intermezzo benchmark: acked creates/s and write MB/s from one client
//! over loopback TLS, each beside the native equivalent on the same disk in
//! the same run.
//!
//! * creates: N `Op::Create`s in the volume root, submitted pipelined (the
//!   client keeps at most `MAX_UNANSWERED` in flight), timed from the first
//!   submit to the last ack. Native: N empty files created in one directory,
//!   then one `fsync` of that directory, timed to its return.
//! * writes: W2 (1 GiB of random data; `--quick`: its first 256 MiB) as
//!   1 MiB `Op::Write`s, pipelined, timed to the last ack. Native: the same
//!   bytes in 1 MiB `write` calls to a new file, then `fsync`, timed to its
//!   return.
//!
//! Every round starts a fresh `izo serve` child on a new export under
//! `/var/tmp` (where the native files go too). Before each timed phase the
//! server is left to finish applying what it acked and the file system is
//! synced, so no phase pays for another's dirty pages.
//!
//! Usage: `cargo bench -p izo --bench core -- [--quick] [--runs N]
//! [--creates N] [--mib N] [--w2 PATH] [--silence-ms N]`; `bench/core` wraps
//! it. `--silence-ms` overrides the client's dead-server timeout, for
//! diagnosis only. W2 comes from `--w2`, else `$IZO_WORKLOADS/w2.bin`, else
//! `/var/tmp/izo-workloads/w2.bin`. The `izo` binary comes from `$IZO_BIN`,
//! else `target/release/izo`; `$IZO_BENCH_SERVE_ARGS` adds arguments to
//! `izo serve` (e.g. `--no-capture`, to see what out-of-band capture
//! costs). Exits 0 when a target is missed: this is a benchmark, not a test.

use anyhow::{bail, ensure, Context, Result};
use izo_client::{Client, ClientConfig};
use izo_proto::{ObjectId, Op};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CHUNK: usize = 1 << 20;
const TARGET_CREATES: f64 = 10_000.0;
const TARGET_WRITE_RATIO: f64 = 0.5;
/// Where exports and native files go: `$IZO_BENCH_ROOT` (bench/core points
/// it at a fresh loop-mounted ext4), else /var/tmp.
fn bench_root() -> String {
    std::env::var("IZO_BENCH_ROOT").unwrap_or_else(|_| "/var/tmp".into())
}
const PHASE_TIMEOUT: Duration = Duration::from_secs(600);

struct Opts {
    quick: bool,
    runs: usize,
    creates: usize,
    write_bytes: usize,
    w2: PathBuf,
    /// Client silence timeout override (diagnosis only; default: the library's).
    silence: Option<Duration>,
}

fn parse_opts() -> Result<Opts> {
    let mut args = std::env::args().skip(1);
    let mut quick = false;
    let (mut runs, mut creates, mut mib, mut w2, mut silence) = (None, None, None, None, None);
    let num = |v: Option<String>, flag: &str| -> Result<usize> {
        let v = v.with_context(|| format!("{flag} needs a value"))?;
        v.parse().with_context(|| format!("{flag} {v}: not a number"))
    };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--runs" => runs = Some(num(args.next(), "--runs")?),
            "--creates" => creates = Some(num(args.next(), "--creates")?),
            "--mib" => mib = Some(num(args.next(), "--mib")?),
            "--silence-ms" => silence = Some(Duration::from_millis(num(args.next(), "--silence-ms")? as u64)),
            "--w2" => w2 = Some(PathBuf::from(args.next().context("--w2 needs a path")?)),
            // cargo bench passes --bench to harness = false targets.
            "--bench" => {}
            other => eprintln!("core: ignoring unknown argument {other:?}"),
        }
    }
    let data_dir = std::env::var("IZO_WORKLOADS").unwrap_or_else(|_| "/var/tmp/izo-workloads".into());
    let runs = runs.unwrap_or(if quick { 1 } else { 3 });
    ensure!(runs > 0, "--runs must be at least 1");
    Ok(Opts {
        quick,
        runs,
        creates: creates.unwrap_or(if quick { 5_000 } else { 20_000 }),
        write_bytes: mib.unwrap_or(if quick { 256 } else { 1024 }) * CHUNK,
        w2: w2.unwrap_or_else(|| Path::new(&data_dir).join("w2.bin")),
        silence,
    })
}

fn izo_bin() -> PathBuf {
    match std::env::var_os("IZO_BIN") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/release/izo"),
    }
}

/// `syncfs` of the file system holding `dir`.
fn syncfs(dir: &Path) -> Result<()> {
    let f = File::open(dir).with_context(|| format!("opening {} for syncfs", dir.display()))?;
    // SAFETY: the fd is open for the duration of the call.
    let r = unsafe { libc::syncfs(f.as_raw_fd()) };
    if r != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("syncfs of {}", dir.display()));
    }
    Ok(())
}

/// An `izo serve` child process on a fresh export.
struct ServerProc {
    child: Child,
    addr: String,
    fingerprint: String,
    token: String,
}

impl ServerProc {
    fn start(bin: &Path, base: &Path) -> Result<ServerProc> {
        let export = base.join("export");
        let state = base.join("state");
        std::fs::create_dir_all(&export).with_context(|| format!("creating export {}", export.display()))?;
        let mut child = Command::new(bin)
            .arg("serve")
            .arg(&export)
            .arg("--state")
            .arg(&state)
            .args(["--listen", "127.0.0.1:0", "--volume", "vol"])
            .args(std::env::var("IZO_BENCH_SERVE_ARGS").unwrap_or_default().split_whitespace())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {} serve (build it: cargo build --release -p izo)", bin.display()))?;
        let stdout = child.stdout.take().context("server stdout was not captured")?;
        let mut lines = BufReader::new(stdout).lines();
        let (mut addr, mut fingerprint) = (None, None);
        while addr.is_none() || fingerprint.is_none() {
            let Some(line) = lines.next() else {
                let status = child.wait().context("waiting for the failed server")?;
                bail!("izo serve exited before announcing its address ({status})");
            };
            let line = line.context("reading the server's stdout")?;
            if let Some(a) = line.strip_prefix("izo: listening on ") {
                addr = Some(a.trim().to_string());
            } else if let Some(f) = line.strip_prefix("izo: certificate fingerprint ") {
                fingerprint = Some(f.trim().to_string());
            }
        }
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines.map_while(|l| l.ok()) {});
        // (a token is created once the server has recorded its volume in the state dir)
        let out = Command::new(bin)
            .args(["token", "create", "--volume", "vol", "--label", "bench", "--state"])
            .arg(&state)
            .stderr(Stdio::inherit())
            .output()
            .with_context(|| format!("running {} token create", bin.display()))?;
        ensure!(out.status.success(), "izo token create failed: {}", out.status);
        let token = String::from_utf8(out.stdout).context("token is not UTF-8")?.trim().to_string();
        ensure!(!token.is_empty(), "izo token create printed nothing");
        Ok(ServerProc {
            child,
            addr: addr.context("no address")?,
            fingerprint: fingerprint.context("no fingerprint")?,
            token,
        })
    }

    async fn connect(&self, silence: Option<Duration>) -> Result<Client> {
        let mut cfg = ClientConfig::new(self.addr.clone(), "vol", self.token.clone());
        cfg.fingerprint = Some(self.fingerprint.clone());
        if let Some(s) = silence {
            cfg.silence = s;
        }
        Client::connect(cfg).await.with_context(|| format!("connecting to the server at {}", self.addr))
    }

    fn stop(mut self) -> Result<()> {
        self.child.kill().context("stopping the server")?;
        self.child.wait().context("waiting for the stopped server")?;
        Ok(())
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

type Stats = Vec<(String, u64)>;

fn stat(s: &Stats, name: &str) -> u64 {
    s.iter().find(|(k, _)| k == name).map(|(_, v)| *v).unwrap_or(0)
}

/// Server counters a phase moved.
#[derive(Clone, Copy, Default)]
struct Delta {
    batches: u64,
    fsyncs: u64,
    records: u64,
    reconnects: u64,
}

impl Delta {
    fn between(a: &Stats, b: &Stats, reconnects: u64) -> Delta {
        let d = |k| stat(b, k).saturating_sub(stat(a, k));
        Delta { batches: d("batches"), fsyncs: d("fsyncs"), records: d("records"), reconnects }
    }

    fn show(&self) -> String {
        let per = if self.batches > 0 { self.records as f64 / self.batches as f64 } else { 0.0 };
        format!(
            "batches={} fsyncs={} records={} records/batch={per:.1} reconnects={}",
            self.batches, self.fsyncs, self.records, self.reconnects
        )
    }
}

/// Wait until the server has applied every record it committed (acks come
/// before the tree apply), so the next phase does not share the disk with it.
async fn quiesce(c: &Client) -> Result<()> {
    let start = Instant::now();
    loop {
        let s = c.server_stats().await.context("reading server counters")?;
        if stat(&s, "ops_applied") >= stat(&s, "records") {
            return Ok(());
        }
        if start.elapsed() > PHASE_TIMEOUT {
            bail!("server still applying after {PHASE_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Submit every op pipelined, then wait for every ack; time to the last ack.
async fn pipelined(c: &Client, ops: Vec<Op>, what: &str) -> Result<Duration> {
    let run = async {
        let t0 = Instant::now();
        let mut pending = Vec::with_capacity(ops.len());
        for op in ops {
            pending.push(c.submit(op).await.with_context(|| format!("submitting a {what}"))?);
        }
        for p in pending {
            let cseq = p.cseq;
            p.wait().await.with_context(|| format!("{what} with client seq {cseq} failed"))?;
        }
        anyhow::Ok(t0.elapsed())
    };
    tokio::time::timeout(PHASE_TIMEOUT, run).await.with_context(|| format!("{what}s not all acked in time"))?
}

fn native_creates(dir: &Path, n: usize) -> Result<Duration> {
    std::fs::create_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
    let names: Vec<PathBuf> = (0..n).map(|i| dir.join(format!("f{i:06}"))).collect();
    syncfs(dir)?;
    let t0 = Instant::now();
    for p in &names {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(p)
            .with_context(|| format!("creating native file {}", p.display()))?;
    }
    File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("fsync of directory {}", dir.display()))?;
    // The files stay until the whole bench ends: on this ext4 (no journal)
    // inode allocation skips inodes freed in the last minutes, so deleting
    // them here would slow the next round's creates.
    Ok(t0.elapsed())
}

fn native_write(path: &Path, data: &[u8]) -> Result<Duration> {
    syncfs(path.parent().context("native file has no parent")?)?;
    let t0 = Instant::now();
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("creating native file {}", path.display()))?;
    for chunk in data.chunks(CHUNK) {
        f.write_all(chunk).with_context(|| format!("writing {}", path.display()))?;
    }
    f.sync_all().with_context(|| format!("fsync of {}", path.display()))?;
    let t = t0.elapsed();
    drop(f);
    std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
    Ok(t)
}

async fn izo_creates(c: &Client, n: usize, sync_dir: &Path) -> Result<(Duration, Delta)> {
    let ops: Vec<Op> = (0..n)
        .map(|i| Op::Create {
            parent: ObjectId::ROOT,
            name: format!("f{i:06}").into_bytes(),
            id: ObjectId::new(),
            mode: 0o644,
            uid: 0,
            gid: 0,
        })
        .collect();
    quiesce(c).await?;
    syncfs(sync_dir)?;
    let s0 = c.server_stats().await.context("reading server counters")?;
    let r0 = c.wire_counters().2;
    let t = pipelined(c, ops, "create").await?;
    let s1 = c.server_stats().await.context("reading server counters")?;
    Ok((t, Delta::between(&s0, &s1, c.wire_counters().2 - r0)))
}

async fn izo_write(c: &Client, data: &[u8], sync_dir: &Path) -> Result<(Duration, Delta)> {
    let id = ObjectId::new();
    let create = Op::Create { parent: ObjectId::ROOT, name: b"w2.bin".to_vec(), id, mode: 0o644, uid: 0, gid: 0 };
    c.mutate(create).await.context("creating the write target")?;
    // Building the owned ops copies the data; that stays outside the timing,
    // as the native side writes straight from the buffer.
    let ops: Vec<Op> = data
        .chunks(CHUNK)
        .enumerate()
        .map(|(i, chunk)| Op::Write { id, base: 0, offset: (i * CHUNK) as u64, data: chunk.to_vec() })
        .collect();
    quiesce(c).await?;
    syncfs(sync_dir)?;
    let s0 = c.server_stats().await.context("reading server counters")?;
    let r0 = c.wire_counters().2;
    let t = pipelined(c, ops, "write").await?;
    let s1 = c.server_stats().await.context("reading server counters")?;
    Ok((t, Delta::between(&s0, &s1, c.wire_counters().2 - r0)))
}

fn read_w2(path: &Path, len: usize) -> Result<Vec<u8>> {
    let f = File::open(path)
        .with_context(|| format!("opening W2 at {} (build it with bench/core or w1.sh)", path.display()))?;
    let mut data = Vec::with_capacity(len);
    f.take(len as u64).read_to_end(&mut data).with_context(|| format!("reading {}", path.display()))?;
    ensure!(data.len() == len, "{} holds {} bytes, fewer than the {len} wanted", path.display(), data.len());
    Ok(data)
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

struct Round {
    izo_creates: f64,
    native_creates: f64,
    izo_mbs: f64,
    native_mbs: f64,
}

/// One round of all four measurements on a fresh server and temp dir; the
/// dir is returned so it outlives the remaining rounds (see `native_creates`).
fn round(
    rt: &tokio::runtime::Runtime,
    opts: &Opts,
    bin: &Path,
    data: &[u8],
    r: usize,
) -> Result<(Round, tempfile::TempDir)> {
    let tmp = tempfile::Builder::new()
        .prefix("izo-bench-")
        .tempdir_in(bench_root())
        .with_context(|| format!("making a temp dir in {}", bench_root()))?;
    let base = tmp.path();
    let server = ServerProc::start(bin, &base.join("izo"))?;
    let mb = data.len() as f64 / 1e6;
    let out = rt.block_on(async {
        let c = server.connect(opts.silence).await?;

        // Odd rounds measure native first, even rounds intermezzo first, so a
        // drift within a round (ext4's recently-deleted-inode window closing,
        // another tenant's load) does not always favour the same side.
        let native_first = r % 2 == 1;
        let order = if native_first { "native first" } else { "intermezzo first" };

        let native_dir = base.join("native-creates");
        let (t_nc, (t_ic, d_ic)) = if native_first {
            let n = native_creates(&native_dir, opts.creates)?;
            (n, izo_creates(&c, opts.creates, base).await?)
        } else {
            let i = izo_creates(&c, opts.creates, base).await?;
            quiesce(&c).await?;
            (native_creates(&native_dir, opts.creates)?, i)
        };
        let n = opts.creates as f64;
        let (nc, ic) = (n / t_nc.as_secs_f64(), n / t_ic.as_secs_f64());
        println!(
            "run {r}: creates   native {t_nc:>9.3?} {nc:>9.0}/s | intermezzo {t_ic:>9.3?} {ic:>9.0}/s | ratio {:.2} | {} | {order}",
            ic / nc,
            d_ic.show()
        );

        quiesce(&c).await?;
        let native_file = base.join("native-w2.bin");
        let (t_nw, (t_iw, d_iw)) = if native_first {
            let n = native_write(&native_file, data)?;
            (n, izo_write(&c, data, base).await?)
        } else {
            let i = izo_write(&c, data, base).await?;
            quiesce(&c).await?;
            (native_write(&native_file, data)?, i)
        };
        let (nw, iw) = (mb / t_nw.as_secs_f64(), mb / t_iw.as_secs_f64());
        println!(
            "run {r}: writes    native {t_nw:>9.3?} {nw:>7.1} MB/s | intermezzo {t_iw:>9.3?} {iw:>7.1} MB/s | ratio {:.2} | {} | {order}",
            iw / nw,
            d_iw.show()
        );
        let all = c.server_stats().await.context("reading server counters")?;
        let show: Vec<String> = all.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("run {r}: server counters {}", show.join(" "));
        c.close();
        anyhow::Ok(Round { izo_creates: ic, native_creates: nc, izo_mbs: iw, native_mbs: nw })
    });
    server.stop()?;
    Ok((out?, tmp))
}

fn main() -> Result<()> {
    // The same allocator settings as the `izo` binary (whose client this
    // stands in for): multi-MiB frames stay in the heap.
    // SAFETY: mallopt only tunes the allocator.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
    let opts = parse_opts()?;
    let bin = izo_bin();
    ensure!(bin.is_file(), "{} not found: run `cargo build --release -p izo` or set IZO_BIN", bin.display());
    let data = read_w2(&opts.w2, opts.write_bytes)?;
    println!(
        "core bench: {} runs, {} creates, {} MiB of {} in {} KiB writes, izo {}, dir {}{}",
        opts.runs,
        opts.creates,
        opts.write_bytes / CHUNK,
        opts.w2.display(),
        CHUNK / 1024,
        bin.display(),
        bench_root(),
        if opts.quick { " (quick)" } else { "" }
    );
    if let Some(s) = opts.silence {
        println!("client silence timeout overridden to {s:?} (diagnosis run; headline figures use the default)");
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    let (mut rounds, mut dirs) = (Vec::new(), Vec::new());
    for r in 1..=opts.runs {
        let (round, dir) = round(&rt, &opts, &bin, &data, r)?;
        rounds.push(round);
        dirs.push(dir);
    }
    for d in dirs {
        let shown = d.path().display().to_string();
        d.close().with_context(|| format!("removing the bench temp dir {shown}"))?;
    }
    // Clean inode-table blocks shorten ext4's "recently deleted" window for
    // whatever creates files next (see `native_creates`).
    syncfs(Path::new(&bench_root()))?;
    let col = |f: fn(&Round) -> f64| median(&rounds.iter().map(f).collect::<Vec<_>>());
    let (ic, nc) = (col(|r| r.izo_creates), col(|r| r.native_creates));
    let (iw, nw) = (col(|r| r.izo_mbs), col(|r| r.native_mbs));
    let met = |ok: bool| if ok { "yes" } else { "NO" };
    println!();
    println!("medians of {} runs", opts.runs);
    println!("| metric | intermezzo | native | ratio | target | met |");
    println!("|---|---:|---:|---:|---|---|");
    println!(
        "| acked creates/s | {ic:.0} | {nc:.0} | {:.2} | >= {TARGET_CREATES:.0}/s | {} |",
        ic / nc,
        met(ic >= TARGET_CREATES)
    );
    println!(
        "| write MB/s | {iw:.1} | {nw:.1} | {:.2} | >= {TARGET_WRITE_RATIO:.2} x native | {} |",
        iw / nw,
        met(iw / nw >= TARGET_WRITE_RATIO)
    );
    Ok(())
}

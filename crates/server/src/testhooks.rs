//! Test-only switches, read from the environment once at start. They exist
//! to inject faults (a crash at a chosen point) and to prove that tests
//! catch a broken mechanism (no reply cache); production never sets them.

/// Where to crash the process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CrashAt {
    /// After staging and appending a batch holding this op kind, before its commit.
    PreCommit(String),
    /// After committing a batch holding this op kind, before applying it.
    Commit(String),
    /// After applying a batch holding this op kind, before the next checkpoint.
    Apply(String),
    /// After applying a record of this op kind, before the applied marker moves.
    Unmarked(String),
}

/// The switches.
#[derive(Clone, Debug, Default)]
pub struct TestHooks {
    /// `IZO_TEST_CRASH=commit:<op>|apply:<op>`.
    pub crash: Option<CrashAt>,
    /// `IZO_TEST_NO_REPLY_CACHE=1`: treat resent ops as new ones.
    pub no_reply_cache: bool,
    /// `IZO_TEST_NO_CHECKPOINT=1`: never checkpoint while running.
    pub no_checkpoint: bool,
    /// `IZO_TEST_KILL_AFTER_COMMIT=<percent>`: after each commit, die with
    /// this probability (a crash test's random moments include the window
    /// between the ack point and the reply).
    pub kill_after_commit: u32,
    /// `IZO_TEST_KILL_ONCE_AFTER_COMMIT=<path>`: die right after the first
    /// commit that finds this file missing, creating it first, so exactly one
    /// process of a restarted series dies there (a control that cannot miss).
    pub kill_once_after_commit: Option<std::path::PathBuf>,
    /// `IZO_TEST_CAPTURE_STALL=<path>`: the capture reader reads nothing
    /// until this file exists, so a burst of changes overflows the kernel queue.
    pub capture_stall: Option<std::path::PathBuf>,
    /// `IZO_TEST_APPLY_PAUSE_MS=<ms>`: wait this long between a commit and
    /// its apply (a test changes the export in that window).
    pub apply_pause_ms: u64,
}

impl TestHooks {
    /// Read the switches from the environment.
    pub fn from_env() -> Self {
        let flag = |k: &str| std::env::var(k).is_ok_and(|v| v == "1");
        let crash = std::env::var("IZO_TEST_CRASH").ok().and_then(|v| {
            let (at, op) = v.split_once(':')?;
            match at {
                "commit" => Some(CrashAt::Commit(op.to_string())),
                "precommit" => Some(CrashAt::PreCommit(op.to_string())),
                "apply" => Some(CrashAt::Apply(op.to_string())),
                "unmarked" => Some(CrashAt::Unmarked(op.to_string())),
                _ => None,
            }
        });
        TestHooks {
            crash,
            no_reply_cache: flag("IZO_TEST_NO_REPLY_CACHE"),
            no_checkpoint: flag("IZO_TEST_NO_CHECKPOINT"),
            kill_after_commit: std::env::var("IZO_TEST_KILL_AFTER_COMMIT")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            kill_once_after_commit: std::env::var_os("IZO_TEST_KILL_ONCE_AFTER_COMMIT").map(Into::into),
            capture_stall: std::env::var_os("IZO_TEST_CAPTURE_STALL").map(Into::into),
            apply_pause_ms: std::env::var("IZO_TEST_APPLY_PAUSE_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(0),
        }
    }

    /// Wait between a commit and its apply, if asked to.
    pub fn maybe_pause_before_apply(&self) {
        if self.apply_pause_ms > 0 {
            std::thread::sleep(std::time::Duration::from_millis(self.apply_pause_ms));
        }
    }

    /// Die with the configured probability right after a commit.
    pub fn maybe_kill_after_commit(&self) {
        if let Some(marker) = &self.kill_once_after_commit {
            if std::fs::OpenOptions::new().write(true).create_new(true).open(marker).is_ok() {
                eprintln!("izo: test hook crash (once, after commit)");
                unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
            }
        }
        if self.kill_after_commit == 0 {
            return;
        }
        let t =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let r = (t ^ (t >> 7)).wrapping_mul(2_654_435_761) % 100;
        if r < self.kill_after_commit {
            eprintln!("izo: test hook crash (random, after commit)");
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
    }

    /// Kill the process after a batch is staged, before its commit.
    pub fn maybe_crash_precommit(&self, kinds: &[&str]) {
        if matches!(&self.crash, Some(CrashAt::PreCommit(k)) if kinds.contains(&k.as_str())) {
            eprintln!("izo: test hook crash ({:?})", self.crash);
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
    }

    /// Kill the process between applying a record and moving the marker.
    pub fn maybe_crash_unmarked(&self, kind: &str) {
        if matches!(&self.crash, Some(CrashAt::Unmarked(k)) if k == kind) {
            eprintln!("izo: test hook crash ({:?})", self.crash);
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
    }

    /// Kill the process here if the switch names this point and op kind.
    pub fn maybe_crash(&self, at_commit: bool, kinds: &[&str]) {
        let hit = match &self.crash {
            Some(CrashAt::Commit(k)) => at_commit && kinds.contains(&k.as_str()),
            Some(CrashAt::Apply(k)) => !at_commit && kinds.contains(&k.as_str()),
            Some(CrashAt::Unmarked(_)) | Some(CrashAt::PreCommit(_)) => false,
            None => false,
        };
        if hit {
            eprintln!("izo: test hook crash ({:?})", self.crash);
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
    }
}

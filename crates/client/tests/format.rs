//! A cache written by the previous format (format 1, before formats were
//! numbered) opens with this build: upgraded on open, with its namespace,
//! its unsent changes and the log a SIGKILL left, so an upgrade never
//! strands a laptop's offline changes.
//!
//! The fixture `fixtures/cache-format-1.tar.gz` was written by the
//! previous release (commit 73f96e1): a mount made `synced-dir/s.txt`
//! while connected; with the server stopped it wrote `offline.txt`, made
//! `offline-dir/in.txt`, chmod 600 `synced-dir/s.txt`, `touch -d
//! 2001-01-01` on `offline.txt`, renamed `before.txt` to
//! `renamed-offline.txt`, waited for a fold, wrote `log-only.txt`, and was
//! SIGKILLed (so the last change is only in the log).

use izo_client::cache::Cache;
use izo_client::format::CACHE_FORMAT;
use izo_proto::{ObjectId, Op};
use std::path::{Path, PathBuf};

fn unpack() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cache-format-1.tar.gz");
    let st = std::process::Command::new("tar").arg("xzf").arg(&fixture).arg("-C").arg(tmp.path()).status();
    assert!(st.expect("run tar").success(), "unpacking {}", fixture.display());
    let dir = tmp.path().join("cache");
    (tmp, dir)
}

fn find(c: &Cache, path: &str) -> ObjectId {
    let mut at = ObjectId::ROOT;
    for part in path.split('/') {
        at = c.lookup(at, part.as_bytes()).expect("lookup").unwrap_or_else(|| panic!("{path}: no {part}"));
    }
    at
}

#[test]
fn a_cache_of_the_previous_format_opens_with_its_offline_changes() {
    let (_tmp, dir) = unpack();
    let log = std::fs::read_dir(&dir)
        .expect("list")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "log"))
        .expect("the killed daemon's log");
    let c = Cache::open(&dir).expect("a format-1 cache opens");
    assert_eq!(c.meta("format").expect("meta"), CACHE_FORMAT, "the upgrade records the format");
    assert!(std::fs::read(&log).expect("log").starts_with(b"izolog2\n"), "the log is rewritten in format 2");
    c.replay_log().expect("the killed daemon's log replays");

    let off = c.get(find(&c, "offline.txt")).expect("get").expect("offline.txt");
    assert_eq!(off.attr.mtime.secs, 978_307_200, "touch -d made offline");
    assert_eq!(std::fs::read(c.data_path(off.attr.id)).expect("data"), b"offline one\n");
    let s = c.get(find(&c, "synced-dir/s.txt")).expect("get").expect("s.txt");
    assert_eq!(s.attr.mode & 0o7777, 0o600, "chmod made offline");
    find(&c, "renamed-offline.txt");
    assert!(c.lookup(ObjectId::ROOT, b"before.txt").expect("lookup").is_none(), "renamed away offline");
    let log_only = find(&c, "log-only.txt");
    assert_eq!(std::fs::read(c.data_path(log_only)).expect("data"), b"in the log only\n", "a change only in the log");
    assert_eq!(std::fs::read(c.data_path(find(&c, "offline-dir/in.txt"))).expect("data"), b"inside\n");

    // every unsent change is still queued, decoded as today's ops
    let kinds: Vec<&str> = c.cml().expect("cml").iter().map(|(_, e)| e.op.kind()).collect();
    for k in ["create", "mkdir", "setattr", "rename"] {
        assert!(kinds.contains(&k), "no queued {k} among {kinds:?}");
    }
    let renamed = c.cml().expect("cml").into_iter().any(|(_, e)| {
        matches!(&e.op, Op::Rename { name, new_name, .. } if name == b"before.txt" && new_name == b"renamed-offline.txt")
    });
    assert!(renamed, "the offline rename is queued as it was made");
    drop(c);
    // a second open finds nothing to upgrade and the same namespace
    let c = Cache::open(&dir).expect("reopens");
    c.replay_log().expect("replays");
    find(&c, "log-only.txt");
}

#[test]
fn a_cache_of_a_newer_format_is_refused_with_what_to_do() {
    let (_tmp, dir) = unpack();
    drop(Cache::open(&dir).expect("upgrades"));
    {
        let db = redb::Database::open(dir.join("cache.redb")).expect("open db");
        let tx = db.begin_write().expect("tx");
        {
            let meta: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");
            tx.open_table(meta).expect("meta").insert("format", CACHE_FORMAT + 1).expect("insert");
        }
        tx.commit().expect("commit");
    }
    let err = match Cache::open(&dir) {
        Ok(_) => panic!("a newer format must not open"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("newer intermezzo") && err.contains("--cache"), "{err}");
}

//! Opening a volume: state dir, store, tree, crash replay, the actor thread.

use crate::auth::Tokens;
use crate::config::ServerConfig;
use crate::counters::Counters;
use crate::hint::Hint;
use crate::lock::Locks;
use crate::testhooks::TestHooks;
use crate::tree::Tree;
use crate::volume::{Actor, Shared, Tuning, Work};
use crate::{sys, tls, ServerError};
use izo_journal::Store;
use izo_proto::{ObjectId, Timestamp};
use std::collections::HashMap;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::AtomicBool;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// A running volume server.
pub struct Server {
    /// Volume name.
    pub volume: String,
    /// Certificate fingerprint clients pin.
    pub fingerprint: String,
    pub(crate) shared: Arc<Shared>,
    pub(crate) tx: Mutex<mpsc::Sender<Work>>,
    stopped: Mutex<mpsc::Receiver<()>>,
    pub(crate) tokens: Tokens,
    pub(crate) acceptor: tokio_rustls::TlsAcceptor,
    pub(crate) policy: crate::policy::Policy,
    /// Connections not authenticated yet may take these (one each).
    pub(crate) handshakes: Arc<tokio::sync::Semaphore>,
    /// Replicas holding replies this state never recorded are let in (the
    /// operator accepted a restored state dir).
    pub(crate) accept_rollback: bool,
    /// Held while the server runs: nobody else serves this export or state.
    _locks: Locks,
}

/// Connections that may be in their handshake at once; more are closed at
/// once, so unauthenticated peers cannot hold much memory.
pub const MAX_HANDSHAKES: usize = 64;

impl Server {
    /// Claim the state dir and the export ([`Locks::take`]), then open the
    /// volume ([`Server::open_locked`]).
    pub fn open(cfg: &ServerConfig) -> Result<Arc<Server>, ServerError> {
        let locks = Locks::take(cfg)?;
        Self::open_locked(cfg, locks)
    }

    /// Open the volume described by `cfg`, holding its locks: create or
    /// load its state, replay the journal, and start the actor thread.
    pub fn open_locked(cfg: &ServerConfig, locks: Locks) -> Result<Arc<Server>, ServerError> {
        let export = &cfg.export;
        let meta = std::fs::metadata(export)
            .map_err(|e| ServerError::io(format!("export directory {}", export.display()), e))?;
        if !meta.is_dir() {
            return Err(ServerError::Config(format!("export {} is not a directory", export.display())));
        }
        let state = cfg.state_path();
        let mut tree =
            Tree::open(export).map_err(|e| ServerError::io(format!("opening export {}", export.display()), e))?;
        let st = sys::fstatat(tree.stage(), b"").map_err(|e| ServerError::io("stat of the stage directory", e))?;
        if (st.st_dev, st.st_ino) != locks.stage {
            return Err(ServerError::Config(format!(
                "export {} changed while it was being opened (another directory is there now)",
                export.display()
            )));
        }
        crate::config::record_volume(&state, &cfg.volume_name())
            .map_err(|e| ServerError::io(format!("recording the volume name in {}", state.display()), e))?;
        // The root's attributes as they are once the stage directory exists.
        let meta = std::fs::metadata(export)
            .map_err(|e| ServerError::io(format!("export directory {}", export.display()), e))?;
        let root = (
            meta.mode() & 0o7777,
            meta.uid(),
            meta.gid(),
            Timestamp { secs: meta.mtime(), nsec: meta.mtime_nsec() as u32 },
        );
        let store = Arc::new(Store::open(&state.join("volume.redb"), root)?);
        if cfg.accept_rollback {
            let old = store.incarnation();
            let new = store.new_incarnation()?;
            tracing::warn!(
                "accepting a restored state dir (--accept-rollback): incarnation {old:032x} is now {new:032x}; \
                 every client resyncs from a snapshot"
            );
        }
        let rh = tree.root_handle().map_err(|e| {
            ServerError::io(
                format!("file handle of {} (the server needs root for open_by_handle_at)", export.display()),
                e,
            )
        })?;
        if store.object(ObjectId::ROOT).map(|r| r.handle != rh).unwrap_or(true) {
            store.set_handle(ObjectId::ROOT, &rh)?;
        }
        let max =
            tree.probe_max_file_size().map_err(|e| ServerError::io("probing the export's largest file size", e))?;
        store.max_file_size.store(max, std::sync::atomic::Ordering::Relaxed);
        let room = tree.probe_xattr_room().map_err(|e| ServerError::io("probing the export's xattr room", e))?;
        store.xattr_room.store(room, std::sync::atomic::Ordering::Relaxed);
        store.trusted.store(cfg.trusted, std::sync::atomic::Ordering::Relaxed);
        let hooks = TestHooks::from_env();
        let counters = Arc::new(Counters::default());
        let (mut hint, marked) =
            Hint::open(tree.stage()).map_err(|e| ServerError::io("reading the applied marker", e))?;
        if marked > store.head() {
            tracing::warn!(
                "the export's applied marker ({marked}) is past this journal's head ({}): it belongs to other \
                 server state; starting from the journal",
                store.head()
            );
            hint.reset(store.head()).map_err(|e| ServerError::io("resetting the applied marker", e))?;
        }
        let marked = marked.min(store.head());
        // Appends written before a commit that never happened are cut off.
        for id in tree.intents().map_err(|e| ServerError::io("reading the stage directory", e))? {
            if let Ok(row) = store.object(id) {
                tree.cut_to(&row.handle, row.size, row.mtime)
                    .map_err(|e| ServerError::io(format!("cutting {id} to its committed size"), e))?;
            }
            tree.clear_intent(id);
        }
        let replayed = crate::replay::replay(&store, &mut tree, marked, &counters)
            .map_err(|e| ServerError::Config(format!("replay: {e}")))?;
        let readonly = !replayed.left.is_empty();
        if !readonly {
            sys::syncfs(tree.root()).map_err(|e| ServerError::io("syncfs after replay", e))?;
            store.set_checkpoint(store.head(), store.settled()?)?;
            tree.clear_stage().map_err(|e| ServerError::io("clearing the stage directory", e))?;
        }
        hint.set(replayed.applied);
        let (applied_tx, applied_rx) = tokio::sync::watch::channel(replayed.applied);
        let root_fd = tree.root().try_clone_to_owned().map_err(|e| ServerError::io("dup export fd", e))?;
        let shared = Arc::new(Shared {
            store: store.clone(),
            counters,
            applied: applied_rx,
            readonly: AtomicBool::new(readonly),
            root: root_fd,
            stop: AtomicBool::new(false),
            scanned: AtomicBool::new(false),
        });
        let identity = tls::load_or_create(&state)?;
        let fingerprint = tls::fingerprint(&identity.cert);
        let acceptor = tls::acceptor(&identity)?;
        let tuning = Tuning {
            retain_records: cfg.retain_records,
            retain_age: Duration::from_secs(cfg.retain_secs),
            retain_bytes: cfg.retain_bytes,
            checkpoint_every: Duration::from_millis(cfg.checkpoint_ms),
            ..Tuning::default()
        };
        let mut dirty = HashMap::new();
        for id in store.stale_objects().unwrap_or_default() {
            dirty.insert(id, Instant::now());
        }
        let checkpointed = Arc::new(std::sync::atomic::AtomicU64::new(store.checkpoint().unwrap_or(0)));
        let (tx, rx) = mpsc::channel();
        let background = crate::background::Background {
            store: store.clone(),
            root: tree.root().try_clone_to_owned().map_err(|e| ServerError::io("dup export fd", e))?,
            counters: shared.counters.clone(),
            tuning: tuning.clone(),
            checkpointed: checkpointed.clone(),
            results: cfg.capture.then(|| tx.clone()),
        }
        .spawn()
        .map_err(|e| ServerError::io("starting the background thread", e))?;
        let (background, background_join) = background;
        let mut local = crate::volume::Local::default();
        local.rescan = cfg.rescan;
        if cfg.capture {
            let started = crate::capture::Fanotify::new(tree.root()).and_then(|fan| {
                if let Err(e) = fan.ignore(tree.stage()) {
                    tracing::debug!("fanotify ignore mark on the stage directory: {e}");
                }
                let sink = tx.clone();
                let stall = hooks.capture_stall.clone();
                crate::capture::spawn(Arc::new(fan), stall, move |events| sink.send(Work::Local(events)).is_ok())
            });
            match started {
                Ok(c) => {
                    local.capture = Some(c);
                    local.active = true;
                    local.root = Some(Arc::new(
                        tree.root().try_clone_to_owned().map_err(|e| ServerError::io("dup export fd", e))?,
                    ));
                }
                Err(e) => tracing::warn!(
                    "out-of-band capture is off: fanotify on {} failed: {e} (needs root and a file system \
                     with file handles); changes other programs make in the export are not journaled",
                    export.display()
                ),
            }
        }
        let actor = Actor {
            store: store.clone(),
            tree,
            shared: shared.clone(),
            applied_tx,
            hint,
            hooks,
            tuning,
            pending: replayed.left.into(),
            staged_writes: Vec::new(),
            dirty,
            hashes: Vec::new(),
            last_checkpoint: (store.checkpoint().unwrap_or(0), Instant::now(), 0),
            background,
            checkpointed,
            direct: HashMap::new(),
            touched: Default::default(),
            staged_ids: Vec::new(),
            replay_marked: replayed.marked,
            local,
            fences: Default::default(),
            skip_once: Default::default(),
        };
        let (done_tx, done_rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("izo-volume".into())
            .spawn(move || {
                actor.run(rx);
                // the actor is gone: the background thread ends after its last job
                let _ = background_join.join();
                let _ = done_tx.send(());
            })
            .map_err(|e| ServerError::io("starting the volume thread", e))?;
        let _ = shared.root.as_fd();
        Ok(Arc::new(Server {
            volume: cfg.volume_name(),
            fingerprint,
            shared,
            tx: Mutex::new(tx),
            stopped: Mutex::new(done_rx),
            tokens: Tokens::new(&state),
            acceptor,
            policy: crate::policy::Policy {
                owners: cfg.owners,
                squash: (cfg.squash_uid.unwrap_or(meta.uid()), cfg.squash_gid.unwrap_or(meta.gid())),
                trusted: cfg.trusted,
            },
            handshakes: Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES)),
            accept_rollback: cfg.accept_rollback,
            _locks: locks,
        }))
    }

    /// Stop cleanly: finish the batch in hand, checkpoint, stop the volume
    /// thread. Returns false if that took longer than `timeout`.
    pub fn shutdown(&self, timeout: Duration) -> bool {
        self.shared.stop.store(true, std::sync::atomic::Ordering::Release);
        let rx = self.stopped.lock().unwrap_or_else(|p| p.into_inner());
        rx.recv_timeout(timeout).is_ok()
    }

    /// Server counters by name.
    pub fn counters(&self) -> Vec<(String, u64)> {
        self.shared.counters.snapshot()
    }

    /// Volume incarnation.
    pub fn incarnation(&self) -> u128 {
        self.shared.store.incarnation()
    }

    /// Whether the volume refuses mutations after a failed apply or replay.
    pub fn is_readonly(&self) -> bool {
        self.shared.readonly.load(std::sync::atomic::Ordering::Acquire)
    }
}

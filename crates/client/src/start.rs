//! Starting a replicate-mode client: the one path `izo mount` and `izo
//! demo` both take. It opens the cache, speaks as the replica the cache
//! remembers, trusts the server's certificate as given or as remembered
//! (trust on first use otherwise), loads what an earlier run left unsent,
//! checks the volume's incarnation and fills an empty cache. What it must
//! never do: print, or know the mount (the caller mounts and says what
//! happens, from the [`Progress`] events).

use crate::cache::{Cache, CacheError};
use crate::replica::{self, Replica, ReplicaError};
use crate::tls::Mismatch;
use crate::{Client, ClientConfig, ClientError};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// What starting a client needs.
#[derive(Clone, Debug)]
pub struct StartOpts {
    /// The server, `host:port`.
    pub addr: String,
    /// The volume's name.
    pub volume: String,
    /// The access token.
    pub token: String,
    /// A certificate fingerprint the user gave (replaces the remembered one).
    pub fingerprint: Option<String>,
    /// The cache directory.
    pub cache_dir: PathBuf,
    /// close(2) waits until the server has the file's changes.
    pub sync_close: bool,
}

/// What happens while a client starts, for the caller to show.
#[derive(Debug)]
pub enum Progress<'a> {
    /// No fingerprint was given or remembered: the server's certificate is
    /// trusted and remembered in `file`.
    FirstTrust {
        /// The certificate's fingerprint.
        fingerprint: String,
        /// Where it is remembered.
        file: PathBuf,
    },
    /// A given fingerprint replaces the one remembered in `file`.
    Replaced {
        /// The new fingerprint.
        fingerprint: String,
        /// The one remembered before.
        old: String,
        /// Where it is remembered.
        file: PathBuf,
    },
    /// The initial replication moved on.
    Replicating(&'a replica::Progress),
    /// The server cannot be reached now: the client starts from its cache
    /// (changes are kept and sent once it connects, in the background).
    Offline {
        /// Why it is not connected.
        why: String,
    },
}

/// Why a client did not start. Each says what failed and where; the
/// sources say why.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The cache could not be opened or read.
    #[error("opening the cache in {}", dir.display())]
    Cache {
        /// The cache directory.
        dir: PathBuf,
        /// What failed.
        #[source]
        source: CacheError,
    },
    /// The cache's replica id could not be read.
    #[error("reading the cache")]
    CacheRead(#[source] CacheError),
    /// The remembered fingerprint could not be read.
    #[error("reading {}", file.display())]
    PinRead {
        /// The fingerprint file.
        file: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The fingerprint file holds something else.
    #[error("{} does not hold a certificate fingerprint (SHA256:…): remove it, or pass --fingerprint", file.display())]
    PinGarbled {
        /// The fingerprint file.
        file: PathBuf,
    },
    /// The server's certificate could not be remembered.
    #[error("remembering the server's certificate in {}", file.display())]
    PinWrite {
        /// The fingerprint file.
        file: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The server presents a certificate other than the one trusted.
    #[error("{}", refused(addr, mismatch, file, *given))]
    Fingerprint {
        /// The server.
        addr: String,
        /// What it presents and what is trusted.
        mismatch: Mismatch,
        /// The fingerprint file.
        file: PathBuf,
        /// Whether the trusted one was given (not remembered).
        given: bool,
    },
    /// The server could not be reached or refused.
    #[error("connecting to {addr} for volume {volume:?} (check the address, token and fingerprint)")]
    Connect {
        /// The server.
        addr: String,
        /// The volume.
        volume: String,
        /// What failed.
        #[source]
        source: Box<ClientError>,
    },
    /// The changes an earlier run queued could not be loaded.
    #[error("loading the changes queued in {}", dir.display())]
    Load {
        /// The cache directory.
        dir: PathBuf,
        /// What failed.
        #[source]
        source: ReplicaError,
    },
    /// The volume's incarnation could not be checked against the cache.
    #[error("checking the volume's incarnation against the cache")]
    Incarnation(#[source] ReplicaError),
    /// The initial replication failed.
    #[error("initial replication")]
    InitialSync(#[source] ReplicaError),
}

fn refused(addr: &str, m: &Mismatch, file: &Path, given: bool) -> String {
    let (file, new) = (file.display(), &m.presented);
    match given {
        true => format!(
            "the server at {addr} presents certificate {new}, not {} given with --fingerprint: check the \
             fingerprint `izo serve` printed",
            m.pinned
        ),
        false => format!(
            "the server at {addr} presents certificate {new}, but this cache trusts {} (remembered in {file} at \
             its first mount). Someone may be impersonating the server. If its certificate changed on purpose \
             (a new state dir, for example), accept the new one with --fingerprint {new}, or remove {file}",
            m.pinned
        ),
    }
}

/// A started client: its replica, whose cache is filled.
pub struct Started {
    /// The replica (mount it, then [`Started::spawn`] its tasks).
    pub replica: Arc<Replica>,
}

/// The background tasks of a started client.
pub struct Tasks {
    /// Follows the record stream (and follows again after it stops).
    pub follower: tokio::task::JoinHandle<()>,
    /// Sends the queued changes.
    pub sender: tokio::task::JoinHandle<()>,
}

impl Started {
    /// Start following the record stream and sending changes, on the
    /// current runtime. Should the stream stop, `stopped` hears why, the
    /// stream is followed again 5 s later and `stopped` hears `None`.
    pub fn spawn(&self, stopped: impl Fn(Option<String>) + Send + 'static) -> Tasks {
        let replica = self.replica.clone();
        let follower = tokio::spawn(async move {
            first_connection(&replica).await;
            loop {
                let why = match replica.clone().follow().await {
                    Ok(()) => "it ended".to_string(),
                    Err(e) => e.to_string(),
                };
                stopped(Some(why));
                tokio::time::sleep(Duration::from_secs(5)).await;
                stopped(None);
            }
        });
        let sender = tokio::spawn(self.replica.clone().send());
        Tasks { follower, sender }
    }
}

/// The server certificate a cache trusts, kept beside it: taken at the
/// first start without a given fingerprint, replaced by a given one.
struct Pin {
    file: PathBuf,
}

impl Pin {
    fn read(&self) -> Result<Option<String>, StartError> {
        let text = match std::fs::read_to_string(&self.file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StartError::PinRead { file: self.file.clone(), source }),
        };
        let fp = text.trim();
        let hex = fp.strip_prefix("SHA256:").unwrap_or_default();
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(StartError::PinGarbled { file: self.file.clone() });
        }
        Ok(Some(fp.to_string()))
    }

    fn remember(&self, fp: &str, had: Option<&str>) -> Result<(), StartError> {
        if had.is_some_and(|h| h.eq_ignore_ascii_case(fp)) {
            return Ok(());
        }
        let tmp = self.file.with_extension("tmp");
        std::fs::write(&tmp, format!("{fp}\n"))
            .and_then(|_| std::fs::rename(&tmp, &self.file))
            .map_err(|source| StartError::PinWrite { file: self.file.clone(), source })
    }
}

/// Start a client as `izo mount` does, up to a filled cache; `progress`
/// hears what happens on the way. Must run inside a tokio runtime.
pub async fn start(opts: StartOpts, mut progress: impl FnMut(&Progress)) -> Result<Started, StartError> {
    let dir = opts.cache_dir.clone();
    let cache_err = |source| StartError::Cache { dir: dir.clone(), source };
    let cache = Cache::open(&dir).map_err(cache_err)?;
    let pin = Pin { file: dir.join("server-fingerprint") };
    let remembered = pin.read()?;
    let mut cfg = ClientConfig::new(opts.addr.clone(), opts.volume.clone(), opts.token.clone());
    // (the replica's sender sends what a broken connection left unanswered
    // again, in its log's order: see Engine::lost)
    cfg.resend = false;
    cfg.fingerprint = opts.fingerprint.clone().or(remembered.clone());
    // a restart speaks as the same replica (its queued changes keep their
    // seqs, which the server's reply cache knows under this id)
    if let Some(r) = cache.meta128("replica").map_err(StartError::CacheRead)? {
        cfg.replica = izo_proto::ReplicaId(r);
    }
    // a cache that follows the volume already comes up without the server
    // (a laptop rebooted on a train) and connects in the background
    let synced =
        cache.seq().map_err(StartError::CacheRead)? > 0 || cache.meta("synced").map_err(StartError::CacheRead)? == 1;
    let can_wait = synced && cfg.fingerprint.is_some();
    let connected =
        if can_wait { Client::connect_within(cfg, OFFLINE_AFTER).await } else { Client::connect(cfg).await };
    let client = match connected {
        Ok(c) => c,
        Err(ClientError::Fingerprint(mismatch)) => {
            let given = opts.fingerprint.is_some();
            return Err(StartError::Fingerprint { addr: opts.addr, mismatch, file: pin.file, given });
        }
        Err(e) => return Err(StartError::Connect { addr: opts.addr, volume: opts.volume, source: Box::new(e) }),
    };
    if let Some(fp) = client.server_fingerprint() {
        match (&opts.fingerprint, &remembered) {
            (None, None) => progress(&Progress::FirstTrust { fingerprint: fp.clone(), file: pin.file.clone() }),
            (Some(_), Some(old)) if !old.eq_ignore_ascii_case(&fp) => {
                progress(&Progress::Replaced { fingerprint: fp.clone(), old: old.clone(), file: pin.file.clone() })
            }
            _ => {}
        }
        pin.remember(&fp, remembered.as_deref())?;
    }
    let replica = Replica::new(client, cache, tokio::runtime::Handle::current())
        .map_err(|source| StartError::Load { dir: dir.clone(), source })?;
    replica.sync_close.store(opts.sync_close, std::sync::atomic::Ordering::Relaxed);
    if !replica.client.is_connected() {
        let why = replica.client.problem().map(|e| e.to_string()).unwrap_or_else(|| "not connected".into());
        progress(&Progress::Offline { why });
        return Ok(Started { replica });
    }
    replica.check_incarnation().map_err(StartError::Incarnation)?;
    replica.check_gap().map_err(StartError::Incarnation)?;
    replica.initial_sync(|p| progress(&Progress::Replicating(p))).await.map_err(StartError::InitialSync)?;
    replica.checked.store(true, std::sync::atomic::Ordering::Release);
    if let Err(e) = replica.learn_rules().await {
        tracing::warn!("asking the server for the volume's rules: {e}; the server decides when changes are sent");
    }
    Ok(Started { replica })
}

/// How long a start from a filled cache waits for the server before it
/// comes up offline.
const OFFLINE_AFTER: Duration = Duration::from_secs(1);

/// A mount that came up offline, at its first connection: the volume's
/// incarnation is checked (changes queued for a replaced volume are
/// parked) and a cache never filled is filled, before anything is sent or
/// followed. Retried until it works.
async fn first_connection(replica: &Replica) {
    use std::sync::atomic::Ordering;
    let mut pause = Duration::from_millis(100);
    while !replica.checked.load(Ordering::Acquire) {
        if replica.client.is_connected() {
            let checked = replica.check_incarnation().and_then(|()| replica.check_gap().map(drop));
            let checked = match checked {
                Ok(()) => replica.initial_sync(|_| {}).await,
                Err(e) => Err(e),
            };
            match checked {
                Ok(()) => {
                    tracing::info!("connected to the server: sending the changes made offline");
                    replica.checked.store(true, Ordering::Release);
                    replica.cml_wake.notify_one();
                    break;
                }
                Err(e) => tracing::warn!("checking the volume at the first connection: {e}; retrying"),
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

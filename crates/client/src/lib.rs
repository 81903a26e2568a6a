//! The intermezzo client library: a connection to one volume with pipelined,
//! exactly-once mutations (client seqs, resend after reconnect), queries,
//! streamed reads and the record stream. This crate holds the cache manager
//! as it grows; it must never know fuser types.

pub mod cache;
pub mod config;
mod conn;
pub mod engine;
pub mod error;
pub mod format;
mod local;
mod query;
pub mod refusals;
pub mod replica;
mod rollback;
pub mod start;
pub mod storage;
pub mod tls;

use izo_proto::*;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Semaphore};

/// Errors of the client library.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// Could not reach the server.
    #[error("cannot connect to {addr}: {why}")]
    Connect {
        /// Server address.
        addr: String,
        /// What failed.
        why: String,
    },
    /// The server refused the handshake.
    #[error("server refused the connection ({reason:?}): {message}")]
    Refused {
        /// Refusal class.
        reason: RefuseReason,
        /// Server's explanation.
        message: String,
    },
    /// The connection is gone and the client does not reconnect.
    #[error("disconnected from the server")]
    Disconnected,
    /// The server answered with an error.
    #[error(transparent)]
    Op(#[from] OpError),
    /// The server sent something unexpected.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The server's certificate is not the one pinned (given, or trusted
    /// at the first connection).
    #[error(transparent)]
    Fingerprint(#[from] tls::Mismatch),
}

/// How to reach and identify with a server.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// `host:port`.
    pub addr: String,
    /// Volume name.
    pub volume: String,
    /// Access token.
    pub token: String,
    /// Pinned certificate fingerprint (`SHA256:…`); `None` trusts on first use.
    pub fingerprint: Option<String>,
    /// This replica's id.
    pub replica: ReplicaId,
    /// Highest client seq answered in an earlier session.
    pub last_acked: u64,
    /// Reconnect and resend after a dropped connection.
    pub reconnect: bool,
    /// Send unanswered mutations again after a reconnect, in client-seq
    /// order. Off for a caller that sends them again itself, in its own
    /// order (a replica's modification log: its waiters see the
    /// connection's loss instead).
    pub resend: bool,
    /// Ping interval.
    pub heartbeat: Duration,
    /// Silence after which the connection is considered dead.
    pub silence: Duration,
    /// This machine's users (id, name), sent for volumes that map owners by
    /// name (see [`ClientConfig::with_local_ids`]).
    pub users: Vec<(u32, String)>,
    /// This machine's groups (id, name).
    pub groups: Vec<(u32, String)>,
}

impl ClientConfig {
    /// A config with the design's timing defaults and a fresh replica id.
    pub fn new(addr: impl Into<String>, volume: impl Into<String>, token: impl Into<String>) -> Self {
        ClientConfig {
            addr: addr.into(),
            volume: volume.into(),
            token: token.into(),
            fingerprint: None,
            replica: ReplicaId::random(),
            last_acked: 0,
            reconnect: true,
            resend: true,
            heartbeat: Duration::from_millis(250),
            silence: Duration::from_millis(750),
            users: Vec::new(),
            groups: Vec::new(),
        }
    }

    /// Fill the id tables from this machine's /etc/passwd and /etc/group.
    pub fn with_local_ids(mut self) -> Self {
        self.users = id_table("/etc/passwd");
        self.groups = id_table("/etc/group");
        self
    }
}

/// (id, name) pairs from a passwd/group-format file; unreadable means none.
fn id_table(path: &str) -> Vec<(u32, String)> {
    parse_id_table(&std::fs::read_to_string(path).unwrap_or_default())
}

/// What a subscription delivers.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    /// The next journal record.
    Record(Box<Record>),
    /// The requested position is behind retention: read a snapshot.
    SnapshotRequired {
        /// Oldest seq still streamable.
        oldest: Seq,
    },
}

/// One piece of a streamed read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// Bytes at an offset.
    Data(u64, Vec<u8>),
    /// A hole (reads as zeros) at an offset, with its length.
    Hole(u64, u64),
}

/// What a stream of several files carries, in order: each file's start
/// (or its absence), then its segments.
#[derive(Debug)]
pub enum FileSegment {
    /// The segments that follow are of `id`, whose first `size` bytes come.
    Start { id: ObjectId, size: u64 },
    /// `id` is gone or no longer a file.
    Missing(ObjectId),
    /// Data or a hole of the file last started.
    Seg(Segment),
}

type Waiter = oneshot::Sender<MutateResult>;

impl State {
    /// What the server may forget replies through.
    pub fn acked_through(&self) -> u64 {
        match self.durable_through {
            Some(d) => self.answered_through.min(d),
            None => self.answered_through,
        }
    }
}

pub(crate) struct State {
    pub conn: Option<mpsc::UnboundedSender<Vec<u8>>>,
    pub next_cseq: u64,
    pub unanswered: BTreeMap<u64, (Op, Option<Timestamp>, Vec<Waiter>)>,
    pub answered_through: u64,
    /// Highest client seq whose reply the server records (what the Hello
    /// claims).
    pub recorded_through: u64,
    /// With a modification log: the highest client seq through which every
    /// answer is durably recorded here. The server may drop its cached
    /// replies only up to it (a refusal lost to a crash before it was
    /// recorded is then answered again, not taken as applied). `None`: up
    /// to what is answered.
    pub durable_through: Option<u64>,
    pub next_qid: u64,
    pub queries: HashMap<u64, mpsc::Sender<Result<QueryReply, OpError>>>,
    pub sub: Option<(Seq, mpsc::UnboundedSender<StreamEvent>)>,
    pub fatal: Option<ClientError>,
}

pub(crate) struct Inner {
    pub cfg: ClientConfig,
    pub state: Mutex<State>,
    pub window: Semaphore,
    pub welcome: Mutex<Option<Welcome>>,
    pub seen_fp: Arc<Mutex<Option<String>>>,
    /// Why the last connection ended or the last attempt failed (cleared
    /// by a new connection).
    pub problem: Mutex<Option<ClientError>>,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub reconnects: AtomicU64,
    pub closed: AtomicBool,
    /// When the connection last came up or went down.
    pub link: Mutex<LinkLog>,
    /// The replica this client speaks as (changed only by
    /// [`Client::become_replica`]).
    pub replica: Mutex<ReplicaId>,
    /// Drops the current connection (a new one follows).
    pub kick: tokio::sync::Notify,
}

/// The connection's ups and downs (see [`Client::link`]).
#[derive(Debug)]
pub(crate) struct LinkLog {
    up: bool,
    since: std::time::Instant,
    since_wall: Timestamp,
    /// Time spent without a connection before `since`.
    offline_before: std::time::Duration,
}

impl LinkLog {
    /// The connection came up (`true`) or went down.
    pub(crate) fn set(&mut self, up: bool) {
        if self.up == up {
            return;
        }
        if !self.up {
            self.offline_before += self.since.elapsed();
        }
        *self = LinkLog { up, since: std::time::Instant::now(), since_wall: Timestamp::now(), ..*self };
    }
}

/// Whether the client is connected, since when, and how long it has been
/// without a connection since it started.
#[derive(Clone, Copy, Debug)]
pub struct Link {
    /// Connected now.
    pub up: bool,
    /// Since when (wall clock) it is up, or down.
    pub since: Timestamp,
    /// How long it is so.
    pub for_: std::time::Duration,
    /// Time without a connection since the client started.
    pub offline: std::time::Duration,
}

/// A connected client. Cheap to clone; all clones share one connection.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

/// A submitted mutation awaiting its reply.
pub struct Pending {
    /// Client seq of the op.
    pub cseq: u64,
    rx: oneshot::Receiver<MutateResult>,
}

impl Pending {
    /// Wait for the reply.
    pub async fn wait(self) -> Result<Applied, ClientError> {
        match self.rx.await {
            Ok(r) => r.map_err(ClientError::Op),
            Err(_) => Err(ClientError::Disconnected),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Client {
    /// Connect, handshake, and keep the connection up in the background.
    pub async fn connect(cfg: ClientConfig) -> Result<Client, ClientError> {
        let inner = Self::inner(cfg);
        let live = conn::establish(&inner).await?;
        let installed = conn::install(&inner, live);
        tokio::spawn(conn::supervise(inner.clone(), Some(installed)));
        Ok(Client { inner })
    }

    /// Like [`Client::connect`], but a server that cannot be reached
    /// within `first` is no error: the client starts disconnected and
    /// keeps trying in the background ([`Client::problem`] says why it is
    /// down). A refusal or a certificate mismatch still is an error.
    pub async fn connect_within(cfg: ClientConfig, first: std::time::Duration) -> Result<Client, ClientError> {
        let inner = Self::inner(cfg);
        let addr = inner.cfg.addr.clone();
        let attempt = match tokio::time::timeout(first, conn::establish(&inner)).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::Connect { addr, why: format!("no answer within {first:?}") }),
        };
        let installed = match attempt {
            Ok(live) => Some(conn::install(&inner, live)),
            Err(e @ ClientError::Connect { .. }) => {
                *lock(&inner.problem) = Some(e);
                None
            }
            Err(e) => return Err(e),
        };
        tokio::spawn(conn::supervise(inner.clone(), installed));
        Ok(Client { inner })
    }

    fn inner(cfg: ClientConfig) -> Arc<Inner> {
        let replica = cfg.replica;
        Arc::new(Inner {
            state: Mutex::new(State {
                conn: None,
                next_cseq: cfg.last_acked + 1,
                unanswered: BTreeMap::new(),
                answered_through: cfg.last_acked,
                recorded_through: cfg.last_acked,
                durable_through: None,
                next_qid: 1,
                queries: HashMap::new(),
                sub: None,
                fatal: None,
            }),
            cfg,
            window: Semaphore::new(MAX_UNANSWERED as usize),
            welcome: Mutex::new(None),
            seen_fp: Arc::new(Mutex::new(None)),
            problem: Mutex::new(None),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            replica: Mutex::new(replica),
            kick: tokio::sync::Notify::new(),
            link: Mutex::new(LinkLog {
                up: false,
                since: std::time::Instant::now(),
                since_wall: Timestamp::now(),
                offline_before: std::time::Duration::ZERO,
            }),
        })
    }

    /// The connection now: up or down, since when, and the time spent
    /// offline since the start.
    pub fn link(&self) -> Link {
        let l = lock(&self.inner.link);
        let for_ = l.since.elapsed();
        let offline = l.offline_before + if l.up { std::time::Duration::ZERO } else { for_ };
        Link { up: l.up, since: l.since_wall, for_, offline }
    }

    /// Whether a connection to the server is up now.
    pub fn is_connected(&self) -> bool {
        lock(&self.inner.state).conn.is_some()
    }

    /// The handshake answer of the current connection.
    pub fn welcome(&self) -> Option<Welcome> {
        lock(&self.inner.welcome).clone()
    }

    /// The server certificate's fingerprint this client trusts: the one
    /// pinned, or the one trusted at the first connection (to remember).
    pub fn server_fingerprint(&self) -> Option<String> {
        lock(&self.inner.seen_fp).clone()
    }

    /// Whether the token allows changes (as the last handshake said).
    pub fn writable(&self) -> bool {
        lock(&self.inner.welcome).as_ref().is_none_or(|w| w.writable)
    }

    /// Why the client is not connected: how the last connection ended or
    /// why the last attempt failed. `None` while connected. The client
    /// keeps trying (a refusal too: the server may be fixed).
    pub fn problem(&self) -> Option<ClientError> {
        if self.is_connected() {
            return None;
        }
        lock(&self.inner.problem).clone()
    }

    /// The server's address.
    pub fn addr(&self) -> &str {
        &self.inner.cfg.addr
    }

    /// This replica's id.
    pub fn replica(&self) -> ReplicaId {
        *lock(&self.inner.replica)
    }

    /// Speak as another replica from the next connection on (a cache
    /// restored from an earlier copy continues under a fresh id): what was
    /// answered under the old one counts for nothing there, and the current
    /// connection is dropped. Changes still unanswered must be settled by
    /// the caller first.
    pub fn become_replica(&self, id: ReplicaId) {
        *lock(&self.inner.replica) = id;
        {
            let mut st = lock(&self.inner.state);
            st.recorded_through = 0;
            st.answered_through = st.next_cseq.saturating_sub(1);
        }
        self.inner.kick.notify_one();
    }

    /// Bytes sent and received on the wire (frames), and reconnects made.
    pub fn wire_counters(&self) -> (u64, u64, u64) {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        (g(&self.inner.bytes_out), g(&self.inner.bytes_in), g(&self.inner.reconnects))
    }

    /// Highest client seq such that it and all before it are answered.
    pub fn answered_through(&self) -> u64 {
        lock(&self.inner.state).answered_through
    }

    /// Every answer through client seq `cseq` is durably recorded by the
    /// caller (its modification log was folded): the server may drop its
    /// cached replies through it. Once called, replies are released only
    /// this way.
    pub fn set_durable_through(&self, cseq: u64) {
        let mut st = lock(&self.inner.state);
        st.durable_through = Some(st.durable_through.unwrap_or(0).max(cseq));
    }

    /// Mutations sent (or queued) but not answered yet.
    pub fn unanswered(&self) -> usize {
        lock(&self.inner.state).unanswered.len()
    }

    /// Stop reconnecting and drop the connection.
    pub fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        lock(&self.inner.state).conn = None;
    }

    /// Send a mutation without waiting for its reply (pipelining). At most
    /// [`MAX_UNANSWERED`] may be outstanding; further calls wait.
    pub async fn submit(&self, op: Op) -> Result<Pending, ClientError> {
        self.submit_as(None, op, None).await
    }

    /// Send a mutation under a client seq chosen by the caller (a
    /// modification log numbers its ops when it queues them, so an op
    /// resent after a restart keeps its seq and the server answers it from
    /// its reply cache instead of applying it twice). Seqs must increase;
    /// gaps are allowed.
    pub async fn submit_at(&self, cseq: u64, op: Op) -> Result<Pending, ClientError> {
        self.submit_as(Some(cseq), op, None).await
    }

    /// [`Client::submit_at`] for a change made at `stamp` (the replica's
    /// clock plus the handshake offset): the implicit mtimes it sets take
    /// that time on the server and on every replica.
    pub async fn submit_stamped(&self, cseq: u64, op: Op, stamp: Option<Timestamp>) -> Result<Pending, ClientError> {
        self.submit_as(Some(cseq), op, stamp).await
    }

    /// The next client seq this client would use.
    pub fn next_cseq(&self) -> u64 {
        lock(&self.inner.state).next_cseq
    }

    async fn submit_as(&self, at: Option<u64>, op: Op, stamp: Option<Timestamp>) -> Result<Pending, ClientError> {
        let permit = self.inner.window.acquire().await.map_err(|_| ClientError::Disconnected)?;
        permit.forget();
        let (tx, rx) = oneshot::channel();
        let mut st = lock(&self.inner.state);
        if let Some(e) = &st.fatal {
            self.inner.window.add_permits(1);
            return Err(e.clone());
        }
        let cseq = match at {
            // (below next: a resend after a restart, answered from the
            // server's reply cache)
            Some(c) => c,
            None => st.next_cseq,
        };
        st.next_cseq = st.next_cseq.max(cseq + 1);
        if let Some(conn) = &st.conn {
            let frame = conn::mutate_frame(cseq, st.acked_through(), &op, stamp);
            self.inner.bytes_out.fetch_add(frame.len() as u64, Ordering::Relaxed);
            let _ = conn.send(frame);
        } else if !self.inner.cfg.reconnect {
            self.inner.window.add_permits(1);
            return Err(ClientError::Disconnected);
        }
        match st.unanswered.get_mut(&cseq) {
            // sent again before its answer came: one slot, every waiter
            // hears the answer
            Some((_, _, waiters)) => {
                waiters.push(tx);
                self.inner.window.add_permits(1);
            }
            None => {
                st.unanswered.insert(cseq, (op, stamp, vec![tx]));
            }
        }
        Ok(Pending { cseq, rx })
    }

    /// Send a mutation and wait for its reply.
    pub async fn mutate(&self, op: Op) -> Result<Applied, ClientError> {
        self.submit(op).await?.wait().await
    }

    /// Follow the journal after `from_seq`; resumes by itself after a
    /// reconnect. Unbounded, so a consumer that is slow (or awaits its own
    /// mutations before draining) never stalls the connection's replies.
    pub async fn subscribe(&self, from_seq: Seq) -> Result<mpsc::UnboundedReceiver<StreamEvent>, ClientError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut st = lock(&self.inner.state);
        st.sub = Some((from_seq, tx));
        if let Some(conn) = &st.conn {
            let frame =
                encode_frame(&ClientMsg::Subscribe { from_seq }).map_err(|e| ClientError::Protocol(e.to_string()))?;
            let _ = conn.send(frame);
        }
        Ok(rx)
    }

    /// Wait until every submitted mutation is answered.
    pub async fn drain(&self) {
        loop {
            if lock(&self.inner.state).unanswered.is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

//! The intermezzo client library: a connection to one volume with pipelined,
//! exactly-once mutations (client seqs, resend after reconnect), queries,
//! streamed reads and the record stream. This crate holds the cache manager
//! as it grows; it must never know fuser types.

pub mod config;
mod conn;
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
    /// Ping interval.
    pub heartbeat: Duration,
    /// Silence after which the connection is considered dead.
    pub silence: Duration,
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
            heartbeat: Duration::from_millis(250),
            silence: Duration::from_millis(750),
        }
    }
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

type Waiter = oneshot::Sender<MutateResult>;

pub(crate) struct State {
    pub conn: Option<mpsc::UnboundedSender<Vec<u8>>>,
    pub next_cseq: u64,
    pub unanswered: BTreeMap<u64, (Op, Option<Waiter>)>,
    pub answered_through: u64,
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
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub reconnects: AtomicU64,
    pub closed: AtomicBool,
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
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                conn: None,
                next_cseq: cfg.last_acked + 1,
                unanswered: BTreeMap::new(),
                answered_through: cfg.last_acked,
                next_qid: 1,
                queries: HashMap::new(),
                sub: None,
                fatal: None,
            }),
            cfg,
            window: Semaphore::new(MAX_UNANSWERED as usize),
            welcome: Mutex::new(None),
            seen_fp: Arc::new(Mutex::new(None)),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            closed: AtomicBool::new(false),
        });
        let live = conn::establish(&inner).await?;
        let installed = conn::install(&inner, live);
        tokio::spawn(conn::supervise(inner.clone(), installed));
        Ok(Client { inner })
    }

    /// The server's handshake answer.
    pub fn welcome(&self) -> Option<Welcome> {
        lock(&self.inner.welcome).clone()
    }

    /// The fingerprint the server presented (to pin after first use).
    pub fn server_fingerprint(&self) -> Option<String> {
        lock(&self.inner.seen_fp).clone()
    }

    /// This replica's id.
    pub fn replica(&self) -> ReplicaId {
        self.inner.cfg.replica
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
        let permit = self.inner.window.acquire().await.map_err(|_| ClientError::Disconnected)?;
        permit.forget();
        let (tx, rx) = oneshot::channel();
        let mut st = lock(&self.inner.state);
        if let Some(e) = &st.fatal {
            self.inner.window.add_permits(1);
            return Err(e.clone());
        }
        let cseq = st.next_cseq;
        st.next_cseq += 1;
        if let Some(conn) = &st.conn {
            let frame = conn::mutate_frame(cseq, st.answered_through, &op);
            self.inner.bytes_out.fetch_add(frame.len() as u64, Ordering::Relaxed);
            let _ = conn.send(frame);
        } else if !self.inner.cfg.reconnect {
            self.inner.window.add_permits(1);
            return Err(ClientError::Disconnected);
        }
        st.unanswered.insert(cseq, (op, Some(tx)));
        Ok(Pending { cseq, rx })
    }

    /// Send a mutation and wait for its reply.
    pub async fn mutate(&self, op: Op) -> Result<Applied, ClientError> {
        self.submit(op).await?.wait().await
    }

    /// Start a query; answers arrive on the returned channel.
    async fn query_stream(&self, query: Query) -> Result<mpsc::Receiver<Result<QueryReply, OpError>>, ClientError> {
        let (tx, rx) = mpsc::channel(64);
        let mut st = lock(&self.inner.state);
        if let Some(e) = &st.fatal {
            return Err(e.clone());
        }
        let qid = st.next_qid;
        st.next_qid += 1;
        let Some(conn) = &st.conn else { return Err(ClientError::Disconnected) };
        let frame = encode_frame(&ClientMsg::Query { qid, query }).map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.inner.bytes_out.fetch_add(frame.len() as u64, Ordering::Relaxed);
        conn.send(frame).map_err(|_| ClientError::Disconnected)?;
        st.queries.insert(qid, tx);
        Ok(rx)
    }

    async fn query(&self, query: Query) -> Result<QueryReply, ClientError> {
        let mut rx = self.query_stream(query).await?;
        match rx.recv().await {
            Some(r) => r.map_err(ClientError::Op),
            None => Err(ClientError::Disconnected),
        }
    }

    /// Resolve a name.
    pub async fn lookup(&self, parent: ObjectId, name: &[u8]) -> Result<Attr, ClientError> {
        match self.query(Query::Lookup { parent, name: name.to_vec() }).await? {
            QueryReply::Attr(a) => Ok(a),
            other => Err(ClientError::Protocol(format!("lookup answered {other:?}"))),
        }
    }

    /// Attributes of an object.
    pub async fn getattr(&self, id: ObjectId) -> Result<Attr, ClientError> {
        match self.query(Query::GetAttr { id }).await? {
            QueryReply::Attr(a) => Ok(a),
            other => Err(ClientError::Protocol(format!("getattr answered {other:?}"))),
        }
    }

    /// One page of a listing.
    pub async fn readdir_page(
        &self,
        id: ObjectId,
        cookie: u64,
        max: u32,
    ) -> Result<(Vec<DirEntry>, bool), ClientError> {
        match self.query(Query::ReadDir { id, cookie, max }).await? {
            QueryReply::Entries { entries, done } => Ok((entries, done)),
            other => Err(ClientError::Protocol(format!("readdir answered {other:?}"))),
        }
    }

    /// The whole listing, page by page.
    pub async fn readdir(&self, id: ObjectId) -> Result<Vec<DirEntry>, ClientError> {
        let mut all = Vec::new();
        let mut cookie = 0;
        loop {
            let (page, done) = self.readdir_page(id, cookie, 1024).await?;
            if let Some(last) = page.last() {
                cookie = last.cookie;
            }
            all.extend(page);
            if done {
                return Ok(all);
            }
        }
    }

    /// Symlink target.
    pub async fn readlink(&self, id: ObjectId) -> Result<Vec<u8>, ClientError> {
        match self.query(Query::ReadLink { id }).await? {
            QueryReply::Target(t) => Ok(t),
            other => Err(ClientError::Protocol(format!("readlink answered {other:?}"))),
        }
    }

    /// Extended attributes.
    pub async fn xattrs(&self, id: ObjectId) -> Result<Vec<(Vec<u8>, Vec<u8>)>, ClientError> {
        match self.query(Query::ListXattr { id }).await? {
            QueryReply::Xattrs(x) => Ok(x),
            other => Err(ClientError::Protocol(format!("listxattr answered {other:?}"))),
        }
    }

    /// Block hashes of a file.
    pub async fn block_hashes(&self, id: ObjectId) -> Result<(Seq, Vec<[u8; 32]>), ClientError> {
        match self.query(Query::BlockHashes { id }).await? {
            QueryReply::Hashes { version, blocks } => Ok((version, blocks)),
            other => Err(ClientError::Protocol(format!("hashes answered {other:?}"))),
        }
    }

    /// Server counters.
    pub async fn server_stats(&self) -> Result<Vec<(String, u64)>, ClientError> {
        match self.query(Query::Stats).await? {
            QueryReply::Stats(s) => Ok(s),
            other => Err(ClientError::Protocol(format!("stats answered {other:?}"))),
        }
    }

    /// Stream a byte range to `sink` segment by segment (never all in memory).
    pub async fn read_with(
        &self,
        id: ObjectId,
        offset: u64,
        len: u64,
        mut sink: impl FnMut(Segment) -> Result<(), ClientError>,
    ) -> Result<(), ClientError> {
        let mut rx = self.query_stream(Query::Read { id, offset, len }).await?;
        loop {
            match rx.recv().await {
                Some(Ok(QueryReply::Data { offset, bytes })) => sink(Segment::Data(offset, bytes))?,
                Some(Ok(QueryReply::Hole { offset, len })) => sink(Segment::Hole(offset, len))?,
                Some(Ok(QueryReply::End { .. })) => return Ok(()),
                Some(Ok(other)) => return Err(ClientError::Protocol(format!("read answered {other:?}"))),
                Some(Err(e)) => return Err(ClientError::Op(e)),
                None => return Err(ClientError::Disconnected),
            }
        }
    }

    /// Read a range into memory (holes as zeros); for small files and tests.
    pub async fn read(&self, id: ObjectId, offset: u64, len: u64) -> Result<Vec<u8>, ClientError> {
        let mut out = Vec::new();
        self.read_with(id, offset, len, |seg| {
            let (at, bytes) = match seg {
                Segment::Data(o, b) => (o, b),
                Segment::Hole(o, l) => (o, vec![0; l as usize]),
            };
            let rel = (at - offset) as usize;
            if out.len() < rel {
                out.resize(rel, 0);
            }
            out.truncate(rel);
            out.extend_from_slice(&bytes);
            Ok(())
        })
        .await?;
        Ok(out)
    }

    /// Read a consistent snapshot; returns the entries and the seq to
    /// subscribe from.
    pub async fn snapshot(&self) -> Result<(Vec<SnapshotEntry>, Seq), ClientError> {
        let mut rx = self.query_stream(Query::Snapshot).await?;
        let mut out = Vec::new();
        loop {
            match rx.recv().await {
                Some(Ok(QueryReply::SnapshotEntry(e))) => out.push(e),
                Some(Ok(QueryReply::End { seq })) => return Ok((out, seq)),
                Some(Ok(other)) => return Err(ClientError::Protocol(format!("snapshot answered {other:?}"))),
                Some(Err(e)) => return Err(ClientError::Op(e)),
                None => return Err(ClientError::Disconnected),
            }
        }
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

//! Connections: TLS accept, handshake and token check, frame loop, and the
//! writer task that serialises replies and streamed answers.

use crate::auth::Rights;
use crate::counters::Counters;
use crate::server::Server;
use crate::volume::{Mutation, Work};
use crate::ServerError;
use izo_proto::codec::{self, check_len};
use izo_proto::*;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// Frames queued by one connection: replies (bounded by the in-flight
/// limit) and bulk streams (bounded channel, so readers wait for the socket).
pub(crate) struct Out {
    pub replies: mpsc::UnboundedSender<Vec<u8>>,
    pub bulk: mpsc::Sender<Vec<u8>>,
}

/// Time a connection has from its TCP accept to its Welcome (TLS handshake
/// and Hello included).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Queries one connection may have running at once.
const MAX_QUERIES: usize = 64;

impl Server {
    /// Accept connections forever.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) -> Result<(), ServerError> {
        loop {
            let (sock, peer) = listener.accept().await.map_err(|e| ServerError::io("accept", e))?;
            // Unauthenticated connections are few and short: past the cap a
            // new one is closed at once, before TLS allocates anything.
            let Ok(permit) = self.handshakes.clone().try_acquire_owned() else {
                tracing::debug!("closing {peer}: {} connections are in their handshake", crate::server::MAX_HANDSHAKES);
                drop(sock);
                continue;
            };
            let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
            let _ = sock.set_nodelay(true);
            // notice clients that vanish without closing (their tasks and
            // subscriptions would otherwise live on)
            if let Err(e) = crate::sys::tune_tcp(std::os::fd::AsFd::as_fd(&sock), 10, 5, 3, 30_000) {
                tracing::debug!("socket options for {peer}: {e}");
            }
            let srv = self.clone();
            tokio::spawn(async move {
                let tls = match tokio::time::timeout_at(deadline, srv.acceptor.accept(sock)).await {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => return tracing::debug!("TLS handshake with {peer} failed: {e}"),
                    Err(_) => return tracing::debug!("TLS handshake with {peer} timed out"),
                };
                if let Err(e) = srv.connection(tls, permit, deadline).await {
                    tracing::debug!("connection from {peer} ended: {e}");
                }
            });
        }
    }

    async fn connection<S: AsyncRead + AsyncWrite + Send + 'static>(
        self: Arc<Self>,
        stream: S,
        permit: tokio::sync::OwnedSemaphorePermit,
        deadline: tokio::time::Instant,
    ) -> Result<(), String> {
        let (mut rd, wr) = tokio::io::split(stream);
        let (rtx, rrx) = mpsc::unbounded_channel();
        let (btx, brx) = mpsc::channel(16);
        let counters = self.shared.counters.clone();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        // Set after the handshake: the owner map on volumes that map owners
        // by name, and the protocol version the connection settled on.
        let idmap: Arc<std::sync::OnceLock<crate::policy::IdMap>> = Arc::default();
        let version: Arc<std::sync::OnceLock<u16>> = Arc::default();
        let tasks = (counters.clone(), idmap.clone(), version.clone());
        let writer = tokio::spawn(write_loop(wr, rrx, brx, stop_rx, tasks));
        let writer = Writer { stop: stop_tx, task: writer };
        let out = Arc::new(Out { replies: rtx, bulk: btx });
        let hello = match tokio::time::timeout_at(deadline, read_hello(&mut rd, &counters)).await {
            Ok(Ok(ClientMsg::Hello(h))) => h,
            Ok(Ok(_)) => return refuse(&out, writer, RefuseReason::Protocol, "first message must be Hello").await,
            Ok(Err(FrameError::Version(v))) => {
                let m = format!("client speaks protocol {v}, server speaks {}", codec::show_range(codec::VERSIONS));
                tracing::warn!("refused a client: {m}");
                return refuse(&out, writer, RefuseReason::Version, &m).await;
            }
            Ok(Err(FrameError::TooLarge(n))) => {
                let m = format!(
                    "a frame of {n} bytes before the handshake (at most {} bytes until a Hello is accepted)",
                    codec::MAX_HANDSHAKE_FRAME
                );
                return refuse(&out, writer, RefuseReason::BadFrame, &m).await;
            }
            Ok(Err(e)) => return refuse(&out, writer, RefuseReason::BadFrame, &e.to_string()).await,
            Err(_) => {
                writer.finish().await;
                return Err(format!("no handshake within {} s", HANDSHAKE_TIMEOUT.as_secs()));
            }
        };
        let Some(v) = codec::negotiate(hello.versions(), codec::VERSIONS) else {
            let (client, server) = (hello.versions(), codec::VERSIONS);
            let older = if client.1 < server.0 { "client" } else { "server" };
            let m = format!(
                "no protocol version in common: the client speaks {}, this server speaks {}; upgrade the {older}",
                codec::show_range(client),
                codec::show_range(server)
            );
            tracing::warn!("refused a client: {m}");
            return refuse(&out, writer, RefuseReason::Version, &m).await;
        };
        let _ = version.set(v);
        let result = tokio::time::timeout_at(deadline, self.admit(&hello)).await;
        let admitted = match result {
            Ok(Ok(a)) => a,
            Ok(Err(Admit::Refuse(reason, m))) => return refuse(&out, writer, reason, &m).await,
            Ok(Err(Admit::Fail(e))) => {
                writer.finish().await;
                return Err(e);
            }
            Err(_) => {
                writer.finish().await;
                return Err(format!("no handshake within {} s", HANDSHAKE_TIMEOUT.as_secs()));
            }
        };
        let (rights, last_applied) = admitted;
        let store = &self.shared.store;
        let welcome = Welcome {
            version: v,
            incarnation: store.incarnation(),
            volume: self.volume.clone(),
            last_applied,
            head_seq: store.head(),
            time: Timestamp::now(),
            writable: rights == Rights::Rw,
            trusted: self.policy.trusted,
        };
        send(&out, &ServerMsg::Welcome(welcome));
        drop(permit);
        if self.policy.owners == crate::policy::Owners::Map {
            let _ = idmap.set(crate::policy::IdMap::new(&hello.users, &hello.groups, self.policy.squash));
        }
        let result = self.frames(&mut rd, &out, hello.replica, rights, idmap.get()).await;
        writer.finish().await;
        result
    }

    /// Check a Hello: volume, token, replica ownership, and the replica's
    /// claim. Returns the token's rights and the replica's last applied seq.
    async fn admit(&self, hello: &Hello) -> Result<(Rights, u64), Admit> {
        if hello.volume != self.volume {
            let m = format!("no volume {:?} here (this server exports {:?})", hello.volume, self.volume);
            return Err(Admit::Refuse(RefuseReason::NoVolume, m));
        }
        let Some(grant) = self.tokens.check(&hello.token, &hello.volume) else {
            let m = format!("token not valid for volume {:?}; create one with `izo token create`", hello.volume);
            return Err(Admit::Refuse(RefuseReason::Auth, m));
        };
        let store = &self.shared.store;
        // A replica id belongs to the token that first used it (its stable
        // id, kept across rotations): ids travel in the record stream, and
        // another token must not speak for them.
        let (st, replica, owner) = (store.clone(), hello.replica, grant.id.clone());
        let claim = tokio::task::spawn_blocking(move || {
            st.claim_replica(replica, owner.as_bytes(), |stored| crate::auth::owns(stored, &owner))
        })
        .await;
        match claim {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => {
                let m = "this replica id is registered under another token; use a fresh replica id";
                return Err(Admit::Refuse(RefuseReason::Auth, m.into()));
            }
            Ok(Err(e)) => return Err(Admit::Fail(e.to_string())),
            Err(e) => return Err(Admit::Fail(e.to_string())),
        }
        let last_applied = store.replica_last(hello.replica).map_err(|e| Admit::Fail(e.to_string()))?;
        // A replica saying it holds replies this state never recorded proves
        // nothing by itself (any token holder can say so): only that
        // replica is refused, the volume stays as it is. A restored state
        // dir is the operator's call (--accept-rollback: a new incarnation
        // at start, and such replicas resync). Read-only replicas never had
        // anything applied, and a claim about another incarnation is void.
        let same_incarnation = hello.incarnation == 0 || hello.incarnation == store.incarnation();
        let checked = grant.rights == Rights::Rw && same_incarnation && !self.accept_rollback;
        if checked && hello.last_acked > last_applied {
            let m = format!(
                "replica {:032x} says it holds replies through client seq {}, but this server recorded only {last_applied}                  for it: either its cache belongs to other server state (mount with a fresh cache) or the server's                  state dir was restored from a backup (then restart the server once with --accept-rollback)",
                hello.replica.0, hello.last_acked
            );
            tracing::warn!("refused a replica: {m}");
            return Err(Admit::Refuse(RefuseReason::ReplicaAhead, m));
        }
        Ok((grant.rights, last_applied))
    }

    async fn frames<R: AsyncRead + Unpin>(
        self: &Arc<Self>,
        rd: &mut R,
        out: &Arc<Out>,
        replica: ReplicaId,
        rights: Rights,
        idmap: Option<&crate::policy::IdMap>,
    ) -> Result<(), String> {
        // Per-connection bounds: unanswered mutations (the protocol's window),
        // queries running at once (further frames wait: TCP backpressure),
        // and one subscription.
        let inflight = Arc::new(tokio::sync::Semaphore::new(MAX_UNANSWERED as usize));
        static CONNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let conn = CONNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let queries = Arc::new(tokio::sync::Semaphore::new(MAX_QUERIES));
        let mut subscription: Option<tokio::task::JoinHandle<()>> = None;
        let limits = Limits { inflight: &inflight, queries: &queries, idmap, conn };
        let result = self.frame_loop(rd, out, replica, rights, &limits, &mut subscription).await;
        if let Some(s) = subscription {
            s.abort();
        }
        result
    }

    #[allow(clippy::too_many_arguments)]
    async fn frame_loop<R: AsyncRead + Unpin>(
        self: &Arc<Self>,
        rd: &mut R,
        out: &Arc<Out>,
        replica: ReplicaId,
        rights: Rights,
        limits: &Limits<'_>,
        subscription: &mut Option<tokio::task::JoinHandle<()>>,
    ) -> Result<(), String> {
        let (inflight, queries) = (limits.inflight, limits.queries);
        loop {
            let msg = match read_frame(rd, &self.shared.counters).await {
                Ok(m) => m,
                Err(FrameError::Malformed(e)) if e == "eof" => return Ok(()),
                Err(e) => {
                    send(out, &ServerMsg::Refused { reason: RefuseReason::BadFrame, message: e.to_string() });
                    return Err(e.to_string());
                }
            };
            // (a stamped mutation is a mutation whose implicit mtimes the
            // replica chose)
            let (msg, stamp) = match msg {
                ClientMsg::MutateAt { cseq, acked_through, op, stamp } => {
                    (ClientMsg::Mutate { cseq, acked_through, op }, Some(stamp))
                }
                m => (m, None),
            };
            match msg {
                ClientMsg::Mutate { cseq, acked_through, mut op } => {
                    if rights != Rights::Rw {
                        let result = Err(OpError::Denied("read-only token".into()));
                        send(out, &ServerMsg::Reply { cseq, result });
                        continue;
                    }
                    self.policy.apply(&mut op, limits.idmap);
                    let Ok(slot) = inflight.clone().try_acquire_owned() else {
                        let why = format!("more than {MAX_UNANSWERED} mutations unanswered; wait for replies");
                        send(out, &ServerMsg::Reply { cseq, result: Err(OpError::Transient(why)) });
                        continue;
                    };
                    let m = Mutation {
                        replica,
                        cseq,
                        acked_through,
                        op,
                        stamp,
                        reply: out.replies.clone(),
                        conn: limits.conn,
                        slot: Some(slot),
                    };
                    let sent = self.tx.lock().map(|tx| tx.send(Work::Mutate(m)).is_ok()).unwrap_or(false);
                    if !sent {
                        return Err("volume thread stopped".into());
                    }
                }
                ClientMsg::Query { qid, query } => {
                    let Ok(permit) = queries.clone().acquire_owned().await else { return Ok(()) };
                    let srv = self.clone();
                    let out = out.clone();
                    tokio::spawn(async move {
                        srv.query(qid, query, out).await;
                        drop(permit);
                    });
                }
                ClientMsg::Subscribe { from_seq } => {
                    if let Some(old) = subscription.take() {
                        old.abort();
                    }
                    let srv = self.clone();
                    let out = out.clone();
                    *subscription = Some(tokio::spawn(async move { srv.subscribe(from_seq, out).await }));
                }
                ClientMsg::Ping { nonce } => send(out, &ServerMsg::Pong { nonce }),
                ClientMsg::Hello(_) | ClientMsg::MutateAt { .. } => {
                    send(out, &ServerMsg::Refused { reason: RefuseReason::Protocol, message: "second Hello".into() });
                    return Err("second Hello".into());
                }
            }
        }
    }
}

/// Why a Hello was not admitted.
enum Admit {
    /// Refuse the client with this reason and message.
    Refuse(RefuseReason, String),
    /// The server failed (the connection just closes).
    Fail(String),
}

/// Per-connection bounds and owner map, handed to the frame loop.
struct Limits<'a> {
    inflight: &'a Arc<tokio::sync::Semaphore>,
    queries: &'a Arc<tokio::sync::Semaphore>,
    idmap: Option<&'a crate::policy::IdMap>,
    /// This connection (unique in the process).
    conn: u64,
}

struct Writer {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    /// Send what is queued, then close; streams still running see a closed channel.
    async fn finish(self) {
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

async fn refuse(out: &Arc<Out>, writer: Writer, reason: RefuseReason, message: &str) -> Result<(), String> {
    send(out, &ServerMsg::Refused { reason, message: message.to_string() });
    writer.finish().await;
    Err(format!("refused: {message}"))
}

/// Re-encode a frame with owners translated for the client.
fn remap(frame: &[u8], m: &crate::policy::IdMap) -> Vec<u8> {
    match frame.get(4..).map(decode_frame::<ServerMsg>) {
        Some(Ok(mut msg)) => {
            m.out(&mut msg);
            encode_frame(&msg).unwrap_or_else(|_| frame.to_vec())
        }
        _ => frame.to_vec(),
    }
}

/// Queue a small message on the reply channel.
pub(crate) fn send(out: &Out, msg: &ServerMsg) {
    if let Ok(f) = encode_frame(msg) {
        let _ = out.replies.send(f);
    }
}

/// Read the first frame of a connection: at most
/// [`codec::MAX_HANDSHAKE_FRAME`] bytes, a Hello of any version range.
async fn read_hello<R: AsyncRead + Unpin>(rd: &mut R, counters: &Counters) -> Result<ClientMsg, FrameError> {
    let mut len = [0u8; 4];
    rd.read_exact(&mut len).await.map_err(|e| FrameError::Malformed(e.to_string()))?;
    let n = codec::check_len_max(u32::from_be_bytes(len), codec::MAX_HANDSHAKE_FRAME)?;
    let mut body = vec![0u8; n];
    rd.read_exact(&mut body).await.map_err(|e| FrameError::Malformed(e.to_string()))?;
    Counters::add(&counters.bytes_in, 4 + n as u64);
    Hello::decode_first(&body)
}

/// Read one frame; `Malformed("eof")` on a clean end of stream.
pub(crate) async fn read_frame<R: AsyncRead + Unpin, T: serde::de::DeserializeOwned>(
    rd: &mut R,
    counters: &Counters,
) -> Result<T, FrameError> {
    let mut len = [0u8; 4];
    if let Err(e) = rd.read_exact(&mut len).await {
        return Err(FrameError::Malformed(if e.kind() == std::io::ErrorKind::UnexpectedEof {
            "eof".into()
        } else {
            e.to_string()
        }));
    }
    let n = check_len(u32::from_be_bytes(len))?;
    let mut body = vec![0u8; n];
    rd.read_exact(&mut body).await.map_err(|e| FrameError::Malformed(e.to_string()))?;
    Counters::add(&counters.bytes_in, 4 + n as u64);
    decode_frame(&body)
}

/// What the writer shares with its connection: counters, and what the
/// handshake settles (the owner map and the protocol version).
type WriterShared = (Arc<Counters>, Arc<std::sync::OnceLock<crate::policy::IdMap>>, Arc<std::sync::OnceLock<u16>>);

async fn write_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut replies: mpsc::UnboundedReceiver<Vec<u8>>,
    mut bulk: mpsc::Receiver<Vec<u8>>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
    (counters, idmap, version): WriterShared,
) {
    let mut open = (true, true);
    while open.0 || open.1 {
        let frame = tokio::select! {
            biased;
            f = replies.recv(), if open.0 => match f { Some(f) => f, None => { open.0 = false; continue } },
            f = bulk.recv(), if open.1 => match f { Some(f) => f, None => { open.1 = false; continue } },
            _ = &mut stop => {
                while let Ok(f) = replies.try_recv() {
                    if wr.write_all(&f).await.is_err() {
                        return;
                    }
                }
                break;
            }
        };
        // On owner-mapping volumes every owner the client sees is its own id.
        let mut frame = match idmap.get() {
            Some(m) => remap(&frame, m),
            None => frame,
        };
        // Frames are encoded at this build's version; a connection that
        // settled on an older one says so in each header.
        if let Some(&v) = version.get().filter(|&&v| v != PROTOCOL_VERSION) {
            codec::set_frame_version(&mut frame, v);
        }
        if wr.write_all(&frame).await.is_err() {
            return;
        }
        Counters::add(&counters.bytes_out, frame.len() as u64);
        // Flush when nothing else is queued, so replies are not held back.
        if replies.is_empty() && bulk.is_empty() && wr.flush().await.is_err() {
            return;
        }
    }
    let _ = wr.shutdown().await;
}

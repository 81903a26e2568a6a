//! Connections: TLS accept, handshake and token check, frame loop, and the
//! writer task that serialises replies and streamed answers.

use crate::auth::Rights;
use crate::counters::Counters;
use crate::server::Server;
use crate::volume::{Mutation, Work};
use crate::ServerError;
use izo_proto::codec::check_len;
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

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Queries one connection may have running at once.
const MAX_QUERIES: usize = 64;

impl Server {
    /// Accept connections forever.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) -> Result<(), ServerError> {
        loop {
            let (sock, peer) = listener.accept().await.map_err(|e| ServerError::io("accept", e))?;
            let _ = sock.set_nodelay(true);
            // notice clients that vanish without closing (their tasks and
            // subscriptions would otherwise live on)
            if let Err(e) = crate::sys::tune_tcp(std::os::fd::AsFd::as_fd(&sock), 10, 5, 3, 30_000) {
                tracing::debug!("socket options for {peer}: {e}");
            }
            let srv = self.clone();
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, srv.acceptor.accept(sock)).await {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => return tracing::debug!("TLS handshake with {peer} failed: {e}"),
                    Err(_) => return tracing::debug!("TLS handshake with {peer} timed out"),
                };
                if let Err(e) = srv.connection(tls).await {
                    tracing::debug!("connection from {peer} ended: {e}");
                }
            });
        }
    }

    async fn connection<S: AsyncRead + AsyncWrite + Send + 'static>(self: Arc<Self>, stream: S) -> Result<(), String> {
        let (mut rd, wr) = tokio::io::split(stream);
        let (rtx, rrx) = mpsc::unbounded_channel();
        let (btx, brx) = mpsc::channel(16);
        let counters = self.shared.counters.clone();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        // Set after the handshake on volumes that map owners by name.
        let idmap: Arc<std::sync::OnceLock<crate::policy::IdMap>> = Arc::default();
        let writer = tokio::spawn(write_loop(wr, rrx, brx, stop_rx, counters.clone(), idmap.clone()));
        let writer = Writer { stop: stop_tx, task: writer };
        let out = Arc::new(Out { replies: rtx, bulk: btx });
        let hello = match tokio::time::timeout(HANDSHAKE_TIMEOUT, read_frame(&mut rd, &counters)).await {
            Ok(Ok(ClientMsg::Hello(h))) => h,
            Ok(Ok(_)) => return refuse(&out, writer, RefuseReason::Protocol, "first message must be Hello").await,
            Ok(Err(FrameError::Version(v))) => {
                let m = format!("client speaks protocol {v}, server speaks {PROTOCOL_VERSION}");
                return refuse(&out, writer, RefuseReason::Version, &m).await;
            }
            Ok(Err(e)) => return refuse(&out, writer, RefuseReason::BadFrame, &e.to_string()).await,
            Err(_) => return Err("no handshake within 10 s".into()),
        };
        if hello.version != PROTOCOL_VERSION {
            let m = format!("client speaks protocol {}, server speaks {PROTOCOL_VERSION}", hello.version);
            return refuse(&out, writer, RefuseReason::Version, &m).await;
        }
        if hello.volume != self.volume {
            let m = format!("no volume {:?} here (this server exports {:?})", hello.volume, self.volume);
            return refuse(&out, writer, RefuseReason::NoVolume, &m).await;
        }
        let Some(rights) = self.tokens.check(&hello.token, &hello.volume) else {
            let m = format!("token not valid for volume {:?}; create one with `izo token create`", hello.volume);
            return refuse(&out, writer, RefuseReason::Auth, &m).await;
        };
        let store = &self.shared.store;
        // A replica id belongs to the token that first used it: ids travel in
        // the record stream, and another token must not speak for them.
        let owner = crate::auth::hash(&hello.token);
        let st = store.clone();
        let claim = tokio::task::spawn_blocking(move || st.claim_replica(hello.replica, owner.as_bytes())).await;
        match claim {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => {
                let m = "this replica id is registered under another token; use a fresh replica id";
                return refuse(&out, writer, RefuseReason::Auth, m).await;
            }
            Ok(Err(e)) => return Err(e.to_string()),
            Err(e) => return Err(e.to_string()),
        }
        let last_applied = store.replica_last(hello.replica).map_err(|e| e.to_string())?;
        if hello.last_acked > last_applied {
            // The client holds replies this server no longer knows: the server's
            // state was rolled back (restored from a backup). Its seqs and ids
            // cannot be trusted by anyone any more.
            tracing::error!(
                "replica {:?} holds replies through {} but this server applied only {last_applied}: \
                 the volume state was rolled back; taking a new incarnation, clients will resync",
                hello.replica,
                hello.last_acked
            );
            let st = store.clone();
            match tokio::task::spawn_blocking(move || st.new_incarnation()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e.to_string()),
                Err(e) => return Err(e.to_string()),
            }
        }
        let welcome = Welcome {
            version: PROTOCOL_VERSION,
            incarnation: store.incarnation(),
            volume: self.volume.clone(),
            last_applied,
            head_seq: store.head(),
            time: Timestamp::now(),
            writable: rights == Rights::Rw,
        };
        send(&out, &ServerMsg::Welcome(welcome));
        if self.policy.owners == crate::policy::Owners::Map {
            let _ = idmap.set(crate::policy::IdMap::new(&hello.users, &hello.groups, self.policy.squash));
        }
        let result = self.frames(&mut rd, &out, hello.replica, rights, idmap.get()).await;
        writer.finish().await;
        result
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
        let queries = Arc::new(tokio::sync::Semaphore::new(MAX_QUERIES));
        let mut subscription: Option<tokio::task::JoinHandle<()>> = None;
        let limits = Limits { inflight: &inflight, queries: &queries, idmap };
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

/// Per-connection bounds and owner map, handed to the frame loop.
struct Limits<'a> {
    inflight: &'a Arc<tokio::sync::Semaphore>,
    queries: &'a Arc<tokio::sync::Semaphore>,
    idmap: Option<&'a crate::policy::IdMap>,
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

async fn write_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut replies: mpsc::UnboundedReceiver<Vec<u8>>,
    mut bulk: mpsc::Receiver<Vec<u8>>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
    counters: Arc<Counters>,
    idmap: Arc<std::sync::OnceLock<crate::policy::IdMap>>,
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
        let frame = match idmap.get() {
            Some(m) => remap(&frame, m),
            None => frame,
        };
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

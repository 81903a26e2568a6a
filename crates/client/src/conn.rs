//! One live connection at a time: TLS connect and handshake, the reader
//! that routes answers, heartbeats, and reconnect with resend of every
//! unanswered mutation in client-seq order (the server answers those it
//! already applied from its reply cache).

use crate::{lock, ClientError, Inner, StreamEvent};
use izo_proto::codec::{self, check_len};
use izo_proto::*;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::client::TlsStream;

type Tls = TlsStream<TcpStream>;

/// A handshaken connection, not yet installed.
pub(crate) struct Live {
    rd: ReadHalf<Tls>,
    wr: WriteHalf<Tls>,
}

pub(crate) fn mutate_frame(cseq: u64, acked_through: u64, op: &Op, stamp: Option<Timestamp>) -> Vec<u8> {
    let frame = match stamp {
        Some(stamp) => encode_frame(&ClientMsgRef::MutateAt { cseq, acked_through, op, stamp }),
        None => encode_frame(&ClientMsgRef::Mutate { cseq, acked_through, op }),
    };
    // (ops are built within MAX_DATA, far below the frame limit, and
    // postcard cannot fail on these types)
    frame.expect("a mutation always fits in a frame")
}

async fn read_msg(rd: &mut ReadHalf<Tls>, inner: &Inner) -> Result<ServerMsg, String> {
    let mut len = [0u8; 4];
    rd.read_exact(&mut len).await.map_err(|e| e.to_string())?;
    let n = check_len(u32::from_be_bytes(len)).map_err(|e| e.to_string())?;
    let mut body = vec![0u8; n];
    rd.read_exact(&mut body).await.map_err(|e| e.to_string())?;
    inner.bytes_in.fetch_add(4 + n as u64, Ordering::Relaxed);
    decode_frame(&body).map_err(|e| e.to_string())
}

/// Read the handshake answer: a Welcome or a refusal, whatever version
/// its header names (a server of another range still explains itself).
async fn read_answer(rd: &mut ReadHalf<Tls>, inner: &Inner) -> Result<ServerMsg, String> {
    let mut len = [0u8; 4];
    rd.read_exact(&mut len).await.map_err(|e| e.to_string())?;
    let n = codec::check_len_max(u32::from_be_bytes(len), codec::MAX_HANDSHAKE_FRAME).map_err(|e| e.to_string())?;
    let mut body = vec![0u8; n];
    rd.read_exact(&mut body).await.map_err(|e| e.to_string())?;
    inner.bytes_in.fetch_add(4 + n as u64, Ordering::Relaxed);
    match codec::decode_handshake::<ServerMsg>(&body) {
        Ok((_, m @ (ServerMsg::Welcome(_) | ServerMsg::Refused { .. }))) => Ok(m),
        _ => decode_frame(&body).map_err(|e| e.to_string()),
    }
}

/// Connect and handshake once.
pub(crate) async fn establish(inner: &Arc<Inner>) -> Result<Live, ClientError> {
    let cfg = &inner.cfg;
    let cerr = |why: String| ClientError::Connect { addr: cfg.addr.clone(), why };
    let connector =
        crate::tls::connector(cfg.fingerprint.clone(), inner.seen_fp.clone()).map_err(|e| cerr(e.to_string()))?;
    let tcp = tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(&cfg.addr))
        .await
        .map_err(|_| cerr("timed out".into()))?
        .map_err(|e| cerr(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    let name = rustls::pki_types::ServerName::try_from("intermezzo").map_err(|e| cerr(e.to_string()))?;
    let tls = tokio::time::timeout(Duration::from_secs(3), connector.connect(name, tcp))
        .await
        .map_err(|_| cerr("TLS handshake timed out".into()))?
        .map_err(|e| crate::tls::mismatch(&e).map_or_else(|| cerr(format!("TLS: {e}")), ClientError::Fingerprint))?;
    let (mut rd, mut wr) = tokio::io::split(tls);
    // The claim counts only replies the server records (not the transient
    // or permission refusals it answers without recording), so a server
    // that was not rolled back never sees a claim above its own record.
    let claim = lock(&inner.state).recorded_through;
    let incarnation = lock(&inner.welcome).as_ref().map(|w| w.incarnation).unwrap_or(0);
    let (min_version, version) = codec::VERSIONS;
    let hello = Hello {
        version,
        volume: cfg.volume.clone(),
        token: cfg.token.clone(),
        replica: *lock(&inner.replica),
        last_acked: claim,
        users: cfg.users.clone(),
        groups: cfg.groups.clone(),
        min_version,
        incarnation,
    };
    let frame = encode_frame(&ClientMsg::Hello(hello)).map_err(|e| ClientError::Protocol(e.to_string()))?;
    wr.write_all(&frame).await.map_err(|e| cerr(e.to_string()))?;
    wr.flush().await.map_err(|e| cerr(e.to_string()))?;
    let msg = tokio::time::timeout(Duration::from_secs(5), read_answer(&mut rd, inner))
        .await
        .map_err(|_| cerr("no handshake answer within 5 s".into()))?
        .map_err(cerr)?;
    match msg {
        ServerMsg::Welcome(w) if !(min_version..=version).contains(&w.version) => Err(ClientError::Protocol(format!(
            "the server chose protocol version {}, but this client speaks {}",
            w.version,
            codec::show_range(codec::VERSIONS)
        ))),
        ServerMsg::Welcome(w) => {
            // never reuse a seq the server already applied (a remount
            // starts from the seq it last saw answered)
            {
                let mut st = lock(&inner.state);
                st.next_cseq = st.next_cseq.max(w.last_applied + 1);
            }
            let mut prev = lock(&inner.welcome);
            if let Some(p) = prev.as_ref() {
                if p.incarnation != w.incarnation {
                    return Err(ClientError::Protocol(
                        "the volume was recreated or restored (new incarnation); resync needed".into(),
                    ));
                }
            }
            *prev = Some(w);
            Ok(Live { rd, wr })
        }
        ServerMsg::Refused { reason, message } => Err(ClientError::Refused { reason, message }),
        other => Err(ClientError::Protocol(format!("unexpected handshake answer {other:?}"))),
    }
}

/// A connection installed as the client's current one.
pub(crate) struct Installed {
    rd: ReadHalf<Tls>,
    writer: tokio::task::JoinHandle<()>,
}

/// Install a live connection: resend what is unanswered, resubscribe.
pub(crate) fn install(inner: &Arc<Inner>, live: Live) -> Installed {
    let Live { rd, wr } = live;
    let writer = install_writer(inner, wr);
    lock(&inner.link).set(true);
    Installed { rd, writer }
}

fn install_writer(inner: &Arc<Inner>, wr: WriteHalf<Tls>) -> tokio::task::JoinHandle<()> {
    let (tx, rx) = mpsc::unbounded_channel();
    let version = lock(&inner.welcome).as_ref().map(|w| w.version).unwrap_or(PROTOCOL_VERSION);
    let handle = tokio::spawn(write_loop(wr, rx, inner.cfg.heartbeat, version));
    let mut st = lock(&inner.state);
    if inner.cfg.resend {
        for (cseq, (op, stamp, _)) in st.unanswered.iter() {
            let f = mutate_frame(*cseq, st.acked_through(), op, *stamp);
            inner.bytes_out.fetch_add(f.len() as u64, Ordering::Relaxed);
            let _ = tx.send(f);
        }
    } else {
        // the caller sends them again itself: its waiters hear of the loss
        for _ in std::mem::take(&mut st.unanswered) {
            inner.window.add_permits(1);
        }
    }
    if let Some((from, _)) = &st.sub {
        if let Ok(f) = encode_frame(&ClientMsg::Subscribe { from_seq: *from }) {
            let _ = tx.send(f);
        }
    }
    st.conn = Some(tx);
    handle
}

/// Frames are encoded at this build's version; on a connection that settled
/// on an older `version` each header says that one.
async fn write_loop(
    mut wr: WriteHalf<Tls>,
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
    heartbeat: Duration,
    version: u16,
) {
    let mut nonce = 0u64;
    let mut next_ping = tokio::time::Instant::now() + heartbeat;
    loop {
        // Ping on schedule even while a long upload keeps the queue busy, so
        // the server's Pong proves it alive between slow group commits.
        let frame = tokio::select! {
            biased;
            _ = tokio::time::sleep_until(next_ping) => {
                nonce += 1;
                next_ping = tokio::time::Instant::now() + heartbeat;
                encode_frame(&ClientMsg::Ping { nonce }).expect("a ping always encodes")
            }
            f = rx.recv() => match f { Some(f) => f, None => break },
        };
        let mut frame = frame;
        if version != PROTOCOL_VERSION {
            codec::set_frame_version(&mut frame, version);
        }
        if wr.write_all(&frame).await.is_err() {
            break;
        }
        if rx.is_empty() && wr.flush().await.is_err() {
            break;
        }
    }
    let _ = wr.shutdown().await;
}

/// Route answers until the connection fails or goes silent.
async fn read_loop(inner: &Arc<Inner>, mut rd: ReadHalf<Tls>) -> Result<(), ClientError> {
    loop {
        if inner.closed.load(Ordering::Acquire) {
            return Ok(());
        }
        let msg = tokio::select! {
            m = tokio::time::timeout(inner.cfg.silence, read_msg(&mut rd, inner)) => match m {
                Ok(Ok(m)) => m,
                Ok(Err(e)) => return Err(ClientError::Protocol(e)),
                Err(_) => return Err(ClientError::Protocol("server silent".into())),
            },
            _ = inner.kick.notified() => return Err(ClientError::Protocol("the replica id changed".into())),
        };
        match msg {
            ServerMsg::Reply { cseq, result } => {
                let mut st = lock(&inner.state);
                // (refusals the server may answer without recording them)
                let unrecorded = matches!(&result, Err(e) if e.is_transient() || matches!(e, OpError::Denied(_)));
                if !unrecorded {
                    st.recorded_through = st.recorded_through.max(cseq);
                }
                if let Some((_, _, waiters)) = st.unanswered.remove(&cseq) {
                    inner.window.add_permits(1);
                    for w in waiters {
                        let _ = w.send(result.clone());
                    }
                }
                let first_open = st.unanswered.keys().next().copied().unwrap_or(st.next_cseq);
                st.answered_through = st.answered_through.max(first_open - 1);
            }
            ServerMsg::Answer { qid, result } => {
                let streaming = matches!(
                    result,
                    Ok(QueryReply::Data { .. }
                        | QueryReply::Hole { .. }
                        | QueryReply::File { .. }
                        | QueryReply::Missing { .. }
                        | QueryReply::SnapshotEntry(_))
                );
                let tx = {
                    let mut st = lock(&inner.state);
                    if streaming {
                        st.queries.get(&qid).cloned()
                    } else {
                        st.queries.remove(&qid)
                    }
                };
                if let Some(tx) = tx {
                    let _ = tx.send(result).await;
                }
            }
            ServerMsg::Record(r) => {
                let tx = {
                    let mut st = lock(&inner.state);
                    match st.sub.as_mut() {
                        Some((last, tx)) => {
                            *last = r.seq;
                            Some(tx.clone())
                        }
                        None => None,
                    }
                };
                if let Some(tx) = tx {
                    let _ = tx.send(StreamEvent::Record(Box::new(r)));
                }
            }
            ServerMsg::SnapshotRequired { oldest } => {
                let tx = lock(&inner.state).sub.take().map(|(_, tx)| tx);
                if let Some(tx) = tx {
                    let _ = tx.send(StreamEvent::SnapshotRequired { oldest });
                }
            }
            ServerMsg::Pong { .. } => {}
            ServerMsg::Refused { reason, message } => return Err(ClientError::Refused { reason, message }),
            ServerMsg::Welcome(_) => return Err(ClientError::Protocol("second Welcome".into())),
        }
    }
}

fn fail_all(inner: &Arc<Inner>, e: &ClientError) {
    let mut st = lock(&inner.state);
    st.fatal = Some(e.clone());
    st.conn = None;
    let err = match e {
        ClientError::Op(o) => o.clone(),
        other => OpError::Transient(other.to_string()),
    };
    for (_, (_, _, ws)) in std::mem::take(&mut st.unanswered) {
        inner.window.add_permits(1);
        // (a caller that sends again itself hears of the loss, not of a
        // refusal: the change may have been applied)
        if inner.cfg.resend {
            for w in ws {
                let _ = w.send(Err(err.clone()));
            }
        }
    }
    st.queries.clear();
    st.sub = None;
}

/// Pause before the next attempt after the server refused one.
const REFUSED_RETRY: Duration = Duration::from_secs(2);

/// Keep a connection up until the client is closed, whatever the server
/// says (the caller sees why it is down in `problem`).
pub(crate) async fn supervise(inner: Arc<Inner>, first: Option<Installed>) {
    let mut current = first;
    let mut backoff = Duration::from_millis(20);
    loop {
        if let Some(Installed { rd, writer }) = current.take() {
            backoff = Duration::from_millis(20);
            let end = read_loop(&inner, rd).await;
            lock(&inner.link).set(false);
            {
                let mut st = lock(&inner.state);
                st.conn = None;
                // Queries in flight are lost with the connection; callers retry.
                st.queries.clear();
            }
            writer.abort();
            if let Err(e) = end {
                *lock(&inner.problem) = Some(e);
            }
        }
        if inner.closed.load(Ordering::Acquire) {
            return fail_all(&inner, &ClientError::Disconnected);
        }
        if !inner.cfg.reconnect {
            return fail_all(&inner, &ClientError::Disconnected);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(500));
        match establish(&inner).await {
            Ok(l) => {
                inner.reconnects.fetch_add(1, Ordering::Relaxed);
                *lock(&inner.problem) = None;
                current = Some(install(&inner, l));
            }
            Err(e) => {
                // A refusal (token, version, incarnation, certificate) is
                // never the end either: the server may be fixed. Less often.
                if !matches!(e, ClientError::Connect { .. }) {
                    backoff = REFUSED_RETRY;
                }
                *lock(&inner.problem) = Some(e);
            }
        }
    }
}

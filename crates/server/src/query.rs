//! Queries and streams: metadata from the store, file data by handle
//! (hole-aware, chunked, back-pressured), snapshots and the record stream.

use crate::net::Out;
use crate::server::Server;
use crate::sys;
use izo_journal::StoredRecord;
use izo_proto::*;
use std::os::fd::AsFd;
use std::sync::Arc;

/// Largest data chunk per read frame.
const CHUNK: u64 = 1 << 20;

/// Encode an answer; one too large for a frame becomes an error answer, so
/// the client is never left waiting.
fn answer(qid: u64, result: Result<QueryReply, OpError>) -> Vec<u8> {
    encode_frame(&ServerMsg::Answer { qid, result }).unwrap_or_else(|e| {
        let result = Err(OpError::Invalid(format!("answer does not fit in a frame: {e}")));
        encode_frame(&ServerMsg::Answer { qid, result }).expect("an error answer always fits in a frame")
    })
}

impl Server {
    pub(crate) async fn query(self: Arc<Self>, qid: u64, query: Query, out: Arc<Out>) {
        let srv = self.clone();
        let bulk = out.bulk.clone();
        let res = tokio::task::spawn_blocking(move || srv.query_blocking(qid, query, &bulk)).await;
        let frame = match res {
            Ok(Ok(Some(reply))) => answer(qid, Ok(reply)),
            Ok(Ok(None)) => return,
            Ok(Err(e)) => answer(qid, Err(e)),
            Err(e) => answer(qid, Err(OpError::Transient(format!("query task failed: {e}")))),
        };
        let _ = out.bulk.send(frame).await;
    }

    /// Answer a query; streamed answers go out through `bulk` and the final
    /// frame is returned.
    fn query_blocking(
        &self,
        qid: u64,
        q: Query,
        bulk: &tokio::sync::mpsc::Sender<Vec<u8>>,
    ) -> Result<Option<QueryReply>, OpError> {
        let store = &self.shared.store;
        let stream = |r: QueryReply| {
            bulk.blocking_send(answer(qid, Ok(r))).map_err(|_| OpError::Transient("connection closed".into()))
        };
        Ok(Some(match q {
            Query::Lookup { parent, name } => QueryReply::Attr(store.lookup(parent, &name)?),
            Query::GetAttr { id } => QueryReply::Attr(store.getattr(id)?),
            Query::ReadDir { id, cookie, max } => {
                let (entries, done) = store.readdir(id, cookie, max)?;
                QueryReply::Entries { entries, done }
            }
            Query::ReadLink { id } => QueryReply::Target(store.readlink(id)?),
            Query::ListXattr { id } => QueryReply::Xattrs(store.xattrs(id)?),
            Query::BlockHashes { id } => {
                // Ship only fresh hashes; a write racing the rehash makes us go again.
                let mut tries = 0;
                loop {
                    crate::hash::rehash(store, self.shared.root.as_fd(), id).map_err(OpError::Transient)?;
                    let (row, blocks) = store.row_and_hashes(id)?;
                    if row.stale.is_empty() {
                        break QueryReply::Hashes { version: row.versions.data, blocks };
                    }
                    tries += 1;
                    if tries == 5 {
                        return Err(OpError::Transient(format!("{id} keeps changing; ask again")));
                    }
                }
            }
            Query::Rules => {
                use std::sync::atomic::Ordering::Relaxed;
                QueryReply::Rules(VolumeRules {
                    max_file_size: store.max_file_size.load(Relaxed),
                    xattr_room: store.xattr_room.load(Relaxed),
                    trusted: self.policy.trusted,
                    owners: match self.policy.owners {
                        crate::policy::Owners::Preserve => 0,
                        crate::policy::Owners::Squash => 1,
                        crate::policy::Owners::Map => 2,
                    },
                })
            }
            Query::Stats => {
                let mut c = self.counters();
                // where the stream is: a client waits for this in `izo sync`
                c.push(("applied_seq".into(), *self.shared.applied.borrow()));
                QueryReply::Stats(c)
            }
            Query::Read { id, offset, len } => {
                self.read_stream(id, offset, len, false, &stream)?;
                QueryReply::End { seq: *self.shared.applied.borrow() }
            }
            Query::ReadFiles { files } => {
                if files.len() > MAX_READ_FILES {
                    return Err(OpError::Invalid(format!(
                        "{} files in one read; at most {MAX_READ_FILES}",
                        files.len()
                    )));
                }
                for (id, len) in files {
                    match self.read_stream(id, 0, len, true, &stream) {
                        Ok(()) => {}
                        // gone, or not a file any more: a record says what
                        Err(OpError::NotFound(_) | OpError::Invalid(_)) => stream(QueryReply::Missing { id })?,
                        Err(e) => return Err(e),
                    }
                }
                QueryReply::End { seq: *self.shared.applied.borrow() }
            }
            Query::Snapshot => {
                // (a first start on a populated export journals it first:
                // a snapshot before would hold a part of the tree)
                self.wait_scanned()?;
                let seq = store.snapshot(|e| stream(QueryReply::SnapshotEntry(e)))?;
                QueryReply::End { seq }
            }
        }))
    }

    /// Wait until the scan at the start journaled the export.
    fn wait_scanned(&self) -> Result<(), OpError> {
        use std::sync::atomic::Ordering;
        let started = std::time::Instant::now();
        while !self.shared.scanned.load(Ordering::Acquire) {
            if self.shared.stop.load(Ordering::Acquire) {
                return Err(OpError::Transient("the server is stopping".into()));
            }
            if started.elapsed() > std::time::Duration::from_secs(600) {
                return Err(OpError::Transient("the server is still scanning its export; ask again".into()));
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Ok(())
    }

    /// Stream `offset..offset+len` of file `id` (with `announce`, first a
    /// `File` frame with the length sent).
    fn read_stream(
        &self,
        id: ObjectId,
        offset: u64,
        len: u64,
        announce: bool,
        stream: &dyn Fn(QueryReply) -> Result<(), OpError>,
    ) -> Result<(), OpError> {
        let row = self.shared.store.object(id)?;
        if row.kind != FileKind::File {
            return Err(OpError::Invalid(format!("{id} is not a regular file")));
        }
        let io = |e: std::io::Error| OpError::Io(format!("reading {id}: {e}"));
        // (removed from the export since its row was read: gone)
        let fd = sys::open_by_handle(self.shared.root.as_fd(), &row.handle, libc::O_RDONLY).map_err(|e| {
            if sys::gone(&e) {
                OpError::NotFound(format!("{id} is gone"))
            } else {
                io(e)
            }
        })?;
        let st = sys::fstatat(fd.as_fd(), b"").map_err(io)?;
        // Never past the committed size: a direct append may be in flight.
        let size = (st.st_size as u64).min(row.size);
        let end = offset.saturating_add(len).min(size);
        if announce {
            stream(QueryReply::File { id, size: end.saturating_sub(offset) })?;
        }
        // a file with all its blocks allocated has no holes: no need to
        // look for them (two syscalls per file fewer, most files).
        // Small files only: blocks preallocated past a large file's end
        // could hide its holes.
        let dense = st.st_size as u64 <= CHUNK && (st.st_blocks as u64).saturating_mul(512) >= st.st_size as u64;
        let mut pos = offset;
        let mut buf = Vec::new();
        while pos < end {
            let data = if dense {
                pos
            } else {
                sys::seek(fd.as_fd(), pos, libc::SEEK_DATA).map_err(io)?.unwrap_or(end).min(end)
            };
            if data > pos {
                stream(QueryReply::Hole { offset: pos, len: data - pos })?;
                pos = data;
                continue;
            }
            let hole =
                if dense { end } else { sys::seek(fd.as_fd(), pos, libc::SEEK_HOLE).map_err(io)?.unwrap_or(end) };
            let stop = hole.min(end).min(pos + CHUNK);
            buf.resize((stop - pos) as usize, 0);
            let n = sys::pread(fd.as_fd(), &mut buf, pos).map_err(io)?;
            if n == 0 {
                break;
            }
            stream(QueryReply::Data { offset: pos, bytes: buf[..n].to_vec() })?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Stream records after `from_seq` as they are applied, until the
    /// connection closes.
    pub(crate) async fn subscribe(self: Arc<Self>, from_seq: Seq, out: Arc<Out>) {
        let store = self.shared.store.clone();
        let mut applied = self.shared.applied.clone();
        let mut next = from_seq.saturating_add(1);
        loop {
            let upto = *applied.borrow_and_update();
            while next <= upto {
                let st = store.clone();
                let recs = tokio::task::spawn_blocking(move || st.records_from(next, 512)).await;
                let recs: Vec<StoredRecord> = match recs {
                    Ok(Ok(r)) => r,
                    _ => return,
                };
                if recs.first().map(|r| r.record.seq) != Some(next) {
                    let oldest = store.retained_from().unwrap_or(next);
                    let _ = out
                        .bulk
                        .send(
                            encode_frame(&ServerMsg::SnapshotRequired { oldest })
                                .expect("a small message always encodes"),
                        )
                        .await;
                    return;
                }
                for r in recs.into_iter().take_while(|r| r.record.seq <= upto) {
                    next = r.record.seq + 1;
                    // (records carry at most INLINE_WRITE_MAX bytes, far below a frame)
                    let frame = encode_frame(&ServerMsg::Record(r.record)).expect("a record always fits in a frame");
                    if out.bulk.send(frame).await.is_err() {
                        return;
                    }
                }
            }
            if applied.changed().await.is_err() || out.bulk.is_closed() {
                return;
            }
        }
    }
}

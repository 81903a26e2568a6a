//! Queries: lookups, listings, streamed hole-aware reads, snapshots, stats.

use crate::{lock, Client, ClientError, FileSegment, Segment};
use izo_proto::*;
use std::sync::atomic::Ordering;
use tokio::sync::mpsc;

impl Client {
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

    /// The volume's rules (protocol 6 on: [`Query::Rules`]).
    pub async fn rules(&self) -> Result<VolumeRules, ClientError> {
        match self.query(Query::Rules).await? {
            QueryReply::Rules(r) => Ok(r),
            other => Err(ClientError::Protocol(format!("rules answered {other:?}"))),
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

    /// Stream the first `len` bytes of each of `files` (at most
    /// [`MAX_READ_FILES`]) to `sink`: one query for many small files.
    pub async fn read_files(
        &self,
        files: Vec<(ObjectId, u64)>,
        mut sink: impl FnMut(FileSegment) -> Result<(), ClientError>,
    ) -> Result<(), ClientError> {
        let mut rx = self.query_stream(Query::ReadFiles { files }).await?;
        loop {
            match rx.recv().await {
                Some(Ok(QueryReply::File { id, size })) => sink(FileSegment::Start { id, size })?,
                Some(Ok(QueryReply::Missing { id })) => sink(FileSegment::Missing(id))?,
                Some(Ok(QueryReply::Data { offset, bytes })) => sink(FileSegment::Seg(Segment::Data(offset, bytes)))?,
                Some(Ok(QueryReply::Hole { offset, len })) => sink(FileSegment::Seg(Segment::Hole(offset, len)))?,
                Some(Ok(QueryReply::End { .. })) => return Ok(()),
                Some(Ok(other)) => return Err(ClientError::Protocol(format!("read of files answered {other:?}"))),
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
}

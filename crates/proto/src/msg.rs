//! Messages exchanged on a connection, queries, journal records and
//! snapshot entries.

use crate::codec::{decode_frame, decode_handshake, FrameError};
use crate::ids::{ObjectId, ReplicaId, Seq, Timestamp};
use crate::op::{Applied, Attr, Op, OpError};
use serde::{Deserialize, Serialize};

/// Messages from a client to the server.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum ClientMsg {
    /// First message on every connection.
    Hello(Hello),
    /// A mutation with its client seq; `acked_through` reports that replies
    /// through that client seq are durably recorded by the client.
    Mutate { cseq: u64, acked_through: u64, op: Op },
    /// A read-only request, answered with the same `qid`.
    Query { qid: u64, query: Query },
    /// Stream journal records after `from_seq` on this connection.
    Subscribe { from_seq: Seq },
    /// Liveness probe.
    Ping { nonce: u64 },
    /// A mutation stamped by the replica that made it: the implicit mtimes
    /// it sets (of the object it writes or makes, of the directories whose
    /// entries it changes) take `stamp` (the replica's clock plus the
    /// handshake offset), so every replica and the export keep the time the
    /// change was made, not the time the server applied it.
    MutateAt { cseq: u64, acked_through: u64, op: Op, stamp: Timestamp },
}

/// A borrowed view of [`ClientMsg`] for encoding without copying the op:
/// the variants match one for one, so the bytes are the same.
#[derive(Serialize)]
pub enum ClientMsgRef<'a> {
    /// As [`ClientMsg::Hello`].
    Hello(&'a Hello),
    /// As [`ClientMsg::Mutate`].
    Mutate {
        /// Client seq.
        cseq: u64,
        /// Replies durable at the client through this seq.
        acked_through: u64,
        /// The op.
        op: &'a Op,
    },
    /// As [`ClientMsg::Query`].
    Query {
        /// Query id.
        qid: u64,
        /// The query.
        query: &'a Query,
    },
    /// As [`ClientMsg::Subscribe`].
    Subscribe {
        /// First seq wanted, exclusive.
        from_seq: Seq,
    },
    /// As [`ClientMsg::Ping`].
    Ping {
        /// Echoed back.
        nonce: u64,
    },
    /// As [`ClientMsg::MutateAt`].
    MutateAt {
        /// Client seq.
        cseq: u64,
        /// Replies durable at the client through this seq.
        acked_through: u64,
        /// The op.
        op: &'a Op,
        /// When the replica made the change.
        stamp: Timestamp,
    },
}

/// Handshake sent by the client. Its layout is kept across protocol
/// versions (new fields go at the end), so any server can read the range.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Hello {
    /// Highest protocol version the client speaks.
    pub version: u16,
    /// Volume to open.
    pub volume: String,
    /// Access token.
    pub token: String,
    /// The client's replica id (registered on first use).
    pub replica: ReplicaId,
    /// Highest client seq whose reply the client has durably recorded.
    pub last_acked: u64,
    /// The client's users (id, name), for volumes that map owners by name.
    pub users: Vec<(u32, String)>,
    /// The client's groups (id, name).
    pub groups: Vec<(u32, String)>,
    /// Lowest protocol version the client speaks (a Hello of a build
    /// before version negotiation has no such field: it speaks `version`
    /// only).
    pub min_version: u16,
    /// The volume incarnation the client followed when it last connected
    /// (0: none yet, or a Hello from before this field). `last_acked`
    /// speaks of replies under that incarnation.
    pub incarnation: u128,
}

/// A Hello as builds before version negotiation sent it.
#[derive(Deserialize)]
enum LegacyFirst {
    Hello {
        version: u16,
        volume: String,
        token: String,
        replica: ReplicaId,
        last_acked: u64,
        users: Vec<(u32, String)>,
        groups: Vec<(u32, String)>,
    },
}

impl Hello {
    /// The client's protocol versions, lowest and highest.
    pub fn versions(&self) -> (u16, u16) {
        (self.min_version.min(self.version), self.version)
    }

    /// Decode the first frame body of a connection. A Hello is read whatever
    /// version the frame header names (so a client of another range learns
    /// why it is refused), including the Hello of builds before version
    /// negotiation; any other first message must carry a version this build
    /// speaks.
    pub fn decode_first(body: &[u8]) -> Result<ClientMsg, FrameError> {
        if let Ok((_, m @ ClientMsg::Hello(_))) = decode_handshake::<ClientMsg>(body) {
            return Ok(m);
        }
        if let Ok((_, LegacyFirst::Hello { version, volume, token, replica, last_acked, users, groups })) =
            decode_handshake::<LegacyFirst>(body)
        {
            let (min_version, incarnation) = (version, 0);
            let h = Hello { version, volume, token, replica, last_acked, users, groups, min_version, incarnation };
            return Ok(ClientMsg::Hello(h));
        }
        decode_frame(body)
    }
}

/// Read-only requests.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum Query {
    /// Resolve a name in a directory.
    Lookup { parent: ObjectId, name: Vec<u8> },
    /// Attributes of an object.
    GetAttr { id: ObjectId },
    /// One page of a directory listing, after `cookie` (0 = start).
    ReadDir { id: ObjectId, cookie: u64, max: u32 },
    /// Stream a byte range, holes reported as holes.
    Read { id: ObjectId, offset: u64, len: u64 },
    /// Stream the first `len` bytes of each of several files (initial
    /// replication: one query, not one per small file; at most
    /// [`MAX_READ_FILES`]): for each, `File` (or `Missing`), then its data
    /// and holes; then `End`.
    ReadFiles { files: Vec<(ObjectId, u64)> },
    /// Symlink target.
    ReadLink { id: ObjectId },
    /// All extended attributes of an object.
    ListXattr { id: ObjectId },
    /// Block hashes of a file's content.
    BlockHashes { id: ObjectId },
    /// Stream a consistent snapshot of the whole volume.
    Snapshot,
    /// Server counters.
    Stats,
    /// What the volume refuses that only the server knows (protocol 6 on):
    /// answered with [`QueryReply::Rules`]; a client keeps it for offline
    /// use and refuses locally what the server would.
    Rules,
}

/// One directory entry in a listing.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct DirEntry {
    /// Entry name.
    #[serde(with = "serde_bytes")]
    pub name: Vec<u8>,
    /// Attributes of the entry's object.
    pub attr: Attr,
    /// Cookie to continue the listing after this entry.
    pub cookie: u64,
}

/// Most files one ReadFiles query may ask for.
pub const MAX_READ_FILES: usize = 1024;

/// Answers to queries; streamed ones send several frames.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum QueryReply {
    /// Attributes (lookup, getattr).
    Attr(Attr),
    /// A page of entries; `done` when the directory has no more.
    Entries { entries: Vec<DirEntry>, done: bool },
    /// Bytes at `offset` (read stream).
    Data {
        offset: u64,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// A hole of `len` bytes at `offset` (read stream).
    Hole { offset: u64, len: u64 },
    /// The data and holes that follow are of file `id`, whose first
    /// `size` bytes are sent (ReadFiles stream).
    File { id: ObjectId, size: u64 },
    /// File `id` is gone or no longer a file (ReadFiles stream).
    Missing { id: ObjectId },
    /// Symlink target.
    Target(Vec<u8>),
    /// Extended attributes, sorted by name.
    Xattrs(Vec<(Vec<u8>, Vec<u8>)>),
    /// BLAKE3 hashes of 1 MiB blocks, at the given data version.
    Hashes { version: Seq, blocks: Vec<[u8; 32]> },
    /// One snapshot entry (snapshot stream).
    SnapshotEntry(SnapshotEntry),
    /// Counters by name.
    Stats(Vec<(String, u64)>),
    /// End of a stream; for a snapshot, the seq it is consistent at.
    End { seq: Seq },
    /// The volume's rules ([`Query::Rules`]).
    Rules(VolumeRules),
}

/// What only the server knows of what a volume accepts (see
/// [`Query::Rules`]); which xattr names replicate follows from `trusted`
/// ([`crate::rules::xattr`]).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct VolumeRules {
    /// The export's largest file size (a write or truncate past it is
    /// `FileTooBig`).
    pub max_file_size: u64,
    /// Room for extended attributes in one inode of the export (names,
    /// values and a 24-byte header each; more is `NoSpace`).
    pub xattr_room: u64,
    /// Device nodes, set-id bits, `trusted.*` and `security.capability`
    /// are kept.
    pub trusted: bool,
    /// How owners are stored: 0 as sent, 1 all squashed to one owner, 2
    /// mapped by name.
    pub owners: u8,
}

/// One object of a snapshot with all its names.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct SnapshotEntry {
    /// Attributes and versions.
    pub attr: Attr,
    /// Every (parent, name) pointing at the object.
    pub links: Vec<(ObjectId, Vec<u8>)>,
    /// Symlink target, if a symlink.
    pub target: Option<Vec<u8>>,
    /// Extended attributes.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Block hashes of the content.
    pub blocks: Vec<[u8; 32]>,
}

/// Where a journal record came from.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum Origin {
    /// A client op: replica and its client seq.
    Replica(ReplicaId, u64),
    /// A change made directly in the export.
    Local,
}

/// A journal record as streamed to subscribers.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Record {
    /// Journal seq.
    pub seq: Seq,
    /// Origin of the change.
    pub origin: Origin,
    /// Server time of the change.
    pub time: Timestamp,
    /// The op as applied (write bytes dropped when over the inline limit).
    pub op: Op,
    /// Attributes of the main object after the op, if it still exists.
    pub attr: Option<Attr>,
    /// A write whose bytes are not in the record (large, appended in place,
    /// or made in the export by another program) gives their length here:
    /// the range `offset..offset + elided` is fetched. 0 otherwise.
    pub elided: u64,
    /// Attributes after the op of the directories whose entries it changed
    /// (their mtime, nlink and versions), so followers need not ask.
    pub dirs: Vec<Attr>,
}

/// Messages from the server to a client.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum ServerMsg {
    /// Handshake accepted.
    Welcome(Welcome),
    /// Handshake or frame refused; the connection closes after this.
    Refused { reason: RefuseReason, message: String },
    /// Reply to a mutation.
    Reply { cseq: u64, result: Result<Applied, OpError> },
    /// Reply (or one frame of a streamed reply) to a query.
    Answer { qid: u64, result: Result<QueryReply, OpError> },
    /// A journal record on a subscribed connection.
    Record(Record),
    /// The subscriber is behind retention: read a snapshot, then resubscribe.
    SnapshotRequired { oldest: Seq },
    /// Answer to a ping.
    Pong { nonce: u64 },
}

/// Handshake answer. Its layout is kept across protocol versions.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Welcome {
    /// Protocol version the connection uses: the highest one both the
    /// client's and the server's ranges hold.
    pub version: u16,
    /// Volume incarnation: a new one means saved seqs and ids are void.
    pub incarnation: u128,
    /// Volume name.
    pub volume: String,
    /// Highest client seq of this replica the server has applied.
    pub last_applied: u64,
    /// Highest journal seq committed.
    pub head_seq: Seq,
    /// Server clock, for the client's offset.
    pub time: Timestamp,
    /// Whether the token allows mutations.
    pub writable: bool,
    /// Whether the volume is trusted: device nodes and set-id bits are kept.
    pub trusted: bool,
}

/// Why a connection was refused. New reasons go at the end (the order is
/// the encoding).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum RefuseReason {
    /// The client's and the server's protocol version ranges are disjoint
    /// (the message names both).
    Version,
    /// Missing or unknown token, or no right on the volume.
    Auth,
    /// Unknown volume.
    NoVolume,
    /// Malformed or oversized frame.
    BadFrame,
    /// The first message was not a handshake.
    Protocol,
    /// The replica claims replies this server never recorded for it: its
    /// cache belongs to other server state, or the server's state dir was
    /// restored from a backup (which only the operator can accept, with
    /// `izo serve --accept-rollback`). Only this replica is refused.
    ReplicaAhead,
}

/// Convenience: the applied result of a mutation reply.
pub type MutateResult = Result<Applied, OpError>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{codec::encode_frame, ObjectId};

    fn hello() -> Hello {
        Hello {
            version: 7,
            volume: "vol".into(),
            token: "t".into(),
            replica: ReplicaId(5),
            last_acked: 2,
            users: vec![(1, "u".into())],
            groups: vec![],
            min_version: 5,
            incarnation: 9,
        }
    }

    #[test]
    fn a_hello_of_another_version_range_is_still_read() {
        let f = encode_frame(&ClientMsg::Hello(hello())).unwrap();
        let mut g = f.clone();
        crate::codec::set_frame_version(&mut g, 7);
        for frame in [f, g] {
            match Hello::decode_first(&frame[4..]) {
                Ok(ClientMsg::Hello(h)) => assert_eq!(h.versions(), (5, 7)),
                other => panic!("{other:?}"),
            }
        }
    }

    /// The Hello of builds before negotiation: the same fields, no range.
    #[test]
    fn a_hello_without_a_range_speaks_its_one_version() {
        #[derive(Serialize)]
        enum Old {
            Hello {
                version: u16,
                volume: String,
                token: String,
                replica: ReplicaId,
                last_acked: u64,
                users: Vec<(u32, String)>,
                groups: Vec<(u32, String)>,
            },
        }
        let h = hello();
        let old = Old::Hello {
            version: 3,
            volume: h.volume.clone(),
            token: h.token.clone(),
            replica: h.replica,
            last_acked: h.last_acked,
            users: h.users.clone(),
            groups: h.groups.clone(),
        };
        let f = encode_frame(&old).unwrap();
        match Hello::decode_first(&f[4..]) {
            Ok(ClientMsg::Hello(got)) => {
                assert_eq!(got.versions(), (3, 3));
                assert_eq!((got.token, got.replica, got.last_acked), (h.token, h.replica, h.last_acked));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_first_message_other_than_hello_needs_a_spoken_version() {
        let mut f = encode_frame(&ClientMsg::Ping { nonce: 3 }).unwrap();
        assert_eq!(Hello::decode_first(&f[4..]), Ok(ClientMsg::Ping { nonce: 3 }));
        crate::codec::set_frame_version(&mut f, 99);
        assert_eq!(Hello::decode_first(&f[4..]), Err(FrameError::Version(99)));
    }

    #[test]
    fn the_borrowed_mutate_encodes_like_the_owned_one() {
        let op = Op::Write { id: ObjectId(5), base: 3, offset: 7, data: vec![1, 2, 3] };
        let owned = encode_frame(&ClientMsg::Mutate { cseq: 9, acked_through: 8, op: op.clone() }).unwrap();
        let borrowed = encode_frame(&ClientMsgRef::Mutate { cseq: 9, acked_through: 8, op: &op }).unwrap();
        assert_eq!(owned, borrowed);
        let stamp = Timestamp { secs: 1_700_000_000, nsec: 5 };
        let owned = encode_frame(&ClientMsg::MutateAt { cseq: 9, acked_through: 8, op: op.clone(), stamp }).unwrap();
        let borrowed = encode_frame(&ClientMsgRef::MutateAt { cseq: 9, acked_through: 8, op: &op, stamp }).unwrap();
        assert_eq!(owned, borrowed);
    }
}

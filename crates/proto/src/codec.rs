//! Framing: `u32` big-endian length, then `u16` protocol version, then a
//! postcard-encoded message. Pure functions over byte buffers.
//!
//! A frame is accepted when its version is one this build speaks
//! ([`MIN_PROTOCOL_VERSION`]..=[`PROTOCOL_VERSION`]); which one a connection
//! uses is settled by the handshake ([`negotiate`]). The handshake messages
//! themselves (`Hello`, `Welcome`, `Refused`) keep their layout across
//! versions and are read with [`decode_handshake`], whatever version their
//! header names, so peers with disjoint ranges still get a clear refusal.

use crate::{MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
use serde::{de::DeserializeOwned, Serialize};

/// Largest frame accepted, header excluded (a 4 MiB payload plus headroom).
pub const MAX_FRAME: usize = 8 << 20;

/// Largest frame accepted before a connection is authenticated: a Hello
/// (token, volume name, the client's user and group names) fits easily.
pub const MAX_HANDSHAKE_FRAME: usize = 64 << 10;

/// The protocol versions this build speaks, lowest and highest.
pub const VERSIONS: (u16, u16) = (MIN_PROTOCOL_VERSION, PROTOCOL_VERSION);

/// The highest version both ranges (lowest, highest) hold, if any.
pub fn negotiate(client: (u16, u16), server: (u16, u16)) -> Option<u16> {
    let high = client.1.min(server.1);
    let low = client.0.max(server.0);
    (low <= high).then_some(high)
}

/// A version range as people read it: `3` or `3..=5`.
pub fn show_range((low, high): (u16, u16)) -> String {
    if low == high {
        format!("{low}")
    } else {
        format!("{low}..={high}")
    }
}

/// Why a frame could not be encoded or decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The length prefix exceeds [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    /// The frame is shorter than its version header.
    #[error("frame of {0} bytes is too short")]
    TooShort(usize),
    /// The frame carries a protocol version this build does not speak.
    #[error("peer speaks protocol version {0}, this build speaks {range}", range = show_range(VERSIONS))]
    Version(u16),
    /// The body does not decode as the expected message.
    #[error("malformed frame: {0}")]
    Malformed(String),
}

/// Encode `msg` as a complete frame (length prefix included).
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    // Size first, so a multi-MiB payload is copied once, never reallocated.
    let size = postcard::experimental::serialized_size(msg).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let mut out = Vec::with_capacity(6 + size);
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
    let mut out = postcard::to_extend(msg, out).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let body = out.len() - 4;
    if body > MAX_FRAME {
        return Err(FrameError::TooLarge(body));
    }
    out[0..4].copy_from_slice(&(body as u32).to_be_bytes());
    Ok(out)
}

/// Check a length prefix before reading the body it announces.
pub fn check_len(len: u32) -> Result<usize, FrameError> {
    check_len_max(len, MAX_FRAME)
}

/// Check a length prefix against a smaller bound than [`MAX_FRAME`] (for
/// frames read before authentication: [`MAX_HANDSHAKE_FRAME`]).
pub fn check_len_max(len: u32, max: usize) -> Result<usize, FrameError> {
    let len = len as usize;
    if len > max.min(MAX_FRAME) {
        return Err(FrameError::TooLarge(len));
    }
    if len < 2 {
        return Err(FrameError::TooShort(len));
    }
    Ok(len)
}

/// Decode a frame body (the bytes after the length prefix).
pub fn decode_frame<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(body.len()));
    }
    if body.len() < 2 {
        return Err(FrameError::TooShort(body.len()));
    }
    let version = u16::from_be_bytes([body[0], body[1]]);
    if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version) {
        return Err(FrameError::Version(version));
    }
    postcard::from_bytes(&body[2..]).map_err(|e| FrameError::Malformed(e.to_string()))
}

/// Decode a handshake frame body whatever version its header names;
/// returns that version with the message. Only for the messages whose
/// layout every version keeps (`Hello`, `Welcome`, `Refused`).
pub fn decode_handshake<T: DeserializeOwned>(body: &[u8]) -> Result<(u16, T), FrameError> {
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(body.len()));
    }
    if body.len() < 2 {
        return Err(FrameError::TooShort(body.len()));
    }
    let version = u16::from_be_bytes([body[0], body[1]]);
    let msg = postcard::from_bytes(&body[2..]).map_err(|e| FrameError::Malformed(e.to_string()))?;
    Ok((version, msg))
}

/// Put `version` in the header of an encoded frame (length prefix
/// included), for a connection that settled on a version below
/// [`PROTOCOL_VERSION`]. A frame too short to hold a header is left alone.
pub fn set_frame_version(frame: &mut [u8], version: u16) {
    if let Some(h) = frame.get_mut(4..6) {
        h.copy_from_slice(&version.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ClientMsg, ObjectId, Op};
    use proptest::prelude::*;

    #[test]
    fn frame_round_trips_non_utf8_names() {
        let msg = ClientMsg::Mutate {
            cseq: 7,
            acked_through: 3,
            op: Op::Create {
                parent: ObjectId::ROOT,
                name: vec![0xff, 0xfe, b'a'],
                id: ObjectId(9),
                mode: 0o644,
                uid: 1,
                gid: 2,
            },
        };
        let f = encode_frame(&msg).unwrap();
        let len = u32::from_be_bytes([f[0], f[1], f[2], f[3]]) as usize;
        assert_eq!(len, f.len() - 4);
        let back: ClientMsg = decode_frame(&f[4..]).unwrap();
        assert_eq!(back, msg);
    }

    #[test]
    fn other_version_is_refused_by_name() {
        let mut f = encode_frame(&ClientMsg::Ping { nonce: 1 }).unwrap();
        f[5] = 99;
        assert!(matches!(decode_frame::<ClientMsg>(&f[4..]), Err(FrameError::Version(_))));
    }

    #[test]
    fn oversized_length_prefix_is_refused_before_reading() {
        assert_eq!(check_len(u32::MAX), Err(FrameError::TooLarge(u32::MAX as usize)));
        let over = MAX_HANDSHAKE_FRAME as u32 + 1;
        assert_eq!(check_len_max(over, MAX_HANDSHAKE_FRAME), Err(FrameError::TooLarge(over as usize)));
        assert_eq!(check_len_max(100, MAX_HANDSHAKE_FRAME), Ok(100));
    }

    #[test]
    fn every_version_of_the_range_is_accepted_in_a_frame_header() {
        for v in MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION {
            let mut f = encode_frame(&ClientMsg::Ping { nonce: 1 }).unwrap();
            set_frame_version(&mut f, v);
            assert_eq!(decode_frame::<ClientMsg>(&f[4..]), Ok(ClientMsg::Ping { nonce: 1 }));
        }
        let mut f = encode_frame(&ClientMsg::Ping { nonce: 1 }).unwrap();
        set_frame_version(&mut f, PROTOCOL_VERSION + 1);
        assert_eq!(decode_frame::<ClientMsg>(&f[4..]), Err(FrameError::Version(PROTOCOL_VERSION + 1)));
        let (v, m) = decode_handshake::<ClientMsg>(&f[4..]).unwrap();
        assert_eq!((v, m), (PROTOCOL_VERSION + 1, ClientMsg::Ping { nonce: 1 }));
    }

    #[test]
    fn negotiation_picks_the_highest_common_version() {
        assert_eq!(negotiate((3, 3), (3, 3)), Some(3));
        assert_eq!(negotiate((3, 9), (2, 5)), Some(5));
        assert_eq!(negotiate((1, 4), (3, 7)), Some(4));
        assert_eq!(negotiate((6, 9), (3, 5)), None);
        assert_eq!(negotiate((1, 2), (3, 5)), None);
        assert_eq!(show_range((3, 3)), "3");
        assert_eq!(show_range((3, 5)), "3..=5");
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_the_decoder(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_frame::<ClientMsg>(&body);
        }
    }
}

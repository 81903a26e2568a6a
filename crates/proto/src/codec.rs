//! Framing: `u32` big-endian length, then `u16` protocol version, then a
//! postcard-encoded message. Pure functions over byte buffers.

use crate::PROTOCOL_VERSION;
use serde::{de::DeserializeOwned, Serialize};

/// Largest frame accepted, header excluded (a 4 MiB payload plus headroom).
pub const MAX_FRAME: usize = 8 << 20;

/// Why a frame could not be encoded or decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The length prefix exceeds [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    /// The frame is shorter than its version header.
    #[error("frame of {0} bytes is too short")]
    TooShort(usize),
    /// The peer speaks another protocol version.
    #[error("peer speaks protocol version {0}, this build speaks {PROTOCOL_VERSION}")]
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
    let len = len as usize;
    if len > MAX_FRAME {
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
    if version != PROTOCOL_VERSION {
        return Err(FrameError::Version(version));
    }
    postcard::from_bytes(&body[2..]).map_err(|e| FrameError::Malformed(e.to_string()))
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
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_the_decoder(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_frame::<ClientMsg>(&body);
        }
    }
}

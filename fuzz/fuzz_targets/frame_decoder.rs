//! Arbitrary bytes as frame bodies: the decoder never panics, and whatever
//! it accepts re-encodes to a frame that decodes to the same message.
#![no_main]

use izo_proto::{codec::check_len, decode_frame, encode_frame, ClientMsg, ServerMsg};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() >= 4 {
        let _ = check_len(u32::from_be_bytes([data[0], data[1], data[2], data[3]]));
    }
    if let Ok(m) = decode_frame::<ClientMsg>(data) {
        let f = encode_frame(&m).expect("an accepted message re-encodes");
        assert_eq!(decode_frame::<ClientMsg>(&f[4..]).ok(), Some(m));
    }
    if let Ok(m) = decode_frame::<ServerMsg>(data) {
        let f = encode_frame(&m).expect("an accepted message re-encodes");
        assert_eq!(decode_frame::<ServerMsg>(&f[4..]).ok(), Some(m));
    }
});

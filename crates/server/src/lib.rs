//! The volume server: validate → journal → apply, the record stream, TLS
//! and tokens. It must never know about FUSE; every access to the exported
//! tree goes through [`tree::Tree`].

pub mod sys;
pub mod tree;

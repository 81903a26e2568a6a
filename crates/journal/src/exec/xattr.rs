//! The xattr rules live with the namespace rules (`izo_proto::rules::xattr`),
//! which the client applies too.

pub(crate) use izo_proto::rules::xattr::*;

//! The applied-seq hint: a tiny file rewritten (without fsync) after every
//! applied record, stamped with the boot id. After a process crash the page
//! cache survives, so the hint says exactly how far the tree got; after a
//! machine crash the boot id differs and replay starts at the checkpoint.

use crate::sys;
use izo_proto::Seq;
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::path::Path;

/// The hint file and the last value written.
pub struct Hint {
    file: Option<File>,
    seq: Seq,
    boot: [u8; 16],
}

impl Hint {
    /// Open (or create) the hint at `path`; `enabled = false` writes nothing.
    pub fn open(path: &Path, enabled: bool) -> io::Result<(Hint, Option<Seq>)> {
        let boot = sys::boot_id();
        let mut saved = None;
        if let Ok(b) = std::fs::read(path) {
            if b.len() == 24 && b[8..24] == boot {
                saved = Some(u64::from_le_bytes(b[0..8].try_into().unwrap_or([0; 8])));
            }
        }
        let file = if enabled {
            Some(std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(path)?)
        } else {
            let _ = std::fs::remove_file(path);
            None
        };
        Ok((Hint { file, seq: 0, boot }, saved))
    }

    /// Highest seq applied.
    pub fn seq(&self) -> Seq {
        self.seq
    }

    /// Record that `seq` is applied.
    pub fn set(&mut self, seq: Seq) {
        self.seq = seq;
        if let Some(f) = &self.file {
            let mut b = [0u8; 24];
            b[0..8].copy_from_slice(&seq.to_le_bytes());
            b[8..24].copy_from_slice(&self.boot);
            if let Err(e) = sys::pwrite_all(f.as_fd(), &b, 0) {
                tracing::warn!("writing the applied hint failed: {e}");
            }
        }
    }
}

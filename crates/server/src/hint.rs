//! The applied marker: an empty file in the stage directory named
//! `applied.<seq>`, renamed after every applied record. A rename is a
//! metadata operation, and journaling file systems (ext4, XFS) commit
//! metadata operations in order, so after any crash — process or machine —
//! every namespace or attribute change made before the marker's rename is
//! in the tree too. Replay therefore starts exactly after the marker for
//! those records. Data writes are not ordered with metadata, so data
//! records since the last checkpoint are redone (see replay).

use crate::sys;
use izo_proto::Seq;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

const PREFIX: &str = "applied.";

/// The marker, the seq it names, and the seq applied in memory (the
/// marker may lag behind the latter; see `note`).
pub struct Hint {
    stage: OwnedFd,
    marked: Seq,
    applied: Seq,
}

fn marker(seq: Seq) -> Vec<u8> {
    format!("{PREFIX}{seq}").into_bytes()
}

/// Whether a stage entry is the marker (kept when the stage is cleared).
pub fn is_marker(name: &[u8]) -> bool {
    name.starts_with(PREFIX.as_bytes())
}

impl Hint {
    /// Find the marker in `stage` (creating `applied.0` when there is none).
    /// Returns the marker and the seq it names.
    pub fn open(stage: BorrowedFd) -> io::Result<(Hint, Seq)> {
        let stage = stage.try_clone_to_owned()?;
        let mut found: Vec<Seq> = Vec::new();
        let dir = std::path::PathBuf::from(
            String::from_utf8_lossy(&sys::proc_path(std::os::fd::AsRawFd::as_raw_fd(&stage))).into_owned(),
        );
        for e in std::fs::read_dir(dir)? {
            let name = e?.file_name();
            if let Some(seq) = name.to_str().and_then(|n| n.strip_prefix(PREFIX)).and_then(|s| s.parse().ok()) {
                found.push(seq);
            }
        }
        found.sort_unstable();
        let seq = found.last().copied().unwrap_or(0);
        // A crash between creating and removing can leave two; keep the newest.
        for old in &found[..found.len().saturating_sub(1)] {
            let _ = sys::unlinkat(stage.as_fd(), &marker(*old), false);
        }
        if found.is_empty() {
            sys::openat(stage.as_fd(), &marker(0), libc::O_CREAT | libc::O_WRONLY, 0o600)?;
        }
        Ok((Hint { stage, marked: seq, applied: seq }, seq))
    }

    /// Highest seq applied.
    pub fn seq(&self) -> Seq {
        self.applied
    }

    /// Note that `seq` is applied without moving the marker. Only for records
    /// whose replay is decided by the tree's state alone (creates, data and
    /// attribute ops): replay re-checks them from the marker on.
    pub fn note(&mut self, seq: Seq) {
        self.applied = self.applied.max(seq);
    }

    /// Move the marker to what is applied; false if the rename failed.
    pub fn flush(&mut self) -> bool {
        self.set(self.applied)
    }

    /// A marker past the journal's head belongs to other state (a state dir
    /// replaced or recreated over the same export): move it back to `head`.
    pub fn reset(&mut self, head: Seq) -> io::Result<()> {
        if self.marked > head {
            sys::renameat2(self.stage.as_fd(), &marker(self.marked), self.stage.as_fd(), &marker(head), 0)?;
            self.marked = head;
        }
        self.applied = self.applied.min(head);
        Ok(())
    }

    /// Record that `seq` is applied and move the marker there (it never
    /// moves back); false if the rename failed.
    pub fn set(&mut self, seq: Seq) -> bool {
        self.applied = self.applied.max(seq);
        if self.applied <= self.marked {
            return true;
        }
        let to = self.applied;
        match sys::renameat2(self.stage.as_fd(), &marker(self.marked), self.stage.as_fd(), &marker(to), 0) {
            Ok(()) => {
                self.marked = to;
                true
            }
            Err(e) => {
                tracing::error!("moving the applied marker to {to} failed: {e}");
                false
            }
        }
    }
}

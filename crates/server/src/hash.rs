//! Block hashes: BLAKE3 per 1 MiB block, recomputed off the ack path for
//! stale blocks only.

use crate::sys;
use izo_journal::Store;
use izo_proto::{FileKind, ObjectId, Seq, BLOCK_SIZE};
use std::os::fd::{AsFd, BorrowedFd};

/// A block of zeros (what a hole hashes like).
static ZEROS: [u8; BLOCK_SIZE as usize] = [0; BLOCK_SIZE as usize];

/// Hash one block of an open file.
pub fn hash_block(fd: BorrowedFd, index: u64, buf: &mut [u8]) -> std::io::Result<[u8; 32]> {
    let n = sys::pread(fd, buf, index * BLOCK_SIZE)?;
    Ok(*blake3::hash(&buf[..n]).as_bytes())
}

/// Recompute the stale block hashes of `id`, if it is a file, and store them.
pub fn rehash(store: &Store, root: BorrowedFd, id: ObjectId) -> Result<(), String> {
    if let Some((version, blocks)) = compute(store, root, id)? {
        store.set_hashes(id, version, blocks).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Block hashes of a file and the data version they describe.
pub type Hashes = (Seq, Vec<[u8; 32]>);

/// The block hashes of `id` with its stale ones recomputed, and the data
/// version they describe; `None` if nothing is stale.
pub fn compute(store: &Store, root: BorrowedFd, id: ObjectId) -> Result<Option<Hashes>, String> {
    let row = store.object(id).map_err(|e| e.to_string())?;
    if row.kind != FileKind::File || row.stale.is_empty() {
        return Ok(None);
    }
    let fd = sys::open_by_handle(root, &row.handle, libc::O_RDONLY).map_err(|e| e.to_string())?;
    let mut blocks = store.hashes(id).map_err(|e| e.to_string())?;
    blocks.resize(row.size.div_ceil(BLOCK_SIZE) as usize, [0; 32]);
    // (no bigger than the file: most files are small, and zeroing two
    // 1 MiB buffers per file was most of this thread's time in an untar)
    let mut buf = vec![0u8; BLOCK_SIZE.min(row.size) as usize];
    for b in row.stale.iter().flat_map(|&(first, last)| first..=last) {
        let Some(slot) = blocks.get_mut(b as usize) else { continue };
        let start = b * BLOCK_SIZE;
        let end = (start + BLOCK_SIZE).min(row.size);
        // A block that is all hole hashes like zeros; don't read it.
        let data = sys::seek(fd.as_fd(), start, libc::SEEK_DATA).map_err(|e| e.to_string())?;
        *slot = match data {
            // (never past the committed size, even if the file grew on disk)
            Some(d) if d < end => {
                hash_block(fd.as_fd(), b, &mut buf[..(end - start) as usize]).map_err(|e| e.to_string())?
            }
            _ => *blake3::hash(&ZEROS[..(end - start) as usize]).as_bytes(),
        };
    }
    Ok(Some((row.versions.data, blocks)))
}

//! What the journal's records cost in the database file, and dropping the
//! oldest of them. Retention's byte limit is about the file, so a record
//! counts the pages redb gives it, not its encoded length.

use crate::store::{db, get_u64, Store, StoreError};
use crate::tables::*;
use izo_proto::{Seq, Timestamp};
use redb::{Durability, ReadableTable, Table};
use std::sync::atomic::Ordering;

/// Meta key of the journal's cost in bytes of the file (see [`record_cost`]).
pub(crate) const COST: &str = "cost";

/// Meta key of the encoded size of the records, as stores before [`COST`]
/// kept it; replaced on open.
const OLD_BYTES: &str = "bytes";

/// redb's page size.
const PAGE: u64 = 4096;

/// Bytes of the database file a journal record of `len` encoded bytes takes,
/// by redb's layout: a leaf page has a 4-byte header and, per entry, a 4-byte
/// value end offset, the 8-byte key and the value. Records are appended at
/// the right edge, where a full leaf splits into a left half that keeps a
/// little over half of the entries and is never filled again; a record too
/// big to share a page gets a leaf of its own, a power of two of pages.
/// Branch pages add about 1/64 of the leaves (32 bytes per child, branches
/// half full).
pub(crate) fn record_cost(len: usize) -> u64 {
    let entry = len as u64 + 12;
    let fit = (PAGE - 4) / entry;
    let leaf = if fit >= 2 {
        // a page overflowing with fit + 1 entries leaves (fit + 2) / 2 behind
        PAGE.div_ceil((fit + 2) / 2)
    } else {
        (entry + 4).div_ceil(PAGE).next_power_of_two() * PAGE
    };
    leaf + leaf.div_ceil(64)
}

/// Make sure the meta table holds [`COST`]: stores written before it kept
/// the encoded size under [`OLD_BYTES`], and get the cost computed once.
pub(crate) fn upgrade_cost(
    meta: &mut Table<&'static str, &'static [u8]>,
    records: &impl ReadableTable<u64, &'static [u8]>,
) -> Result<(), StoreError> {
    if get_u64(meta, COST)?.is_some() {
        return Ok(());
    }
    let mut cost = 0u64;
    for row in records.iter().map_err(db)? {
        cost += record_cost(row.map_err(db)?.1.value().len());
    }
    meta.insert(COST, cost.to_be_bytes().as_slice()).map_err(db)?;
    meta.remove(OLD_BYTES).map_err(db)?;
    Ok(())
}

/// Add the cost of records of these encoded lengths to the journal's (in
/// the transaction that records them).
pub(crate) fn add_cost(
    store: &Store,
    meta: &mut Table<&'static str, &'static [u8]>,
    lens: impl Iterator<Item = usize>,
) -> Result<(), StoreError> {
    let added: u64 = lens.map(record_cost).sum();
    let held = get_u64(meta, COST)?.unwrap_or(0);
    meta.insert(COST, (held + added).to_be_bytes().as_slice()).map_err(db)?;
    store.written.fetch_add(added, Ordering::Relaxed);
    Ok(())
}

impl Store {
    /// Oldest seq still held (records before it were dropped by retention).
    pub fn retained_from(&self) -> Result<Seq, StoreError> {
        Ok(self.meta_u64("pruned")? + 1)
    }

    /// Drop records up to `through` (never past the checkpoint: replay needs them).
    /// Returns how many were dropped. Their pages are reused once no reader
    /// older than the next durable commit holds them.
    pub fn prune(&self, through: Seq) -> Result<u64, StoreError> {
        let through = through.min(self.checkpoint()?);
        let from = self.meta_u64("pruned")?;
        if through <= from {
            return Ok(0);
        }
        let mut tx = self.db.begin_write().map_err(db)?;
        tx.set_durability(Durability::None);
        let mut n = 0;
        {
            let mut t = tx.open_table(RECORDS).map_err(db)?;
            let mut freed = 0u64;
            for row in t.extract_from_if(..=through, |_, _| true).map_err(db)? {
                freed += record_cost(row.map_err(db)?.1.value().len());
                n += 1;
            }
            let mut meta = tx.open_table(META).map_err(db)?;
            meta.insert("pruned", through.to_be_bytes().as_slice()).map_err(db)?;
            let held = get_u64(&meta, COST)?.unwrap_or(0).saturating_sub(freed);
            meta.insert(COST, held.to_be_bytes().as_slice()).map_err(db)?;
        }
        tx.commit().map_err(db)?;
        Ok(n)
    }

    /// Bytes of the database file the journal's records take (their
    /// record costs, see docs/design.md), which retention's byte limit bounds.
    pub fn held_bytes(&self) -> Result<u64, StoreError> {
        self.meta_u64(COST)
    }

    /// Cost of the records recorded since the store was opened (it only
    /// grows; the server checkpoints, and so prunes, by it).
    pub fn journal_written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Walk records from `from` on, oldest first, giving `f` each one's seq,
    /// cost in the file and time, until `f` returns false. Only the head of
    /// each record is decoded (write payloads are skipped).
    pub fn walk_oldest(&self, from: Seq, mut f: impl FnMut(Seq, u64, Timestamp) -> bool) -> Result<(), StoreError> {
        let r = self.db.begin_read().map_err(db)?;
        let t = r.open_table(RECORDS).map_err(db)?;
        for row in t.range(from..).map_err(db)? {
            let (k, v) = row.map_err(db)?;
            let bytes = v.value();
            let head = match bytes.split_first() {
                // both record formats begin with seq, origin, time
                Some((&ROW_V1 | &RECORD_V2 | &RECORD_V3, rest)) => {
                    postcard::take_from_bytes::<(Seq, izo_proto::Origin, Timestamp)>(rest).ok()
                }
                _ => None,
            };
            let Some(((_, _, time), _)) = head else { return Err(StoreError::Corrupt("records")) };
            if !f(k.value(), record_cost(bytes.len()), time) {
                break;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::ReadableTableMetadata;

    /// Bytes of the pages the records table takes, as redb reports them.
    fn pages_of_records(store: &Store) -> u64 {
        let tx = store.db.begin_write().expect("write tx");
        let s = tx.open_table(RECORDS).expect("records").stats().expect("stats");
        s.stored_bytes() + s.metadata_bytes() + s.fragmented_bytes()
    }

    /// Append `n` records with the lengths `len` gives them after `head`,
    /// several per commit as batches do.
    fn append(store: &Store, head: &mut Seq, n: u64, len: impl Fn(Seq) -> usize) {
        let mut left = n;
        while left > 0 {
            let mut tx = store.db.begin_write().expect("write tx");
            tx.set_durability(Durability::None);
            let mut lens = Vec::new();
            {
                let mut t = tx.open_table(RECORDS).expect("records");
                for _ in 0..left.min(20) {
                    *head += 1;
                    lens.push(len(*head));
                    t.insert(*head, vec![7u8; len(*head)].as_slice()).expect("insert");
                }
                left -= lens.len() as u64;
                add_cost(store, &mut tx.open_table(META).expect("meta"), lens.into_iter()).expect("cost");
            }
            tx.commit().expect("commit");
        }
    }

    fn open(dir: &tempfile::TempDir) -> Store {
        let t0 = Timestamp { secs: 0, nsec: 0 };
        Store::open(&dir.path().join("volume.redb"), (0o755, 0, 0, t0)).expect("open")
    }

    #[test]
    fn the_counted_cost_of_records_is_the_pages_redb_gives_them() {
        // (0: a mix of sizes)
        for len in [40, 300, 1000, 2000, 2100, 4000, 4100, 8300, 70_000, 0] {
            let size = move |seq: Seq| if len > 0 { len } else { [60, 700, 2500, 9000][seq as usize % 4] };
            let dir = tempfile::tempdir().expect("temp dir");
            let store = open(&dir);
            let n = (1 << 20) / size(1) as u64 + 40;
            let mut head = 0;
            append(&store, &mut head, n, size);
            // the edges: a last leaf not full yet, a first one partly pruned
            let slack = 2 * record_cost(size(1)).max(PAGE) + PAGE;
            // one size: the model is exact; in a mix, small records share
            // leaves with big ones, which fills them better than counted
            let over = if len > 0 { 20 } else { 4 };
            let (counted, actual) = (store.held_bytes().expect("cost"), pages_of_records(&store));
            assert!(counted + slack >= actual, "{n} records of {len} B: counted {counted}, redb uses {actual}");
            assert!(
                counted <= actual + actual / over + slack,
                "{n} records of {len} B: counted {counted} for {actual}"
            );
            // retention drops the older half; what stays is still counted
            store.set_checkpoint(head, 0).expect("checkpoint");
            store.prune(head / 2).expect("prune");
            append(&store, &mut head, n / 4, size);
            let (counted, actual) = (store.held_bytes().expect("cost"), pages_of_records(&store));
            assert!(counted + slack >= actual, "after pruning, {len} B records: counted {counted}, redb uses {actual}");
            assert!(
                counted <= actual + actual / over + slack,
                "after pruning, {len} B: counted {counted} for {actual}"
            );
        }
    }

    #[test]
    fn a_store_that_counted_encoded_bytes_gets_its_cost_on_open() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = open(&dir);
        let mut head = 0;
        append(&store, &mut head, 10, |_| 5000);
        let cost = store.held_bytes().expect("cost");
        assert_eq!(cost, 10 * record_cost(5000));
        // as the previous format left it: encoded bytes under "bytes"
        let tx = store.db.begin_write().expect("write tx");
        {
            let mut meta = tx.open_table(META).expect("meta");
            meta.remove(COST).expect("remove cost");
            meta.insert(OLD_BYTES, 50_000u64.to_be_bytes().as_slice()).expect("old bytes");
        }
        tx.commit().expect("commit");
        drop(store);
        let store = open(&dir);
        assert_eq!(store.held_bytes().expect("cost"), cost, "the cost is recomputed from the records");
        assert_eq!(store.meta_u64(OLD_BYTES).expect("meta"), 0, "the old counter is gone");
    }
}

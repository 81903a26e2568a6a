//! Journaling changes other programs make in the export ("out-of-band").
//!
//! fanotify events name directory entries and objects by file handle; they
//! queue here as items, debounced (entry changes, closes and attribute
//! changes shortly; files held open and written once they have been quiet
//! for a while). An item is reconciled by comparing the export with the
//! metadata and journaling the difference as `local` records, which are
//! already true of the tree and are never applied. This runs on the actor
//! thread between batches, with every committed record applied, so the
//! comparison never sees a half-applied op; and the items that concern a
//! batch's objects are reconciled before that batch is validated, so a
//! local edit the client had not seen turns its op into a conflict instead
//! of being overwritten.

use super::*;
use crate::capture::{Capture, Event};
use izo_journal::{Batch, Handle, ObjectRow, Payload};
use std::collections::BTreeSet;
use std::os::fd::{BorrowedFd, OwnedFd};

/// Something in the export to compare with the metadata.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Item {
    /// A directory entry.
    Name(ObjectId, Vec<u8>),
    /// A rename: the old entry and the new one, compared together.
    Rename(ObjectId, Vec<u8>, ObjectId, Vec<u8>),
    /// An object's attributes (and content, when flagged).
    Object(ObjectId),
    /// Every entry of a directory, and the subdirectories below (scan).
    Dir(ObjectId),
    /// An entry whose object vanished from it but lives on: compared again
    /// once everything else is, so a rename found at its new name first is
    /// a rename, not a removal and a new file.
    Gone(ObjectId, Vec<u8>),
}

struct Pending {
    first: Instant,
    first_wall: Timestamp,
    due: Instant,
    content: bool,
}

/// Entry changes, closes and attribute changes wait this long for more
/// events on the same item.
const DEBOUNCE: Duration = Duration::from_millis(20);
/// A file written but not closed is read once quiet this long...
const SETTLE: Duration = Duration::from_secs(1);
/// ...or at the latest this long after its first write.
const MAX_SETTLE: Duration = Duration::from_secs(5);
/// Margin for clocks and events still in the kernel queue when a checkpoint
/// declares everything before it journaled.
const SETTLED_MARGIN: i64 = 5;
/// Records per commit while reconciling.
const CHUNK: usize = 1024;
/// Longest a reconcile keeps one write transaction open.
const TXN_TIME: Duration = Duration::from_millis(50);
/// Most handles remembered as outside the export.
const UNKNOWN_MAX: usize = 4096;

/// State of out-of-band capture on the actor.
#[derive(Default)]
pub(crate) struct Local {
    order: VecDeque<Item>,
    pending: HashMap<Item, Pending>,
    pub(super) overflow: bool,
    /// The fanotify group and its reader thread.
    pub capture: Option<Capture>,
    /// The export root, for opening by handle.
    pub root: Option<Arc<OwnedFd>>,
    /// Reread every file at start (`izo serve --rescan`).
    pub rescan: bool,
    /// Buffer for reading events on the actor.
    buf: Vec<u8>,
    /// Handles found in no object (outside the export); forgotten whenever
    /// objects are created (a handle becomes known only then).
    unknown: std::collections::HashSet<Handle>,
    /// Capture ran (and, after a stop, was drained): the export's changes
    /// are journaled through the settled time.
    pub active: bool,
}

impl Local {
    fn push(&mut self, item: Item, content: bool, settle: bool) {
        let now = Instant::now();
        match self.pending.get_mut(&item) {
            Some(p) => {
                p.content |= content;
                p.due =
                    if settle { p.due.max(now + SETTLE).min(p.first + MAX_SETTLE) } else { p.due.min(now + DEBOUNCE) };
            }
            None => {
                let due = now + if settle { SETTLE } else { DEBOUNCE };
                self.pending.insert(item.clone(), Pending { first: now, first_wall: Timestamp::now(), due, content });
                self.order.push_back(item);
            }
        }
    }

    /// When the next item is due.
    pub(crate) fn next_due(&self) -> Option<Instant> {
        self.pending.values().map(|p| p.due).min()
    }

    /// Take the items `pick` selects, in arrival order.
    fn take(&mut self, mut pick: impl FnMut(&Item, &Pending) -> bool) -> VecDeque<(Item, bool)> {
        let mut out = VecDeque::new();
        let pending = &mut self.pending;
        self.order.retain(|item| match pending.get(item) {
            Some(p) if pick(item, p) => {
                let content = p.content;
                pending.remove(item);
                out.push_back((item.clone(), content));
                false
            }
            Some(_) => true,
            None => false,
        });
        out
    }
}

impl Actor {
    /// Is out-of-band capture running?
    pub(super) fn capturing(&self) -> bool {
        self.local.active
    }

    /// Queue what a batch of events names, mapped from handles to objects
    /// (handles the metadata does not know are outside the export, or inside
    /// a directory not journaled yet, which is scanned when it is).
    pub(super) fn take_events(&mut self, events: Vec<Event>) {
        // The mark covers the whole file system: remember handles outside
        // the export, so a busy neighbour costs a set lookup per event.
        let store = self.store.clone();
        let unknown = &mut self.local.unknown;
        let mut known = |h: &Handle| {
            if unknown.contains(h) {
                return None;
            }
            let id = store.by_handle(h).ok().flatten();
            if id.is_none() {
                if unknown.len() >= UNKNOWN_MAX {
                    unknown.clear();
                }
                unknown.insert(h.clone());
            }
            id
        };
        let mut items = Vec::new();
        for e in events {
            if e.overflow() {
                self.local.overflow = true;
                continue;
            }
            let entry = e.mask & (libc::FAN_CREATE | libc::FAN_DELETE | libc::FAN_RENAME) != 0;
            if e.mask & libc::FAN_RENAME != 0 && e.names.len() == 2 {
                let (old, new) = (&e.names[0], &e.names[1]);
                match (known(&old.0), known(&new.0)) {
                    (Some(a), Some(b)) => items.push((Item::Rename(a, old.1.clone(), b, new.1.clone()), false, false)),
                    (Some(a), None) => items.push((Item::Name(a, old.1.clone()), false, false)),
                    (None, Some(b)) => items.push((Item::Name(b, new.1.clone()), false, false)),
                    (None, None) => {}
                }
                continue;
            }
            let settle = e.mask & libc::FAN_MODIFY != 0 && !e.closed();
            let object = if entry { None } else { e.object.as_ref().and_then(&mut known) };
            match object {
                Some(x) => items.push((Item::Object(x), e.content(), settle)),
                None => {
                    for (dir, name) in &e.names {
                        if let Some(d) = known(dir) {
                            items.push((Item::Name(d, name.clone()), e.content(), settle && !entry));
                        }
                    }
                }
            }
        }
        for (item, content, settle) in items {
            self.local.push(item, content, settle);
        }
    }

    /// New objects were recorded: their handles are no longer unknown.
    pub(super) fn handles_added(&mut self) {
        self.local.unknown.clear();
    }

    /// Store rehashed blocks unless a local change of the file is queued
    /// (then the reconcile journals the blocks as changed instead).
    pub(super) fn store_hashes(&mut self, id: ObjectId, version: Seq, blocks: Vec<[u8; 32]>) {
        self.hashes.push((id, version, blocks));
        if self.hashes.len() >= 256 {
            self.flush_hashes();
        }
    }

    /// Store the rehashed blocks gathered so far, in one transaction.
    pub(super) fn flush_hashes(&mut self) {
        if self.hashes.is_empty() {
            return;
        }
        self.read_queued_events();
        let mut files = std::mem::take(&mut self.hashes);
        files.retain(|(id, _, _)| !self.local.pending.contains_key(&Item::Object(*id)));
        if let Err(e) = self.store.set_hashes_many(files) {
            tracing::debug!("storing block hashes failed: {e}");
        }
    }

    /// Read events still in the kernel queue (the reader thread may not have run yet).
    fn read_queued_events(&mut self) {
        if let Some(fan) = self.local.capture.as_ref().map(|c| c.fan.clone()) {
            let mut buf = std::mem::take(&mut self.local.buf);
            buf.resize(64 << 10, 0);
            while let Ok(Some(events)) = fan.read(&mut buf) {
                self.take_events(events);
            }
            self.local.buf = buf;
        }
    }

    /// An entry another program made was moved aside at apply: journal it
    /// once the records in hand are applied.
    pub(super) fn local_moved_aside(&mut self, dir: ObjectId, name: Vec<u8>) {
        self.local.push(Item::Name(dir, name), true, false);
    }

    /// Reconcile the items that are due.
    pub(super) fn reconcile_due(&mut self) {
        // Until every committed record is applied, tree and metadata disagree.
        if !self.pending.is_empty() {
            return;
        }
        if self.local.overflow {
            self.local.overflow = false;
            let since = self.store.settled().unwrap_or(0);
            tracing::warn!("fanotify queue overflowed: rescanning the export for changes since {since}");
            self.scan(since);
        }
        if self.local.order.is_empty() {
            return;
        }
        let now = Instant::now();
        let items = self.local.take(|_, p| p.due <= now);
        self.run_items(items, i64::MAX);
    }

    /// Before a batch: reconcile the changes it could race with (every entry
    /// change, and content or attribute changes of the objects it names), so
    /// its preconditions meet the export as it is.
    pub(super) fn reconcile_for(&mut self, batch: &[Mutation]) {
        // Events of changes made before the batch arrived may still sit in
        // the kernel queue (the reader thread has not run yet): read them here.
        self.read_queued_events();
        if self.local.order.is_empty() || !self.pending.is_empty() {
            return;
        }
        let mut ids = std::collections::HashSet::new();
        for m in batch {
            named_ids(&m.op, &mut ids);
        }
        let items = self.local.take(|item, _| match item {
            Item::Object(x) => ids.contains(x),
            _ => true,
        });
        self.run_items(items, i64::MAX);
    }

    /// Compare the whole export with the metadata; files whose ctime is at
    /// or after `since` (ns since the epoch) have their content reread.
    pub(super) fn scan(&mut self, since: i64) {
        let started = Instant::now();
        let before = self.store.head();
        let mut items = VecDeque::new();
        items.push_back((Item::Dir(ObjectId::ROOT), false));
        self.run_items(items, since);
        Counters::add(&self.shared.counters.scans, 1);
        tracing::info!(
            "scan of the export done in {} ms: {} changes journaled",
            started.elapsed().as_millis(),
            self.store.head() - before
        );
    }

    /// On stop: read what is still queued and journal everything pending.
    pub(super) fn capture_stop(&mut self, rx: &mpsc::Receiver<Work>) {
        let Some(capture) = self.local.capture.take() else { return };
        let fan = capture.stop_reader();
        while let Ok(w) = rx.try_recv() {
            if let Work::Local(events) = w {
                self.take_events(events);
            }
        }
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(Some(events)) = fan.read(&mut buf) {
            self.take_events(events);
        }
        if self.pending.is_empty() {
            let items = self.local.take(|_, _| true);
            self.run_items(items, i64::MAX);
        }
    }

    /// A time before which every out-of-band change is journaled (seconds;
    /// 0 when capture is off: nothing is known).
    pub(super) fn settled(&self) -> i64 {
        self.settled_within(SETTLED_MARGIN)
    }

    /// Like [`Actor::settled`], with the margin given (seconds).
    pub(super) fn settled_within(&self, margin: i64) -> i64 {
        if !self.local.active || self.local.overflow {
            return self.store.settled().unwrap_or(0);
        }
        let now = nanos(Timestamp::now());
        let oldest = self.local.pending.values().map(|p| nanos(p.first_wall)).min().unwrap_or(now);
        (oldest.min(now) - margin * 1_000_000_000).max(0)
    }

    fn run_items(&mut self, mut items: VecDeque<(Item, bool)>, since: i64) {
        // Until every committed record is applied, tree and metadata
        // disagree: compare later, with a scan.
        if !self.pending.is_empty() {
            self.local.overflow = true;
            return;
        }
        let Some(root) = self.local.root.clone() else { return };
        let store = self.store.clone();
        while !items.is_empty() {
            let b = match store.batch() {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!("journaling out-of-band changes failed: {e}; will rescan");
                    self.local.overflow = true;
                    return;
                }
            };
            let mut rc = Rc { b, root: root.as_fd(), since, deferred: Vec::new(), buf: Vec::new() };
            // A write transaction is held meanwhile (handshakes and other
            // writers wait for it): keep each one short.
            let started = Instant::now();
            while rc.b.records().len() < CHUNK && started.elapsed() < TXN_TIME {
                let Some((item, content)) = items.pop_front() else { break };
                match rc.item(&item, content, &mut items) {
                    Ok(()) => {}
                    // gone from the metadata meanwhile (removed with its directory)
                    Err(
                        OpError::NotFound(_)
                        | OpError::Conflict {
                            kind: ConflictKind::ObjectGone | ConflictKind::ParentGone | ConflictKind::NameGone,
                            ..
                        },
                    ) => {}
                    Err(e) => {
                        // Not journaled now: a rescan finds it (and the settled
                        // time stays where it is until then).
                        tracing::warn!("out-of-band change at {item:?} not journaled yet: {e}; will rescan");
                        self.local.overflow = true;
                    }
                }
            }
            // (a later chunk sees them again, after what it has queued)
            items.extend(rc.deferred.drain(..).map(|(d, n)| (Item::Gone(d, n), false)));
            if rc.b.records().is_empty() {
                continue;
            }
            match rc.b.commit(true) {
                Ok(records) => {
                    if records.iter().any(|r| r.record.op.new_object().is_some()) {
                        self.local.unknown.clear();
                    }
                    Counters::add(&self.shared.counters.fsyncs, 1);
                    Counters::add(&self.shared.counters.records, records.len() as u64);
                    Counters::add(&self.shared.counters.local_records, records.len() as u64);
                    self.apply_all(records);
                    self.applied_tx.send_replace(self.hint.seq());
                }
                Err(e) => {
                    tracing::error!("committing out-of-band changes failed: {e}; will rescan");
                    self.local.overflow = true;
                    return;
                }
            }
        }
    }
}

/// Every object an op names (to find the local changes it could race).
fn named_ids(op: &Op, ids: &mut std::collections::HashSet<ObjectId>) {
    match op {
        Op::Create { parent, .. }
        | Op::Mkdir { parent, .. }
        | Op::Symlink { parent, .. }
        | Op::Mknod { parent, .. } => {
            ids.insert(*parent);
        }
        Op::Link { id, parent, .. } => {
            ids.extend([*id, *parent]);
        }
        Op::Unlink { parent, expect, .. } | Op::Rmdir { parent, expect, .. } => {
            ids.extend([*parent, expect.id]);
        }
        Op::Rename { parent, expect, new_parent, target, .. } => {
            ids.extend([*parent, expect.id, *new_parent]);
            ids.extend(target.map(|t| t.id));
        }
        op => ids.extend(op.changed_object()),
    }
}

type R<T> = Result<T, OpError>;

fn io(what: &str) -> impl Fn(std::io::Error) -> OpError + '_ {
    move |e| crate::sys::op_io(what, e)
}

/// A time in nanoseconds since the epoch.
fn nanos(t: Timestamp) -> i64 {
    t.secs.saturating_mul(1_000_000_000).saturating_add(t.nsec as i64)
}

fn ctime_ns(st: &libc::stat) -> i64 {
    nanos(Timestamp { secs: st.st_ctime, nsec: st.st_ctime_nsec as u32 })
}

fn mtime_of(st: &libc::stat) -> Timestamp {
    Timestamp { secs: st.st_mtime, nsec: st.st_mtime_nsec as u32 }
}

/// One reconciling pass: a batch of local records being built.
struct Rc<'s, 'f> {
    b: Batch<'s>,
    root: BorrowedFd<'f>,
    /// Files whose ctime is at or after this (ns since the epoch) have their
    /// content reread; `i64::MAX` while running (events say what changed).
    since: i64,
    /// Entries whose object lives on elsewhere, to compare last.
    deferred: Vec<(ObjectId, Vec<u8>)>,
    /// Block buffer for rehashing.
    buf: Vec<u8>,
}

/// BLAKE3 of `len` zero bytes (a hole); the whole-block one is computed once.
fn zero_hash(len: usize) -> [u8; 32] {
    static ZEROS: [u8; BLOCK_SIZE as usize] = [0; BLOCK_SIZE as usize];
    static BLOCK: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    if len == ZEROS.len() {
        return *BLOCK.get_or_init(|| *blake3::hash(&ZEROS).as_bytes());
    }
    *blake3::hash(&ZEROS[..len.min(ZEROS.len())]).as_bytes()
}

impl Rc<'_, '_> {
    fn item(&mut self, item: &Item, content: bool, more: &mut VecDeque<(Item, bool)>) -> R<()> {
        match item {
            Item::Name(d, n) => self.name(*d, n, false, more),
            Item::Gone(d, n) => {
                let Some(dfd) = self.dir_fd(*d)? else { return Ok(()) };
                if sys::fstatat(dfd.as_fd(), n).is_err() {
                    if let Some(x) = self.b.lookup(*d, n)? {
                        return self.remove(*d, n, x, Some(&dfd));
                    }
                }
                self.name(*d, n, false, more)
            }
            Item::Rename(a, an, b, bn) => {
                self.name(*b, bn, false, more)?;
                self.name(*a, an, false, more)
            }
            Item::Object(x) => {
                let row = self.b.object(*x)?;
                let Ok(fd) = sys::open_by_handle(self.root, &row.handle, libc::O_PATH) else { return Ok(()) };
                let st = sys::fstatat(fd.as_fd(), b"").map_err(io("stat"))?;
                if st.st_nlink == 0 {
                    return Ok(()); // removed: its entry's event says so
                }
                self.object(*x, &st, content)
            }
            Item::Dir(d) => self.dir(*d, more),
        }
    }

    /// Open a directory by handle, if it still exists.
    fn open_dir(&self, handle: &[u8]) -> Option<OwnedFd> {
        let fd = sys::open_by_handle(self.root, handle, libc::O_RDONLY | libc::O_DIRECTORY).ok()?;
        let st = sys::fstatat(fd.as_fd(), b"").ok()?;
        (st.st_nlink > 0).then_some(fd)
    }

    fn dir_fd(&self, d: ObjectId) -> R<Option<OwnedFd>> {
        let row = match self.b.object(d) {
            Ok(r) => r,
            Err(OpError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        if row.kind != FileKind::Dir {
            return Ok(None);
        }
        Ok(self.open_dir(&row.handle))
    }

    /// The directory's mtime in the export (entry records carry it), or now.
    fn dir_time(&self, dfd: Option<&OwnedFd>) -> Timestamp {
        dfd.and_then(|fd| sys::fstatat(fd.as_fd(), b"").ok()).map(|st| mtime_of(&st)).unwrap_or_else(Timestamp::now)
    }

    /// Record a local op; `mtime` of the object it makes or writes, and
    /// `dir` of the directories whose entries it changes, as the export shows.
    fn exec(&mut self, op: Op, mtime: Option<Timestamp>, dir: Option<Timestamp>) -> R<Applied> {
        self.b.execute_local(&op, Payload::Inline, mtime, dir)
    }

    /// Every entry of a directory, then the directory's own attributes.
    fn dir(&mut self, d: ObjectId, more: &mut VecDeque<(Item, bool)>) -> R<()> {
        let Some(dfd) = self.dir_fd(d)? else { return Ok(()) };
        let mut names: BTreeSet<Vec<u8>> =
            sys::read_dir_names(dfd.as_fd()).map_err(io("reading a directory"))?.into_iter().collect();
        names.extend(self.b.children(d)?.into_iter().map(|(n, _)| n));
        for n in names {
            if let Err(e) = self.name_in(d, &dfd, &n, true, more) {
                tracing::warn!("out-of-band change of {:?} in {d} not journaled: {e}", String::from_utf8_lossy(&n));
            }
        }
        let st = sys::fstatat(dfd.as_fd(), b"").map_err(io("stat"))?;
        self.object(d, &st, false)
    }

    /// Compare one directory entry; in a scan, descend into subdirectories.
    fn name(&mut self, d: ObjectId, n: &[u8], scan: bool, more: &mut VecDeque<(Item, bool)>) -> R<()> {
        if (d == ObjectId::ROOT && n == crate::tree::STAGE_DIR) || !valid_name(n) {
            return Ok(());
        }
        let Some(dfd) = self.dir_fd(d)? else { return Ok(()) };
        self.name_in(d, &dfd, n, scan, more)
    }

    /// [`Rc::name`] with the directory already open.
    fn name_in(
        &mut self,
        d: ObjectId,
        dfd: &OwnedFd,
        n: &[u8],
        scan: bool,
        more: &mut VecDeque<(Item, bool)>,
    ) -> R<()> {
        if (d == ObjectId::ROOT && n == crate::tree::STAGE_DIR) || !valid_name(n) {
            return Ok(());
        }
        let fs = match sys::fstatat(dfd.as_fd(), n) {
            Ok(st) => match sys::name_to_handle(dfd.as_fd(), n) {
                Ok(h) => Some((st, h)),
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => None,
                Err(e) => return Err(io("name_to_handle_at")(e)),
            },
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => None,
            Err(e) => return Err(io("stat")(e)),
        };
        let cur = self.b.lookup(d, n)?;
        match (fs, cur) {
            (None, None) => Ok(()),
            (None, Some(x)) if self.alive(x) => {
                self.deferred.push((d, n.to_vec()));
                Ok(())
            }
            (None, Some(x)) => self.remove(d, n, x, Some(dfd)),
            (Some((st, h)), Some(x)) if self.b.object(x)?.handle == h => {
                if scan && st.st_mode & libc::S_IFMT == libc::S_IFDIR {
                    more.push_back((Item::Dir(x), false));
                    return Ok(());
                }
                self.object(x, &st, false)
            }
            (Some((st, h)), cur) => {
                self.arrive(d, n, dfd, &st, h, cur, scan, more)?;
                // a new object's record carries its own mtime: the
                // directory's follows (a scan does this once per directory)
                if !scan {
                    let dst = sys::fstatat(dfd.as_fd(), b"").map_err(io("stat"))?;
                    self.object(d, &dst, false)?;
                }
                Ok(())
            }
        }
    }

    /// Does the object's inode still have a name somewhere?
    fn alive(&self, x: ObjectId) -> bool {
        let Ok(row) = self.b.object(x) else { return false };
        let Ok(fd) = sys::open_by_handle(self.root, &row.handle, libc::O_PATH) else { return false };
        sys::fstatat(fd.as_fd(), b"").is_ok_and(|st| st.st_nlink > 0)
    }

    /// Does `name` in `dir` still lead to the inode with handle `h`?
    fn resolves(&self, dir: ObjectId, name: &[u8], h: &[u8]) -> R<bool> {
        let Some(dfd) = self.dir_fd(dir)? else { return Ok(false) };
        Ok(sys::name_to_handle(dfd.as_fd(), name).is_ok_and(|x| x == h))
    }

    /// An entry now leads to an inode the metadata has elsewhere (a rename
    /// or a new hard link) or not at all (a new object).
    #[allow(clippy::too_many_arguments)]
    fn arrive(
        &mut self,
        d: ObjectId,
        n: &[u8],
        dfd: &OwnedFd,
        st: &libc::stat,
        h: Handle,
        cur: Option<ObjectId>,
        scan: bool,
        more: &mut VecDeque<(Item, bool)>,
    ) -> R<()> {
        let time = self.dir_time(Some(dfd));
        if let Some(y) = self.b.by_handle(&h)?.filter(|y| self.b.object(*y).is_ok()) {
            let ykind = self.b.object(y)?.kind;
            let mut from = None;
            for (p, pn) in self.b.names_of(y)? {
                if !self.resolves(p, &pn, &h)? {
                    from = Some((p, pn));
                    break;
                }
            }
            if let Some((p, pn)) = from {
                let target = match cur {
                    Some(x) => {
                        let xr = self.b.object(x)?;
                        if xr.kind == FileKind::Dir || ykind == FileKind::Dir {
                            self.remove(d, n, x, Some(dfd))?;
                            None
                        } else {
                            Some(Expect { id: x, base: xr.versions })
                        }
                    }
                    None => None,
                };
                let expect = Expect { id: y, base: self.b.object(y)?.versions };
                let op = Op::Rename {
                    parent: p,
                    name: pn,
                    expect,
                    new_parent: d,
                    new_name: n.to_vec(),
                    target,
                    mode: RenameMode::Replace,
                };
                self.exec(op, None, Some(time))?;
                if scan && ykind == FileKind::Dir {
                    // moved while nobody watched: what is inside may have changed too
                    more.push_back((Item::Dir(y), false));
                }
                if p != d {
                    if let Some(pfd) = self.dir_fd(p)? {
                        let pst = sys::fstatat(pfd.as_fd(), b"").map_err(io("stat"))?;
                        self.object(p, &pst, false)?;
                    }
                }
                return self.object(y, st, false);
            }
            if ykind != FileKind::Dir {
                if let Some(x) = cur {
                    self.remove(d, n, x, Some(dfd))?;
                }
                self.exec(Op::Link { id: y, parent: d, name: n.to_vec() }, None, Some(time))?;
                return self.object(y, st, false);
            }
            return Ok(());
        }
        if let Some(x) = cur {
            self.remove(d, n, x, Some(dfd))?;
        }
        self.create(d, n, dfd, st, h, more)
    }

    /// A name is gone from the export: journal its removal (a directory's
    /// entries first).
    fn remove(&mut self, d: ObjectId, n: &[u8], x: ObjectId, dfd: Option<&OwnedFd>) -> R<()> {
        let row = self.b.object(x)?;
        if row.kind == FileKind::Dir {
            for (cn, c) in self.b.children(x)? {
                self.remove(x, &cn, c, None)?;
            }
        }
        let expect = Expect { id: x, base: self.b.object(x)?.versions };
        let time = self.dir_time(dfd);
        let op = if row.kind == FileKind::Dir {
            Op::Rmdir { parent: d, name: n.to_vec(), expect }
        } else {
            Op::Unlink { parent: d, name: n.to_vec(), expect }
        };
        self.exec(op, None, Some(time)).map(drop)
    }

    /// A new object in the export: journal its creation and content; a new
    /// directory is scanned.
    fn create(
        &mut self,
        d: ObjectId,
        n: &[u8],
        dfd: &OwnedFd,
        st: &libc::stat,
        h: Handle,
        more: &mut VecDeque<(Item, bool)>,
    ) -> R<()> {
        let id = ObjectId::new();
        let (parent, name) = (d, n.to_vec());
        let (mode, uid, gid) = (st.st_mode & 0o7777, st.st_uid, st.st_gid);
        let op = match st.st_mode & libc::S_IFMT {
            libc::S_IFREG => Op::Create { parent, name, id, mode, uid, gid },
            libc::S_IFDIR => Op::Mkdir { parent, name, id, mode, uid, gid },
            libc::S_IFLNK => {
                let target = sys::readlinkat(dfd.as_fd(), n).map_err(io("readlink"))?;
                Op::Symlink { parent, name, id, target, uid, gid }
            }
            libc::S_IFIFO => Op::Mknod { parent, name, id, kind: FileKind::Fifo, mode, uid, gid, rdev: 0 },
            libc::S_IFSOCK => Op::Mknod { parent, name, id, kind: FileKind::Socket, mode, uid, gid, rdev: 0 },
            t @ (libc::S_IFBLK | libc::S_IFCHR) if self.b.trusted() => {
                let kind = if t == libc::S_IFBLK { FileKind::BlockDev } else { FileKind::CharDev };
                // stat gives the kernel's 32-bit encoding in a 64-bit field
                let Ok(rdev) = u32::try_from(st.st_rdev) else {
                    tracing::warn!(
                        "device node {:?}: device number {:#x} not kept",
                        String::from_utf8_lossy(n),
                        st.st_rdev
                    );
                    return Ok(());
                };
                Op::Mknod { parent, name, id, kind, mode, uid, gid, rdev }
            }
            _ => {
                tracing::debug!(
                    "device node {:?} in the export is not replicated (the volume is not trusted)",
                    String::from_utf8_lossy(n)
                );
                return Ok(());
            }
        };
        let dir = matches!(op, Op::Mkdir { .. });
        self.exec(op, Some(mtime_of(st)), Some(self.dir_time(Some(dfd))))?;
        self.b.set_handle(id, h)?;
        if dir {
            more.push_back((Item::Dir(id), false));
            return Ok(());
        }
        self.object(id, st, true)
    }

    /// Compare an object's content (files: when flagged, or when size,
    /// mtime or a recent ctime say so) and attributes.
    fn object(&mut self, x: ObjectId, st: &libc::stat, content: bool) -> R<()> {
        let row = self.b.object(x)?;
        let mtime = mtime_of(st);
        if row.kind == FileKind::File
            && (content || st.st_size as u64 != row.size || mtime != row.mtime || ctime_ns(st) >= self.since)
        {
            self.data(x, &row, st)?;
        }
        let row = self.b.object(x)?;
        let mut a = SetAttrs::default();
        if row.kind != FileKind::Symlink && st.st_mode & 0o7777 != row.mode {
            a.mode = Some(st.st_mode & 0o7777);
        }
        if st.st_uid != row.uid {
            a.uid = Some(st.st_uid);
        }
        if st.st_gid != row.gid {
            a.gid = Some(st.st_gid);
        }
        if mtime != row.mtime {
            a.mtime = Some(mtime);
        }
        if a != SetAttrs::default() {
            self.exec(Op::SetAttr { id: x, base: row.versions.meta, attrs: a }, None, None)?;
        }
        // xattr changes show in the ctime (and in events while running)
        if matches!(row.kind, FileKind::File | FileKind::Dir) && (self.since == i64::MAX || ctime_ns(st) >= self.since)
        {
            self.xattrs(x, row.kind, &row.handle)?;
        }
        Ok(())
    }

    /// Journal the replicated extended attributes that differ.
    fn xattrs(&mut self, x: ObjectId, kind: FileKind, handle: &[u8]) -> R<()> {
        let flags = if kind == FileKind::Dir { libc::O_RDONLY | libc::O_DIRECTORY } else { libc::O_RDONLY };
        let fd = match sys::open_by_handle(self.root, handle, flags) {
            Ok(fd) => fd,
            Err(e) if sys::gone(&e) => return Ok(()),
            Err(e) => return Err(io("open")(e)),
        };
        let trusted = self.b.trusted();
        let mut fs = std::collections::BTreeMap::new();
        for name in sys::flistxattr(fd.as_fd()).map_err(io("listxattr"))? {
            let Ok(value) = sys::fgetxattr(fd.as_fd(), &name) else { continue };
            if izo_journal::xattr_replicates(&name, &value, kind, trusted) {
                fs.insert(name, value);
            }
        }
        let cur: std::collections::BTreeMap<_, _> = self.b.xattrs(x)?.into_iter().collect();
        for (name, value) in &fs {
            if cur.get(name) != Some(value) {
                let base = self.b.object(x)?.versions.meta;
                let op = Op::SetXattr { id: x, base, name: name.clone(), value: value.clone() };
                self.exec(op, None, None)?;
            }
        }
        for name in cur.keys().filter(|n| !fs.contains_key(*n)) {
            let base = self.b.object(x)?.versions.meta;
            self.exec(Op::RemoveXattr { id: x, base, name: name.clone() }, None, None)?;
        }
        Ok(())
    }

    /// Rehash a file and journal the blocks that differ from its hashes (a
    /// stale hash counts as different) and a size change.
    fn data(&mut self, x: ObjectId, row: &ObjectRow, st: &libc::stat) -> R<()> {
        let fd = match sys::open_by_handle(self.root, &row.handle, libc::O_RDONLY) {
            Ok(fd) => fd,
            Err(e) if sys::gone(&e) => return Ok(()), // removed: its entry's event says so
            Err(e) => return Err(io("open")(e)),
        };
        let size = st.st_size as u64;
        let old = self.b.hashes(x)?;
        let mut blocks = Vec::new();
        let mut changed = Vec::new();
        for i in 0..size.div_ceil(BLOCK_SIZE) {
            let start = i * BLOCK_SIZE;
            let end = (start + BLOCK_SIZE).min(size);
            let zero = zero_hash((end - start) as usize);
            let hole = !matches!(sys::seek(fd.as_fd(), start, libc::SEEK_DATA), Ok(Some(d)) if d < end);
            let hash = if hole {
                zero
            } else {
                self.buf.resize(BLOCK_SIZE as usize, 0);
                let n = sys::pread(fd.as_fd(), &mut self.buf[..(end - start) as usize], start).map_err(io("read"))?;
                *blake3::hash(&self.buf[..n]).as_bytes()
            };
            let stale = row.stale.iter().any(|&(a, b)| a <= i && i <= b);
            let differs = if start < row.size && stale {
                // Written by a client and not rehashed yet: while running, an
                // event says this file changed here, so journal the block; in
                // the start-up scan, replay has just made it what the journal
                // says, so take it as it is.
                self.since == i64::MAX
            } else if start < row.size {
                old.get(i as usize) != Some(&hash)
            } else {
                hash != zero // past the old end the size change gives zeros
            };
            blocks.push(hash);
            changed.push(differs);
        }
        let time = mtime_of(st);
        let mut base = row.versions.data;
        // A write of the last block sets a grown size by itself.
        if size < row.size || (size > row.size && changed.last() != Some(&true)) {
            base = self.exec(Op::Truncate { id: x, base, size }, Some(time), None)?.seq;
        }
        let mut i = 0;
        while i < changed.len() {
            if !changed[i] {
                i += 1;
                continue;
            }
            let first = i;
            while i < changed.len() && changed[i] {
                i += 1;
            }
            let offset = first as u64 * BLOCK_SIZE;
            let len = (i as u64 * BLOCK_SIZE).min(size) - offset;
            let op = Op::Write { id: x, base, offset, data: Vec::new() };
            base = self.b.execute_local(&op, Payload::Direct(len), Some(time), None)?.seq;
        }
        self.b.set_hashes(x, &blocks)
    }
}

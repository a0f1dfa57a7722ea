//! The flow history (`--flow-history-dir`): the ring's records kept on disk, bounded by size
//! and age, so that `/v1/flows?since=` reaches back past the ring and across restarts.
//!
//! A background thread (never the request path) takes the records the ring numbered after the
//! last one it wrote, every second (sooner while the ring fills fast) and at shutdown, and
//! appends them as JSON Lines, the bytes `/v1/flows` writes, to segment files
//! `flows-<first seq>-<first time, unix ns>.jsonl`. A
//! segment is closed at a size bound and never appended to again (a new run starts a new one);
//! the oldest are deleted beyond `--flow-history-max-bytes` or once their last write is older
//! than `--flow-history-max-age`. Record N of a segment has sequence number `first seq + N`
//! (complete lines only), so a reader takes exactly the records the ring no longer holds, and
//! a restart resumes numbering after the newest record on disk: no duplicate, no gap.
//!
//! Fail-open: a write error (disk full, the directory removed) is counted and logged, the ring
//! keeps serving, the writer tries again at its next pass; records the ring dropped before the
//! writer took them are counted as lost. Reading skips (and counts) what is not a whole flow
//! line: a line cut by a crash, a corrupt or oversized one.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tracing::{info, warn};

use crate::flows::{FlowFilter, FlowLog};

/// A flow line longer than this is skipped when read (flows are a few hundred bytes; a URL is
/// bounded by the proxy's header limits well below it). The reader never holds more.
pub const MAX_LINE: usize = 1 << 20;

/// How far a segment's last write may seem to precede a flow it holds (coarse file times, a
/// clock stepped back) and still be read for a window starting at that flow.
const SKEW: Duration = Duration::from_secs(60);

/// Records taken from the ring at once (the ring's lock, which every new flow takes, is held
/// while they are cloned: tens of microseconds).
const BATCH: usize = 256;

#[derive(Clone, Debug)]
pub struct HistoryConfig {
    pub dir: PathBuf,
    /// Total bytes of segments kept (the oldest are deleted beyond it).
    pub max_bytes: u64,
    /// Segments whose last write is older than this are deleted.
    pub max_age: Duration,
    /// How often the writer takes new records from the ring.
    pub interval: Duration,
}

impl HistoryConfig {
    /// A segment is closed at an eighth of the total (so retention deletes in small steps),
    /// between 4 KiB and 64 MiB.
    fn segment_bytes(&self) -> u64 {
        (self.max_bytes / 8).clamp(4096, 64 << 20)
    }

    /// A segment whose first flow (at `first_nanos`, unix ns) is an eighth of the age bound
    /// old takes no more: age retention goes by a segment's last write, so a flow is kept at
    /// most 9/8 of `max_age`.
    fn too_old_to_append(&self, first_nanos: u128) -> bool {
        let first = u64::try_from(first_nanos).map_or(SystemTime::UNIX_EPOCH, |n| {
            SystemTime::UNIX_EPOCH.checked_add(Duration::from_nanos(n)).unwrap_or(SystemTime::UNIX_EPOCH)
        });
        SystemTime::now().duration_since(first).is_ok_and(|age| age > self.max_age / 8)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("flow history {0}: is a symbolic link; give the directory itself")]
    Symlink(PathBuf),
    #[error("flow history {0}: exists and is not a directory")]
    NotADirectory(PathBuf),
    #[error("flow history {dir}: owned by uid {owner}, not by this process's uid {euid}")]
    Owner { dir: PathBuf, owner: u32, euid: u32 },
    #[error("flow history {dir}: writable by group or others (mode {mode:o}); it records who talked to whom: `chmod 700` it")]
    Writable { dir: PathBuf, mode: u32 },
    #[error("flow history {dir}: {parent} {reason}: another user could swap the directory for one of theirs; give a directory under root's own")]
    UnsafeParent { dir: PathBuf, parent: PathBuf, reason: String },
    #[error("flow history {dir}: {source}")]
    Io { dir: PathBuf, source: std::io::Error },
}

impl HistoryError {
    /// The directory is not safely this process's (someone else could read or plant flows):
    /// refused. Any other error (a full or read-only disk, an I/O error) is the disk failing,
    /// which costs the history, never the proxy's start.
    pub fn is_unsafe(&self) -> bool {
        !matches!(self, HistoryError::Io { .. })
    }
}

/// `l7mesh_flow_history_*`.
#[derive(Clone, Debug, Default)]
pub struct HistoryMetrics {
    pub written: Counter,
    pub lost: Counter,
    pub write_errors: Counter,
    pub skipped_lines: Counter,
    pub bytes: Gauge,
}

/// Makes `dir` the history's: created 0700 when missing; refused when it is a symbolic link,
/// not a directory, someone else's, or writable by group or others (another user could have
/// put or swapped files in it); made 0700 when it is merely readable by them.
pub fn prepare_dir(dir: &Path) -> Result<(), HistoryError> {
    let io = |source| HistoryError::Io { dir: dir.into(), source };
    let meta = match std::fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = dir.parent() {
                std::fs::create_dir_all(parent).map_err(io)?;
            }
            match std::fs::DirBuilder::new().mode(0o700).create(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io(e)),
            }
            std::fs::symlink_metadata(dir).map_err(io)?
        }
        Err(e) => return Err(io(e)),
    };
    if meta.file_type().is_symlink() {
        return Err(HistoryError::Symlink(dir.into()));
    }
    if !meta.is_dir() {
        return Err(HistoryError::NotADirectory(dir.into()));
    }
    let euid = nix::unistd::geteuid().as_raw();
    if meta.uid() != euid {
        return Err(HistoryError::Owner { dir: dir.into(), owner: meta.uid(), euid });
    }
    check_parents(dir, euid)?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(HistoryError::Writable { dir: dir.into(), mode });
    }
    if mode & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
        info!(dir = %dir.display(), was = format!("{mode:o}"), "flow history directory made 0700");
    }
    Ok(())
}

/// The directories above `dir` must be root's (or ours) and writable by no one else unless
/// sticky (as /tmp is), and a symbolic link on the way must be root's (or ours): else another
/// user could rename the history directory away and put one of theirs (or a link) in its
/// place between two checks.
fn check_parents(dir: &Path, euid: u32) -> Result<(), HistoryError> {
    let io = |source| HistoryError::Io { dir: dir.into(), source };
    let unsafe_parent =
        |parent: &Path, reason: String| HistoryError::UnsafeParent { dir: dir.into(), parent: parent.into(), reason };
    let trusted = |uid: u32| uid == 0 || uid == euid;
    for parent in dir.ancestors().skip(1).filter(|p| !p.as_os_str().is_empty()) {
        let meta = std::fs::symlink_metadata(parent).map_err(io)?;
        if meta.file_type().is_symlink() && !trusted(meta.uid()) {
            return Err(unsafe_parent(parent, format!("is a symbolic link owned by uid {}", meta.uid())));
        }
    }
    let real = match dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(p) => p.canonicalize().map_err(io)?,
        None => return Ok(()),
    };
    for parent in real.ancestors() {
        let meta = std::fs::metadata(parent).map_err(io)?;
        let mode = meta.mode() & 0o7777;
        if !trusted(meta.uid()) {
            return Err(unsafe_parent(parent, format!("is owned by uid {}", meta.uid())));
        }
        if mode & 0o022 != 0 && mode & 0o1000 == 0 {
            return Err(unsafe_parent(
                parent,
                format!("is writable by group or others (mode {mode:o}) and not sticky"),
            ));
        }
    }
    Ok(())
}

/// One segment file.
#[derive(Clone, Debug)]
struct Segment {
    first_seq: u64,
    first_nanos: u128,
    path: PathBuf,
    bytes: u64,
    modified: SystemTime,
}

fn segment_name(first_seq: u64, first_nanos: u128) -> String {
    format!("flows-{first_seq:020}-{first_nanos:020}.jsonl")
}

fn parse_segment_name(name: &str) -> Option<(u64, u128)> {
    let rest = name.strip_prefix("flows-")?.strip_suffix(".jsonl")?;
    let (seq, nanos) = rest.split_once('-')?;
    let digits = |s: &str| s.len() == 20 && s.bytes().all(|b| b.is_ascii_digit());
    (digits(seq) && digits(nanos)).then(|| Some((seq.parse().ok()?, nanos.parse().ok()?)))?
}

/// The segments in `dir`, in sequence order; other entries (symbolic links, files of another
/// user's) are ignored.
fn list_segments(dir: &Path) -> std::io::Result<Vec<Segment>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let Some((first_seq, first_nanos)) = entry.file_name().to_str().and_then(parse_segment_name) else {
            continue;
        };
        let Ok(meta) = entry.path().symlink_metadata() else { continue };
        // (Another user's file is no segment of ours, whatever its name.)
        if !meta.file_type().is_file() || meta.uid() != nix::unistd::geteuid().as_raw() {
            continue;
        }
        let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        out.push(Segment { first_seq, first_nanos, path: entry.path(), bytes: meta.len(), modified });
    }
    out.sort_by_key(|s| (s.first_seq, s.first_nanos));
    Ok(out)
}

/// What a bounded line reader meets.
#[derive(Debug, PartialEq)]
enum Line<'a> {
    Whole(&'a [u8]),
    /// A line longer than the bound (its bytes were not kept).
    TooLong,
}

/// Calls `each` for every newline-ended line of `reader`, holding at most `max` bytes of one;
/// returns the length in bytes of an unended last fragment (a write cut short), or stops early when
/// `each` says so.
fn for_each_line(reader: impl Read, max: usize, mut each: impl FnMut(Line<'_>) -> bool) -> std::io::Result<usize> {
    let mut reader = BufReader::with_capacity(64 * 1024, reader);
    let mut line = Vec::new();
    let mut too_long = false;
    // The bytes of the line being read so far (kept or not).
    let mut fragment = 0usize;
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(fragment);
        }
        let (chunk, ended) = match memchr(buf) {
            Some(i) => (&buf[..i], i + 1),
            None => (buf, 0),
        };
        if !too_long && line.len() + chunk.len() <= max {
            line.extend_from_slice(chunk);
        } else {
            too_long = true;
            line.clear();
        }
        let used = if ended > 0 { ended } else { chunk.len() };
        fragment = if ended > 0 { 0 } else { fragment + used };
        reader.consume(used);
        if ended > 0 {
            let go_on = if too_long { each(Line::TooLong) } else { each(Line::Whole(&line)) };
            line.clear();
            too_long = false;
            if !go_on {
                return Ok(0);
            }
        }
    }
}

fn memchr(buf: &[u8]) -> Option<usize> {
    buf.iter().position(|&b| b == b'\n')
}

/// The reader's side: cheap to clone, one per `/v1/flows?since=` call.
#[derive(Clone, Debug)]
pub struct History {
    config: Arc<HistoryConfig>,
    metrics: HistoryMetrics,
    /// The newest segment, cut after its last whole line, which the writer may go on
    /// appending to (a start does not leave one small file behind per restart).
    resume: Option<PathBuf>,
    /// Reads at once ([`MAX_READERS`]).
    readers: Arc<tokio::sync::Semaphore>,
}

/// History reads at once: each holds a blocking thread of the runtime (shared with Kafka's
/// request handling and policy loads) for as long as its client takes, or its disk does.
pub const MAX_READERS: usize = 4;

impl History {
    /// Prepares the directory and finds where numbering resumes: after the newest record on
    /// disk (its newest segment's first number plus its whole lines).
    pub fn open(config: HistoryConfig, metrics: HistoryMetrics) -> Result<(History, u64), HistoryError> {
        prepare_dir(&config.dir)?;
        let io = |source| HistoryError::Io { dir: config.dir.clone(), source };
        let segments = list_segments(&config.dir).map_err(io)?;
        let mut segments = segments;
        let mut resume = None;
        let next_seq = match segments.last().cloned() {
            None => 1,
            Some(newest) => {
                let file = open_segment(&newest.path).map_err(io)?;
                let mut lines = 0u64;
                let fragment = for_each_line(file, MAX_LINE, |_| {
                    lines += 1;
                    true
                })
                .map_err(io)?;
                if lines == 0 {
                    // Nothing whole in it (a crash before its first write ended): the next
                    // segment starts at the same number, so this one goes.
                    std::fs::remove_file(&newest.path).map_err(io)?;
                    segments.pop();
                } else {
                    // A line a crash cut is cut off (it was lost either way), so that the
                    // writer can append whole lines after the last whole one.
                    let whole = newest.bytes.saturating_sub(fragment as u64);
                    let cut = fragment == 0
                        || OpenOptions::new()
                            .write(true)
                            .custom_flags(nix::libc::O_NOFOLLOW)
                            .open(&newest.path)
                            .and_then(|f| f.set_len(whole))
                            .is_ok();
                    if cut {
                        if let Some(s) = segments.last_mut() {
                            s.bytes = whole;
                        }
                        resume = Some(newest.path.clone());
                    }
                }
                newest.first_seq.saturating_add(lines)
            }
        };
        metrics.bytes.set(segments.iter().map(|s| s.bytes as i64).sum());
        info!(dir = %config.dir.display(), segments = segments.len(), next_seq, "flow history opened");
        let readers = Arc::new(tokio::sync::Semaphore::new(MAX_READERS));
        Ok((History { config: Arc::new(config), metrics, resume, readers }, next_seq))
    }

    pub fn dir(&self) -> &Path {
        &self.config.dir
    }

    /// A place among the [`MAX_READERS`] reads at once, held until dropped; none when all are
    /// taken (the caller is told to try again rather than queued on a blocking thread).
    pub fn reader(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.readers.clone().try_acquire_owned().ok()
    }

    /// [`History::open`], failing open: a directory that is not safely ours is still refused,
    /// but a disk that fails (full, read-only, an I/O error) leaves l7proxy to start with
    /// flows in memory only, counted as a write error and logged.
    pub fn open_or_off(config: HistoryConfig, metrics: HistoryMetrics) -> Result<Option<(History, u64)>, HistoryError> {
        match History::open(config, metrics.clone()) {
            Ok(opened) => Ok(Some(opened)),
            Err(e) if e.is_unsafe() => Err(e),
            Err(e) => {
                metrics.write_errors.inc();
                warn!(error = %e, "the flow history cannot be opened; flows are kept in memory only until l7proxy restarts");
                Ok(None)
            }
        }
    }

    /// Calls `emit` with each kept line (without its newline) that `filter` matches and whose
    /// record is numbered before `before_seq` (the oldest the ring still holds), oldest first,
    /// until `emit` says stop. Segments last written before `filter.since` are not opened.
    pub fn read(&self, filter: &FlowFilter, before_seq: u64, mut emit: impl FnMut(&[u8]) -> bool) {
        let segments = match list_segments(&self.config.dir) {
            Ok(s) => s,
            Err(e) => {
                warn!(dir = %self.config.dir.display(), error = %e, "flow history unreadable; serving the ring only");
                return;
            }
        };
        let since = filter.since.map(SystemTime::from);
        for (i, segment) in segments.iter().enumerate() {
            if segment.first_seq >= before_seq {
                break;
            }
            // (With a margin: the kernel stamps mtime from a coarse clock, a tick behind the
            // flow's own time, and a clock stepped back a little must not hide a segment.)
            if since.is_some_and(|since| segment.modified + SKEW < since) {
                continue;
            }
            // Past the age bound: not served, even before the writer's retention deleted it (a
            // node that was stopped a long time, a disk that refuses deletions).
            if SystemTime::now().duration_since(segment.modified).is_ok_and(|age| age > self.config.max_age) {
                continue;
            }
            let end = segments.get(i + 1).map_or(u64::MAX, |s| s.first_seq).min(before_seq);
            let file = match open_segment(&segment.path) {
                Ok(f) => f,
                // Deleted by retention since the listing.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    warn!(segment = %segment.path.display(), error = %e, "flow history segment unreadable; skipped");
                    continue;
                }
            };
            let mut seq = segment.first_seq;
            let mut stopped = false;
            let mut skipped = 0u64;
            let read = for_each_line(file, MAX_LINE, |line| {
                if seq >= end {
                    return false;
                }
                seq += 1;
                match line {
                    Line::Whole(bytes) => match serde_json::from_slice::<l7mesh_api::flow::Flow>(bytes) {
                        Ok(flow) if filter.matches_flow(&flow) => {
                            stopped = !emit(bytes);
                            !stopped
                        }
                        Ok(_) => true,
                        Err(_) => {
                            skipped += 1;
                            true
                        }
                    },
                    Line::TooLong => {
                        skipped += 1;
                        true
                    }
                }
            });
            match read {
                // A cut last line: its record was not written whole (a crash, a full disk);
                // unless it is one the ring still holds (being written right now: not lost).
                Ok(fragment) if fragment > 0 && seq < end => skipped += 1,
                Ok(_) => {}
                Err(e) => warn!(segment = %segment.path.display(), error = %e, "reading a flow history segment"),
            }
            if skipped > 0 {
                self.metrics.skipped_lines.inc_by(skipped);
                warn!(segment = %segment.path.display(), skipped, "flow history lines that are not whole flows were skipped");
            }
            if stopped {
                return;
            }
        }
    }
}

/// Opens a segment to read: never through a symbolic link, only a regular file.
fn open_segment(path: &Path) -> std::io::Result<File> {
    // (Non-blocking: a FIFO swapped in after the listing does not hang the reader.)
    let file = OpenOptions::new().read(true).custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK).open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "not a regular file"));
    }
    // Only what this process wrote is served as flows (a file another user got in is not).
    if meta.uid() != nix::unistd::geteuid().as_raw() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "owned by another user"));
    }
    Ok(file)
}

/// Logs a recurring problem at most once a minute, with how often it happened meanwhile.
#[derive(Default)]
struct RateLimited {
    last: Option<Instant>,
    since_last: u64,
}

impl RateLimited {
    fn hit(&mut self) -> Option<u64> {
        self.since_last += 1;
        if self.last.is_some_and(|t| t.elapsed() < Duration::from_secs(60)) {
            return None;
        }
        self.last = Some(Instant::now());
        Some(std::mem::take(&mut self.since_last))
    }
}

/// The segment being appended to.
struct Open {
    file: File,
    segment: Segment,
}

/// The writer's state, owned by its thread.
struct Writer {
    history: History,
    flows: Arc<FlowLog>,
    /// The last sequence number on disk (or counted lost).
    written: u64,
    open: Option<Open>,
    /// Closed segments, oldest first.
    closed: Vec<Segment>,
    write_errors: RateLimited,
    losses: RateLimited,
}

impl Writer {
    fn new(history: History, flows: Arc<FlowLog>) -> Self {
        let mut closed = list_segments(&history.config.dir).unwrap_or_default();
        let written = flows.next_seq().saturating_sub(1);
        // Go on appending to the newest segment when it has room and is young enough.
        let mut open = None;
        if let Some(newest) = closed.last().filter(|s| Some(&s.path) == history.resume.as_ref()) {
            let roomy = newest.bytes < history.config.segment_bytes();
            let young = !history.config.too_old_to_append(newest.first_nanos);
            let file = OpenOptions::new().append(true).custom_flags(nix::libc::O_NOFOLLOW).open(&newest.path);
            let ours = |f: &File| {
                f.metadata().is_ok_and(|m| m.is_file() && m.uid() == nix::unistd::geteuid().as_raw() && m.nlink() == 1)
            };
            if let (true, true, Ok(file)) = (roomy, young, file) {
                if ours(&file) {
                    let segment = closed.pop().unwrap_or_else(|| unreachable!());
                    open = Some(Open { file, segment });
                }
            }
        }
        Writer {
            history,
            flows,
            written,
            open,
            closed,
            write_errors: RateLimited::default(),
            losses: RateLimited::default(),
        }
    }

    /// Writes every record the ring numbered after `written`; how many the ring had for it.
    fn pass(&mut self) -> u64 {
        let before = self.written;
        self.write_new();
        self.written - before
    }

    fn write_new(&mut self) {
        // A segment removed under the writer (its directory deleted) is not written on.
        if self.open.as_ref().is_some_and(|o| std::fs::symlink_metadata(&o.segment.path).is_err()) {
            self.open = None;
        }
        loop {
            let (batch, lost) = self.flows.after(self.written, BATCH);
            if lost > 0 {
                self.history.metrics.lost.inc_by(lost);
                self.written += lost;
                // A segment's lines are numbered consecutively: after a gap, a new segment.
                if let Some(open) = self.open.take() {
                    self.closed.push(open.segment);
                }
                if let Some(times) = self.losses.hit() {
                    warn!(
                        lost,
                        times, "the flow ring dropped records before the history took them (raise --flow-capacity)"
                    );
                }
            }
            let Some((last_seq, _)) = batch.last() else { break };
            let last_seq = *last_seq;
            let mut pending: Vec<u8> = Vec::new();
            let mut ends: Vec<(u64, usize)> = Vec::new();
            for (seq, record) in &batch {
                let config = &self.history.config;
                let full = self.open.as_ref().is_none_or(|o| {
                    o.segment.bytes + pending.len() as u64 >= config.segment_bytes()
                        || config.too_old_to_append(o.segment.first_nanos)
                });
                if full {
                    if self.write(&mut pending, &mut ends).is_err() {
                        return self.retain();
                    }
                    if let Err(e) = self.rotate(*seq, record.time.0) {
                        self.write_failed(&e);
                        return self.retain();
                    }
                    // A long pass (a large ring, or a writer that does not catch up) keeps
                    // within the bound as it goes, not only at its end.
                    self.retain();
                }
                // The bytes `/v1/flows` writes for this record.
                // (A record that cannot be written keeps its place, as a line no reader takes.)
                if serde_json::to_writer(&mut pending, record).is_err() {
                    pending.truncate(ends.last().map_or(0, |e| e.1));
                    pending.extend_from_slice(b"{}");
                }
                pending.push(b'\n');
                ends.push((*seq, pending.len()));
            }
            if self.write(&mut pending, &mut ends).is_err() {
                return self.retain();
            }
            self.written = self.written.max(last_seq);
        }
        self.retain();
    }

    /// Appends `pending` (whole lines, record `seq` ending at each offset of `ends`) to the
    /// open segment. On an error, `written` is the last record that reached the file whole, and
    /// the segment is closed: the next pass starts a new one there.
    fn write(&mut self, pending: &mut Vec<u8>, ends: &mut Vec<(u64, usize)>) -> Result<(), ()> {
        if pending.is_empty() {
            return Ok(());
        }
        let Some(open) = self.open.as_mut() else { return Err(()) };
        let result = open.file.write_all(pending);
        let last = ends.last().map(|e| e.0);
        match result {
            Ok(()) => {
                open.segment.bytes += pending.len() as u64;
                open.segment.modified = SystemTime::now();
                self.history.metrics.written.inc_by(ends.len() as u64);
                self.history.metrics.bytes.inc_by(pending.len() as i64);
                if let Some(last) = last {
                    self.written = self.written.max(last);
                }
                pending.clear();
                ends.clear();
                Ok(())
            }
            Err(e) => {
                // What reached the file: the records whose line ends within its length.
                let on_disk = open.file.metadata().map(|m| m.len().saturating_sub(open.segment.bytes)).unwrap_or(0);
                let whole = ends.iter().take_while(|(_, end)| *end as u64 <= on_disk).count();
                if let Some((seq, _)) = ends.get(whole.wrapping_sub(1)) {
                    self.written = self.written.max(*seq);
                }
                self.history.metrics.written.inc_by(whole as u64);
                self.write_failed(&e);
                let open = self.open.take();
                if let Some(open) = open {
                    let kept = open.segment.bytes + on_disk;
                    self.history.metrics.bytes.inc_by(on_disk as i64);
                    if open.segment.bytes == 0 && whole == 0 {
                        // Nothing whole in it: the next segment starts at the same number.
                        let _ = std::fs::remove_file(&open.segment.path);
                        self.history.metrics.bytes.dec_by(kept as i64);
                    } else {
                        self.closed.push(Segment { bytes: kept, ..open.segment });
                    }
                }
                pending.clear();
                ends.clear();
                Err(())
            }
        }
    }

    fn write_failed(&mut self, e: &dyn std::fmt::Display) {
        self.history.metrics.write_errors.inc();
        if let Some(times) = self.write_errors.hit() {
            warn!(dir = %self.history.config.dir.display(), error = %e, times,
                "writing the flow history failed; flows stay in the ring and are written once it works again (those the ring drops meanwhile are lost to the history)");
        }
    }

    /// Closes the open segment and starts one for the record `seq` of time `at`.
    fn rotate(&mut self, seq: u64, at: time::OffsetDateTime) -> Result<(), HistoryError> {
        if let Some(open) = self.open.take() {
            self.closed.push(open.segment);
        }
        prepare_dir(&self.history.config.dir)?;
        let nanos = u128::try_from(at.unix_timestamp_nanos()).unwrap_or(0);
        let path = self.history.config.dir.join(segment_name(seq, nanos));
        let io = |source| HistoryError::Io { dir: path.clone(), source };
        let file = OpenOptions::new()
            .append(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&path)
            .map_err(io)?;
        let segment = Segment { first_seq: seq, first_nanos: nanos, path, bytes: 0, modified: SystemTime::now() };
        self.open = Some(Open { file, segment });
        Ok(())
    }

    /// Deletes the oldest closed segments beyond the size bound, and every segment (the open
    /// one too) last written longer ago than the age bound.
    fn retain(&mut self) {
        let config = &self.history.config;
        let now = SystemTime::now();
        let expired = |s: &Segment| now.duration_since(s.modified).is_ok_and(|age| age > config.max_age);
        if self.open.as_ref().is_some_and(|o| expired(&o.segment)) {
            if let Some(open) = self.open.take() {
                self.closed.push(open.segment);
            }
        }
        let open_bytes = self.open.as_ref().map_or(0, |o| o.segment.bytes);
        let mut total: u64 = self.closed.iter().map(|s| s.bytes).sum::<u64>() + open_bytes;
        while let Some(oldest) = self.closed.first() {
            if total <= config.max_bytes && !expired(oldest) {
                break;
            }
            let oldest = self.closed.remove(0);
            match std::fs::remove_file(&oldest.path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    self.history.metrics.write_errors.inc();
                    warn!(segment = %oldest.path.display(), error = %e, "deleting an old flow history segment");
                }
            }
            total = total.saturating_sub(oldest.bytes);
        }
        self.history.metrics.bytes.set(total as i64);
    }
}

/// The running writer: [`HistoryWriter::stop`] makes its last pass and waits for it.
pub struct HistoryWriter {
    stop: std::sync::mpsc::Sender<()>,
    done: std::sync::mpsc::Receiver<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// How long a stop waits for the writer's last pass: a disk that blocks (a hung network or
/// FUSE mount) must not keep l7proxy from exiting.
const STOP_WAIT: Duration = Duration::from_secs(5);

impl HistoryWriter {
    pub fn start(history: History, flows: Arc<FlowLog>) -> std::io::Result<Self> {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let (finished, done) = std::sync::mpsc::channel::<()>();
        let interval = history.config.interval;
        let quarter = (flows.capacity() as u64 / 4).max(1);
        let mut wait = interval;
        let mut writer = Writer::new(history, flows);
        let thread = std::thread::Builder::new().name("flow-history".into()).spawn(move || loop {
            let last = !matches!(stopped.recv_timeout(wait), Err(std::sync::mpsc::RecvTimeoutError::Timeout));
            // A pass that took a quarter of the ring or more: the next comes sooner, before the
            // ring drops what it has not taken.
            let taken = writer.pass();
            wait = if taken >= quarter { interval / 100 } else { interval };
            if last {
                if let Some(open) = &writer.open {
                    let _ = open.file.sync_data();
                }
                let _ = finished.send(());
                return;
            }
        })?;
        Ok(HistoryWriter { stop, done, thread: Some(thread) })
    }

    /// Writes what the ring holds that is not on disk yet, and ends the writer; gives up on
    /// it (and says so) after [`STOP_WAIT`].
    pub fn stop(self) {
        self.stop_within(STOP_WAIT)
    }

    fn stop_within(mut self, wait: Duration) {
        let _ = self.stop.send(());
        match self.done.recv_timeout(wait) {
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                warn!(waited = ?wait, "the flow history writer did not finish its last pass (the disk blocks?); stopping without it");
            }
            _ => {
                if let Some(t) = self.thread.take() {
                    let _ = t.join();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::{Endpoint, FlowRecord, FlowTime};
    use l7mesh_api::{Direction, Verdict};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fresh directory path (not created), removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static N: AtomicUsize = AtomicUsize::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let base = std::env::temp_dir().join(format!("l7proxy-history-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&base);
            std::fs::DirBuilder::new().mode(0o700).create(&base).unwrap();
            TempDir(base)
        }
        fn history(&self) -> PathBuf {
            self.0.join("flows")
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn config(dir: &Path, max_bytes: u64) -> HistoryConfig {
        HistoryConfig {
            dir: dir.into(),
            max_bytes,
            max_age: Duration::from_secs(3600),
            interval: Duration::from_secs(3600),
        }
    }

    /// Flow `n`: its source port says which it is.
    fn record(n: u16, at: time::OffsetDateTime) -> FlowRecord {
        let src = Endpoint::new(std::net::SocketAddr::from(([10, 0, 0, 1], n)), None);
        let dst = Endpoint::new("10.0.0.2:80".parse().unwrap(), None);
        let mut r = FlowRecord::proxied(Verdict::Allowed, Direction::Egress, src, dst, None);
        if n.is_multiple_of(5) {
            r.verdict = Verdict::Denied;
        }
        r.time = FlowTime(at);
        r
    }

    fn now() -> time::OffsetDateTime {
        time::OffsetDateTime::now_utc()
    }

    /// A history, its ring (numbered where the history resumes) and a writer on both.
    fn node(cfg: &HistoryConfig, capacity: usize) -> (History, Arc<FlowLog>, Writer) {
        let (history, next) = History::open(cfg.clone(), HistoryMetrics::default()).unwrap();
        let flows = Arc::new(FlowLog::new(capacity).starting_at(next));
        let writer = Writer::new(history.clone(), flows.clone());
        (history, flows, writer)
    }

    /// The source ports of what `/v1/flows?<query>` answers: history before the ring, then the
    /// ring, as admin.rs serves them.
    fn served(history: &History, flows: &FlowLog, query: &str) -> Vec<u16> {
        let filter = FlowFilter::parse(query).unwrap();
        let (first_held, held) = flows.held(&filter);
        let mut lines: Vec<Vec<u8>> = Vec::new();
        history.read(&filter, first_held, |l| {
            lines.push(l.to_vec());
            true
        });
        let mut out: Vec<u16> = lines
            .iter()
            .map(|l| serde_json::from_slice::<l7mesh_api::flow::Flow>(l).expect("a whole flow line").source.port)
            .collect();
        out.extend(held.iter().map(|r| r.source.addr.unwrap().port()));
        out
    }

    fn segments(dir: &Path) -> Vec<Segment> {
        list_segments(dir).unwrap()
    }

    #[test]
    fn rotates_segments_and_writes_the_bytes_flows_serves() {
        let tmp = TempDir::new();
        let cfg = config(&tmp.history(), 64 * 1024); // 8 KiB segments
        let (history, flows, mut writer) = node(&cfg, 1000);
        let t = now();
        for n in 1..=200 {
            flows.push(record(n, t));
        }
        writer.pass();
        let segs = segments(&cfg.dir);
        assert!(segs.len() > 3, "{} segments", segs.len());
        assert_eq!(segs[0].first_seq, 1);
        for s in &segs {
            assert!(s.bytes <= cfg.segment_bytes() + 400, "a segment closes at its bound: {}", s.bytes);
            let mode = std::fs::metadata(&s.path).unwrap().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", s.path.display());
        }
        assert_eq!(std::fs::metadata(&cfg.dir).unwrap().mode() & 0o777, 0o700);
        // Each segment's lines are the records numbered from its name on, byte for byte what
        // `/v1/flows` writes for them.
        let all: Vec<u8> = segs.iter().flat_map(|s| std::fs::read(&s.path).unwrap()).collect();
        let expected: String =
            flows.snapshot(&FlowFilter::default()).iter().map(|r| serde_json::to_string(r).unwrap() + "\n").collect();
        assert_eq!(String::from_utf8(all).unwrap(), expected);
        for pair in segs.windows(2) {
            let lines = std::fs::read(&pair[0].path).unwrap().iter().filter(|&&b| b == b'\n').count() as u64;
            assert_eq!(pair[0].first_seq + lines, pair[1].first_seq);
        }
        // A reader of a window sees each record once, in order (all of them are in the ring too).
        assert_eq!(served(&history, &flows, "since=1h"), (1..=200).collect::<Vec<_>>());
        assert_eq!(history.metrics.written.get(), 200);
    }

    #[test]
    fn history_and_ring_together_have_each_record_once() {
        let tmp = TempDir::new();
        let cfg = config(&tmp.history(), 1 << 20);
        let (history, flows, mut writer) = node(&cfg, 10);
        let t = now();
        for n in 1..=8 {
            flows.push(record(n, t));
        }
        writer.pass();
        for n in 9..=25 {
            flows.push(record(n, t));
        }
        // The ring holds 16..=25; 9..=15 were dropped before the writer took them: lost, counted.
        writer.pass();
        assert_eq!(history.metrics.lost.get(), 7);
        for n in 26..=30 {
            flows.push(record(n, t));
        }
        // 26..=30 are not on disk yet, 16..=25 on disk and in the ring.
        let want: Vec<u16> = (1..=8).chain(16..=30).collect();
        assert_eq!(served(&history, &flows, "since=1h"), want);
        writer.pass();
        assert_eq!(served(&history, &flows, "since=1h"), want);
        // The same filters apply to both.
        let denied: Vec<u16> = want.iter().copied().filter(|n| n.is_multiple_of(5)).collect();
        assert_eq!(served(&history, &flows, "since=1h&verdict=denied"), denied);
        // Without `since`, the ring only (as before there was a history).
        let ring: Vec<u16> =
            flows.snapshot(&FlowFilter::default()).iter().map(|r| r.source.addr.unwrap().port()).collect();
        assert_eq!(ring, (21..=30).collect::<Vec<_>>());
    }

    #[test]
    fn since_reaches_across_segment_boundaries() {
        let tmp = TempDir::new();
        let cfg = config(&tmp.history(), 32 * 1024); // 4 KiB segments
        let (history, flows, mut writer) = node(&cfg, 5);
        let start = now() - time::Duration::minutes(100);
        for n in 0..100u16 {
            // One a minute, from 100 minutes ago.
            flows.push(record(n + 1, start + time::Duration::minutes(n.into())));
            writer.pass();
        }
        assert!(segments(&cfg.dir).len() > 5);
        // The last 31 minutes: flows 71..=100 (70 is a moment older), from several segments and the ring.
        let got = served(&history, &flows, "since=31m");
        assert_eq!(got.first(), Some(&71), "{got:?}");
        assert_eq!(got, (71..=100).collect::<Vec<_>>());
        // Segments last written before the window are not even opened: one made unreadable
        // (not a flow file any more) changes nothing for a window after it.
        let first = &segments(&cfg.dir)[0];
        std::fs::write(&first.path, b"garbage\n").unwrap();
        let old = SystemTime::now() - Duration::from_secs(2 * 3600);
        File::options().write(true).open(&first.path).unwrap().set_modified(old).unwrap();
        assert_eq!(served(&history, &flows, "since=31m"), (71..=100).collect::<Vec<_>>());
        assert_eq!(history.metrics.skipped_lines.get(), 0);
    }

    #[test]
    fn retention_by_size_deletes_the_oldest() {
        let tmp = TempDir::new();
        let cfg = config(&tmp.history(), 32 * 1024);
        let (history, flows, mut writer) = node(&cfg, 100);
        let t = now();
        for n in 1..=2000 {
            flows.push(record(n, t));
            if n % 50 == 0 {
                writer.pass();
            }
        }
        let segs = segments(&cfg.dir);
        let total: u64 = segs.iter().map(|s| s.bytes).sum();
        assert!(total <= cfg.max_bytes, "{total} bytes kept");
        assert!(total > cfg.max_bytes / 2, "{total} bytes kept");
        assert_eq!(history.metrics.bytes.get(), total as i64);
        // What is kept is the newest, without a gap, ending with the newest record.
        let got = served(&history, &flows, "since=1h");
        assert_eq!(got.last(), Some(&2000));
        let from = got[0];
        assert!(from > 1, "the oldest went");
        assert_eq!(got, (from..=2000).collect::<Vec<_>>());
    }

    #[test]
    fn retention_by_age_deletes_what_was_last_written_too_long_ago() {
        let tmp = TempDir::new();
        let mut cfg = config(&tmp.history(), 1 << 20);
        cfg.max_age = Duration::from_secs(600);
        let (history, flows, mut writer) = node(&cfg, 100);
        let t = now();
        for n in 1..=10 {
            // An eighth of the age old: the next run does not append to their segment.
            flows.push(record(n, t - time::Duration::seconds(100)));
        }
        writer.pass();
        // A restart: the first run's segment is closed; the new run writes a new one.
        drop(writer);
        let (history2, next) = History::open(cfg.clone(), HistoryMetrics::default()).unwrap();
        assert_eq!(next, 11);
        let flows2 = Arc::new(FlowLog::new(100).starting_at(next));
        let mut writer2 = Writer::new(history2.clone(), flows2.clone());
        let olds = segments(&cfg.dir);
        assert!(!olds.is_empty());
        for old in &olds {
            File::options()
                .write(true)
                .open(&old.path)
                .unwrap()
                .set_modified(SystemTime::now() - Duration::from_secs(601))
                .unwrap();
        }
        writer2.closed = list_segments(&cfg.dir).unwrap();
        for n in 11..=12 {
            flows2.push(record(n, t));
        }
        writer2.pass();
        assert!(olds.iter().all(|old| !old.path.exists()), "an expired segment is deleted");
        assert_eq!(segments(&cfg.dir).len(), 1);
        assert_eq!(served(&history2, &flows2, "since=1h"), vec![11, 12]);
        drop(history);
    }

    #[test]
    fn a_restart_resumes_after_the_newest_record_and_a_cut_line_is_cut_off() {
        let tmp = TempDir::new();
        let cfg = config(&tmp.history(), 1 << 20);
        let t = now();
        {
            let (_, flows, mut writer) = node(&cfg, 100);
            for n in 1..=5 {
                flows.push(record(n, t));
            }
            writer.pass();
        }
        // A crash in the middle of a write: half a line at the end.
        let seg = segments(&cfg.dir)[0].clone();
        let mut f = File::options().append(true).open(&seg.path).unwrap();
        f.write_all(br#"{"time":"2026-12-03T10:00:00Z","verdict":"ALL"#).unwrap();
        drop(f);
        let (history, flows, mut writer) = node(&cfg, 100);
        assert_eq!(flows.next_seq(), 6, "numbering resumes after the whole lines on disk");
        for n in 6..=8 {
            flows.push(record(n, t));
        }
        writer.pass();
        assert_eq!(segments(&cfg.dir).len(), 1, "a new run appends to the newest segment");
        // The ring holds 6..=8, the history 1..=5 and 6..=8: each once, the cut line gone.
        assert_eq!(served(&history, &flows, "since=1h"), (1..=8).collect::<Vec<_>>());
        assert_eq!(history.metrics.skipped_lines.get(), 0);
        // After another restart (an empty ring), all of it from disk.
        drop(writer);
        let (history, flows, _writer) = node(&cfg, 100);
        assert_eq!(flows.next_seq(), 9);
        assert_eq!(served(&history, &flows, "since=1h"), (1..=8).collect::<Vec<_>>());
    }

    #[test]
    fn a_segment_cut_before_its_first_line_ended_is_dropped_at_start() {
        let tmp = TempDir::new();
        let cfg = config(&tmp.history(), 1 << 20);
        prepare_dir(&cfg.dir).unwrap();
        std::fs::write(cfg.dir.join(segment_name(41, 5)), b"{\"time\":").unwrap();
        let (history, flows, mut writer) = node(&cfg, 100);
        assert_eq!(flows.next_seq(), 41);
        assert!(segments(&cfg.dir).is_empty());
        flows.push(record(1, now()));
        writer.pass();
        assert_eq!(segments(&cfg.dir)[0].first_seq, 41);
        let (_, ring) = flows.held(&FlowFilter::default());
        assert_eq!(ring.len(), 1);
        let (history2, flows2, _w) = node(&cfg, 100);
        assert_eq!(served(&history2, &flows2, "since=1h"), vec![1]);
        drop(history);
    }

    #[test]
    fn a_corrupt_segment_does_not_poison_the_rest() {
        let tmp = TempDir::new();
        let cfg = config(&tmp.history(), 32 * 1024);
        let t = now();
        {
            let (_, flows, mut writer) = node(&cfg, 1000);
            for n in 1..=120 {
                flows.push(record(n, t));
            }
            writer.pass();
        }
        let segs = segments(&cfg.dir);
        assert!(segs.len() >= 3);
        // The middle segment: its second line replaced by garbage of the same shape (a line),
        // and a stray non-UTF-8 line; the numbering of the rest must not shift.
        let middle = &segs[1];
        let text = std::fs::read(&middle.path).unwrap();
        let mut lines: Vec<&[u8]> = text.split_inclusive(|&b| b == b'\n').collect();
        lines[1] = b"\xff\xfe not json\n";
        std::fs::write(&middle.path, lines.concat()).unwrap();
        let (history, flows, _w) = node(&cfg, 1000);
        let got = served(&history, &flows, "since=1h");
        let missing = middle.first_seq as u16 + 1;
        assert_eq!(got, (1..=120).filter(|&n| n != missing).collect::<Vec<_>>());
        assert_eq!(history.metrics.skipped_lines.get(), 1);
    }

    #[test]
    fn a_huge_line_is_skipped_without_being_held() {
        // 64 MiB without a newline, then a flow line: the reader holds at most MAX_LINE.
        let huge = std::io::repeat(b'x').take(64 << 20);
        let good = serde_json::to_vec(&record(7, now())).unwrap();
        let input = huge.chain(&b"\n"[..]).chain(&good[..]).chain(&b"\n"[..]).chain(&b"tail"[..]);
        let mut seen = Vec::new();
        let fragment = for_each_line(input, MAX_LINE, |l| {
            seen.push(match l {
                Line::Whole(b) => {
                    assert!(b.len() <= MAX_LINE);
                    Some(b.to_vec())
                }
                Line::TooLong => None,
            });
            true
        })
        .unwrap();
        assert_eq!(seen, vec![None, Some(good)]);
        assert_eq!(fragment, 4);
        // In a segment: skipped and counted, and it keeps its number.
        let tmp = TempDir::new();
        let cfg = config(&tmp.history(), 1 << 30);
        prepare_dir(&cfg.dir).unwrap();
        let mut seg = Vec::new();
        seg.extend(serde_json::to_vec(&record(1, now())).unwrap());
        seg.push(b'\n');
        seg.extend(std::iter::repeat_n(b'y', 2 * MAX_LINE));
        seg.push(b'\n');
        seg.extend(serde_json::to_vec(&record(3, now())).unwrap());
        seg.push(b'\n');
        std::fs::write(cfg.dir.join(segment_name(1, 1)), seg).unwrap();
        let (history, flows, _w) = node(&cfg, 10);
        assert_eq!(flows.next_seq(), 4);
        assert_eq!(served(&history, &flows, "since=1h"), vec![1, 3]);
        assert_eq!(history.metrics.skipped_lines.get(), 1);
    }

    #[test]
    fn write_errors_are_counted_and_the_ring_keeps_what_was_not_written() {
        let tmp = TempDir::new();
        let cfg = config(&tmp.history(), 1 << 20);
        let (history, flows, mut writer) = node(&cfg, 100);
        let t = now();
        flows.push(record(1, t));
        writer.pass();
        // The directory removed and a file put in its place: no segment can be made.
        std::fs::remove_dir_all(&cfg.dir).unwrap();
        std::fs::write(&cfg.dir, b"").unwrap();
        flows.push(record(2, t));
        writer.pass();
        assert_eq!(history.metrics.write_errors.get(), 1);
        assert_eq!(flows.snapshot(&FlowFilter::default()).len(), 2, "the ring serves on");
        // Once the directory can be made again, the records still in the ring are written.
        std::fs::remove_file(&cfg.dir).unwrap();
        flows.push(record(3, t));
        writer.pass();
        assert_eq!(history.metrics.write_errors.get(), 1);
        assert_eq!(history.metrics.lost.get(), 0);
        let (history2, flows2, _w) = node(&cfg, 100);
        assert_eq!(served(&history2, &flows2, "since=1h"), vec![2, 3], "1 went with the directory");
        assert_eq!(flows2.next_seq(), 4);
    }

    /// A full disk (a 12 KiB tmpfs; the unit tests run as root, as l7proxy does): the writes
    /// fail part way, what reached the disk whole is kept and numbered right, the rest stays
    /// in the ring and is written once there is room, each record once.
    #[test]
    fn a_full_disk_keeps_whole_lines_and_writes_the_rest_later() {
        struct Mount(PathBuf);
        impl Drop for Mount {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount").arg(&self.0).status();
            }
        }
        let tmp = TempDir::new();
        let mnt = tmp.0.join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let mount = |opts: &str| {
            std::process::Command::new("mount").args(["-t", "tmpfs", "-o", opts, "tmpfs"]).arg(&mnt).status().unwrap()
        };
        assert!(mount("size=12k,mode=0700").success(), "mount tmpfs (needs root)");
        let _mounted = Mount(mnt.clone());
        let cfg = config(&mnt.join("flows"), 1 << 20);
        let (history, flows, mut writer) = node(&cfg, 1000);
        let t = now();
        for n in 1..=200 {
            flows.push(record(n, t));
        }
        writer.pass();
        assert!(history.metrics.write_errors.get() >= 1, "the disk filled");
        let on_disk = served(&history, &FlowLog::new(1).starting_at(201), "since=1h");
        let k = on_disk.len() as u16;
        assert!(k > 10 && k < 200, "{k} records fit");
        assert_eq!(on_disk, (1..=k).collect::<Vec<_>>(), "whole lines, numbered from 1");
        assert_eq!(history.metrics.skipped_lines.get(), 1, "the line the disk cut");
        // Served with the ring: each once.
        assert_eq!(served(&history, &flows, "since=1h"), (1..=200).collect::<Vec<_>>());
        writer.pass();
        assert_eq!(served(&history, &flows, "since=1h"), (1..=200).collect::<Vec<_>>());
        // Room again: the rest is written, after what was there.
        assert!(std::process::Command::new("mount")
            .args(["-o", "remount,size=1m"])
            .arg(&mnt)
            .status()
            .unwrap()
            .success());
        writer.pass();
        assert_eq!(served(&history, &FlowLog::new(1).starting_at(201), "since=1h"), (1..=200).collect::<Vec<_>>());
        assert_eq!(history.metrics.lost.get(), 0);
        let (reopened, next) = History::open(cfg.clone(), HistoryMetrics::default()).unwrap();
        assert_eq!(next, 201);
        assert_eq!(served(&reopened, &FlowLog::new(1).starting_at(next), "since=1h"), (1..=200).collect::<Vec<_>>());
    }

    #[test]
    fn an_unsafe_directory_is_refused_or_fixed() {
        let tmp = TempDir::new();
        // A symbolic link, even to a good directory.
        let real = tmp.0.join("real");
        std::fs::DirBuilder::new().mode(0o700).create(&real).unwrap();
        let link = tmp.0.join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let e = prepare_dir(&link).unwrap_err();
        assert!(matches!(e, HistoryError::Symlink(_)), "{e}");
        assert!(e.to_string().contains("symbolic link"), "{e}");
        // Writable by others: refused, left as it is.
        let open = tmp.0.join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = prepare_dir(&open).unwrap_err();
        assert!(matches!(e, HistoryError::Writable { mode: 0o777, .. }), "{e}");
        assert!(e.to_string().contains("chmod 700"), "{e}");
        assert!(History::open(config(&open, 1 << 20), HistoryMetrics::default()).is_err());
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1733)).unwrap();
        assert!(matches!(prepare_dir(&open), Err(HistoryError::Writable { .. })));
        // Merely readable by others: made 0700.
        let readable = tmp.0.join("readable");
        std::fs::create_dir(&readable).unwrap();
        std::fs::set_permissions(&readable, std::fs::Permissions::from_mode(0o755)).unwrap();
        prepare_dir(&readable).unwrap();
        assert_eq!(std::fs::metadata(&readable).unwrap().mode() & 0o7777, 0o700);
        // Not a directory.
        let file = tmp.0.join("file");
        std::fs::write(&file, b"").unwrap();
        assert!(matches!(prepare_dir(&file), Err(HistoryError::NotADirectory(_))));
        // Someone else's (needs root to make one: these tests run as root, as l7proxy does).
        let theirs = tmp.0.join("theirs");
        std::fs::DirBuilder::new().mode(0o700).create(&theirs).unwrap();
        std::os::unix::fs::chown(&theirs, Some(65534), None).expect("chown (the unit tests run as root)");
        assert!(matches!(prepare_dir(&theirs), Err(HistoryError::Owner { owner: 65534, .. })));
        // A symbolic link in place of a segment is not read.
        let dir = tmp.0.join("flows");
        prepare_dir(&dir).unwrap();
        let outside = tmp.0.join("outside.jsonl");
        std::fs::write(&outside, serde_json::to_vec(&record(9, now())).unwrap()).unwrap();
        std::os::unix::fs::symlink(&outside, dir.join(segment_name(1, 1))).unwrap();
        assert!(list_segments(&dir).unwrap().is_empty());
        assert!(open_segment(&dir.join(segment_name(1, 1))).is_err());
    }

    #[test]
    fn hostile_segment_names_and_files_do_not_break_the_reader() {
        let tmp = TempDir::new();
        let cfg = config(&tmp.history(), 1 << 20);
        prepare_dir(&cfg.dir).unwrap();
        // Numbered at the very end of the range: numbering saturates, nothing overflows.
        let line = serde_json::to_vec(&record(1, now())).unwrap();
        let mut lines = [line.clone(), line.clone(), line].join(&b'\n');
        lines.push(b'\n');
        std::fs::write(cfg.dir.join(segment_name(u64::MAX - 1, 1)), &lines).unwrap();
        // A FIFO named like a segment, and a directory: not read, no hang.
        let fifo = cfg.dir.join(segment_name(5, 1));
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        std::fs::create_dir(cfg.dir.join(segment_name(6, 1))).unwrap();
        assert!(open_segment(&cfg.dir.join(segment_name(5, 1))).is_err());
        let (history, next) = History::open(cfg.clone(), HistoryMetrics::default()).unwrap();
        assert_eq!(next, u64::MAX);
        let flows = FlowLog::new(10).starting_at(next);
        // The ring's oldest is numbered u64::MAX: the history's records before it are served.
        assert_eq!(served(&history, &flows, "since=1h"), vec![1]);
    }

    /// The running writer: its passes come by themselves, and stopping it writes what the ring
    /// took since the last one (l7proxy stops it after the drain).
    #[test]
    fn the_writer_thread_passes_by_itself_and_writes_the_rest_when_stopped() {
        let tmp = TempDir::new();
        let mut cfg = config(&tmp.history(), 1 << 20);
        cfg.interval = Duration::from_millis(50);
        let (history, next) = History::open(cfg.clone(), HistoryMetrics::default()).unwrap();
        let flows = Arc::new(FlowLog::new(100).starting_at(next));
        let writer = HistoryWriter::start(history.clone(), flows.clone()).unwrap();
        flows.push(record(1, now()));
        let deadline = Instant::now() + Duration::from_secs(10);
        while history.metrics.written.get() < 1 {
            assert!(Instant::now() < deadline, "no pass wrote the record");
            std::thread::sleep(Duration::from_millis(10));
        }
        writer.stop();
        cfg.interval = Duration::from_secs(3600);
        let (history, next) = History::open(cfg, HistoryMetrics::default()).unwrap();
        let flows = Arc::new(FlowLog::new(100).starting_at(next));
        let writer = HistoryWriter::start(history.clone(), flows.clone()).unwrap();
        for n in 2..=4 {
            flows.push(record(n, now()));
        }
        writer.stop();
        assert_eq!(history.metrics.written.get(), 3, "written at the stop, not an hour later");
        assert_eq!(served(&history, &FlowLog::new(1).starting_at(5), "since=1h"), vec![1, 2, 3, 4]);
    }

    /// A tmpfs of `size` (the unit tests run as root), unmounted when dropped.
    struct Tmpfs(PathBuf);

    impl Tmpfs {
        fn mount(at: &Path, size: &str) -> Self {
            std::fs::create_dir_all(at).unwrap();
            let ok = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
                .arg(at)
                .status()
                .unwrap();
            assert!(ok.success(), "mount tmpfs (needs root)");
            Tmpfs(at.into())
        }
    }

    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }

    /// One pass that takes far more than `--flow-history-max-bytes` (a large ring, or a writer
    /// that never catches up with the ring and so never ends its pass) must delete the oldest
    /// as it goes: the disk never holds much more than the bound. On a tmpfs twice the bound,
    /// no write may fail and nothing may be lost.
    #[test]
    fn retention_bounds_the_disk_within_one_long_pass() {
        let tmp = TempDir::new();
        let mnt = tmp.0.join("mnt");
        let _fs = Tmpfs::mount(&mnt, "128k");
        let cfg = config(&mnt.join("flows"), 64 * 1024);
        let (history, flows, mut writer) = node(&cfg, 5000);
        let t = now();
        for n in 1..=5000 {
            flows.push(record(n, t));
        }
        writer.pass();
        assert_eq!(history.metrics.write_errors.get(), 0, "the disk filled before retention ran");
        assert_eq!(history.metrics.lost.get(), 0);
        let total: u64 = segments(&cfg.dir).iter().map(|s| s.bytes).sum();
        assert!(total <= cfg.max_bytes, "{total} bytes kept");
        let got = served(&history, &FlowLog::new(1).starting_at(5001), "since=1h");
        assert_eq!(got.last(), Some(&5000));
        assert_eq!(got, (got[0]..=5000).collect::<Vec<_>>());
    }

    /// `--flow-history-max-age` is a promise about flows (who talked to whom is not kept longer),
    /// not only about files: a quiet node whose open segment gets a flow now and then must not
    /// keep the first of them for ever (a segment closes once its first flow is an eighth of
    /// the age old, and goes once its last write is older than the age).
    #[test]
    fn max_age_bounds_how_long_a_flow_is_kept_on_a_quiet_node() {
        let tmp = TempDir::new();
        let mut cfg = config(&tmp.history(), 1 << 30);
        cfg.max_age = Duration::from_secs(3600);
        let (history, flows, mut writer) = node(&cfg, 100);
        // A flow 2 h ago, written then (its segment's last write is then too).
        let two_hours = Duration::from_secs(7200);
        flows.push(record(1, now() - two_hours));
        writer.pass();
        let seg = segments(&cfg.dir)[0].clone();
        File::options().write(true).open(&seg.path).unwrap().set_modified(SystemTime::now() - two_hours).unwrap();
        if let Some(open) = writer.open.as_mut() {
            open.segment.modified -= two_hours;
        }
        // A flow now: flow 1 (2 h old, the bound is 1 h) must be gone, flow 2 kept.
        flows.push(record(2, now()));
        writer.pass();
        assert_eq!(served(&history, &FlowLog::new(1).starting_at(3), "since=1d"), vec![2]);
    }

    /// The kernel stamps a file's mtime from a coarse clock (a tick behind the precise one the
    /// flow's time comes from): a segment written a moment after its flow may say it was last
    /// written a moment before it. `since` exactly at that flow must still find it.
    #[test]
    fn since_at_a_flows_own_time_finds_it_though_the_mtime_is_a_tick_older() {
        let tmp = TempDir::new();
        let cfg = config(&tmp.history(), 1 << 20);
        let (history, flows, mut writer) = node(&cfg, 100);
        let t = now();
        flows.push(record(1, t));
        writer.pass();
        let seg = segments(&cfg.dir)[0].clone();
        let coarse = SystemTime::from(t) - Duration::from_millis(4);
        File::options().write(true).open(&seg.path).unwrap().set_modified(coarse).unwrap();
        let filter = FlowFilter { since: Some(t), ..FlowFilter::default() };
        let mut got = 0;
        history.read(&filter, u64::MAX, |_| {
            got += 1;
            true
        });
        assert_eq!(got, 1, "the flow at `since` was skipped with its segment");
    }

    /// A node restarted often (l7proxy crash-looping, `l7ctl up` restarting it) with a few
    /// flows each time: segments must not pile up one per start (each costs a file and at
    /// least a disk block that `max-bytes` does not see). A start appends to the newest
    /// segment when it has room, after cutting a line a crash left half written.
    #[test]
    fn restarts_do_not_pile_up_small_segments() {
        let tmp = TempDir::new();
        let cfg = config(&tmp.history(), 1 << 20);
        let t = now();
        for n in 1..=30u16 {
            let (_, flows, mut writer) = node(&cfg, 100);
            assert_eq!(flows.next_seq(), u64::from(n));
            flows.push(record(n, t));
            writer.pass();
            if n == 10 {
                // A crash in the middle of a write.
                let seg = segments(&cfg.dir).pop().unwrap();
                let mut f = File::options().append(true).open(&seg.path).unwrap();
                f.write_all(br#"{"time":"2026-12-03T10:00:00Z","verd"#).unwrap();
            }
        }
        let segs = segments(&cfg.dir);
        assert!(segs.len() <= 2, "{} segments for 30 flows", segs.len());
        let (history, flows, _w) = node(&cfg, 100);
        assert_eq!(flows.next_seq(), 31);
        assert_eq!(served(&history, &flows, "since=1h"), (1..=30).collect::<Vec<_>>());
        assert_eq!(history.metrics.skipped_lines.get(), 0, "the cut line was cut off the file");
        for s in &segs {
            assert_eq!(std::fs::metadata(&s.path).unwrap().mode() & 0o777, 0o600);
        }
    }

    /// A writer stuck in its pass (here on the ring's lock, as it would be in a write to a disk
    /// that blocks) does not keep a stop, and so l7proxy's exit, waiting.
    #[test]
    fn a_stuck_writer_does_not_hold_up_the_stop() {
        let tmp = TempDir::new();
        let mut cfg = config(&tmp.history(), 1 << 20);
        cfg.interval = Duration::from_millis(20);
        let (history, next) = History::open(cfg, HistoryMetrics::default()).unwrap();
        let flows = Arc::new(FlowLog::new(100).starting_at(next));
        let writer = HistoryWriter::start(history, flows.clone()).unwrap();
        let held = flows.hold_ring_for_test();
        std::thread::sleep(Duration::from_millis(100));
        let started = Instant::now();
        writer.stop_within(Duration::from_millis(500));
        assert!(started.elapsed() < Duration::from_secs(3), "stop waited {:?}", started.elapsed());
        drop(held);
    }

    /// A disk that fails at start (read-only here) costs the history, not l7proxy's start; a
    /// directory that is not safely ours is still refused.
    #[test]
    fn a_failing_disk_at_start_turns_the_history_off_an_unsafe_one_is_refused() {
        let tmp = TempDir::new();
        let mnt = tmp.0.join("ro");
        let _fs = Tmpfs::mount(&mnt, "64k");
        assert!(std::process::Command::new("mount").args(["-o", "remount,ro"]).arg(&mnt).status().unwrap().success());
        let metrics = HistoryMetrics::default();
        let opened = History::open_or_off(config(&mnt.join("flows"), 1 << 20), metrics.clone()).unwrap();
        assert!(opened.is_none());
        assert_eq!(metrics.write_errors.get(), 1);
        let open = tmp.0.join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(History::open_or_off(config(&open, 1 << 20), HistoryMetrics::default()).is_err());
    }

    /// Slow or stuck readers (a client that does not read, a disk that blocks) take at most
    /// MAX_READERS blocking threads: the next is refused at once, and a place comes back when
    /// a read ends.
    #[test]
    fn history_reads_at_once_are_bounded() {
        let tmp = TempDir::new();
        let (history, _) = History::open(config(&tmp.history(), 1 << 20), HistoryMetrics::default()).unwrap();
        let held: Vec<_> = (0..MAX_READERS).map(|_| history.clone().reader().expect("a place")).collect();
        assert!(history.reader().is_none(), "one read more than the bound");
        drop(held);
        assert!(history.reader().is_some());
    }

    /// The directory's parents: one another user may write to (not sticky) or owns could have
    /// the history directory renamed away and replaced between two checks; refused. A sticky
    /// world-writable parent (as /tmp) is fine. A segment another user owns is not served.
    #[test]
    fn unsafe_parents_are_refused_and_foreign_segments_not_read() {
        let tmp = TempDir::new();
        let open = tmp.0.join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = prepare_dir(&open.join("flows")).unwrap_err();
        assert!(matches!(e, HistoryError::UnsafeParent { .. }), "{e}");
        assert!(e.is_unsafe() && e.to_string().contains("not sticky"), "{e}");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        prepare_dir(&open.join("flows")).unwrap();
        let theirs = tmp.0.join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::os::unix::fs::chown(&theirs, Some(65534), None).unwrap();
        let e = prepare_dir(&theirs.join("flows")).unwrap_err();
        assert!(e.to_string().contains("owned by uid 65534"), "{e}");
        // A link on the way that another user owns (they could point it elsewhere).
        let link = tmp.0.join("link");
        std::os::unix::fs::symlink(&tmp.0, &link).unwrap();
        std::os::unix::fs::lchown(&link, Some(65534), None).unwrap();
        let e = prepare_dir(&link.join("sub").join("flows")).unwrap_err();
        assert!(e.to_string().contains("symbolic link owned by uid 65534"), "{e}");
        // A segment file of another user's: skipped, not served.
        let cfg = config(&tmp.history(), 1 << 20);
        let (history, flows, mut writer) = node(&cfg, 100);
        flows.push(record(1, now()));
        writer.pass();
        drop(writer);
        let planted = cfg.dir.join(segment_name(2, 1));
        std::fs::write(&planted, [serde_json::to_vec(&record(2, now())).unwrap(), b"\n".to_vec()].concat()).unwrap();
        std::os::unix::fs::chown(&planted, Some(65534), None).unwrap();
        assert_eq!(served(&history, &FlowLog::new(1).starting_at(3), "since=1h"), vec![1]);
        assert!(open_segment(&planted).is_err(), "not read even when named directly");
        // Nor does it take part in where numbering resumes.
        let (_, next) = History::open(cfg.clone(), HistoryMetrics::default()).unwrap();
        assert_eq!(next, 2);
    }

    /// A node stopped longer than the age bound: its old flows are not served in the moment
    /// before the writer's first pass deletes them, nor when deleting them fails.
    #[test]
    fn expired_segments_are_not_served_before_retention_deletes_them() {
        let tmp = TempDir::new();
        let mut cfg = config(&tmp.history(), 1 << 20);
        cfg.max_age = Duration::from_secs(3600);
        let t = now() - time::Duration::days(10);
        {
            let (_, flows, mut writer) = node(&cfg, 100);
            flows.push(record(1, t));
            writer.pass();
        }
        let seg = segments(&cfg.dir)[0].clone();
        File::options().write(true).open(&seg.path).unwrap().set_modified(SystemTime::from(t)).unwrap();
        // Started again ten days later: no pass yet.
        let (history, next) = History::open(cfg.clone(), HistoryMetrics::default()).unwrap();
        assert_eq!(next, 2);
        assert!(served(&history, &FlowLog::new(10).starting_at(next), "since=30d").is_empty());
    }

    /// A read meeting the open segment in the middle of a write sees half a line at its end:
    /// that record is in the ring (the reader takes it from there), so nothing is counted or
    /// logged as skipped; half a line of a record the ring no longer has is.
    #[test]
    fn a_line_being_written_is_not_counted_skipped() {
        let tmp = TempDir::new();
        let cfg = config(&tmp.history(), 1 << 20);
        prepare_dir(&cfg.dir).unwrap();
        let line = |n| [serde_json::to_vec(&record(n, now())).unwrap(), b"\n".to_vec()].concat();
        let mut seg = [line(1), line(2)].concat();
        seg.extend_from_slice(&line(3)[..40]);
        std::fs::write(cfg.dir.join(segment_name(1, 1)), seg).unwrap();
        let history = History {
            config: Arc::new(cfg),
            metrics: HistoryMetrics::default(),
            resume: None,
            readers: Arc::new(tokio::sync::Semaphore::new(1)),
        };
        let filter = FlowFilter::parse("since=1h").unwrap();
        let mut got = 0;
        history.read(&filter, 3, |_| {
            got += 1;
            true
        });
        assert_eq!((got, history.metrics.skipped_lines.get()), (2, 0), "record 3 is the ring's");
        history.read(&filter, 10, |_| true);
        assert_eq!(history.metrics.skipped_lines.get(), 1, "record 3 is gone from the ring: lost");
    }

    #[test]
    fn segment_names() {
        assert_eq!(
            parse_segment_name(&segment_name(42, 1_790_000_000_000_000_000)),
            Some((42, 1_790_000_000_000_000_000))
        );
        for bad in [
            "flows-1-2.jsonl",
            "flows-00000000000000000001.jsonl",
            "x.jsonl",
            "flows-0000000000000000000a-00000000000000000001.jsonl",
        ] {
            assert_eq!(parse_segment_name(bad), None, "{bad}");
        }
    }
}

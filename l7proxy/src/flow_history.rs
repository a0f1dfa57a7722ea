//! The flow history (`--flow-history-dir`): the ring's records kept on disk, bounded by size
//! and age, so that `/v1/flows?since=` reaches back past the ring and across restarts.
//!
//! A background thread (never the request path) takes the records the ring numbered after the
//! last one it wrote, every second and at shutdown, and appends them as JSON Lines, the bytes
//! `/v1/flows` writes, to segment files `flows-<first seq>-<first time, unix ns>.jsonl`. A
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

/// Records taken from the ring at once (the ring's lock is held while they are cloned).
const BATCH: usize = 1024;

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
    #[error("flow history {dir}: {source}")]
    Io { dir: PathBuf, source: std::io::Error },
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

/// The segments in `dir`, in sequence order; other entries (and symbolic links) are ignored.
fn list_segments(dir: &Path) -> std::io::Result<Vec<Segment>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let Some((first_seq, first_nanos)) = entry.file_name().to_str().and_then(parse_segment_name) else {
            continue;
        };
        let Ok(meta) = entry.path().symlink_metadata() else { continue };
        if !meta.file_type().is_file() {
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
/// returns the length of an unended last fragment (a write cut short), or stops early when
/// `each` says so.
fn for_each_line(reader: impl Read, max: usize, mut each: impl FnMut(Line<'_>) -> bool) -> std::io::Result<usize> {
    let mut reader = BufReader::with_capacity(64 * 1024, reader);
    let mut line = Vec::new();
    let mut too_long = false;
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(if too_long { max + 1 } else { line.len() });
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
}

impl History {
    /// Prepares the directory and finds where numbering resumes: after the newest record on
    /// disk (its newest segment's first number plus its whole lines).
    pub fn open(config: HistoryConfig, metrics: HistoryMetrics) -> Result<(History, u64), HistoryError> {
        prepare_dir(&config.dir)?;
        let io = |source| HistoryError::Io { dir: config.dir.clone(), source };
        let segments = list_segments(&config.dir).map_err(io)?;
        let mut segments = segments;
        let next_seq = match segments.last().cloned() {
            None => 1,
            Some(newest) => {
                let file = open_segment(&newest.path).map_err(io)?;
                let mut lines = 0u64;
                for_each_line(file, MAX_LINE, |_| {
                    lines += 1;
                    true
                })
                .map_err(io)?;
                if lines == 0 {
                    // Nothing whole in it (a crash before its first write ended): the next
                    // segment starts at the same number, so this one goes.
                    std::fs::remove_file(&newest.path).map_err(io)?;
                    segments.pop();
                }
                newest.first_seq + lines
            }
        };
        metrics.bytes.set(segments.iter().map(|s| s.bytes as i64).sum());
        info!(dir = %config.dir.display(), segments = segments.len(), next_seq, "flow history opened");
        Ok((History { config: Arc::new(config), metrics }, next_seq))
    }

    pub fn dir(&self) -> &Path {
        &self.config.dir
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
            if since.is_some_and(|since| segment.modified < since) {
                continue;
            }
            let end = segments.get(i + 1).map_or(u64::MAX, |s| s.first_seq).min(before_seq);
            let file = match open_segment(&segment.path) {
                Ok(f) => f,
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
                // A cut last line: its record was not written whole (a crash, a full disk).
                Ok(fragment) if fragment > 0 => skipped += 1,
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
    let file = OpenOptions::new().read(true).custom_flags(nix::libc::O_NOFOLLOW).open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "not a regular file"));
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
        let closed = list_segments(&history.config.dir).unwrap_or_default();
        let written = flows.next_seq().saturating_sub(1);
        Writer {
            history,
            flows,
            written,
            open: None,
            closed,
            write_errors: RateLimited::default(),
            losses: RateLimited::default(),
        }
    }

    /// Writes every record the ring numbered after `written`.
    fn pass(&mut self) {
        // A segment removed under the writer (its directory deleted) is not written on.
        if self.open.as_ref().is_some_and(|o| std::fs::symlink_metadata(&o.segment.path).is_err()) {
            self.open = None;
        }
        loop {
            let (batch, lost) = self.flows.after(self.written, BATCH);
            if lost > 0 {
                self.history.metrics.lost.inc_by(lost);
                self.written += lost;
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
                let full = self
                    .open
                    .as_ref()
                    .is_none_or(|o| o.segment.bytes + pending.len() as u64 >= self.history.config.segment_bytes());
                if full {
                    if self.write(&mut pending, &mut ends).is_err() {
                        return self.retain();
                    }
                    if let Err(e) = self.rotate(*seq, record.time.0) {
                        self.write_failed(&e);
                        return self.retain();
                    }
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
                "writing the flow history failed; flows stay in the ring, the history has a gap");
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
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HistoryWriter {
    pub fn start(history: History, flows: Arc<FlowLog>) -> std::io::Result<Self> {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let interval = history.config.interval;
        let mut writer = Writer::new(history, flows);
        let thread = std::thread::Builder::new().name("flow-history".into()).spawn(move || loop {
            let last = !matches!(stopped.recv_timeout(interval), Err(std::sync::mpsc::RecvTimeoutError::Timeout));
            writer.pass();
            if last {
                if let Some(open) = &writer.open {
                    let _ = open.file.sync_data();
                }
                return;
            }
        })?;
        Ok(HistoryWriter { stop, thread: Some(thread) })
    }

    /// Writes what the ring holds that is not on disk yet, and ends the writer.
    pub fn stop(mut self) {
        let _ = self.stop.send(());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

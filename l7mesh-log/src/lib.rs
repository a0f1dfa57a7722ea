//! The one log set-up of every l7mesh process (l7ctl, l7proxy, policy-api, tls-broker), so that
//! the lines `l7ctl up` gathers from all of them on one stream read alike:
//!
//! - `--log-format text` (the default): `<RFC 3339 time> <LEVEL> <target>: <message> <fields>`;
//!   `--log-format json`: one JSON object per line (`timestamp`, `level`, `target`, `fields`
//!   with `message`, and the spans), for log collectors. `L7MESH_LOG_FORMAT` sets the same, and
//!   `l7ctl up` passes its own format on to the processes it starts.
//! - ANSI colour only when stderr is a terminal and `NO_COLOR` is unset or empty
//!   (<https://no-color.org>); never in a file, a pipe or JSON.
//! - `RUST_LOG` filters (default `info`).
#![forbid(unsafe_code)]

use std::ffi::OsString;
use std::io::IsTerminal as _;

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

pub use tracing_appender::non_blocking::WorkerGuard;

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// For people: time, level, target, message and fields on one line.
    #[default]
    Text,
    /// For collectors: one JSON object per line.
    Json,
}

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// The `--log-format` flag, the same in every binary.
#[derive(Clone, Copy, Debug, Default, clap::Args)]
pub struct LogArgs {
    /// Log line format: text (for people) or json (one object per line, for log collectors).
    #[arg(long, global = true, value_enum, env = LOG_FORMAT_ENV, default_value_t = LogFormat::Text, ignore_case = true)]
    pub log_format: LogFormat,
}

/// The environment variable `--log-format` also reads.
pub const LOG_FORMAT_ENV: &str = "L7MESH_LOG_FORMAT";

/// Whether text lines get ANSI colour: only on a terminal, and never when `NO_COLOR` holds a
/// value (an empty `NO_COLOR` does not count, as no-color.org says).
pub fn ansi_wanted(stderr_is_terminal: bool, no_color: Option<OsString>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

fn filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Installs the global subscriber writing to `writer` (`ansi` only matters for text).
pub fn init_with<W>(format: LogFormat, writer: W, ansi: bool)
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt().with_env_filter(filter()).with_writer(writer);
    // A second init (a test harness that set one up first) keeps the first: not an error.
    let _ = match format {
        LogFormat::Text => builder.with_ansi(ansi).try_init(),
        LogFormat::Json => builder.json().with_ansi(false).with_current_span(true).try_init(),
    };
}

/// For the long-running processes: lines leave through a background writer, so a terminal
/// paused with Ctrl-S, or a pipe nobody reads, drops log lines instead of stalling the threads
/// that serve connections. Keep the guard until exit (it flushes what is queued).
pub fn init_background(args: LogArgs) -> WorkerGuard {
    // 4,096 lines waiting at most (the default, 128,000, is a 4 MiB channel touched at start).
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(4096)
        .finish(std::io::stderr());
    init_with(args.log_format, writer, ansi_wanted(std::io::stderr().is_terminal(), std::env::var_os("NO_COLOR")));
    guard
}

/// For a command that runs and exits (l7ctl): lines are written to stderr as they come.
pub fn init_foreground(args: LogArgs) {
    init_with(
        args.log_format,
        std::io::stderr,
        ansi_wanted(std::io::stderr().is_terminal(), std::env::var_os("NO_COLOR")),
    );
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> MakeWriter<'w> for Captured {
        type Writer = Captured;
        fn make_writer(&'w self) -> Self::Writer {
            self.clone()
        }
    }

    fn lines(format: LogFormat, ansi: bool) -> String {
        let out = Captured::default();
        let builder = tracing_subscriber::fmt().with_writer(out.clone());
        let emit = || {
            let span = tracing::info_span!("conn", peer = "10.0.0.1:5000");
            let _g = span.enter();
            tracing::warn!(limit = "connections_per_workload", "a \"quoted\"\nmessage");
        };
        match format {
            LogFormat::Text => tracing::subscriber::with_default(builder.with_ansi(ansi).finish(), emit),
            LogFormat::Json => tracing::subscriber::with_default(
                builder.json().with_ansi(false).with_current_span(true).finish(),
                emit,
            ),
        }
        let bytes = out.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn json_lines_are_one_object_each_with_the_message_escaped() {
        let text = lines(LogFormat::Json, false);
        let all: Vec<&str> = text.lines().collect();
        assert_eq!(all.len(), 1, "a newline in a message must not split the line: {text}");
        let v: serde_json::Value = serde_json::from_str(all[0]).unwrap();
        assert_eq!(v["level"], "WARN");
        assert_eq!(v["fields"]["message"], "a \"quoted\"\nmessage");
        assert_eq!(v["fields"]["limit"], "connections_per_workload");
        assert_eq!(v["span"]["peer"], "10.0.0.1:5000");
        assert!(v["timestamp"].as_str().is_some_and(|t| t.contains('T')), "{v}");
        assert!(!text.contains('\u{1b}'), "no ANSI in JSON: {text:?}");
    }

    #[test]
    fn text_has_no_ansi_unless_asked() {
        assert!(!lines(LogFormat::Text, false).contains('\u{1b}'));
        assert!(lines(LogFormat::Text, true).contains('\u{1b}'), "the terminal case does colour");
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(ansi_wanted(true, None));
        assert!(ansi_wanted(true, Some("".into())), "an empty NO_COLOR does not count");
        assert!(!ansi_wanted(true, Some("1".into())));
        assert!(!ansi_wanted(false, None), "a file or a pipe never gets colour");
    }

    #[test]
    fn the_flag_is_case_insensitive_and_reads_its_env() {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            log: LogArgs,
        }
        assert_eq!(Cli::try_parse_from(["x", "--log-format", "JSON"]).unwrap().log.log_format, LogFormat::Json);
        assert_eq!(Cli::try_parse_from(["x"]).unwrap().log.log_format, LogFormat::Text);
        assert!(Cli::try_parse_from(["x", "--log-format", "yaml"]).is_err());
    }
}

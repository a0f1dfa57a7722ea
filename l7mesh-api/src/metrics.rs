//! What every l7mesh process that serves `/metrics` exports beside its own families (feature
//! `metrics`): `l7mesh_build_info`, the standard `process_*` metrics, and the exposition in
//! either format a scraper asks for. One shape for every process, so a dashboard reads them
//! alike.
//!
//! The process metrics are read from `/proc/self` by hand: prometheus-client has no process
//! collector, and the `prometheus` crate's would bring a second metrics library and `procfs`
//! into every process for six numbers.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};

/// Registers `l7mesh_build_info{component, version}` (always 1) and the process collector in
/// `registry`: the root registry, without a prefix (the process metrics have the standard
/// names; the process's own families go in a sub-registry with the `l7mesh` prefix).
pub fn register_common(registry: &mut Registry, component: &'static str, version: &'static str) {
    registry.register_collector(Box::new(BuildInfo { component, version }));
    registry.register_collector(Box::new(ProcessCollector));
}

#[derive(Debug)]
struct BuildInfo {
    component: &'static str,
    version: &'static str,
}

impl Collector for BuildInfo {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let metric = ConstGauge::new(1i64);
        let labels = [("component", self.component), ("version", self.version)];
        let mut family = encoder.encode_descriptor(
            "l7mesh_build_info",
            "The running l7mesh component and its version (always 1)",
            None,
            metric.metric_type(),
        )?;
        metric.encode(family.encode_family(&labels)?)
    }
}

/// `process_*` as the Prometheus client libraries write them, for this process.
#[derive(Debug)]
struct ProcessCollector;

/// What `/proc/self` says now; a value that cannot be read is left out of the scrape.
#[derive(Debug, Default, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: Option<f64>,
    pub resident_bytes: Option<u64>,
    pub virtual_bytes: Option<u64>,
    pub start_time_seconds: Option<f64>,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
}

/// The fields of `/proc/self/stat` after the command (which may hold spaces and parentheses):
/// field 3 (state) is index 0.
fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    let after = &stat[stat.rfind(')')? + 1..];
    Some(after.split_whitespace().collect())
}

impl ProcessStats {
    pub fn read() -> Self {
        let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().map(|t| t as f64);
        let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok().flatten().map(|p| p as u64);
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        let boot = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| s.lines().find_map(|l| l.strip_prefix("btime ")).and_then(|v| v.trim().parse::<f64>().ok()));
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
        let open_fds = std::fs::read_dir("/proc/self/fd").ok().map(|d| d.count() as u64);
        Self::parse(&stat, &limits, ticks, page, boot, open_fds)
    }

    /// The numbers from the files' text (split out to be tested on fixed input).
    pub fn parse(
        stat: &str,
        limits: &str,
        ticks: Option<f64>,
        page: Option<u64>,
        boot: Option<f64>,
        open_fds: Option<u64>,
    ) -> Self {
        let fields = stat_fields(stat).unwrap_or_default();
        // stat(5): utime 14, stime 15, starttime 22, vsize 23, rss 24 (1-based, the pid first).
        let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok());
        let cpu_seconds = match (field(14), field(15), ticks) {
            (Some(u), Some(s), Some(t)) if t > 0.0 => Some((u + s) as f64 / t),
            _ => None,
        };
        let start_time_seconds = match (field(22), ticks, boot) {
            (Some(start), Some(t), Some(boot)) if t > 0.0 => Some(boot + start as f64 / t),
            _ => None,
        };
        let max_fds = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .and_then(|l| l["Max open files".len()..].split_whitespace().next())
            .and_then(|soft| soft.parse().ok());
        ProcessStats {
            cpu_seconds,
            resident_bytes: field(24).zip(page).map(|(pages, page)| pages * page),
            virtual_bytes: field(23),
            start_time_seconds,
            open_fds,
            max_fds,
        }
    }
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let p = ProcessStats::read();
        if let Some(v) = p.cpu_seconds {
            let m = ConstCounter::new(v);
            m.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                m.metric_type(),
            )?)?;
        }
        let gauges: [(&str, &str, Option<f64>); 5] = [
            ("process_resident_memory_bytes", "Resident memory size in bytes", p.resident_bytes.map(|v| v as f64)),
            ("process_virtual_memory_bytes", "Virtual memory size in bytes", p.virtual_bytes.map(|v| v as f64)),
            (
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch in seconds",
                p.start_time_seconds,
            ),
            ("process_open_fds", "Number of open file descriptors", p.open_fds.map(|v| v as f64)),
            (
                "process_max_fds",
                "Maximum number of open file descriptors (the soft limit)",
                p.max_fds.map(|v| v as f64),
            ),
        ];
        for (name, help, value) in gauges {
            if let Some(v) = value {
                let m = ConstGauge::new(v);
                m.encode(encoder.encode_descriptor(name, help, None::<&Unit>, m.metric_type())?)?;
            }
        }
        Ok(())
    }
}

/// Whether a scrape's `Accept` asks for OpenMetrics (Prometheus does); anything else (curl,
/// promtool, a browser) gets the classic text format.
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| a.contains("application/openmetrics-text"))
}

/// The content type of [`OPENMETRICS`] text.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of the classic text format [`to_classic_text`] writes.
pub const CLASSIC_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// prometheus-client's OpenMetrics text as the classic text format (version 0.0.4): a counter's
/// `# HELP`/`# TYPE` name the `_total` series its samples carry, an info metric is a gauge of
/// its `_info` series, and `# UNIT` and `# EOF` go (the classic format has neither).
pub fn to_classic_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len() + 256);
    let lines = openmetrics.lines();
    let mut pending_help: Option<&str> = None;
    for line in lines {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            // Written once the TYPE line (next) tells the name.
            pending_help = Some(rest);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.rsplit_once(' ').unwrap_or((rest, "untyped"));
            let (name, kind) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                "info" => (format!("{name}_info"), "gauge"),
                "unknown" => (name.to_string(), "untyped"),
                k => (name.to_string(), k),
            };
            if let Some(help) = pending_help.take() {
                let text = help.split_once(' ').map_or("", |(_, t)| t);
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
            continue;
        }
        if let Some(help) = pending_help.take() {
            out.push_str("# HELP ");
            out.push_str(help);
            out.push('\n');
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_proc_files() {
        // A command with spaces and a parenthesis, as a process may name itself.
        let stat = "4242 (l7 proxy) x) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 8 0 12345 \
                    104857600 2560 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0";
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max cpu time              unlimited            unlimited            seconds\n\
                      Max open files            1048576              1048576              files\n";
        let p = ProcessStats::parse(stat, limits, Some(100.0), Some(4096), Some(1_700_000_000.0), Some(12));
        assert_eq!(
            p,
            ProcessStats {
                cpu_seconds: Some(3.0),
                resident_bytes: Some(2560 * 4096),
                virtual_bytes: Some(104_857_600),
                start_time_seconds: Some(1_700_000_123.45),
                open_fds: Some(12),
                max_fds: Some(1_048_576),
            }
        );
        assert_eq!(ProcessStats::parse("", "", None, None, None, None), ProcessStats::default());
    }

    #[test]
    fn this_process_is_exported() {
        let mut registry = Registry::default();
        register_common(&mut registry, "test", "1.2.3");
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("l7mesh_build_info{component=\"test\",version=\"1.2.3\"} 1"), "{text}");
        for name in [
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_virtual_memory_bytes ",
            "process_start_time_seconds ",
            "process_open_fds ",
            "process_max_fds ",
        ] {
            assert!(text.lines().any(|l| l.starts_with(name)), "{name} missing:\n{text}");
        }
        let rss: f64 =
            text.lines().find_map(|l| l.strip_prefix("process_resident_memory_bytes ")).unwrap().parse().unwrap();
        assert!(rss > 1e6, "{rss}");
    }

    #[test]
    fn classic_text_names_the_counter_series() {
        let om = "# HELP l7mesh_requests L7 requests.\n# TYPE l7mesh_requests counter\n\
                  l7mesh_requests_total{a=\"b\"} 3\n# HELP l7mesh_tasks Live tasks.\n# TYPE l7mesh_tasks gauge\n\
                  l7mesh_tasks 4\n# HELP l7mesh_x A histogram.\n# TYPE l7mesh_x_seconds histogram\n# UNIT l7mesh_x_seconds seconds\n\
                  l7mesh_x_seconds_bucket{le=\"+Inf\"} 1\n# EOF\n";
        let classic = to_classic_text(om);
        assert_eq!(
            classic,
            "# HELP l7mesh_requests_total L7 requests.\n# TYPE l7mesh_requests_total counter\n\
             l7mesh_requests_total{a=\"b\"} 3\n# HELP l7mesh_tasks Live tasks.\n# TYPE l7mesh_tasks gauge\n\
             l7mesh_tasks 4\n# HELP l7mesh_x_seconds A histogram.\n# TYPE l7mesh_x_seconds histogram\n\
             l7mesh_x_seconds_bucket{le=\"+Inf\"} 1\n"
        );
        assert!(wants_openmetrics(Some("application/openmetrics-text;version=1.0.0;q=0.5,text/plain;q=0.3")));
        assert!(!wants_openmetrics(Some("*/*")));
        assert!(!wants_openmetrics(None));
    }
}

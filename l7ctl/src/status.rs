//! `l7ctl status`: the node at a glance, from the pid files and /proc (its processes), the
//! pins (the datapath), policy-api's `/v1/status` (versions in force, counts, last errors) and
//! l7proxy's admin port (readiness, connections).

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use http::Method;
use l7mesh_api::layout::PROXY_ADMIN;
use l7mesh_api::rest::Status;
use serde::Serialize;

use crate::cli::{Output, StatusArgs};
use crate::client::{api_call, http_status, Api};
use crate::render::{or_dash, print_table, to_yaml, versions_in_force};
use crate::supervisor::{node_processes, UP_NAME};

/// What `status` exits with when a process of the node is down or not ready.
pub(crate) const EXIT_COMPONENT_DOWN: u8 = 2;

/// The node's status as `l7ctl status -o json` prints it.
#[derive(Debug, Serialize)]
pub(crate) struct NodeStatus {
    pub(crate) components: Vec<Component>,
    pub(crate) datapath: Datapath,
    /// Counts (None: policy-api or l7proxy did not say).
    pub(crate) policies: Option<usize>,
    pub(crate) workloads: Option<usize>,
    pub(crate) proxy_connections: Option<u64>,
    /// The policy version in force in each part (None: policy-api does not answer).
    pub(crate) in_force: Option<l7mesh_api::rest::InForce>,
    /// The last errors, oldest first.
    pub(crate) errors: Vec<String>,
    /// In a cluster: the kvstore and the nodes it lists.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) kvstore: Option<l7mesh_api::cluster::KvstoreStatus>,
}

#[derive(Debug, Serialize)]
pub(crate) struct Component {
    pub(crate) name: &'static str,
    pub(crate) state: State,
    pub(crate) pid: Option<i32>,
    /// The running binary's version.
    pub(crate) version: Option<String>,
    /// The policy version it has in force (policy-api: the store's; l7proxy: the one it loaded).
    pub(crate) policy_version: Option<u64>,
    pub(crate) detail: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum State {
    Up,
    /// Running, but not answering as it should (policy-api's API, l7proxy's /readyz).
    NotReady,
    Down,
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            State::Up => "up",
            State::NotReady => "not ready",
            State::Down => "down",
        })
    }
}

#[derive(Debug, Serialize)]
pub(crate) struct Datapath {
    pub(crate) pin_dir: String,
    /// The datapath's links are pinned (it enforces, whether or not the node's processes run).
    pub(crate) pinned: bool,
    pub(crate) programs_attached: usize,
    pub(crate) programs_expected: usize,
    /// Programs whose link is not pinned.
    pub(crate) missing: Vec<String>,
    /// While no proxy listens: marked connections pass unredirected (true) or are refused
    /// (false); None: the maps cannot be read.
    pub(crate) fail_open: Option<bool>,
    pub(crate) kernel_generation: Option<u32>,
}

/// The version a binary says (`NAME X.Y.Z` from `--version`), run through /proc/PID/exe: the
/// very binary that runs, even if the file was replaced since.
async fn running_version(pid: i32) -> Option<String> {
    let exe = format!("/proc/{pid}/exe");
    let out = tokio::time::timeout(
        Duration::from_secs(3),
        tokio::process::Command::new(&exe).arg("--version").kill_on_drop(true).output(),
    )
    .await
    .ok()?
    .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().nth(1).map(str::to_string)
}

/// l7proxy's open proxied connections, from its metrics (`l7mesh_proxy_active_connections`).
async fn proxy_connections() -> Option<u64> {
    let (status, body) =
        l7mesh_client::call(PROXY_ADMIN, Method::GET, "/metrics", Default::default(), Bytes::new()).await.ok()?;
    if !status.is_success() {
        return None;
    }
    parse_gauge(&String::from_utf8_lossy(&body), "l7mesh_proxy_active_connections")
}

/// Gauge `name` in OpenMetrics text, summed over its label sets (`name{direction="egress"} 2`);
/// 0 when a whole page (ending `# EOF`) has no series of it (prometheus-client writes nothing
/// for a family none of whose label sets was used yet); None when the text is no such page.
fn parse_gauge(text: &str, name: &str) -> Option<u64> {
    // A whole page: OpenMetrics ends with `# EOF`; the classic text format has no end marker,
    // so there its `# TYPE` line of the gauge says so.
    let declared = text.lines().any(|l| l.trim_end() == "# EOF" || l.trim_end() == format!("# TYPE {name} gauge"));
    let values: Vec<f64> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with([' ', '{'])))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .collect();
    if values.is_empty() && !declared {
        return None;
    }
    Some(values.iter().sum::<f64>() as u64)
}

pub(crate) fn datapath(pin_dir: &Path) -> Datapath {
    let links = redirector::pinned_links(pin_dir);
    let maps = redirector::Maps::open(pin_dir);
    let (fail_open, kernel_generation) = match &maps {
        Ok(m) => (m.fail_open().ok(), m.generation().ok()),
        Err(_) => (None, None),
    };
    Datapath {
        pin_dir: pin_dir.display().to_string(),
        pinned: redirector::is_installed(pin_dir),
        programs_attached: links.iter().filter(|(_, on)| *on).count(),
        programs_expected: links.len(),
        missing: links.iter().filter(|(_, on)| !on).map(|(n, _)| n.to_string()).collect(),
        fail_open,
        kernel_generation,
    }
}

/// How long status waits for each answer (a stopped process accepts connections and says nothing).
const ANSWER_WITHIN: Duration = Duration::from_secs(3);

async fn fetch_status(api: &Api) -> Result<Status> {
    let body = tokio::time::timeout(ANSWER_WITHIN, api_call(api, Method::GET, "/v1/status", None, Bytes::new()))
        .await
        .map_err(|_| anyhow::anyhow!("policy-api did not answer within {} s", ANSWER_WITHIN.as_secs()))??;
    Ok(serde_json::from_slice(&body)?)
}

pub(crate) async fn gather(api: &Api, args: &StatusArgs) -> NodeStatus {
    let paths = args.layout.paths();
    let procs = node_processes(&paths.run_dir, &paths.pin_dir);
    let pid = |name: &str| procs.iter().find(|(n, _)| *n == name).map(|(_, p)| p.as_raw());
    let api_status = fetch_status(api).await;
    let mut errors = Vec::new();
    let in_force = api_status.as_ref().ok().map(|s| s.in_force.clone());

    let mut components = Vec::new();
    let up_pid = pid(UP_NAME);
    components.push(Component {
        name: "l7ctl up",
        state: if up_pid.is_some() { State::Up } else { State::Down },
        pid: up_pid,
        version: match up_pid {
            Some(p) => running_version(p).await,
            None => None,
        },
        policy_version: None,
        detail: if up_pid.is_some() { "supervising the three below".into() } else { "not running".into() },
    });

    let api_pid = pid("policy-api");
    let (state, detail) = match (&api_status, api_pid) {
        (Ok(_), _) => (State::Up, format!("REST API on {}", api.addr)),
        (Err(e), Some(_)) => (State::NotReady, format!("running, but its API on {} does not answer: {e:#}", api.addr)),
        (Err(e), None) => (State::Down, format!("{e:#}").lines().next().unwrap_or_default().to_string()),
    };
    let api_version = match (&api_status, api_pid) {
        (Ok(s), _) if !s.api_version.is_empty() => Some(s.api_version.clone()),
        (_, Some(p)) => running_version(p).await,
        _ => None,
    };
    components.push(Component {
        name: "policy-api",
        state,
        pid: api_pid,
        version: api_version,
        policy_version: in_force.as_ref().map(|f| f.store),
        detail,
    });

    let proxy_pid = pid("l7proxy");
    let ready = tokio::time::timeout(ANSWER_WITHIN, http_status(PROXY_ADMIN, "/readyz")).await.ok().flatten();
    let (state, detail) = match (proxy_pid, ready) {
        (_, Some(200)) => (State::Up, format!("ready (admin {PROXY_ADMIN})")),
        (Some(_), Some(code)) => (State::NotReady, format!("/readyz answers {code}")),
        (Some(_), None) => (
            State::NotReady,
            format!("running, but its admin port {PROXY_ADMIN} does not answer (within {} s)", ANSWER_WITHIN.as_secs()),
        ),
        (None, _) => (State::Down, "not running".into()),
    };
    components.push(Component {
        name: "l7proxy",
        state,
        pid: proxy_pid,
        version: match proxy_pid {
            Some(p) => running_version(p).await,
            None => None,
        },
        policy_version: in_force.as_ref().and_then(|f| f.proxy),
        detail,
    });

    let broker_pid = pid("tls-broker");
    let admin_socket = l7mesh_api::layout::broker_admin_socket(&paths.run_dir);
    let (state, detail) = match (broker_pid, admin_socket.exists()) {
        (Some(_), true) => (State::Up, format!("admin socket {}", admin_socket.display())),
        (Some(_), false) => (State::NotReady, format!("running, but {} is missing", admin_socket.display())),
        (None, _) => (State::Down, "not running".into()),
    };
    components.push(Component {
        name: "tls-broker",
        state,
        pid: broker_pid,
        version: match broker_pid {
            Some(p) => running_version(p).await,
            None => None,
        },
        policy_version: None,
        detail,
    });

    let kvstore = api_status.as_ref().ok().and_then(|s| s.kvstore.clone());
    if let Some(k) = &kvstore {
        let (state, detail) = if k.connected {
            (State::Up, format!("{} as node {}, cluster revision {} in force", k.endpoints, k.node, k.revision))
        } else {
            (
                State::NotReady,
                format!(
                    "{} unreachable since {} ({}): enforcing the last policy set it had (cluster revision {})",
                    k.endpoints,
                    k.since,
                    k.error.as_deref().unwrap_or("not connected yet"),
                    k.revision
                ),
            )
        };
        components.push(Component { name: "kvstore", state, pid: None, version: None, policy_version: None, detail });
    }
    if let Ok(s) = &api_status {
        for e in &s.recent_errors {
            errors.push(format!("{} {}: {}", e.time, e.during, e.error));
        }
        if let Some(why) = &s.in_force.store_error {
            errors.push(format!("the store cannot be read: {why}"));
        }
        if let Some(d) = &s.in_force.divergence {
            errors.push(format!(
                "not converged: version {} was refused by the store ({}); bringing every part to version {}{}",
                d.failed_version,
                d.reason,
                d.target,
                d.last_error.as_ref().map(|e| format!(", last attempt: {e}")).unwrap_or_default()
            ));
        }
        if let Some(note) = s.last_apply.as_ref().and_then(|r| r.proxy_note.as_ref()) {
            errors.push(format!("last apply: {note}"));
        }
    }
    NodeStatus {
        components,
        datapath: datapath(&paths.pin_dir),
        policies: api_status.as_ref().ok().and_then(|s| s.policies),
        workloads: api_status.as_ref().ok().and_then(|s| s.workloads),
        proxy_connections: tokio::time::timeout(ANSWER_WITHIN, proxy_connections()).await.ok().flatten(),
        in_force,
        errors,
        kvstore,
    }
}

/// `fail_when_down`: exit 2 when a process is not up (`l7ctl status`); `get status` shows the
/// same and, as every `get`, exits 0 once it could tell (scripts written for it keep working).
pub(crate) async fn status(api: &Api, args: StatusArgs, fail_when_down: bool) -> Result<ExitCode> {
    let s = gather(api, &args).await;
    let down: Vec<&str> = s.components.iter().filter(|c| c.state != State::Up).map(|c| c.name).collect();
    let code = if down.is_empty() || !fail_when_down { ExitCode::SUCCESS } else { ExitCode::from(EXIT_COMPONENT_DOWN) };
    match args.output {
        Output::Json => println!("{}", serde_json::to_value(&s)?),
        Output::Yaml => print!("{}", to_yaml(&serde_json::to_value(&s)?) + "\n"),
        Output::Dot => anyhow::bail!("-o dot is for `l7ctl servicemap`"),
        Output::Table => print_status(&s),
    }
    if !down.is_empty() && fail_when_down {
        eprintln!("l7ctl: not running as it should: {} (exit {EXIT_COMPONENT_DOWN})", down.join(", "));
    } else if !down.is_empty() {
        eprintln!("l7ctl: not running as it should: {}", down.join(", "));
    }
    Ok(code)
}

fn print_status(s: &NodeStatus) {
    let mut rows: Vec<Vec<String>> = s
        .components
        .iter()
        .map(|c| {
            vec![
                c.name.to_string(),
                c.state.to_string(),
                or_dash(c.pid),
                c.version.clone().unwrap_or("-".into()),
                or_dash(c.policy_version),
                c.detail.clone(),
            ]
        })
        .collect();
    let d = &s.datapath;
    rows.push(vec![
        "kernel".into(),
        if d.pinned { "up".into() } else { "down".into() },
        "-".into(),
        "-".into(),
        or_dash(s.in_force.as_ref().and_then(|f| f.kernel)),
        format!("generation {}", or_dash(d.kernel_generation)),
    ]);
    print_table(&["COMPONENT", "STATE", "PID", "VERSION", "POLICY VERSION", "DETAIL"], &rows);
    println!();
    if let Some(k) = &s.kvstore {
        let rows: Vec<Vec<String>> = k
            .nodes
            .iter()
            .map(|n| {
                let addrs: Vec<String> = n.addresses.iter().map(|a| a.to_string()).collect();
                let failed = n
                    .failed
                    .as_ref()
                    .map(|f| format!("failed on revision {}: {}", f.revision, f.error))
                    .unwrap_or_else(|| "-".into());
                vec![n.name.clone(), addrs.join(","), or_dash(n.revision), failed]
            })
            .collect();
        println!("cluster nodes (as the kvstore lists them):");
        print_table(&["NODE", "ADDRESSES", "REVISION IN FORCE", "ERROR"], &rows);
        println!();
    }
    let mode = match d.fail_open {
        Some(true) => "fail-open (while no proxy listens, marked connections pass unredirected)",
        Some(false) => "fail-closed (while no proxy listens, marked connections are refused)",
        None => "mode unknown (the maps cannot be read)",
    };
    if d.pinned {
        println!(
            "datapath: pinned at {}, {} of {} programs attached{}, {mode}",
            d.pin_dir,
            d.programs_attached,
            d.programs_expected,
            if d.missing.is_empty() { String::new() } else { format!(" (missing: {})", d.missing.join(", ")) }
        );
    } else {
        println!("datapath: not pinned at {} (no enforcement; `l7ctl up` installs it)", d.pin_dir);
    }
    println!(
        "counts: {} policies, {} workloads, {} connections through l7proxy",
        or_dash(s.policies),
        or_dash(s.workloads),
        or_dash(s.proxy_connections)
    );
    if let Some(f) = &s.in_force {
        let status = Status { in_force: f.clone(), ..Status::default() };
        println!("policy version in force: {}", versions_in_force(&status));
        match (&f.store_error, f.converged) {
            (_, true) => println!("converged: true"),
            (Some(why), false) => println!("converged: false (the store cannot be read: {why})"),
            (None, false) => println!("converged: false"),
        }
    }
    if s.errors.is_empty() {
        println!("last errors: none");
    } else {
        println!("last errors:");
        for e in &s.errors {
            println!("  {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_gauge;

    #[test]
    fn gauges_are_read_by_their_whole_name() {
        let name = "l7mesh_proxy_active_connections";
        let text = format!(
            "# HELP {name} Proxied connections open now\n# TYPE {name} gauge\n{name}_peak 9\n{name}{{direction=\"egress\"}} 3\n{name}{{direction=\"ingress\"}} 2\n"
        );
        assert_eq!(parse_gauge(&text, name), Some(5), "summed over directions, not the _peak gauge");
        assert_eq!(parse_gauge("# TYPE other gauge\nother 1\n# EOF\n", name), Some(0), "a whole page, no series yet");
        assert_eq!(parse_gauge(&format!("{name} 4\n"), name), Some(4));
        assert_eq!(parse_gauge("other 1\n", name), None, "not a whole page");
        assert_eq!(
            parse_gauge(&format!("# HELP {name} x\n# TYPE {name} gauge\n"), name),
            Some(0),
            "classic text, declared"
        );
    }
}

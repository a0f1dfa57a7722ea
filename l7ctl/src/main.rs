//! l7ctl: the command users type (README, "The two commands" and "Running a node by hand").
//! Its modules: the commands ([`cli`]), the supervisor ([`supervisor`]: `up`, `down`), `run`
//! and its sandbox ([`run`]), the node's APIs ([`client`]) and printing ([`render`]).
#![forbid(unsafe_code)]

mod cli;
mod client;
mod config;
mod observe;
mod operate;
mod render;
mod run;
mod status;
mod supervisor;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Parser as _;
use l7policy::validate::{load_path, Severity};

use crate::cli::{Cli, Cmd, CompletionShell, GetWhat, ObserveArgs, SecretCmd, StatusDefaults};
use crate::client::{broker_admin, Api};
use crate::observe::observe;
use crate::operate::{apply, delete, delete_files, get, history, rollback, servicemap, simulate};
use crate::run::{init, run, sandbox};
use crate::status::status;
use crate::supervisor::{down, up};

/// `l7ctl ca init | issue-node | install-node | show-node`: the cluster's trust.
fn trust(cmd: cli::CaCmd) -> Result<ExitCode> {
    use std::time::Duration;
    use tls_broker::trust;
    let days = |d: u64| Duration::from_secs(d.saturating_mul(86400));
    match cmd {
        cli::CaCmd::Init { dir, trust_domain, days: d } => {
            trust::init_root(&dir, &trust_domain, days(d))?;
            println!(
                "cluster root for trust domain {trust_domain} made in {} (root.key, 0600: keep it there, off the nodes; root.pem)",
                dir.display()
            );
        }
        cli::CaCmd::IssueNode { name, dir, out, days: d } => {
            let bundle = trust::issue_node(&dir, &name, days(d))?;
            let out = out.unwrap_or_else(|| dir.join("nodes").join(format!("{name}.pem")));
            if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
            }
            write_private_file(&out, &bundle)?;
            println!(
                "node {name}'s intermediate written to {} (0600: its key is in it); on {name}: sudo l7ctl ca install-node {}",
                out.display(),
                out.display()
            );
        }
        cli::CaCmd::InstallNode { file, run_dir } => {
            let bundle = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let issuer = trust::NodeIssuer::from_bundle(&bundle)?;
            broker_admin(&run_dir, &l7mesh_api::broker::Request::InstallNodeIssuer { bundle })?;
            let until = time::OffsetDateTime::from_unix_timestamp(issuer.not_after)
                .ok()
                .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
                .unwrap_or_default();
            println!(
                "node {}'s intermediate (trust domain {}, valid until {until}) installed in the broker; {} can be deleted",
                issuer.node,
                issuer.trust_domain,
                file.display()
            );
        }
        cli::CaCmd::ShowNode { run_dir } => {
            let reply = broker_admin(&run_dir, &l7mesh_api::broker::Request::ClusterTrust)?;
            print!("{}{}", reply.cert.unwrap_or_default(), reply.ca.unwrap_or_default());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes `text` to `path`, mode 0600 before any byte is written (the file holds a key); an
/// older bundle there (a rotation) is replaced.
fn write_private_file(path: &std::path::Path, text: &str) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {}", path.display()))?;
    f.write_all(text.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn main() -> ExitCode {
    let cli = config::parse(std::env::args_os().collect());
    // These two must unshare and mount before the process has any thread.
    let cli = match cli.cmd {
        Cmd::Sandbox(args) => return exit_with(sandbox(args)),
        Cmd::Init(args) => return exit_with(init(args)),
        _ => cli,
    };
    let api = Api::new(cli.api, cli.api_token_file.clone());
    let api = &api;
    l7mesh_log::init_foreground(cli.log);
    let result = match cli.cmd {
        Cmd::Validate { file } => validate(&file),
        Cmd::Completion { shell } => completion(shell),
        Cmd::Man { dir } => man(&dir),
        Cmd::Ca { cmd: None, run_dir } => broker_admin(&run_dir, &l7mesh_api::broker::Request::Ca).map(|reply| {
            print!("{}", reply.ca.unwrap_or_default());
            ExitCode::SUCCESS
        }),
        Cmd::Ca { cmd: Some(cmd), .. } => trust(cmd),
        Cmd::Secret { cmd: SecretCmd::Import { name, namespace, cert, key, ca, run_dir } } => (|| {
            let read = |p: &Option<PathBuf>| -> Result<Option<String>> {
                p.as_ref()
                    .map(|p| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display())))
                    .transpose()
            };
            let request = l7mesh_api::broker::Request::Import {
                namespace: namespace.clone(),
                name: name.clone(),
                cert: read(&cert)?,
                key: read(&key)?,
                ca: read(&ca)?,
            };
            if cert.is_none() && ca.is_none() {
                bail!("give --cert and --key, or --ca, or both");
            }
            broker_admin(&run_dir, &request)?;
            println!("secret {namespace}/{name} imported into the broker");
            Ok(ExitCode::SUCCESS)
        })(),
        Cmd::Up(args) => runtime().and_then(|rt| rt.block_on(up(*args, cli.log))),
        Cmd::Down(args) => down(args),
        Cmd::Status(args) => runtime().and_then(|rt| rt.block_on(status(api, args, true))),
        Cmd::History { output } => runtime().and_then(|rt| rt.block_on(history(api, output))),
        Cmd::Rollback { version } => runtime().and_then(|rt| rt.block_on(rollback(api, version))),
        Cmd::Apply { file, dry_run, force } => runtime().and_then(|rt| rt.block_on(apply(api, &file, dry_run, force))),
        Cmd::Get { what: GetWhat::Status, name: None, output, .. } => {
            let mut args = StatusDefaults::parse_from(["l7ctl"]).args;
            args.output = output;
            runtime().and_then(|rt| rt.block_on(status(api, args, false)))
        }
        Cmd::Get { what, name, namespace, output } => {
            runtime().and_then(|rt| rt.block_on(get(api, what, name.as_deref(), namespace.as_deref(), output)))
        }
        Cmd::Delete { file: Some(file), force, .. } => {
            runtime().and_then(|rt| rt.block_on(delete_files(api, &file, force)))
        }
        Cmd::Delete { name, namespace, force, .. } => runtime().and_then(|rt| {
            let name = name.context("give a policy's name, or -f FILE")?;
            rt.block_on(delete(api, &name, namespace.as_deref(), force))
        }),
        Cmd::Observe(args) => runtime().and_then(|rt| rt.block_on(observe(api, args))),
        Cmd::Explain(args) => runtime().and_then(|rt| rt.block_on(observe(api, ObserveArgs { explain: true, ..args }))),
        Cmd::Simulate { file, since, output, no_fail_on_change, .. } => {
            runtime().and_then(|rt| rt.block_on(simulate(api, &file, since, output, !no_fail_on_change)))
        }
        Cmd::Servicemap { output, since } => runtime().and_then(|rt| rt.block_on(servicemap(api, since, output))),
        Cmd::Run(args) => runtime().and_then(|rt| rt.block_on(run(args))),
        Cmd::Sandbox(_) | Cmd::Init(_) => unreachable!("handled above"),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("l7ctl: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}

pub(crate) fn require_root(what: &str) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("{what} needs root (it manages cgroups and the eBPF datapath)");
    }
    Ok(())
}

/// The policy files of `-f`: a file, a directory's policy files, or `-` (stdin, read whole).
pub(crate) fn load_policies(
    file: &Path,
) -> Result<(Vec<l7policy::validate::LoadedPolicy>, Vec<l7policy::validate::Diagnostic>)> {
    if file == Path::new("-") {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).context("reading stdin")?;
        return Ok(l7policy::validate::load_text("<stdin>", &text));
    }
    Ok(load_path(file))
}

fn validate(file: &Path) -> Result<ExitCode> {
    let (policies, diags) = load_policies(file)?;
    for d in &diags {
        println!("{d}");
    }
    let errors = diags.iter().filter(|d| d.severity == Severity::Error).count();
    if errors > 0 {
        println!("{errors} error(s); nothing would be applied");
        return Ok(ExitCode::from(1));
    }
    println!("{} policies valid", policies.len());
    Ok(ExitCode::SUCCESS)
}

/// `l7ctl completion SHELL`: the script clap_complete writes for this very command tree.
fn completion(shell: CompletionShell) -> Result<ExitCode> {
    use clap::CommandFactory;
    let shell = match shell {
        CompletionShell::Bash => clap_complete::Shell::Bash,
        CompletionShell::Zsh => clap_complete::Shell::Zsh,
        CompletionShell::Fish => clap_complete::Shell::Fish,
    };
    // The visible commands only: clap_complete's bash script would offer the hidden ones too.
    let full = Cli::command();
    let mut cmd = clap::Command::new("l7ctl").args(full.get_arguments().cloned());
    for sub in full.get_subcommands().filter(|s| !s.is_hide_set()) {
        cmd = cmd.subcommand(sub.clone());
    }
    clap_complete::generate(shell, &mut cmd, "l7ctl", &mut std::io::stdout());
    Ok(ExitCode::SUCCESS)
}

/// `l7ctl man --dir DIR`: l7ctl.1 and a page per visible command (l7ctl-apply.1, ...).
fn man(dir: &Path) -> Result<ExitCode> {
    use clap::CommandFactory;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let cmd = Cli::command();
    let mut written = Vec::new();
    let mut write = |name: String, cmd: clap::Command| -> Result<()> {
        let path = dir.join(format!("{name}.1"));
        let mut out = Vec::new();
        clap_mangen::Man::new(cmd).render(&mut out)?;
        std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
        Ok(())
    };
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        // (clap names commands with &'static str; a CLI that ends right after may leak these.)
        let name: &'static str = Box::leak(format!("l7ctl-{}", sub.get_name()).into_boxed_str());
        write(name.to_string(), sub.clone().name(name).bin_name(name))?;
    }
    write("l7ctl".into(), cmd)?;
    for p in &written {
        println!("{}", p.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn exit_with(result: Result<ExitCode>) -> ExitCode {
    result.unwrap_or_else(|e| {
        eprintln!("l7ctl: {e:#}");
        ExitCode::from(1)
    })
}

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
mod supervisor;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use l7policy::validate::{load_path, Severity};

use crate::cli::{Cmd, DeleteWhat, ObserveArgs, SecretCmd};
use crate::client::{broker_admin, Api};
use crate::observe::observe;
use crate::operate::{apply, delete, get, servicemap, simulate};
use crate::run::{init, run, sandbox};
use crate::supervisor::{down, up};

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
        Cmd::Ca { run_dir } => broker_admin(&run_dir, &l7mesh_api::broker::Request::Ca).map(|reply| {
            print!("{}", reply.ca.unwrap_or_default());
            ExitCode::SUCCESS
        }),
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
        Cmd::Up(args) => runtime().and_then(|rt| rt.block_on(up(args, cli.log))),
        Cmd::Down(args) => down(args),
        Cmd::Apply { file, dry_run } => runtime().and_then(|rt| rt.block_on(apply(api, &file, dry_run))),
        Cmd::Get { what, output } => runtime().and_then(|rt| rt.block_on(get(api, what, output))),
        Cmd::Delete { what: DeleteWhat::Policy, name, namespace } => {
            runtime().and_then(|rt| rt.block_on(delete(api, &name, namespace.as_deref())))
        }
        Cmd::Observe(args) => runtime().and_then(|rt| rt.block_on(observe(api, args))),
        Cmd::Explain(args) => runtime().and_then(|rt| rt.block_on(observe(api, ObserveArgs { explain: true, ..args }))),
        Cmd::Simulate { file, since, output } => {
            runtime().and_then(|rt| rt.block_on(simulate(api, &file, since, output)))
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

fn validate(file: &Path) -> Result<ExitCode> {
    let (policies, diags) = load_path(file);
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

fn exit_with(result: Result<ExitCode>) -> ExitCode {
    result.unwrap_or_else(|e| {
        eprintln!("l7ctl: {e:#}");
        ExitCode::from(1)
    })
}

//! `l7ctl up --config FILE`: a YAML map whose keys are `l7ctl up`'s long flags (`policy`,
//! `fail-open`, `listen-api`, `state-dir`, `log-format`, ...), so that a node started by a
//! service manager keeps its settings in one file. The keys are read off the command itself
//! (clap), so every flag `up` has can be set here and no other key is taken. A flag on the
//! command line, or its environment variable, wins over the file; the file wins over the
//! defaults.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, CommandFactory, FromArgMatches};
use yaml_rust2::{Yaml, YamlLoader};

use crate::cli::Cli;

#[derive(Debug, thiserror::Error)]
pub(crate) enum ConfigError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: not YAML: {source}")]
    Yaml { path: PathBuf, source: yaml_rust2::ScanError },
    #[error("{path}: expected a map of `l7ctl up` flags (key: value), found {found}")]
    NotAMap { path: PathBuf, found: &'static str },
    #[error("{path}: unknown key `{key}`{hint}; the keys are the long flags of `l7ctl up`: {known}")]
    UnknownKey { path: PathBuf, key: String, hint: String, known: String },
    #[error("{path}: key `{key}`: {problem}")]
    BadValue { path: PathBuf, key: String, problem: String },
}

/// The command line as `l7ctl` parses it: `argv`, with the settings of `up --config FILE`
/// inserted after `up` wherever neither a flag nor an environment variable sets them.
pub(crate) fn parse(argv: Vec<OsString>) -> Cli {
    let command = || Cli::command().args_override_self(true);
    let matches = command().get_matches_from(&argv);
    let config = match matches.subcommand() {
        Some(("up", up)) => up.get_one::<PathBuf>("config").cloned().map(|path| (path, up.clone())),
        _ => None,
    };
    let matches = match config {
        None => matches,
        Some((path, up)) => match settings(&path, &up) {
            Ok(tokens) => command().get_matches_from(insert_after_up(argv, tokens)),
            Err(e) => {
                eprintln!("l7ctl up: {e}");
                std::process::exit(2);
            }
        },
    };
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

/// `argv` with `tokens` right after the `up` subcommand (the first `up` that is not the value
/// of a global option), so that flags after them, on the command line, still win.
fn insert_after_up(argv: Vec<OsString>, tokens: Vec<OsString>) -> Vec<OsString> {
    let mut command = Cli::command();
    command.build();
    let takes_value = |token: &str| {
        command
            .get_arguments()
            .any(|a| a.get_long().is_some_and(|l| token == format!("--{l}")) && a.get_action().takes_values())
    };
    let mut i = 1;
    while i < argv.len() {
        let token = argv[i].to_string_lossy();
        if token == "up" {
            break;
        }
        i += if takes_value(&token) { 2 } else { 1 };
    }
    let mut out = argv;
    let at = (i + 1).min(out.len());
    out.splice(at..at, tokens);
    out
}

/// The flags FILE sets, as command-line tokens (`--key=value`), leaving out those the command
/// line or the environment already set.
fn settings(path: &Path, up: &ArgMatches) -> Result<Vec<OsString>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
    let docs = YamlLoader::load_from_str(&text).map_err(|source| ConfigError::Yaml { path: path.into(), source })?;
    let map = match docs.into_iter().next() {
        None => return Ok(Vec::new()), // an empty file sets nothing
        Some(Yaml::Hash(map)) => map,
        Some(other) => return Err(ConfigError::NotAMap { path: path.into(), found: kind(&other) }),
    };
    let mut command = Cli::command();
    command.build();
    let up_command = command.find_subcommand("up").expect("`up` is a subcommand");
    let known: Vec<String> = up_command
        .get_arguments()
        .filter_map(|a| a.get_long().map(str::to_string))
        .filter(|l| l != "config" && l != "help" && l != "version")
        .collect();
    let mut tokens = Vec::new();
    for (key, value) in map {
        let key = match key {
            Yaml::String(k) => k,
            other => {
                return Err(ConfigError::BadValue {
                    path: path.into(),
                    key: format!("{other:?}"),
                    problem: "keys are flag names (strings)".into(),
                })
            }
        };
        let long = key.replace('_', "-");
        let Some(arg) =
            up_command.get_arguments().find(|a| a.get_long() == Some(long.as_str()) && known.contains(&long))
        else {
            let hint = known
                .iter()
                .map(|k| (strsim::jaro_winkler(k, &long), k))
                .filter(|(score, _)| *score > 0.8)
                .max_by(|a, b| a.0.total_cmp(&b.0))
                .map(|(_, k)| format!(" (did you mean `{k}`?)"))
                .unwrap_or_default();
            return Err(ConfigError::UnknownKey { path: path.into(), key, hint, known: known.join(", ") });
        };
        let id = arg.get_id().as_str();
        if matches!(up.value_source(id), Some(ValueSource::CommandLine | ValueSource::EnvVariable)) {
            continue; // the command line and the environment win over the file
        }
        let bad =
            |problem: &str| ConfigError::BadValue { path: path.into(), key: key.clone(), problem: problem.into() };
        match arg.get_action() {
            ArgAction::SetTrue => match value {
                Yaml::Boolean(true) => tokens.push(format!("--{long}").into()),
                Yaml::Boolean(false) => {}
                _ => return Err(bad("expected true or false")),
            },
            ArgAction::Append => {
                let items = match value {
                    Yaml::Array(items) => items,
                    one => vec![one],
                };
                for item in items {
                    tokens.push(
                        format!(
                            "--{long}={}",
                            scalar(&item).ok_or_else(|| bad("expected a value or a list of values"))?
                        )
                        .into(),
                    );
                }
            }
            _ => {
                let v = scalar(&value).ok_or_else(|| bad(&format!("expected one value, found {}", kind(&value))))?;
                tokens.push(format!("--{long}={v}").into());
            }
        }
    }
    Ok(tokens)
}

fn scalar(v: &Yaml) -> Option<String> {
    match v {
        Yaml::String(s) | Yaml::Real(s) => Some(s.clone()),
        Yaml::Integer(i) => Some(i.to_string()),
        Yaml::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

fn kind(v: &Yaml) -> &'static str {
    match v {
        Yaml::Hash(_) => "a map",
        Yaml::Array(_) => "a list",
        Yaml::Null => "nothing",
        _ => "a value",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Cmd;

    fn refused(file: &str) -> String {
        match parse_with(file, &["up", "--config", "CONFIG"]) {
            Ok(_) => panic!("{file:?} was taken"),
            Err(e) => e.to_string(),
        }
    }

    fn parse_with(file: &str, argv: &[&str]) -> Result<Cli, ConfigError> {
        let dir = std::env::temp_dir().join(format!("l7ctl-config-test-{}-{}", std::process::id(), argv.len()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("c{}.yaml", file.len()));
        std::fs::write(&path, file).unwrap();
        let mut full: Vec<OsString> = vec!["l7ctl".into()];
        full.extend(argv.iter().map(|a| OsString::from(a.replace("CONFIG", path.to_str().unwrap()))));
        let command = || Cli::command().args_override_self(true);
        let matches = command().try_get_matches_from(&full).unwrap();
        let (_, up) = matches.subcommand().unwrap();
        let tokens = settings(&path, up)?;
        let matches = command().try_get_matches_from(insert_after_up(full, tokens)).unwrap();
        Ok(Cli::from_arg_matches(&matches).unwrap())
    }

    fn up(cli: Cli) -> crate::cli::UpArgs {
        match cli.cmd {
            Cmd::Up(a) => *a,
            _ => panic!("not up"),
        }
    }

    const FILE: &str = "policy: /etc/l7mesh/policies\nfail-open: true\nlisten_api: 127.0.0.1:9191\nstate-dir: /srv/l7mesh\nlog-format: json\n";

    #[test]
    fn every_key_is_a_flag_and_sets_it() {
        let cli = parse_with(FILE, &["up", "--config", "CONFIG"]).unwrap();
        assert_eq!(cli.log.log_format, l7mesh_log::LogFormat::Json);
        let a = up(cli);
        assert_eq!(a.policy.as_deref(), Some(Path::new("/etc/l7mesh/policies")));
        assert!(a.fail_open);
        assert_eq!(a.api.to_string(), "127.0.0.1:9191");
        assert_eq!(a.layout.dirs.state_dir, Path::new("/srv/l7mesh"));
        let a = up(parse_with(
            "flow-history-dir: /srv/flows\nflow-history-max-bytes: 1G\nflow-history-max-age: 2d\nflow-capacity: 100\n",
            &["up", "--config", "CONFIG"],
        )
        .unwrap());
        assert_eq!(a.flow_history_dir.as_deref(), Some(Path::new("/srv/flows")));
        assert_eq!((a.flow_history_max_bytes.as_deref(), a.flow_history_max_age.as_deref()), (Some("1G"), Some("2d")));
        assert_eq!(a.flow_capacity, Some(100));
        assert!(up(parse_with("no-flow-history: true\n", &["up", "--config", "CONFIG"]).unwrap()).no_flow_history);
        // Values l7proxy would refuse are refused before anything starts (clap checks what the
        // file sets as it checks the command line).
        for (flag, bad, says) in [
            ("--flow-history-max-bytes", "lots", "K, M or G"),
            ("--flow-history-max-bytes", "99999999999999G", "K, M or G"),
            ("--flow-history-max-age", "7 days", "12h or 7d"),
            ("--flow-history-max-bytes", "4096", "at least 64K"),
            ("--flow-history-max-bytes", "0", "at least 64K"),
            ("--flow-history-max-age", "30s", "1m at least"),
            ("--flow-history-max-age", "0", "1m at least"),
        ] {
            let e = Cli::command().try_get_matches_from(["l7ctl", "up", flag, bad]).expect_err(bad).to_string();
            assert!(e.contains(says), "{e}");
        }
        assert!(Cli::command().try_get_matches_from(["l7ctl", "up", "--flow-history-max-bytes", "2GiB"]).is_ok());
    }

    #[test]
    fn the_hubble_socket_is_a_setting() {
        let a = up(parse_with("hubble-socket: /run/x/hubble.sock\n", &["up", "--config", "CONFIG"]).unwrap());
        assert_eq!(a.hubble_socket.as_deref(), Some(Path::new("/run/x/hubble.sock")));
        assert!(!a.no_hubble);
        let a = up(parse_with("no-hubble: true\n", &["up", "--config", "CONFIG"]).unwrap());
        assert!(a.no_hubble && a.hubble_socket.is_none());
        // Both at once is a contradiction, refused rather than one silently winning.
        let both = Cli::command().try_get_matches_from(["l7ctl", "up", "--no-hubble", "--hubble-socket", "/x"]);
        assert_eq!(both.unwrap_err().kind(), clap::error::ErrorKind::ArgumentConflict);
    }

    #[test]
    fn the_command_line_wins_over_the_file_before_or_after_up() {
        let a = up(parse_with(FILE, &["up", "--config", "CONFIG", "--policy", "/tmp/p"]).unwrap());
        assert_eq!(a.policy.as_deref(), Some(Path::new("/tmp/p")));
        let a = up(parse_with(FILE, &["up", "--policy", "/tmp/q", "--config", "CONFIG"]).unwrap());
        assert_eq!(a.policy.as_deref(), Some(Path::new("/tmp/q")));
        let cli = parse_with(FILE, &["--log-format", "text", "up", "--config", "CONFIG"]).unwrap();
        assert_eq!(cli.log.log_format, l7mesh_log::LogFormat::Text, "a global flag before `up` wins too");
        // A false in the file does not unset a flag given on the command line.
        let a = up(parse_with("fail-open: false\n", &["up", "--fail-open", "--config", "CONFIG"]).unwrap());
        assert!(a.fail_open);
    }

    #[test]
    fn unknown_keys_and_wrong_values_are_refused_with_the_key() {
        let e = refused("polcy: /x\n");
        assert!(e.contains("unknown key `polcy`") && e.contains("did you mean `policy`"), "{e}");
        let e = refused("help: true\n");
        assert!(e.contains("unknown key `help`"), "{e}");
        let e = refused("config: /other.yaml\n");
        assert!(e.contains("unknown key `config`"), "no nested config files: {e}");
        let e = refused("fail-open: yes please\n");
        assert!(e.contains("`fail-open`") && e.contains("true or false"), "{e}");
        let e = refused("policy: [a, b]\n");
        assert!(e.contains("`policy`") && e.contains("one value"), "{e}");
        let e = refused("- policy\n");
        assert!(e.contains("expected a map"), "{e}");
        let e = refused("policy: [\n");
        assert!(e.contains("not YAML"), "{e}");
    }

    #[test]
    fn an_empty_file_sets_nothing() {
        let a = up(parse_with("", &["up", "--config", "CONFIG"]).unwrap());
        assert!(a.policy.is_none() && !a.fail_open);
    }
}

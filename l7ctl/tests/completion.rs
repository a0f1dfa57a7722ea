//! The shell completion script and the man pages l7ctl generates from its own commands: the
//! bash script parses and completes a subcommand in a real bash; every page is written.

use std::process::Command;

fn l7ctl(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_l7ctl")).args(args).output().expect("running l7ctl")
}

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("l7ctl-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// What bash completes for the words `line` (the last one being completed), with the script
/// l7ctl wrote loaded as a user's shell loads it.
fn bash_completes(script: &std::path::Path, words: &[&str]) -> Vec<String> {
    let words_text: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
    let program = format!(
        "source '{}'\nCOMP_WORDS=({})\nCOMP_CWORD={}\nCOMP_LINE='{}'\nCOMP_POINT=${{#COMP_LINE}}\n_l7ctl l7ctl '{}' '{}'\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"\n",
        script.display(),
        words_text.join(" "),
        words.len() - 1,
        words.join(" "),
        words[words.len() - 1],
        words[words.len() - 2],
    );
    let o = Command::new("bash").args(["--norc", "-c", &program]).output().expect("running bash");
    assert!(o.status.success(), "bash: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).lines().map(str::to_string).collect()
}

#[test]
fn the_bash_completion_parses_and_completes_subcommands_and_their_values() {
    let dir = temp_dir("completion");
    let o = l7ctl(&["completion", "bash"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let script = dir.join("l7ctl.bash");
    std::fs::write(&script, &o.stdout).unwrap();
    let check = Command::new("bash").arg("-n").arg(&script).output().unwrap();
    assert!(check.status.success(), "bash -n: {}", String::from_utf8_lossy(&check.stderr));

    assert_eq!(bash_completes(&script, &["l7ctl", "hist"]), ["history"]);
    let r = bash_completes(&script, &["l7ctl", "ro"]);
    assert_eq!(r, ["rollback"], "{r:?}");
    let all = bash_completes(&script, &["l7ctl", ""]);
    for cmd in ["status", "history", "rollback", "apply", "get", "delete", "simulate", "completion", "man"] {
        assert!(all.iter().any(|c| c == cmd), "`{cmd}` is not offered: {all:?}");
    }
    assert!(!all.iter().any(|c| c.starts_with("__")), "hidden commands are not offered: {all:?}");
    let nouns = bash_completes(&script, &["l7ctl", "get", "wo"]);
    assert!(nouns.iter().any(|n| n == "workloads"), "{nouns:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn zsh_and_fish_scripts_name_every_command() {
    for shell in ["zsh", "fish", "ZSH"] {
        let o = l7ctl(&["completion", shell]);
        assert!(o.status.success(), "{shell}: {}", String::from_utf8_lossy(&o.stderr));
        let text = String::from_utf8_lossy(&o.stdout);
        for cmd in ["rollback", "history", "status"] {
            assert!(text.contains(cmd), "the {shell} script does not name `{cmd}`");
        }
    }
    let o = l7ctl(&["completion", "powershell"]);
    assert!(!o.status.success(), "an unknown shell is refused");
}

#[test]
fn man_pages_are_written_for_every_command() {
    let dir = temp_dir("man");
    let o = l7ctl(&["man", "--dir", dir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for page in ["l7ctl.1", "l7ctl-status.1", "l7ctl-history.1", "l7ctl-rollback.1", "l7ctl-apply.1", "l7ctl-get.1"] {
        let text = std::fs::read_to_string(dir.join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(text.starts_with(".ie") || text.contains(".TH"), "{page} is not a man page");
    }
    let rollback = std::fs::read_to_string(dir.join("l7ctl-rollback.1")).unwrap();
    assert!(rollback.contains("l7ctl rollback 12"), "the page carries the command's examples");
    assert!(!dir.join("l7ctl-__sandbox.1").exists(), "no page for hidden commands");
    std::fs::remove_dir_all(&dir).unwrap();
}

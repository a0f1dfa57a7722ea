//! The release tarball (`make package`, scripts/package.sh) as an operator uses it: unpacked,
//! installed with its install.sh (into a directory of the test's), its systemd unit checked by
//! `systemd-analyze verify`, and a node started from the installed binaries with the installed
//! settings file, enforcing a policy from the installed policy directory.

use std::path::Path;
use std::process::Command;

use integration::*;

fn sh(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        o.status.success(),
        "{cmd:?}: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn the_tarball_installs_verifies_and_runs_a_node() {
    require_root();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let bin_dir = workspace_bin("l7ctl").unwrap().parent().unwrap().to_path_buf();
    let work = std::env::temp_dir().join(format!("l7mesh-package-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let tarball = sh(Command::new("bash")
        .arg(repo.join("scripts/package.sh"))
        .args(["--profile", "debug", "--bin-dir"])
        .arg(&bin_dir)
        .arg("--out")
        .arg(work.join("dist")));
    let tarball = tarball.trim();
    let listing = sh(Command::new("tar").args(["tzf", tarball]));
    for entry in [
        "bin/l7ctl",
        "bin/l7proxy",
        "bin/policy-api",
        "bin/tls-broker",
        "lib/l7mesh/redirector.bpf.o",
        "lib/systemd/system/l7mesh.service",
        "etc/l7mesh/config.yaml",
        "install.sh",
        "share/bash-completion/completions/l7ctl",
        "share/zsh/site-functions/_l7ctl",
        "share/fish/vendor_completions.d/l7ctl.fish",
        "share/man/man1/l7ctl.1",
        "share/man/man1/l7ctl-up.1",
    ] {
        assert!(listing.lines().any(|l| l.ends_with(entry)), "{entry} is not in the tarball:\n{listing}");
    }
    sh(Command::new("tar").args(["xzf", tarball, "-C"]).arg(&work));
    let unpacked = std::fs::read_dir(&work)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("l7mesh-"))
        .expect("the unpacked directory");
    assert_eq!(
        std::fs::read(unpacked.join("lib/l7mesh/redirector.bpf.o")).unwrap(),
        std::fs::read(repo.join("redirector-bpf/redirector/bpf/redirector.bpf.o")).unwrap(),
        "the packed eBPF object is the committed one"
    );

    let (prefix, units, etc) = (work.join("prefix"), work.join("units"), work.join("etc"));
    sh(Command::new(unpacked.join("install.sh")).env("PREFIX", &prefix).env("UNIT_DIR", &units).env("ETC_DIR", &etc));
    assert!(prefix.join("share/man/man1/l7ctl-status.1").is_file(), "install.sh puts the man pages under PREFIX");
    sh(Command::new("bash").arg("-n").arg(prefix.join("share/bash-completion/completions/l7ctl")));
    let unit = units.join("l7mesh.service");
    let unit_text = std::fs::read_to_string(&unit).unwrap();
    assert!(
        unit_text.contains(&format!(
            "ExecStart={}/bin/l7ctl up --config {}/config.yaml",
            prefix.display(),
            etc.display()
        )),
        "{unit_text}"
    );
    sh(Command::new("systemd-analyze").arg("verify").arg(&unit));
    // verify does look: a unit whose binary is missing fails it.
    let broken = work.join("broken.service");
    std::fs::write(&broken, unit_text.replace(&format!("{}/bin/l7ctl", prefix.display()), "/nonexistent/l7ctl"))
        .unwrap();
    let o = Command::new("systemd-analyze").arg("verify").arg(&broken).output().unwrap();
    assert!(!o.status.success(), "systemd-analyze verify passed a unit with a missing binary");

    // A re-install keeps the operator's edited settings.
    let config = etc.join("config.yaml");
    let edited = std::fs::read_to_string(&config).unwrap().replace("log-format: text", "log-format: json");
    std::fs::write(&config, &edited).unwrap();
    sh(Command::new(unpacked.join("install.sh")).env("PREFIX", &prefix).env("UNIT_DIR", &units).env("ETC_DIR", &etc));
    assert_eq!(std::fs::read_to_string(&config).unwrap(), edited);

    // The node from the installed binaries and settings (the test's own dirs on the command
    // line win over the file's defaults); the policy comes from the installed policy dir.
    std::fs::write(
        etc.join("policies/client.yaml"),
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: client-egress\nspec:\n  endpointSelector:\n    matchLabels:\n      app: client\n  egress:\n  - toPorts:\n    - ports:\n      - port: \"8080\"\n        protocol: TCP\n",
    )
    .unwrap();
    // (This test binary runs one test: no other thread reads the environment meanwhile.)
    std::env::set_var("L7MESH_L7CTL_BIN", prefix.join("bin/l7ctl"));
    let mut node = TestNode::new("package").unwrap();
    let mut args = vec!["up".to_string(), "--config".into(), config.display().to_string()];
    args.extend(node.node_dir_args());
    node.restart_node_with(args).unwrap();
    let log = node.node_log();
    assert!(log.lines().any(|l| l.starts_with("{\"timestamp\"")), "the settings file's log-format holds:\n{log}");
    let pids = node.node_processes();
    for (name, pid) in &pids {
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
        assert!(
            exe.starts_with(&prefix),
            "{name} runs from {} instead of the installed {}",
            exe.display(),
            prefix.display()
        );
    }
    assert!(pids.len() >= 4, "{pids:?}");
    node.http_server(None, "127.0.0.1", 8080, "allowed\n").unwrap();
    node.http_server(None, "127.0.0.1", 8082, "not listed\n").unwrap();
    let curl = |port: u16| {
        let o = node
            .l7ctl_run(
                "client",
                "app=client",
                &["curl", "-sS", "--max-time", "5", &format!("http://127.0.0.1:{port}/")],
            )
            .unwrap();
        (o.status.code(), out(&o))
    };
    assert_eq!(curl(8080), (Some(0), "allowed".to_string()), "{}", node.node_log());
    assert_ne!(curl(8082).0, Some(0), "the installed policy denies 8082");
    node.stop_node().unwrap();
    let _ = std::fs::remove_dir_all(&work);
}

//! The TLS broker: the CA and secrets stay with it; only the proxy's identity gets keys.

use std::path::Path;
use std::process::Command;

use integration::*;

/// The broker process, killed when the test ends (even by a panic).
struct Broker(std::process::Child);

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn cmd_out(c: &mut Command) -> String {
    let o = c.output().unwrap();
    String::from_utf8_lossy(&o.stdout).trim().to_string() + String::from_utf8_lossy(&o.stderr).trim()
}

#[test]
fn only_the_proxy_identity_gets_keys_and_the_ca_survives_restarts() {
    require_root();
    let node = TestNode::new("broker").unwrap();
    let dir = node.log_dir.clone();
    let state = dir.join("broker-state");
    let run = dir.join("broker-run");
    let proxy_cg = node.cgroup_root.join("proxy");
    std::fs::create_dir_all(&proxy_cg).unwrap();
    let cg_rel = format!("/{}", proxy_cg.strip_prefix(CGROUP2).unwrap().display());
    // This test's stand-in for l7proxy is the Python client: the broker serves that executable.
    let python = std::fs::canonicalize("/usr/bin/python3").unwrap();
    let start = || {
        let child = Command::new(workspace_bin("tls-broker").unwrap())
            .args([
                "--state-dir",
                state.to_str().unwrap(),
                "--run-dir",
                run.to_str().unwrap(),
                "--proxy-cgroup",
                &cg_rel,
                "--proxy-exe",
                python.to_str().unwrap(),
            ])
            .stderr(std::fs::File::create(dir.join("broker.log")).unwrap())
            .spawn()
            .unwrap();
        for _ in 0..100 {
            if std::fs::read_to_string(dir.join("broker.log")).unwrap_or_default().contains("ready") {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Broker(child)
    };
    let broker = start();
    let client = dir.join("broker_client.py");
    std::fs::copy(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/broker_client.py"), &client).unwrap();
    let admin = run.join("broker-admin.sock");
    let proxy = run.join("broker-proxy.sock");
    // `as_` runs the client as a user, in a cgroup.
    let ask_with = |exe: &Path, sock: &Path, json: &str, user: &str, cgroup: &Path| {
        let script = format!(
            "echo $$ > {}/cgroup.procs && exec setpriv --reuid={user} --regid={user} --clear-groups {} {} {} '{json}'",
            cgroup.display(),
            exe.display(),
            client.display(),
            sock.display()
        );
        cmd_out(Command::new("sh").arg("-c").arg(script))
    };
    let ask = |sock: &Path, json: &str, user: &str, cgroup: &Path| ask_with(&python, sock, json, user, cgroup);
    let host_cg = node.cgroup_root.join("host");
    std::fs::create_dir_all(&host_cg).unwrap();

    // Admin: root gets the CA certificate; nobody cannot even connect; keys are never served.
    let ca: serde_json::Value = serde_json::from_str(&ask(&admin, r#"{"op":"ca"}"#, "0", &host_cg)).unwrap();
    let ca_pem = ca["ca"].as_str().unwrap().to_string();
    assert!(ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));
    assert_eq!(ask(&admin, r#"{"op":"ca"}"#, "65534", &host_cg), "PermissionError");
    let keyed = ask(&admin, r#"{"op":"issue_server","names":["x"]}"#, "0", &host_cg);
    assert!(keyed.contains("not served on the admin socket"), "{keyed}");
    let import = ask(
        &admin,
        r#"{"op":"import","namespace":"default","name":"web","cert":"C","key":"K","ca":null}"#,
        "0",
        &host_cg,
    );
    assert!(import.contains(r#""ok":true"#), "{import}");

    // Proxy socket: the proxy's uid in the proxy's cgroup only.
    let issue = r#"{"op":"issue_server","names":["deathstar.default","10.0.0.1"]}"#;
    let refused_cgroup = ask(&proxy, issue, "0", &host_cg);
    assert!(refused_cgroup.contains("refused") && refused_cgroup.contains("not the proxy's"), "{refused_cgroup}");
    let refused_uid = ask(&proxy, issue, "65534", &proxy_cg);
    assert!(refused_uid.contains("refused: uid 65534"), "{refused_uid}");
    // Root in the proxy's cgroup running another executable (the same program under another
    // path) is refused too.
    let other = dir.join("python-copy");
    std::fs::copy(&python, &other).unwrap();
    let refused_exe = ask_with(&other, &proxy, issue, "0", &proxy_cg);
    assert!(refused_exe.contains("not the proxy's executable"), "{refused_exe}");
    let leaf: serde_json::Value = serde_json::from_str(&ask(&proxy, issue, "0", &proxy_cg)).unwrap();
    assert_eq!(leaf["ok"], true, "{leaf}");
    let secret = ask(&proxy, r#"{"op":"secret","namespace":"default","name":"web"}"#, "0", &proxy_cg);
    assert!(secret.contains(r#""key":"K""#), "{secret}");

    // The files: only root reads them.
    assert!(cmd_out(
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
            .arg(state.join("ca.key"))
    )
    .contains("Permission denied"));

    // Leaves chain to the CA, before and after a restart (the CA is kept).
    let verify = |cert: &str, name: &str| {
        std::fs::write(dir.join("ca.crt"), &ca_pem).unwrap();
        std::fs::write(dir.join(name), cert).unwrap();
        cmd_out(Command::new("openssl").args(["verify", "-CAfile"]).arg(dir.join("ca.crt")).arg(dir.join(name)))
    };
    assert!(verify(leaf["cert"].as_str().unwrap(), "leaf1.crt").ends_with("OK"));
    drop(broker);
    let _broker = start();
    let again: serde_json::Value = serde_json::from_str(&ask(&proxy, issue, "0", &proxy_cg)).unwrap();
    let ca_after: serde_json::Value = serde_json::from_str(&ask(&admin, r#"{"op":"ca"}"#, "0", &host_cg)).unwrap();
    assert_eq!(ca_after["ca"].as_str().unwrap(), ca_pem, "the CA survives a restart");
    assert!(verify(again["cert"].as_str().unwrap(), "leaf2.crt").ends_with("OK"));
    let text = cmd_out(Command::new("openssl").args(["x509", "-noout", "-text", "-in"]).arg(dir.join("leaf2.crt")));
    assert!(text.contains("DNS:deathstar.default") && text.contains("IP Address:10.0.0.1"), "{text}");
}

//! A workload, even one run as root, stays in its cgroup, never reaches the node's state,
//! sockets or processes, and gets no key; its connections are policed afterwards as before.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use integration::*;

const PY: &str = "/usr/bin/python3";

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).trim().to_string()
}

const POLICY: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: attacker-egress
spec:
  endpointSelector:
    matchLabels:
      app: attacker
  egress:
  - toPorts:
    - ports:
      - port: "8080"
        protocol: TCP
      rules:
        http:
        - method: GET
  - toPorts:
    - ports:
      - port: "8447"
        protocol: TCP
      terminatingTLS: {}
      rules:
        http:
        - method: GET
"#;

/// `l7ctl run --user USER [extra] --name NAME --labels app=attacker -- CMD`.
fn run_as(node: &TestNode, user: &str, extra: &[&str], name: &str, cmd: &[&str]) -> Output {
    let run_dir = node.run_dir().display().to_string();
    let log_dir = node.log_dir.display().to_string();
    let mut args = vec!["run", "--run-dir", &run_dir, "--user", user, "--share", &log_dir];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--name", name, "--labels", "app=attacker", "--"]);
    args.extend_from_slice(cmd);
    node.l7ctl(&args).unwrap()
}

fn copy_broker_client(node: &TestNode) -> String {
    let client = node.log_dir.join("broker_client.py");
    std::fs::copy(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/broker_client.py"), &client).unwrap();
    client.display().to_string()
}

/// The pid of this node's `bin` (its command line names one of the node's directories).
fn pid_by(node: &TestNode, bin: &str) -> Option<i32> {
    let marks = [node.log_dir.display().to_string(), node.pin_dir.display().to_string()];
    std::fs::read_dir("/proc").ok()?.filter_map(|e| e.ok()).find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        let args: Vec<String> = cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        let exe = Path::new(args.first()?).file_name()?.to_str()?.to_string();
        (exe == bin && args.iter().any(|a| marks.iter().any(|m| a.starts_with(m.as_str())))).then_some(pid)
    })
}

fn procs(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default()
}

/// Every way out a uid-0 process without capabilities has, each as one shell command that
/// succeeds only if the escape worked.
fn escapes(node: &TestNode, me: &str, client: &str, pids: &[(&str, i32)]) -> Vec<(String, String)> {
    let cg2 = CGROUP2;
    let root = node.cgroup_root.display().to_string();
    let own = format!("{root}/workloads/{me}");
    let sibling = format!("{root}/workloads/sibling");
    let state = node.state_dir().display().to_string();
    let run = node.run_dir().display().to_string();
    let pins = node.pin_dir.display().to_string();
    let policy = node.log_dir.join("policies/attacker.yaml").display().to_string();
    let l7proxy = workspace_bin("l7proxy").unwrap().display().to_string();
    let mut v: Vec<(String, String)> = Vec::new();
    let mut add = |name: &str, cmd: String| v.push((name.to_string(), cmd));
    for (what, dir) in
        [("proxy", format!("{root}/proxy")), ("node", root.clone()), ("root", cg2.to_string()), ("sibling", sibling)]
    {
        for file in ["cgroup.procs", "cgroup.threads"] {
            add(&format!("join the {what} cgroup via {file}"), format!("echo $$ > {dir}/{file}"));
        }
    }
    add("make a sub-cgroup of its own", format!("mkdir {own}/escape && echo $$ > {own}/escape/cgroup.procs"));
    add("remount cgroupfs read-write", format!("mount -o remount,rw {cg2}"));
    add(
        "mount cgroup2 a second time and join the proxy there",
        format!(
            "d=$(mktemp -d) && mount -t cgroup2 none $d && echo $$ > $d/{}/proxy/cgroup.procs",
            root.trim_start_matches(&format!("{cg2}/"))
        ),
    );
    add(
        "mount cgroup2 in a user namespace and make a sub-cgroup",
        "d=$(mktemp -d) && unshare -U -r -C -m sh -c \"mount -t cgroup2 none $d && mkdir $d/x && echo \\$\\$ > $d/x/cgroup.procs\""
            .to_string(),
    );
    add("create a user namespace (unshare)", "unshare -U -r true".into());
    // clone(CLONE_NEWUSER | SIGCHLD), syscall 56 on x86_64: the path fork-like callers take.
    add("create a user namespace (clone)", "perl -e 'exit(syscall(56, 0x10000011, 0, 0, 0, 0) >= 0 ? 0 : 1)'".into());
    // keyctl(KEYCTL_GET_KEYRING_ID, KEY_SPEC_USER_KEYRING, 0), syscall 250 on x86_64.
    add(
        "open root's user keyring",
        format!("{PY} -c 'import ctypes, sys; sys.exit(0 if ctypes.CDLL(None).syscall(250, 0, -4, 0) > 0 else 1)'"),
    );
    add("read the mesh CA key", format!("cat {state}/broker/ca.key"));
    add("list the state dir", format!("ls {state} | grep -q ."));
    add("read the API token", format!("cat {run}/api-token"));
    add("list the default state dir", "ls /var/lib/l7mesh | grep -q .".into());
    add(
        "get a key from the broker's proxy socket",
        format!(
            "{PY} {client} {run}/broker-proxy.sock '{{\"op\":\"issue_server\",\"names\":[\"x\"]}}' | grep -q PRIVATE"
        ),
    );
    add(
        "use the broker's admin socket",
        format!("{PY} {client} {run}/broker-admin.sock '{{\"op\":\"ca\"}}' | grep -q '\"ok\":true'"),
    );
    add(
        "register on the node's control socket",
        format!("{PY} {client} {run}/node.sock '{{\"op\":\"status\"}}' | grep -q '\"ok\":true'"),
    );
    // Hubble's API (every flow): an HTTP/2 server there answers the client preface with SETTINGS.
    add(
        "reach Hubble's API socket",
        format!(
            "{PY} -c \"import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); \
             s.sendall(b'PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n' + bytes([0,0,0,4,0,0,0,0,0])); \
             f=s.recv(9); assert len(f) == 9 and f[3] == 4\" {run}/hubble.sock"
        ),
    );
    add("list the datapath's pins", format!("ls {pins} | grep -q ."));
    add("list BPF maps", "bpftool map show | grep -q .".into());
    for (what, pid) in pids {
        add(&format!("kill {what}"), format!("kill -9 {pid}"));
        add(&format!("find {what}"), format!("pgrep -x {what}"));
    }
    add(
        "read a disk",
        "for b in $(ls /sys/class/block); do head -c 1 /dev/$b > /dev/null && exit 0; done; exit 1".into(),
    );
    add("rewrite the policy file", format!("echo '# x' >> {policy}"));
    add("write a sysctl (core_pattern)", "echo '|/bin/true' > /proc/sys/kernel/core_pattern".into());
    add("replace the l7proxy binary", format!("touch {l7proxy}"));
    add("write /etc/ld.so.preload", "touch /etc/ld.so.preload".into());
    let id = std::process::id();
    let connect = format!("{PY} -c \"import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1].replace('@', chr(0), 1)); assert s.recv(5) == b'hello'\"");
    add("connect to an abstract socket of the node", format!("{connect} @l7mesh-iso-{id}"));
    add("connect to a root socket in /tmp (a root tmux server's, say)", format!("{connect} /tmp/l7mesh-iso-{id}.sock"));
    add("connect to a daemon's socket in /run", format!("{connect} /run/l7mesh-iso-{id}.sock"));
    add("read a root file in /tmp", format!("cat /tmp/l7mesh-iso-{id}.secret | grep -q secret"));
    add(
        "set SO_MARK (the proxy's mark)",
        format!("{PY} -c 'import socket; socket.socket().setsockopt(socket.SOL_SOCKET, 36, 0x4c37)'"),
    );
    v
}

#[test]
fn a_root_workload_stays_in_its_cgroup_gets_no_key_and_is_still_policed() {
    let mut node = TestNode::new("iso").unwrap();
    let policy = node.policy_file("attacker.yaml", POLICY).unwrap();
    node.start_node(&policy, &[]).unwrap();
    node.http_server(None, "127.0.0.1", 8080, "allowed\n").unwrap();
    node.http_server(None, "127.0.0.1", 8082, "denied\n").unwrap();
    node.spawn_l7ctl_run("sibling", "app=sibling", &["sleep", "120"], "sibling.log").unwrap();
    let client = copy_broker_client(&node);
    let probe = node.probe_path().display().to_string();
    let proxy_pid = node.pid_of("l7proxy").expect("l7proxy runs");
    let pids = [
        ("l7proxy", proxy_pid),
        ("tls-broker", pid_by(&node, "tls-broker").expect("the broker runs")),
        ("policy-api", pid_by(&node, "policy-api").expect("policy-api runs")),
    ];
    let (proxy_cg, node_cg, sibling_cg) =
        (node.cgroup_root.join("proxy"), node.cgroup_root.clone(), node.cgroup_root.join("workloads/sibling"));
    // The node's own listeners a workload must not reach: an abstract socket in the node's
    // network namespace, root sockets in /tmp and /run, a root file in /tmp.
    let id = std::process::id();
    let (tmp_sock, run_sock, secret) = (
        format!("/tmp/l7mesh-iso-{id}.sock"),
        format!("/run/l7mesh-iso-{id}.sock"),
        format!("/tmp/l7mesh-iso-{id}.secret"),
    );
    std::fs::write(&secret, "secret\n").unwrap();
    let listen = "import os, socket, sys, threading\n\
        def serve(addr):\n    s = socket.socket(socket.AF_UNIX)\n    s.bind(addr)\n    s.listen(16)\n    \
        while True:\n        c, _ = s.accept(); c.sendall(b'hello'); c.close()\n\
        for a in sys.argv[1:]:\n    threading.Thread(target=serve, args=(a.replace('@', chr(0), 1),), daemon=True).start()\n\
        print('listening', flush=True)\nthreading.Event().wait()\n";
    let abstract_name = format!("@l7mesh-iso-{id}");
    node.spawn(None, &[PY, "-c", listen, &abstract_name, &tmp_sock, &run_sock], "listeners.log").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !node.log("listeners.log").contains("listening") {
        assert!(Instant::now() < deadline, "listeners: {}", node.log("listeners.log"));
        std::thread::sleep(Duration::from_millis(20));
    }

    // The attempts are real: run by the node's own root (outside any sandbox), these succeed.
    let attempts = escapes(&node, "control", &client, &pids);
    for name in [
        "join the node cgroup via cgroup.procs",
        "read the mesh CA key",
        "list the state dir",
        "read the API token",
        "use the broker's admin socket",
        "register on the node's control socket",
        "reach Hubble's API socket",
        "list the datapath's pins",
        "list BPF maps",
        "find l7proxy",
        "find tls-broker",
        "find policy-api",
        "open root's user keyring",
        "connect to an abstract socket of the node",
        "connect to a root socket in /tmp (a root tmux server's, say)",
        "connect to a daemon's socket in /run",
        "read a root file in /tmp",
    ] {
        let (_, cmd) = attempts.iter().find(|(n, _)| n == name).unwrap();
        let o = node.run(None, &["sh", "-c", cmd]).unwrap();
        assert!(o.status.success(), "as the node's root, `{name}` should work: {}", err(&o));
    }
    // The sibling's sandbox, its init and `sleep`.
    let deadline = Instant::now() + Duration::from_secs(10);
    while procs(&sibling_cg).lines().count() < 3 {
        assert!(Instant::now() < deadline, "sibling: {}", procs(&sibling_cg));
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = (procs(&proxy_cg), procs(&node_cg), procs(&sibling_cg));
    let policy_before = std::fs::read_to_string(&policy).unwrap();

    for user in ["root", "nobody"] {
        let me = format!("attacker-{user}");
        let attempts = escapes(&node, &me, &client, &pids);
        let mut script = String::new();
        for (i, (_, cmd)) in attempts.iter().enumerate() {
            script.push_str(&format!(
                "if ( {cmd} ) > /dev/null 2>&1; then echo 'ESCAPED: {i}'; else echo 'blocked: {i}'; fi\n"
            ));
        }
        // Still policed afterwards: a denied connect is EPERM; the allowed port goes through
        // the proxy, which judges each request.
        script.push_str(&format!("echo \"denied connect: $({PY} {probe} tcp-connect 127.0.0.1 8082)\"\n"));
        script.push_str("echo \"GET: $(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8080/)\"\n");
        script.push_str("echo \"POST: $(curl -s -o /dev/null -w '%{http_code}' -X POST http://127.0.0.1:8080/)\"\n");
        script.push_str("echo \"uid: $(id -u)\"\nexit 7\n");
        let o = run_as(&node, user, &[], &me, &["sh", "-c", &script]);
        let text = out(&o);
        assert_eq!(o.status.code(), Some(7), "l7ctl run exits with CMD's status: {text}\n{}", err(&o));
        let escaped: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("ESCAPED: "))
            .filter_map(|i| attempts.get(i.parse::<usize>().ok()?).map(|(name, _)| name.as_str()))
            .collect();
        assert!(escaped.is_empty(), "as {user}: {escaped:#?}\n{text}");
        assert_eq!(text.lines().filter(|l| l.starts_with("blocked: ")).count(), attempts.len(), "{text}");
        assert!(text.contains("denied connect: EPERM"), "as {user}: {text}");
        assert!(text.contains("GET: 200") && text.contains("POST: 403"), "as {user}: {text}");
        let uid = if user == "root" { "0" } else { "65534" };
        assert!(text.contains(&format!("uid: {uid}")), "{text}");
    }
    // On a terminal: TIOCSTI on it would type into the shell that ran `l7ctl run`. Under
    // `script` (a real pty), the node's root can; a root workload cannot.
    let tiocsti =
        format!("{PY} -c 'import fcntl, termios; fcntl.ioctl(0, termios.TIOCSTI, b\" \"); print(\"ESCAPED\")'");
    let on_tty = |cmd: &str| {
        let o = Command::new("script")
            .args(["-qec", cmd, "/dev/null"])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        out(&o) + &err(&o)
    };
    assert!(on_tty(&tiocsti).contains("ESCAPED"), "the control TIOCSTI should work");
    let l7ctl = workspace_bin("l7ctl").unwrap();
    let in_workload = on_tty(&format!(
        "nsenter --net={} -- {} run --run-dir {} --user root --share {} --name tty --labels app=attacker -- {tiocsti}",
        node.netns_path(),
        l7ctl.display(),
        node.run_dir().display(),
        node.log_dir.display()
    ));
    assert!(in_workload.contains("PermissionError") && !in_workload.contains("ESCAPED"), "{in_workload}");

    // Nothing joined another cgroup, nothing was killed, nothing was rewritten.
    assert_eq!((procs(&proxy_cg), procs(&node_cg), procs(&sibling_cg)), before);
    assert_eq!(node.pid_of("l7proxy"), Some(proxy_pid), "l7proxy was not killed");
    assert_eq!(std::fs::read_to_string(&policy).unwrap(), policy_before);
    assert!(!node.node_log().contains("exited; restarting"), "{}", node.node_log());
    for f in [&tmp_sock, &run_sock, &secret] {
        let _ = std::fs::remove_file(f);
    }
}

#[test]
fn dangerous_caps_are_refused_workload_processes_end_with_cmd_and_only_the_real_proxy_gets_keys() {
    let mut node = TestNode::new("iso-broker").unwrap();
    let policy = node.policy_file("attacker.yaml", POLICY).unwrap();
    node.start_node(&policy, &[]).unwrap();
    let marker = node.log_dir.join("cmd-ran");
    let touch = ["touch", marker.to_str().unwrap()];
    for cap in ["sys_admin", "CAP_NET_ADMIN", "sys_ptrace", "bpf", "mknod", "net_raw", "all"] {
        let o = run_as(&node, "root", &["--cap", cap], "capped", &touch);
        assert_eq!(o.status.code(), Some(1), "{cap}: {}", out(&o));
        assert!(err(&o).contains("is refused"), "{cap}: {}", err(&o));
        assert!(!marker.exists(), "CMD must not start with --cap {cap}");
    }

    // A process CMD leaves behind ends with it: the workload's cgroup is left empty and the
    // workload is deregistered.
    let o = run_as(&node, "root", &[], "leaver", &["sh", "-c", "sleep 300 & echo started"]);
    assert_eq!(out(&o), "started", "{}", err(&o));
    let leaver = node.cgroup_root.join("workloads/leaver");
    let deadline = Instant::now() + Duration::from_secs(10);
    while leaver.exists() && !procs(&leaver).trim().is_empty() {
        assert!(Instant::now() < deadline, "left behind: {}", procs(&leaver));
        std::thread::sleep(Duration::from_millis(50));
    }
    let workloads = node.l7ctl(&["get", "workloads", "-o", "json"]).unwrap();
    assert!(!out(&workloads).contains("leaver"), "{}", out(&workloads));

    // SIGTERM to `l7ctl run` reaches CMD (through the sandbox and the namespace's init), and
    // `l7ctl run` exits with CMD's status.
    let trap = "import signal, sys, time\n\
        signal.signal(signal.SIGTERM, lambda *_: (print('got TERM', flush=True), sys.exit(5)))\n\
        print('ready', flush=True)\ntime.sleep(60)\n";
    let mut termed = node
        .l7ctl_run_command("termed", "app=attacker", &[PY, "-c", trap])
        .unwrap()
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(termed.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(termed.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    line.clear();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert_eq!(line.trim(), "got TERM");
    assert_eq!(termed.wait().unwrap().code(), Some(5));

    // Nor does it outlive a killed `l7ctl run` (it would run unregistered).
    let mut doomed = node.l7ctl_run_command("doomed", "app=attacker", &["sleep", "300"]).unwrap().spawn().unwrap();
    let doomed_cg = node.cgroup_root.join("workloads/doomed");
    let deadline = Instant::now() + Duration::from_secs(10);
    while procs(&doomed_cg).lines().count() < 3 {
        assert!(Instant::now() < deadline, "doomed did not start: {}", procs(&doomed_cg));
        std::thread::sleep(Duration::from_millis(20));
    }
    doomed.kill().unwrap();
    doomed.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !procs(&doomed_cg).trim().is_empty() {
        assert!(Instant::now() < deadline, "left running after l7ctl run was killed: {}", procs(&doomed_cg));
        std::thread::sleep(Duration::from_millis(50));
    }

    // The broker itself, asked by root processes outside any sandbox: in a workload's cgroup,
    // or in the proxy's cgroup running anything but l7proxy, each is refused.
    let client = copy_broker_client(&node);
    let sock = node.run_dir().join("broker-proxy.sock").display().to_string();
    let ask = r#"{"op":"issue_server","names":["x"]}"#;
    let as_root_in = |cgroup: &Path| {
        std::fs::create_dir_all(cgroup).unwrap();
        let o = Command::new("sh")
            .arg("-c")
            .arg(format!("echo $$ > {}/cgroup.procs && exec {PY} {client} {sock} '{ask}'", cgroup.display()))
            .output()
            .unwrap();
        out(&o) + &err(&o)
    };
    let in_workload = as_root_in(&node.cgroup_root.join("workloads/attacker-host"));
    assert!(in_workload.contains("refused") && in_workload.contains("not the proxy's"), "{in_workload}");
    assert!(!in_workload.contains("PRIVATE"), "{in_workload}");
    let in_proxy = as_root_in(&node.cgroup_root.join("proxy"));
    assert!(in_proxy.contains("not the proxy's executable"), "{in_proxy}");
    assert!(!in_proxy.contains("PRIVATE"));

    // The real l7proxy is served (TLS termination with a minted certificate), and so is the
    // l7proxy that `l7ctl up` starts after it dies.
    node.http_server(None, "127.0.0.1", 8447, "behind terminatingTLS").unwrap();
    let run_dir = node.run_dir().display().to_string();
    let ca = node.l7ctl(&["ca", "--run-dir", &run_dir]).unwrap();
    let ca_file = node.log_dir.join("mesh-ca.pem");
    std::fs::write(&ca_file, out(&ca)).unwrap();
    let ca_s = ca_file.display().to_string();
    let terminated = || {
        let curl = [
            "curl",
            "-sS",
            "--max-time",
            "10",
            "--cacert",
            &ca_s,
            "--resolve",
            "web.mesh.local:8447:127.0.0.1",
            "https://web.mesh.local:8447/",
        ];
        let o = run_as(&node, "root", &[], "tls-client", &curl);
        (out(&o), err(&o))
    };
    let (body, why) = terminated();
    assert_eq!(body, "behind terminatingTLS", "{why}");
    let old = node.pid_of("l7proxy").unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(old), nix::sys::signal::Signal::SIGKILL).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = node.pid_of("l7proxy");
        if now.is_some() && now != Some(old) && node.admin("/readyz").map(|r| r.starts_with("ready")).unwrap_or(false) {
            break;
        }
        assert!(Instant::now() < deadline, "l7proxy was not restarted:\n{}", node.node_log());
        std::thread::sleep(Duration::from_millis(100));
    }
    // A new name: the restarted proxy has no cached certificate for it and must ask the broker.
    let fresh = {
        let curl = [
            "curl",
            "-sS",
            "--max-time",
            "10",
            "--cacert",
            &ca_s,
            "--resolve",
            "fresh.mesh.local:8447:127.0.0.1",
            "https://fresh.mesh.local:8447/",
        ];
        let o = run_as(&node, "root", &[], "tls-client", &curl);
        (out(&o), err(&o))
    };
    assert_eq!(fresh.0, "behind terminatingTLS", "{}\n{}", fresh.1, node.node_log());
}

/// A workload started from a directory its view hides (under the host's /tmp, the node's state
/// dir) starts in `/`: its old working directory would still point below the mounts that cover
/// it, and `..` from there would walk the host's tree.
#[test]
fn a_workload_started_from_a_hidden_directory_cannot_walk_out_of_it() {
    let mut node = TestNode::new("iso-cwd").unwrap();
    let policy = node.policy_file("attacker.yaml", POLICY).unwrap();
    node.start_node(&policy, &[]).unwrap();
    let host_tmp = std::path::PathBuf::from(format!("/tmp/l7mesh-cwd-{}", std::process::id()));
    std::fs::create_dir_all(host_tmp.join("inner")).unwrap();
    std::fs::write(host_tmp.join("host-tmp-marker"), "x").unwrap();
    std::fs::write(node.state_dir().join("state-dir-marker"), "x").unwrap();
    let run_dir = node.run_dir().display().to_string();
    for cwd in [host_tmp.join("inner"), node.state_dir()] {
        let o = node
            .l7ctl_command(&[
                "run",
                "--run-dir",
                &run_dir,
                "--user",
                "root",
                "--name",
                "wanderer",
                "--labels",
                "app=attacker",
                "--",
                "sh",
                "-c",
                "pwd; ls -a . .. ../.. 2>&1",
            ])
            .unwrap()
            .current_dir(&cwd)
            .output()
            .unwrap();
        let seen = out(&o);
        assert!(o.status.success(), "{}", err(&o));
        assert_eq!(seen.lines().next(), Some("/"), "from {}: {seen}", cwd.display());
        assert!(!seen.contains("marker"), "from {}: {seen}", cwd.display());
    }
    let _ = std::fs::remove_dir_all(&host_tmp);
}

/// The two routes past a read-only cgroupfs that the mounts alone do not close: `clone3` with
/// CLONE_INTO_CGROUP (it takes a directory fd and checks only file modes; the cgroup namespace
/// bounds migrations only where cgroup2 is mounted with nsdelegate, which this host's is not),
/// refused by seccomp (ENOSYS, also under its x32 number: EPERM), and a `--share` of cgroupfs or
/// of the node's directories, refused before CMD starts.
#[test]
fn clone3_and_shares_of_kernel_or_node_directories_are_refused() {
    let mut node = TestNode::new("iso-clone3").unwrap();
    let policy = node.policy_file("attacker.yaml", POLICY).unwrap();
    node.start_node(&policy, &[]).unwrap();
    let py = "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nfor nr in (435, 0x40000000 | 435, 0x40000000 | 272):\n    r = libc.syscall(nr, 0, 0)\n    print(nr, r, ctypes.get_errno())\n";
    let o = run_as(&node, "root", &[], "cloner", &["/usr/bin/python3", "-c", py]);
    assert_eq!(out(&o), format!("435 -1 38\n{} -1 1\n{} -1 1", 0x40000000 | 435, 0x40000000 | 272), "{}", err(&o));
    // The node's cgroup subtree (on cgroupfs) and its state dir.
    let cgroup = node.workload("cloner").unwrap().parent().unwrap().display().to_string();
    for share in [cgroup, node.state_dir().display().to_string(), "/proc".to_string(), "/".to_string()] {
        let o = run_as(&node, "root", &["--share", &share], "sharer", &["true"]);
        assert_eq!(o.status.code(), Some(1), "--share {share}: {}", out(&o));
        assert!(err(&o).contains("not shareable"), "--share {share}: {}", err(&o));
    }
}

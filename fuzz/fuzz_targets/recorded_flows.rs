//! Recorded traffic that `l7ctl simulate` replays (flow JSON lines): a file a user points the
//! simulator at, replayed against a compiled policy (the Star Wars demo's). Lines that are not
//! flows are skipped; no flow, however odd its URL, topic or labels, may panic the replay.
#![no_main]

use libfuzzer_sys::fuzz_target;
use l7policy::compile::{compile, Compiled, Workload};
use l7policy::labels::Labels;
use std::sync::OnceLock;

fn candidate() -> &'static Compiled {
    static COMPILED: OnceLock<Compiled> = OnceLock::new();
    COMPILED.get_or_init(|| {
        let text = include_str!("../../examples/policies/star-wars.yaml");
        let (policies, diagnostics) = l7policy::validate::load_text("star-wars.yaml", text);
        assert!(diagnostics.is_empty(), "{diagnostics:?}");
        let workload = |name: &str, labels: &str, cgroup_id| Workload {
            name: name.into(),
            labels: Labels::parse(labels).expect("labels"),
            cgroup_id,
        };
        let workloads = [
            workload("deathstar", "org=empire,class=deathstar", 21),
            workload("tiefighter", "org=empire,class=tiefighter", 22),
            workload("xwing", "org=alliance,class=xwing", 23),
        ];
        compile(&policies, &workloads, &[], 1)
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let flows = policy_api::flows::parse_lines(text);
    let _ = policy_api::simulate::simulate(candidate(), &flows);
});

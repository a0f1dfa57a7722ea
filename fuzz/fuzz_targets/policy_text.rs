//! Policy files as users write them (YAML or JSON, one or many documents): read, validated
//! with file:line:field diagnostics, then compiled. Whatever the text, an error is a
//! diagnostic, never a panic, and a policy that validates compiles.
#![no_main]

use libfuzzer_sys::fuzz_target;
use l7policy::compile::{compile, Workload};
use l7policy::labels::Labels;
use l7policy::validate::{load_text, Severity};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (policies, diagnostics) = load_text("fuzz.yaml", text);
    // YAML breaks lines at CRLF, LF and a lone CR alike; editors count lines the same way.
    let lines = text.replace("\r\n", "\n").replace('\r', "\n").lines().count();
    for d in &diagnostics {
        // Every diagnostic points into the file it names.
        if let Some(line) = d.line {
            assert!(line >= 1 && line <= lines.max(1) + 1, "diagnostic past the end: {d:?}");
        }
    }
    if diagnostics.iter().any(|d| d.severity == Severity::Error) {
        return;
    }
    // Two workloads that selectors of the corpus pick, so the compiler walks real rules.
    let workload = |name: &str, labels: &str, cgroup_id| Workload {
        name: name.into(),
        labels: Labels::parse(labels).expect("labels"),
        cgroup_id,
    };
    let workloads = vec![workload("web", "app=web", 11), workload("db", "app=db,tier=backend", 12)];
    let _ = compile(&policies, &workloads, &[], 1);
});

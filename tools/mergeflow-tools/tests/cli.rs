//! The `mergeflow-tools` command has the commands the scripts run (they
//! were hidden commands of `mergeflow` before; `tests/cli.rs` at the root
//! checks that `mergeflow --help` does not show them).

use std::process::Command;

fn help(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_mergeflow-tools"))
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn the_tools_have_the_commands_the_scripts_run() {
    assert!(help(&["bench", "--help"]).contains("--concurrency"));
    assert!(help(&["bench", "--help"]).contains("--fill"));
    let chaos = help(&["chaos", "--help"]);
    for cmd in ["workload", "receive", "check"] {
        assert!(chaos.contains(cmd), "{chaos}");
    }
}

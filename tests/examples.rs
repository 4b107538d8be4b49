//! The examples a new user runs, run here as they are: the cluster, IoT,
//! ETL and MQTT scripts against the binary under test, and the offline-first
//! app.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `cmd`, prints its output, and returns its stdout if it exited 0.
fn run(mut cmd: Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    println!("{stdout}");
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn script(path: &str) -> String {
    run(script_cmd(path), path)
}

fn script_cmd(path: &str) -> Command {
    let mut cmd = Command::new("bash");
    cmd.arg(root().join(path))
        .env("MERGEFLOW_BIN", common::bin())
        .env_remove("MERGEFLOW_API")
        .env_remove("MERGEFLOW_API_TOKEN");
    cmd
}

/// Where `cargo test` put the example binaries.
fn examples_dir() -> PathBuf {
    let deps = std::env::current_exe().unwrap();
    deps.parent()
        .and_then(Path::parent)
        .unwrap()
        .join("examples")
}

#[test]
fn the_cluster_example_converges_after_a_kill() {
    let out = script("examples/cluster/run.sh");
    assert!(out.contains("n3: in sync with 2 peers"), "{out}");
    assert!(
        out.trim_end()
            .ends_with("including the one that was killed"),
        "{out}"
    );
}

#[test]
fn the_iot_example_derives_resolves_and_alerts() {
    let out = script("examples/iot/run.sh");
    assert!(
        out.contains("heater-1 setpoint on s1 after the merge: 21"),
        "{out}"
    );
    assert!(
        out.contains("s3: readings [30.5,32.5,34.5,36.5,38.5], average 34.5"),
        "{out}"
    );
    assert!(
        out.contains("alert: sensors/s3") || out.contains("\"doc\":\"sensors/s3\""),
        "{out}"
    );
    assert!(out.trim_end().ends_with("ok"), "{out}");
}

/// The example binaries are built next to the test binaries (`cargo test`
/// builds examples); run the offline-first app.
#[test]
fn the_offline_first_example_merges_both_devices_edits() {
    let exe = examples_dir().join("offline_first");
    assert!(exe.exists(), "{} is not built", exe.display());
    let out = run(Command::new(exe), "examples/offline_first.rs");
    assert!(out.contains("ok: no edit was lost"), "{out}");
}

#[test]
fn the_etl_example_pulls_summarizes_and_pushes_each_state_once() {
    let services = examples_dir().join("etl_services");
    assert!(services.exists(), "{} is not built", services.display());
    let mut cmd = script_cmd("examples/etl/run.sh");
    cmd.env("ETL_SERVICES", services);
    let out = run(cmd, "examples/etl/run.sh");
    assert!(out.contains("\"count\":4"), "{out}");
    assert!(
        out.contains("catalog on a: C-400 costs 99.5, summary max 99.5"),
        "{out}"
    );
    assert!(out.contains("and on b: summary max 99.5"), "{out}");
    assert!(out.trim_end().ends_with("ok"), "{out}");
}

#[test]
fn the_mqtt_example_brings_readings_in_and_alerts_out() {
    let out = script_cmd("examples/mqtt/run.sh").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    if out.status.code() == Some(3) {
        // No Mosquitto here: CI installs it and asks for it.
        assert!(
            std::env::var_os("MERGEFLOW_REQUIRE_MOSQUITTO").is_none(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        println!("skipped: {}", String::from_utf8_lossy(&out.stderr));
        return;
    }
    println!("{stdout}");
    assert!(
        out.status.success(),
        "examples/mqtt/run.sh failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("dev3 on the replica: 5 readings, last 36.5"),
        "{stdout}"
    );
    assert!(
        stdout.contains("alerts/site {\"hot\":{\"sensors/dev3\""),
        "{stdout}"
    );
    assert!(stdout.trim_end().ends_with("ok"), "{stdout}");
}

//! `vitalstream replay` as a user runs it, and the independent reference implementation
//! (`tests/reference/`, Python) it is checked against: recordings it generates, and the
//! counts it gives for them.

#![allow(dead_code)]

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/reference")
        .join(name)
}

/// Runs the `vitalstream` binary in the repository's root.
pub fn vitalstream(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vitalstream"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("running vitalstream")
}

/// `vitalstream replay --input INPUT ARGS…`; it must succeed, and its report is returned.
pub fn replay(input: &Path, args: &[&str]) -> Value {
    let mut all = vec!["replay", "--input", input.to_str().unwrap()];
    all.extend_from_slice(args);
    let out = vitalstream(&all);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the report is JSON")
}

/// Writes a recording of `devices` × `seconds` at 1 Hz, out of order by up to
/// `disorder_ms`, with 1% bad lines.
pub fn recording(out: &Path, devices: u32, seconds: u32, seed: u64, disorder_ms: u32) {
    let generated = Command::new("python3")
        .arg(script("gen_recording.py"))
        .args([
            "--devices",
            &devices.to_string(),
            "--seconds",
            &seconds.to_string(),
        ])
        .args([
            "--seed",
            &seed.to_string(),
            "--disorder-ms",
            &disorder_ms.to_string(),
        ])
        .args(["--bad-rate", "0.01", "--out"])
        .arg(out)
        .status()
        .expect("python3 runs the recording generator");
    assert!(generated.success());
}

/// The reference implementation's report for a recording.
pub fn counts(recording: &Path) -> Value {
    let reference = Command::new("python3")
        .arg(script("replay_reference.py"))
        .arg("--input")
        .arg(recording)
        .output()
        .expect("python3 runs the reference implementation");
    assert!(
        reference.status.success(),
        "{}",
        String::from_utf8_lossy(&reference.stderr)
    );
    serde_json::from_slice(&reference.stdout).expect("the reference's report is JSON")
}

//! `cargo fuzz run workflow_toml`: see `mergeflow::fuzzing::workflow_toml`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mergeflow::fuzzing::workflow_toml(data));

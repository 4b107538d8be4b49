//! `cargo fuzz run automerge_repo`: see `mergeflow::fuzzing::automerge_repo`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mergeflow::fuzzing::automerge_repo(data));

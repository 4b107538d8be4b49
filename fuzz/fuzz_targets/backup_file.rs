//! `cargo fuzz run backup_file`: see `mergeflow::fuzzing::backup_file`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mergeflow::fuzzing::backup_file(data));

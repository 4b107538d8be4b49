//! `cargo fuzz run wire`: see `mergeflow::fuzzing::wire`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mergeflow::fuzzing::wire(data));

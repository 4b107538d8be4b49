//! `cargo fuzz run http_body`: see `mergeflow::fuzzing::http_body`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mergeflow::fuzzing::http_body(data));

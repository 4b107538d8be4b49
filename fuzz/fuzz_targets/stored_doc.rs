//! `cargo fuzz run stored_doc`: see `mergeflow::fuzzing::stored_doc`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mergeflow::fuzzing::stored_doc(data));

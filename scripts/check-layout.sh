#!/usr/bin/env bash
# The layout rules of src/ (issue 19): no import cycle between its modules
# (files, and top-level modules as wholes), and no source file over 700 lines
# not counting its #[cfg(test)] items. The checks are tests/layout.rs, which
# `cargo test` (and so CI) runs too; this runs them alone and prints the
# report. Needs only the Rust toolchain.
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo test --quiet --test layout -- --nocapture "$@"

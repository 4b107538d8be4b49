//! What the project's two commands, `mergeflow` and `mergeflow-tools`, share
//! (feature `cli`): running an async main and printing its error once, and
//! progress bars on stderr.

use std::process::ExitCode;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// Runs `main` on a multi-threaded tokio runtime; prints its error, each
/// part of the chain once, as `error: ...` on stderr.
pub fn run(main: impl Future<Output = anyhow::Result<()>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(main) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line. Our errors often include their
/// cause in their message, so each part of the chain is printed once.
pub fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain().map(|c| c.to_string()) {
        if !line.contains(&cause) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&cause);
        }
    }
    line
}

/// A bar (or a spinner, without `len`) drawn on stderr when it is a
/// terminal, ticking on its own.
pub fn progress_bar(len: Option<u64>, template: &str) -> ProgressBar {
    let bar = match len {
        Some(n) => ProgressBar::new(n),
        None => ProgressBar::new_spinner(),
    };
    bar.set_style(
        ProgressStyle::with_template(template)
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_chain_prints_each_part_once() {
        let e = anyhow::anyhow!("disk full").context("cannot write doc a: disk full");
        assert_eq!(error_line(&e), "cannot write doc a: disk full");
        let e = anyhow::anyhow!("refused").context("cannot reach node");
        assert_eq!(error_line(&e), "cannot reach node: refused");
    }
}

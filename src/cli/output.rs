//! What the commands print: JSON, and the status for people.

use anyhow::Result;

/// `mergeflow status` for people: one `name value` line each, then the
/// effective config as TOML, indented (so `awk '/^listen/'` finds only the
/// listen lines). Written in one piece ([`write_stdout`]).
pub(crate) fn print_status(s: &mergeflow::Status) -> Result<()> {
    use std::fmt::Write as _;
    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(w, "peer_id   {}", s.peer_id);
    let _ = writeln!(w, "version   {}", s.version);
    let _ = writeln!(w, "light     {}", if s.light { "on" } else { "off" });
    let _ = writeln!(w, "docs      {}", s.docs);
    let _ = writeln!(w, "uptime_s  {}", s.uptime_s);
    let _ = writeln!(w, "data_dir  {}", s.data_dir);
    let _ = writeln!(w, "boot      {}", s.boot);
    let _ = writeln!(w, "store     {} bytes", s.store_bytes);
    let _ = writeln!(w, "peers     {} connected", s.peers);
    if let Some(n) = s.docs_lacking {
        let _ = writeln!(w, "lacking   {n} docs peers hold (on their way)");
    }
    for t in &s.tasks {
        let total = t.total.map(|n| format!("/{n}")).unwrap_or_default();
        let _ = writeln!(w, "task      {} {}{total}", t.kind, t.done);
    }
    let f = &s.workflows;
    let _ = writeln!(
        w,
        "workflows {} loaded, {} invalid; runs {} ({} done, {} dead)",
        f.workflows, f.invalid, f.runs, f.done, f.dead
    );
    for a in &s.listen_addrs {
        let _ = writeln!(w, "listen    {a}");
    }
    if let Some(config) = &s.config {
        let _ = writeln!(
            w,
            "config    effective: defaults < file < MERGEFLOW_* < flags; secrets hidden"
        );
        let text = toml::to_string(config).unwrap_or_else(|_| {
            // A value TOML cannot hold (a null from a newer node): as JSON.
            serde_json::to_string_pretty(config).unwrap_or_default()
        });
        for line in text.lines().filter(|l| !l.is_empty()) {
            let _ = writeln!(w, "  {line}");
        }
    }
    Ok(write_stdout(&out)?)
}

pub(crate) fn print_json<T: serde::Serialize>(v: &T) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => {
            if let Err(e) = write_stdout(&format!("{s}\n")) {
                eprintln!("error: cannot print JSON: {e}");
            }
        }
        Err(e) => eprintln!("error: cannot print JSON: {e}"),
    }
}

/// Writes `text` to stdout in one piece. A reader that stopped early (`|
/// grep -q`, `| head`) is not an error: what it wanted, it had.
pub(crate) fn write_stdout(text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r,
    }
}

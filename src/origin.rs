//! Host and origin syntax: what `api.allow_hosts` and `api.allow_origins`
//! hold and what browsers send in `Host` and `Origin`. A leaf, shared by the
//! config check and the API's browser guard.

/// Splits `host[:port]` (IPv6 in brackets) into the lowercase name and the
/// port; `None` when it is not that shape.
pub(crate) fn split_host(host: &str) -> Option<(String, Option<u16>)> {
    let host = host.trim();
    let (name, port) = if host.starts_with('[') {
        let end = host.find(']')?;
        let (name, rest) = host.split_at(end + 1);
        match rest {
            "" => (name, None),
            _ => (name, Some(rest.strip_prefix(':')?)),
        }
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (host, None),
        }
    };
    let bad = |c: char| c.is_whitespace() || c.is_control() || "/?#@".contains(c);
    if name.is_empty() || name.contains(bad) {
        return None;
    }
    let port = match port {
        None => None,
        Some(p) => Some(p.parse::<u16>().ok()?),
    };
    Some((name.to_ascii_lowercase(), port))
}

/// An `api.allow_hosts` entry: a host name or address, optionally with a
/// port (`nas.local`, `nas.local:7700`, `192.168.1.5`, `[fd00::5]:7700`).
///
/// # Errors
/// Why it is not one.
pub(crate) fn parse_allowed_host(entry: &str) -> Result<(String, Option<u16>), String> {
    if entry.contains("://") {
        return Err(format!(
            "{entry:?}: a host name (optionally with :port), not a URL"
        ));
    }
    if entry.trim() != entry {
        return Err(format!("{entry:?}: remove the surrounding whitespace"));
    }
    split_host(entry).ok_or_else(|| format!("{entry:?} is not a host name with an optional :port"))
}

/// An origin as browsers send it, lowercase, without the scheme's default
/// port: `http://localhost:5173`, `https://app.example`.
///
/// # Errors
/// Why it is not an origin (`scheme://host[:port]`, nothing after).
pub(crate) fn normalise_origin(origin: &str) -> Result<String, String> {
    let (scheme, rest) = origin
        .split_once("://")
        .ok_or_else(|| format!("{origin:?}: an origin is scheme://host[:port]"))?;
    let scheme = scheme.to_ascii_lowercase();
    let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
    if !scheme_ok {
        return Err(format!("{origin:?}: bad scheme {scheme:?}"));
    }
    if rest.contains(['/', '?', '#', '@']) {
        return Err(format!(
            "{origin:?}: an origin has no path, query or user (write scheme://host[:port])"
        ));
    }
    let (name, port) = split_host(rest)
        .filter(|_| rest.trim() == rest)
        .ok_or_else(|| format!("{origin:?}: bad host {rest:?}"))?;
    let port = match (scheme.as_str(), port) {
        ("http", Some(80)) | ("https", Some(443)) | (_, None) => String::new(),
        (_, Some(p)) => format!(":{p}"),
    };
    Ok(format!("{scheme}://{name}{port}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_split() {
        assert_eq!(
            split_host("LocalHost:7700"),
            Some(("localhost".into(), Some(7700)))
        );
        assert_eq!(split_host("[::1]:80"), Some(("[::1]".into(), Some(80))));
        assert_eq!(split_host("[::1]"), Some(("[::1]".into(), None)));
        assert_eq!(split_host("a.b"), Some(("a.b".into(), None)));
        for bad in ["", ":80", "a:b", "[::1", "[::1]x", "a b", "u@h"] {
            assert_eq!(split_host(bad), None, "{bad}");
        }
    }

    #[test]
    fn origins_normalise_and_compare() {
        assert_eq!(
            normalise_origin("HTTP://LocalHost:80").unwrap(),
            "http://localhost"
        );
        assert_eq!(
            normalise_origin("http://localhost:5173").unwrap(),
            "http://localhost:5173"
        );
        assert_eq!(
            normalise_origin("tauri://localhost").unwrap(),
            "tauri://localhost"
        );
        for bad in [
            "localhost:5173",
            "http://h/",
            "http://h/x",
            "http://",
            "null",
            "*x",
        ] {
            assert!(normalise_origin(bad).is_err(), "{bad}");
        }
    }
}

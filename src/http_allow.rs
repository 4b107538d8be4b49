//! Where `http` steps of applied definitions may post
//! (`workflow.http_allow`).
//!
//! An applied definition syncs from any admitted peer, so without a limit
//! one peer could aim a step at a service only the nodes reach (an
//! internal port, a cloud metadata address, a router's admin page) and
//! have every node that owns the effect post its docs there. Definitions
//! from the workflow dir are the node operator's own and are not limited.
//!
//! The rules, for applied definitions:
//! - a URL naming an IP address is allowed when a listed address or CIDR
//!   covers it;
//! - a URL naming a host is allowed when the host is listed (with its port,
//!   when the entry names one), and then only the addresses it resolves to
//!   that are public, or covered by a listed CIDR, are dialled: a listed
//!   name that resolves to a loopback or private address (DNS rebinding)
//!   reaches it only if that range is listed too;
//! - redirects are followed only to allowed URLs.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;

/// The parsed `workflow.http_allow`.
#[derive(Debug, Clone, Default)]
pub struct HttpAllow {
    /// Host names, lowercase, with the port the entry names, if any.
    hosts: Vec<(String, Option<u16>)>,
    /// Addresses and ranges, with the port the entry names, if any.
    nets: Vec<(IpNet, Option<u16>)>,
}

impl HttpAllow {
    /// Parses the entries: `host`, `host:port`, an IP address (`ip:port`,
    /// `[ip6]:port`) or a CIDR.
    ///
    /// # Errors
    /// The first entry that is none of those.
    pub fn new(entries: &[String]) -> Result<HttpAllow, String> {
        let mut allow = HttpAllow::default();
        for e in entries {
            let e = e.trim();
            if let Ok(net) = e.parse::<IpNet>() {
                allow.nets.push((net, None));
            } else if let Ok(ip) = e.parse::<IpAddr>() {
                allow.nets.push((IpNet::from(ip), None));
            } else if let Ok(sa) = e.parse::<SocketAddr>() {
                allow.nets.push((IpNet::from(sa.ip()), Some(sa.port())));
            } else {
                let (host, port) =
                    match e.rsplit_once(':') {
                        Some((h, p)) => (
                            h,
                            Some(p.parse::<u16>().map_err(|_| {
                                format!("{e:?}: the port after ':' must be a number")
                            })?),
                        ),
                        None => (e, None),
                    };
                let ok = !host.is_empty()
                    && host
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
                if !ok {
                    return Err(format!(
                        "{e:?}: expected a host name (hooks.example.com[:port]), an IP address or a CIDR (10.0.0.0/8)"
                    ));
                }
                allow.hosts.push((host.to_ascii_lowercase(), port));
            }
        }
        Ok(allow)
    }

    /// Ok if an applied definition may post to `url` (as far as the URL
    /// tells: a host's addresses are checked when it is resolved).
    ///
    /// # Errors
    /// Why not, naming `workflow.http_allow`.
    pub fn check_url(&self, url: &str) -> Result<(), String> {
        let parsed = reqwest::Url::parse(url).map_err(|e| format!("{url}: {e}"))?;
        let port = parsed.port_or_known_default();
        let host = parsed.host_str().unwrap_or_default();
        let ip = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>();
        let allowed = match ip {
            Ok(ip) => self
                .nets
                .iter()
                .any(|(n, p)| n.contains(&ip) && p.is_none_or(|p| Some(p) == port)),
            Err(_) => {
                let d = host.to_ascii_lowercase();
                !d.is_empty()
                    && self
                        .hosts
                        .iter()
                        .any(|(h, p)| *h == d && p.is_none_or(|p| Some(p) == port))
            }
        };
        if allowed {
            Ok(())
        } else {
            Err(format!(
                "{url}: http steps of applied definitions reach only what workflow.http_allow \
                 lists (host names, IP addresses, CIDRs) on this node"
            ))
        }
    }

    /// A listed address or range covers `ip` (on some port).
    fn covers(&self, ip: IpAddr) -> bool {
        self.nets.iter().any(|(n, _)| n.contains(&ip))
    }

    /// A listed host may be dialled at `ip`: a public address, or one a
    /// listed range covers.
    fn may_dial(&self, ip: IpAddr) -> bool {
        self.covers(ip) || is_public(ip)
    }

    /// An HTTP client that dials only what this allows: names resolve to
    /// allowed addresses only, and redirects go to allowed URLs only.
    pub fn client(self, roots: &[reqwest::Certificate]) -> reqwest::Client {
        let allow = Arc::new(self);
        let redirects = allow.clone();
        client_builder(roots)
            .dns_resolver(Arc::new(Resolver(allow)))
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() >= 10 {
                    return attempt.error("more than 10 redirects");
                }
                match redirects.check_url(attempt.url().as_str()) {
                    Ok(()) => attempt.follow(),
                    Err(e) => attempt.error(format!("redirected to {e}")),
                }
            }))
            .build()
            .expect("reqwest client builds")
    }
}

/// Makes ring rustls' process-wide crypto provider, unless one is set
/// already (an embedder's choice stands). reqwest (built without a
/// provider of its own) and the MQTT bridge take theirs from there; every
/// HTTP client the node builds calls this first.
pub fn install_tls_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // An error means another provider was installed first: it is used.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// The builder every `http` step client starts from: a 10 s connect
/// timeout, `roots` trusted for `https://` besides the system's, and
/// redirects followed only within the same host (a step's headers, which
/// may carry a secret, never go to another).
pub fn client_builder(roots: &[reqwest::Certificate]) -> reqwest::ClientBuilder {
    install_tls_provider();
    reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(10))
        .tls_certs_merge(roots.iter().cloned())
        .redirect(reqwest::redirect::Policy::custom(|attempt| {
            let same = attempt
                .previous()
                .first()
                .is_some_and(|first| first.host_str() == attempt.url().host_str());
            if attempt.previous().len() >= 10 {
                attempt.error("more than 10 redirects")
            } else if same {
                attempt.follow()
            } else {
                let to = attempt.url().to_string();
                attempt.error(format!("a redirect to another host ({to}) is not followed"))
            }
        }))
}

/// Reads `workflow.tls_ca`: a PEM file of one or more CA certificates.
///
/// # Errors
/// The file, and why it cannot be read or holds no certificate.
pub fn read_ca(path: &std::path::Path) -> Result<Vec<reqwest::Certificate>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|e| format!("{}: not PEM certificates: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: holds no certificate", path.display()));
    }
    Ok(certs)
}

/// Not loopback, private, link-local, shared (CGNAT), unspecified,
/// multicast, documentation or otherwise reserved.
fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || a >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || first == 0x2001 && v6.segments()[1] == 0x0db8)
        }
    }
}

/// Resolves names with the system resolver and keeps the addresses the
/// allow list lets a listed host reach.
struct Resolver(Arc<HttpAllow>);

impl reqwest::dns::Resolve for Resolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow = self.0.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let kept: Vec<SocketAddr> = found
                .iter()
                .copied()
                .filter(|a| allow.may_dial(a.ip()))
                .collect();
            if kept.is_empty() {
                let ips: Vec<String> = found.iter().map(|a| a.ip().to_string()).collect();
                return Err(format!(
                    "{host} resolves to {} only, which workflow.http_allow does not cover \
                     (a listed host reaches a loopback or private address only if its range is listed too)",
                    ips.join(", ")
                )
                .into());
            }
            let addrs: reqwest::dns::Addrs = Box::new(kept.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow(e: &[&str]) -> HttpAllow {
        HttpAllow::new(&e.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn only_listed_destinations_pass() {
        let none = allow(&[]);
        for url in [
            "http://127.0.0.1:7700/v1/docs",
            "http://[::1]/x",
            "http://169.254.169.254/latest/meta-data",
            "http://localhost:8080/x",
            "https://hooks.example.com/x",
        ] {
            assert!(none.check_url(url).is_err(), "{url}");
        }
        let some = allow(&[
            "hooks.example.com",
            "alerts.example.com:8443",
            "10.1.0.0/16",
            "127.0.0.1",
            "192.168.1.5:9000",
        ]);
        assert!(some.check_url("http://192.168.1.5:9000/a").is_ok());
        assert!(
            some.check_url("http://192.168.1.5:9001/a").is_err(),
            "other port"
        );
        assert!(some.check_url("https://hooks.example.com/a").is_ok());
        assert!(some.check_url("https://HOOKS.example.com:9000/a").is_ok());
        assert!(some.check_url("https://alerts.example.com:8443/a").is_ok());
        assert!(
            some.check_url("https://alerts.example.com/a").is_err(),
            "other port"
        );
        assert!(some.check_url("http://10.1.2.3:80/a").is_ok());
        assert!(some.check_url("http://10.2.0.1/a").is_err());
        assert!(some.check_url("http://127.0.0.1:7700/a").is_ok());
        assert!(some.check_url("http://127.0.0.2/a").is_err());
        let e = none.check_url("http://127.0.0.1/").unwrap_err();
        assert!(e.contains("workflow.http_allow"), "{e}");
    }

    #[test]
    fn a_listed_name_reaches_private_addresses_only_when_their_range_is_listed() {
        let a = allow(&["hooks.example.com"]);
        assert!(a.may_dial("93.184.216.34".parse().unwrap()));
        for private in [
            "127.0.0.1",
            "10.0.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "::1",
            "fd00::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(!a.may_dial(private.parse().unwrap()), "{private}");
        }
        assert!(allow(&["127.0.0.0/8"]).may_dial("127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn bad_entries_are_refused() {
        for bad in ["http://x", "host:port", "a b", ""] {
            assert!(HttpAllow::new(&[bad.to_string()]).is_err(), "{bad}");
        }
    }
}

//! The request an `http` step sends: its method, its headers (whose values
//! may name environment variables, so that secrets stay out of definitions
//! and docs), and what its body is.

use std::collections::BTreeMap;

/// An HTTP method an `http` step may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Reads a source (no body).
    Get,
    /// The default: sends the run and the doc, or `body`.
    Post,
    /// Sends `body` (or the run and the doc).
    Put,
    /// Sends `body` (or the run and the doc).
    Patch,
    /// Deletes (no body).
    Delete,
}

impl Method {
    /// Parses `GET`, `post`, ...
    ///
    /// # Errors
    /// Names the methods there are.
    pub fn parse(s: &str) -> Result<Method, String> {
        Ok(match s.to_ascii_uppercase().as_str() {
            "GET" => Method::Get,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "PATCH" => Method::Patch,
            "DELETE" => Method::Delete,
            _ => {
                return Err(format!(
                    "method {s:?}: one of GET, POST, PUT, PATCH, DELETE"
                ));
            }
        })
    }

    /// Its name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
            Method::Delete => "DELETE",
        }
    }

    /// True for the methods that send a body.
    pub fn has_body(self) -> bool {
        matches!(self, Method::Post | Method::Put | Method::Patch)
    }

    /// For `reqwest`.
    pub fn to_reqwest(self) -> reqwest::Method {
        match self {
            Method::Get => reqwest::Method::GET,
            Method::Post => reqwest::Method::POST,
            Method::Put => reqwest::Method::PUT,
            Method::Patch => reqwest::Method::PATCH,
            Method::Delete => reqwest::Method::DELETE,
        }
    }
}

/// Headers the node sets itself; a definition may not set them.
const RESERVED: [&str; 4] = [
    "idempotency-key",
    "content-length",
    "host",
    "transfer-encoding",
];

/// Checks an `http` step's `headers`: names are HTTP header names (not
/// one the node sets itself), values are text where `${NAME}` stands for
/// environment variable `NAME` of the node running the step.
///
/// # Errors
/// The header and what is wrong with it.
pub fn check_headers(headers: &BTreeMap<String, String>) -> Result<(), String> {
    for (name, value) in headers {
        if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err(format!("headers {name:?}: not an HTTP header name"));
        }
        if RESERVED.contains(&name.to_ascii_lowercase().as_str()) {
            return Err(format!("headers {name:?}: set by the node itself"));
        }
        variables(value).map_err(|e| format!("headers {name:?}: {e}"))?;
    }
    Ok(())
}

/// The names of the `${NAME}` variables in `template`.
fn variables(template: &str) -> Result<Vec<&str>, String> {
    let mut out = Vec::new();
    let mut rest = template;
    while let Some(at) = rest.find("${") {
        let after = &rest[at + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("{template:?}: ${{ without a closing }}"))?;
        let name = &after[..end];
        let ok = !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !ok {
            return Err(format!(
                "{template:?}: ${{{name}}} is not an environment variable name (A-Z, 0-9, _)"
            ));
        }
        out.push(name);
        rest = &after[end + 1..];
    }
    Ok(out)
}

/// `template` with each `${NAME}` replaced by environment variable `NAME`
/// as `env` reads it.
///
/// # Errors
/// A variable that is not set (or not UTF-8): the step fails with the
/// variable's name, never with its value.
pub fn expand(template: &str, env: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(at) = rest.find("${") {
        out.push_str(&rest[..at]);
        let after = &rest[at + 2..];
        let end = after.find('}').ok_or("unclosed ${")?;
        let name = &after[..end];
        let value = env(name)
            .ok_or_else(|| format!("environment variable {name} is not set on this node"))?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_parse_in_any_case_and_say_which_take_a_body() {
        assert_eq!(Method::parse("get"), Ok(Method::Get));
        assert_eq!(Method::parse("PATCH"), Ok(Method::Patch));
        assert!(Method::parse("TRACE").unwrap_err().contains("one of GET"));
        assert!(!Method::Get.has_body());
        assert!(Method::Put.has_body());
    }

    #[test]
    fn header_values_name_environment_variables() {
        let env = |n: &str| (n == "TOKEN").then(|| "s3cret".to_string());
        assert_eq!(
            expand("Bearer ${TOKEN}", env).unwrap(),
            "Bearer s3cret".to_string()
        );
        assert_eq!(expand("plain", env).unwrap(), "plain");
        let missing = expand("${NOPE}", env).unwrap_err();
        assert!(missing.contains("NOPE is not set"), "{missing}");
        let h = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
        assert!(check_headers(&h("Authorization", "Bearer ${TOKEN}")).is_ok());
        assert!(check_headers(&h("X", "${}")).is_err());
        assert!(check_headers(&h("X", "${A-B}")).is_err());
        assert!(check_headers(&h("X", "${OPEN")).is_err());
        assert!(check_headers(&h("bad name", "v")).is_err());
        assert!(
            check_headers(&h("Idempotency-Key", "k"))
                .unwrap_err()
                .contains("set by the node")
        );
    }
}

//! Durations written as text: `250ms`, `30s`, `5m`, `2h`.
//!
//! One parser for workflow definitions (`timeout = "5s"`, `every 30s`) and
//! the node's config (`anti_entropy_ms = "30s"`), so both read the same way.
//! Config keys keep their unit in their name for plain integers
//! (`anti_entropy_ms = 30000` is milliseconds); a string names its own unit.

use std::time::Duration;

use serde::Deserializer;

/// `250ms`, `30s`, `5m`, `2h`: a whole number, then its unit.
///
/// # Errors
/// A message that shows the expected form.
pub fn parse(s: &str) -> Result<Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("duration {s:?}: a whole number then ms, s, m or h"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n.saturating_mul(60))),
        "h" => Ok(Duration::from_secs(n.saturating_mul(3600))),
        _ => Err(format!("duration {s:?}: a whole number then ms, s, m or h")),
    }
}

/// Milliseconds in `s` (see [`parse`]), for a config key ending in `_ms`.
///
/// # Errors
/// As [`parse`], or more milliseconds than a `u64` holds.
pub fn parse_ms(s: &str) -> Result<u64, String> {
    let d = parse(s.trim())?;
    u64::try_from(d.as_millis()).map_err(|_| format!("duration {s:?} is too long"))
}

/// Deserializes a config value in milliseconds: an integer is milliseconds
/// (the unit in the key's name), a string is a duration such as `"30s"`.
///
/// # Errors
/// A negative integer, or a string [`parse`] refuses.
pub fn de_ms<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    struct Ms;
    impl serde::de::Visitor<'_> for Ms {
        type Value = u64;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str(
                "milliseconds (an integer) or a duration such as \"500ms\", \"30s\", \"2m\"",
            )
        }

        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }

        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v).map_err(|_| E::custom(format!("{v} is negative")))
        }

        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<u64, E> {
            parse_ms(v).map_err(E::custom)
        }
    }
    d.deserialize_any(Ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_unit() {
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_ms(" 30s "), Ok(30_000));
        for bad in ["s", "-1s", "30", "1.5s", "30 s", "30sec", ""] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        assert!(parse_ms(&format!("{}h", u64::MAX)).is_err());
    }
}

//! MQTT topic filters and the templates that turn a topic into a doc id,
//! or a doc id into a topic.
//!
//! A filter is `/`-separated levels where `+` matches one level and a final
//! `#` matches the rest (MQTT 3.1.1 and 5, section 4.7). A template is text
//! with placeholders: `{N}` for level N of the topic (or of the doc id, for
//! an `out` rule), counted from 0, `{topic}` for the whole topic and `{doc}`
//! for the whole doc id.

/// Checks a subscription filter.
///
/// # Errors
/// What is wrong with it.
pub fn check_filter(filter: &str) -> Result<(), String> {
    if filter.is_empty() {
        return Err("an empty topic filter".into());
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        let wild = level.contains('+') || level.contains('#');
        if wild && *level != "+" && *level != "#" {
            return Err(format!(
                "{filter:?}: + and # stand alone in their level (\"a/+/b\", \"a/#\")"
            ));
        }
        if *level == "#" && i + 1 != levels.len() {
            return Err(format!("{filter:?}: # must be the last level"));
        }
    }
    Ok(())
}

/// Checks a topic to publish to: no wildcards.
///
/// # Errors
/// What is wrong with it.
pub fn check_topic(topic: &str) -> Result<(), String> {
    if topic.is_empty() {
        return Err("an empty topic".into());
    }
    if topic.contains(['+', '#']) {
        return Err(format!("{topic:?}: a topic to publish to has no + or #"));
    }
    Ok(())
}

/// True if `topic` matches `filter`. Topics starting with `$` (the
/// broker's own) match no filter that starts with a wildcard.
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// The placeholders of `template`, checked: `{N}` below `levels` (when
/// known), and the names in `names`.
///
/// # Errors
/// An unclosed brace or an unknown placeholder.
pub fn check_template(template: &str, levels: Option<usize>, names: &[&str]) -> Result<(), String> {
    let mut rest = template;
    while let Some(at) = rest.find('{') {
        let after = &rest[at + 1..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("{template:?}: {{ without a closing }}"))?;
        let name = &after[..end];
        match name.parse::<usize>() {
            Ok(n) if levels.is_none_or(|l| n < l) => {}
            Ok(n) => {
                return Err(format!(
                    "{template:?}: {{{n}}} names level {n}, and there are {} (counted from 0)",
                    levels.unwrap_or_default()
                ));
            }
            Err(_) if names.contains(&name) => {}
            Err(_) => {
                let known: Vec<String> = names.iter().map(|n| format!("{{{n}}}")).collect();
                return Err(format!(
                    "{template:?}: {{{name}}} is not a placeholder (use {{0}}, {{1}}, ... {})",
                    known.join(" ")
                ));
            }
        }
        rest = &after[end + 1..];
    }
    Ok(())
}

/// `template` with `{N}` replaced by level N of `path` (split at `/`) and
/// `{name}` by `path` itself for `name` in `whole`.
///
/// # Errors
/// A level that `path` does not have.
pub fn fill(template: &str, path: &str, whole: &[&str]) -> Result<String, String> {
    let levels: Vec<&str> = path.split('/').collect();
    let mut out = String::with_capacity(template.len() + path.len());
    let mut rest = template;
    while let Some(at) = rest.find('{') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let end = after.find('}').ok_or("unclosed {")?;
        let name = &after[..end];
        match name.parse::<usize>() {
            Ok(n) => out.push_str(
                levels
                    .get(n)
                    .ok_or_else(|| format!("{path:?} has no level {n}"))?,
            ),
            Err(_) if whole.contains(&name) => out.push_str(path),
            Err(_) => return Err(format!("{{{name}}} is not a placeholder")),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Levels of a filter, or `None` when a `#` makes them unbounded.
pub fn levels(filter: &str) -> Option<usize> {
    (!filter.ends_with('#')).then(|| filter.split('/').count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_match_as_mqtt_says() {
        assert!(matches("sensors/+/reading", "sensors/a/reading"));
        assert!(!matches("sensors/+/reading", "sensors/a/b/reading"));
        assert!(!matches("sensors/+/reading", "sensors/a"));
        assert!(matches("sensors/#", "sensors"));
        assert!(matches("sensors/#", "sensors/a/b"));
        assert!(matches("#", "anything/at/all"));
        assert!(!matches("#", "$SYS/broker/load"));
        assert!(!matches("+/x", "$SYS/x"));
        assert!(matches("$SYS/#", "$SYS/x"));
        assert!(matches("a//b", "a//b"));
        assert!(!matches("a/b", "a/b/"));
    }

    #[test]
    fn filters_and_topics_are_checked() {
        assert!(check_filter("a/+/b").is_ok());
        assert!(check_filter("a/#").is_ok());
        assert!(check_filter("a/b+").is_err());
        assert!(check_filter("a/#/b").is_err());
        assert!(check_filter("").is_err());
        assert!(check_topic("alerts/a").is_ok());
        assert!(check_topic("alerts/+").is_err());
    }

    #[test]
    fn templates_take_levels_and_names() {
        let t = "sensors/{1}";
        assert!(check_template(t, levels("sensors/+/reading"), &["topic"]).is_ok());
        let e = check_template("s/{3}", levels("a/+/b"), &["topic"]).unwrap_err();
        assert!(e.contains("level 3"), "{e}");
        assert!(check_template("s/{9}", levels("a/#"), &["topic"]).is_ok());
        let e = check_template("s/{dev}", None, &["topic"]).unwrap_err();
        assert!(e.contains("{dev} is not a placeholder"), "{e}");
        assert!(check_template("s/{1", None, &[]).is_err());
        assert_eq!(
            fill(t, "sensors/dev7/reading", &["topic"]).unwrap(),
            "sensors/dev7"
        );
        assert_eq!(fill("log/{topic}", "a/b", &["topic"]).unwrap(), "log/a/b");
        assert_eq!(
            fill("out/{doc}/{0}", "alerts/x", &["doc"]).unwrap(),
            "out/alerts/x/alerts"
        );
        assert!(fill("{5}", "a/b", &[]).is_err());
    }
}

//! The exposition formats: OpenMetrics text (what the registry writes) and Prometheus text
//! 0.0.4 made from it, and reading a sample line's labels (to show a caller only the series
//! the metrics policy lets it see).

use std::collections::HashSet;

/// The media type of [`Metrics::encode`]'s output (OpenMetrics text).
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The media type of [`to_prometheus_text`]'s output (Prometheus text format 0.0.4).
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// OpenMetrics text as Prometheus text format 0.0.4, for clients that do not ask for
/// OpenMetrics: a counter's metadata names its `_total` series, and there is no `# EOF`.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let meta = line
            .strip_prefix("# HELP ")
            .map(|rest| ("# HELP ", rest))
            .or_else(|| line.strip_prefix("# TYPE ").map(|rest| ("# TYPE ", rest)));
        match meta {
            Some((kind, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let suffix = if counters.contains(name) {
                    "_total"
                } else {
                    ""
                };
                out.push_str(&format!("{kind}{name}{suffix} {tail}\n"));
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// The labels of a sample line (`name{a="x",b="y\\"z"} 1`), unescaped, or `None` for a line
/// without labels or one that does not parse.
pub(super) fn sample_labels(line: &str) -> Option<Vec<(&str, String)>> {
    let start = line.find('{')?;
    let mut rest = &line[start + 1..];
    let mut out = Vec::new();
    loop {
        if rest.starts_with('}') {
            return Some(out);
        }
        let eq = rest.find('=')?;
        let name = &rest[..eq];
        rest = rest[eq + 1..].strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        out.push((name, value));
        rest = &rest[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

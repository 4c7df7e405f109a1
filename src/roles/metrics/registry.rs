//! The series pushed to the metrics role, the guards on them, and their exposition.
//!
//! Two kinds, kept apart: *tracked* points (`/metrics/track`: counters add, gauges set,
//! histograms observe into configured buckets) and *pushed groups* (the Pushgateway-compatible
//! path: absolute values, a group replaced or deleted whole). Both are rendered after the role's
//! own metrics by `GET /metrics`, each family once with `# HELP` and `# TYPE`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// Sorted (name, value) pairs: a series' identity within its family.
pub type Labels = Vec<(String, String)>;

/// Metric types that can be tracked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Monotonic: a push adds.
    Counter,
    /// A push sets.
    Gauge,
    /// A push observes into the configured buckets.
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One tracked point, as pushed.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"name": "jobs_processed", "value": 3, "type": "counter", "labels": {"queue": "pricing"}, "service": "pricing-batch", "tenant_id": "t1"}))]
pub struct Point {
    /// Metric name (Prometheus rules; counters get `_total` appended when missing).
    pub name: String,
    /// The value.
    pub value: f64,
    /// counter, gauge or histogram.
    #[serde(rename = "type")]
    pub kind: Kind,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The pushing service; becomes the `service` label.
    #[serde(default)]
    pub service: Option<String>,
    /// The tenant; becomes the `tenant_id` label.
    #[serde(default)]
    pub tenant_id: Option<String>,
    /// Help text for the family (first push wins).
    #[serde(default)]
    pub help: Option<String>,
}

/// Why a point was refused; each has a counter (`access_metrics_rejected_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Rejection {
    /// The metric name breaks Prometheus' rules.
    InvalidName,
    /// The name belongs to this role's own metrics.
    ReservedName,
    /// A label name breaks Prometheus' rules (or starts with `__`).
    InvalidLabel,
    /// More labels than `metrics.max_labels`.
    TooManyLabels,
    /// A label value longer than `metrics.max_label_value_length`.
    LabelValueTooLong,
    /// Not a finite number, or a negative counter increment.
    InvalidValue,
    /// The name is already used with another type (or by the other kind of ingest).
    TypeConflict,
    /// `metrics.max_series` reached.
    SeriesCap,
    /// A batch element that is not a point object.
    InvalidPoint,
}

impl Rejection {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::InvalidName => "invalid_name",
            Rejection::ReservedName => "reserved_name",
            Rejection::InvalidLabel => "invalid_label",
            Rejection::TooManyLabels => "too_many_labels",
            Rejection::LabelValueTooLong => "label_value_too_long",
            Rejection::InvalidValue => "invalid_value",
            Rejection::TypeConflict => "type_conflict",
            Rejection::SeriesCap => "series_cap",
            Rejection::InvalidPoint => "invalid_point",
        }
    }
}

/// The guards' limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Labels per point (including `service` and `tenant_id`).
    pub max_labels: usize,
    /// Characters per label value.
    pub max_label_value_length: usize,
    /// Series per metric; beyond, points fold into one overflow series.
    pub max_series_per_metric: usize,
    /// Series in all (tracked and pushed); beyond, new series are refused.
    pub max_series: usize,
    /// Histogram buckets (upper bounds).
    pub buckets: Vec<f64>,
    /// Samples kept per series for trends.
    pub history: usize,
}

/// A metric name per Prometheus: `[a-zA-Z_:][a-zA-Z0-9_:]*`.
pub fn valid_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// A label name per Prometheus, not reserved (`__` prefix).
pub fn valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    !name.starts_with("__")
        && chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Names of this role's own metrics; pushed names may not use the prefix, except usage metrics.
fn reserved(name: &str) -> bool {
    name.starts_with("access_") && !name.starts_with("access_usage_")
}

/// Checks label names, count and value lengths.
pub fn check_labels(labels: &Labels, limits: &Limits) -> Result<(), Rejection> {
    if labels.len() > limits.max_labels {
        return Err(Rejection::TooManyLabels);
    }
    for (name, value) in labels {
        if !valid_label_name(name) {
            return Err(Rejection::InvalidLabel);
        }
        if value.chars().count() > limits.max_label_value_length {
            return Err(Rejection::LabelValueTooLong);
        }
    }
    Ok(())
}

#[derive(Debug, Clone)]
enum Value {
    Scalar(f64),
    Histogram { counts: Vec<u64>, sum: f64, count: u64 },
}

#[derive(Debug, Clone)]
struct Series {
    value: Value,
    last_push: f64,
    history: VecDeque<(f64, f64)>,
}

#[derive(Debug)]
struct Family {
    kind: Kind,
    help: String,
    series: BTreeMap<Labels, Series>,
}

/// The names a tracked family occupies, given its exported name: the name the caller gave and
/// every sample name it exports. A counter is one family whether pushed as `jobs` or
/// `jobs_total` (exported `jobs_total`), so it occupies both; a histogram occupies its name and
/// its `_bucket`, `_sum` and `_count`; a gauge its name. Two families may not share a name, so a
/// name has one type, whatever suffix the caller gave.
pub fn claimed(kind: Kind, exported: &str) -> Vec<String> {
    match kind {
        Kind::Counter => {
            let base = exported.strip_suffix("_total").unwrap_or(exported);
            vec![base.to_string(), exported.to_string()]
        }
        Kind::Gauge => vec![exported.to_string()],
        Kind::Histogram => ["", "_bucket", "_sum", "_count"]
            .iter()
            .map(|suffix| format!("{exported}{suffix}"))
            .collect(),
    }
}

/// Applies `point`'s value to `series` at `now`, and keeps it in the series' history.
fn record(series: &mut Series, point: &Point, now: f64, limits: &Limits) {
    match (&mut series.value, point.kind) {
        (Value::Scalar(v), Kind::Counter) => *v += point.value,
        (Value::Scalar(v), _) => *v = point.value,
        (Value::Histogram { counts, sum, count }, _) => {
            for (i, bound) in limits.buckets.iter().enumerate() {
                if point.value <= *bound {
                    counts[i] += 1;
                }
            }
            *sum += point.value;
            *count += 1;
        }
    }
    series.last_push = now;
    let recorded = match &series.value {
        Value::Scalar(v) => *v,
        Value::Histogram { .. } => point.value,
    };
    series.history.push_back((now, recorded));
    while series.history.len() > limits.history {
        series.history.pop_front();
    }
}

/// Label set of the series that absorbs a metric's points beyond its series limit.
fn overflow_labels() -> Labels {
    vec![("overflow".to_string(), "true".to_string())]
}

/// A series as listed by `GET /metrics/series`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct SeriesInfo {
    /// The exported family name.
    pub name: String,
    /// Its type (`counter`, `gauge`, `histogram`, or a pushed family's own type).
    #[serde(rename = "type")]
    #[schema(example = "counter")]
    pub kind: &'static str,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Current value (histograms: the observation count).
    pub value: f64,
    /// Histograms: the sum of observations.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sum: Option<f64>,
    /// Unix seconds of the last push.
    pub last_push: f64,
    /// `tracked` or `pushed` (the Pushgateway path, with its group).
    pub source: String,
}

/// The tracked families.
pub struct Tracked {
    families: HashMap<String, Family>,
    series: usize,
}

/// What an accepted point did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// Into its own series.
    Stored,
    /// Folded into the overflow series.
    Overflowed,
}

impl Tracked {
    /// Empty.
    pub fn new() -> Self {
        Tracked { families: HashMap::new(), series: 0 }
    }

    /// Series held.
    pub fn series_count(&self) -> usize {
        self.series
    }

    /// Families held.
    pub fn has_family(&self, name: &str) -> bool {
        self.families.contains_key(name)
    }

    /// Whether a tracked family occupies `name` in the exposition (see [`claimed`]).
    pub fn claims(&self, name: &str) -> bool {
        self.owner(name).is_some()
    }

    /// The family (by exported name) that occupies `name`: only a family whose name is `name`
    /// plus or minus a suffix of [`claimed`] can.
    fn owner(&self, name: &str) -> Option<&str> {
        let mut candidates = vec![name.to_string(), format!("{name}_total")];
        for suffix in ["_total", "_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix) {
                candidates.push(base.to_string());
            }
        }
        candidates.into_iter().find_map(|key| {
            let (key, family) = self.families.get_key_value(&key)?;
            claimed(family.kind, key).iter().any(|n| n == name).then_some(key.as_str())
        })
    }

    /// The exported name of a point named `name` (`_total` added to counters).
    pub fn exported_name(kind: Kind, name: &str) -> std::borrow::Cow<'_, str> {
        if kind == Kind::Counter && !name.ends_with("_total") {
            format!("{name}_total").into()
        } else {
            name.into()
        }
    }

    /// Applies a point at unix time `now`; `other_series` counts series held elsewhere (pushed
    /// groups) against the total cap; `taken` says whether a name is used by pushed groups.
    pub fn ingest(
        &mut self,
        point: &mut Point,
        now: f64,
        limits: &Limits,
        other_series: usize,
        taken: impl Fn(&str) -> bool,
    ) -> Result<Accepted, Rejection> {
        if !valid_metric_name(&point.name) {
            return Err(Rejection::InvalidName);
        }
        let name = Self::exported_name(point.kind, &point.name);
        if reserved(&name) && !name.starts_with("access_usage_") {
            return Err(Rejection::ReservedName);
        }
        if !point.value.is_finite() || (point.kind == Kind::Counter && point.value < 0.0) {
            return Err(Rejection::InvalidValue);
        }
        // The point's own labels, moved (not copied) into the series key.
        let mut labels: Labels = std::mem::take(&mut point.labels).into_iter().collect();
        for (key, value) in [("service", &point.service), ("tenant_id", &point.tenant_id)] {
            if let Some(value) = value {
                labels.retain(|(k, _)| k != key);
                labels.push((key.to_string(), value.clone()));
            }
        }
        labels.sort();
        check_labels(&labels, limits)?;
        // The common case first: a point of a series that exists (one lookup of each).
        if let Some(family) = self.families.get_mut(name.as_ref()) {
            if family.kind != point.kind {
                return Err(Rejection::TypeConflict);
            }
            if let Some(series) = family.series.get_mut(&labels) {
                record(series, point, now, limits);
                return Ok(Accepted::Stored);
            }
        }
        let name = name.into_owned();
        // One name, one type: every name this point's family would occupy must be free or its
        // own (see `claimed`), here and in the pushed groups. A family that exists already holds
        // its names (pushed groups check `claims` before taking one), so only its type is checked.
        match self.families.get(&name) {
            Some(family) if family.kind != point.kind => return Err(Rejection::TypeConflict),
            Some(_) => {}
            None => {
                for occupied in claimed(point.kind, &name) {
                    if taken(&occupied) || self.owner(&occupied).is_some_and(|owner| owner != name)
                    {
                        return Err(Rejection::TypeConflict);
                    }
                }
            }
        }
        let total = self.series + other_series;
        if !self.families.contains_key(&name) {
            let help = point
                .help
                .clone()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| format!("Tracked metric {name}"));
            self.families
                .insert(name.clone(), Family { kind: point.kind, help, series: BTreeMap::new() });
        }
        let family = self.families.get_mut(&name).expect("inserted above");
        let mut accepted = Accepted::Stored;
        let key = if family.series.contains_key(&labels) {
            labels
        } else if family.series.len() + 1 >= limits.max_series_per_metric {
            // One slot is kept for the overflow series itself.
            accepted = Accepted::Overflowed;
            overflow_labels()
        } else {
            labels
        };
        if !family.series.contains_key(&key) {
            if total >= limits.max_series {
                if family.series.is_empty() {
                    self.families.remove(&name);
                }
                return Err(Rejection::SeriesCap);
            }
            let value = match point.kind {
                Kind::Histogram => {
                    Value::Histogram { counts: vec![0; limits.buckets.len()], sum: 0.0, count: 0 }
                }
                _ => Value::Scalar(0.0),
            };
            family
                .series
                .insert(key.clone(), Series { value, last_push: now, history: VecDeque::new() });
            self.series += 1;
        }
        let series = family.series.get_mut(&key).expect("inserted above");
        record(series, point, now, limits);
        Ok(accepted)
    }

    /// Drops series not pushed since `cutoff` (unix s); returns how many.
    pub fn expire(&mut self, cutoff: f64) -> usize {
        let mut dropped = 0;
        self.families.retain(|_, family| {
            let before = family.series.len();
            family.series.retain(|_, s| s.last_push >= cutoff);
            dropped += before - family.series.len();
            !family.series.is_empty()
        });
        self.series -= dropped;
        dropped
    }

    /// Prometheus text for every family.
    pub fn render(&self, buckets: &[f64], out: &mut String) {
        let mut names: Vec<&String> = self.families.keys().collect();
        names.sort();
        for name in names {
            let family = &self.families[name];
            let _ = writeln!(out, "# HELP {name} {}", escape_help(&family.help));
            let _ = writeln!(out, "# TYPE {name} {}", family.kind.as_str());
            for (labels, series) in &family.series {
                match &series.value {
                    Value::Scalar(v) => sample(out, name, labels, None, *v),
                    Value::Histogram { counts, sum, count } => {
                        for (bound, c) in buckets.iter().zip(counts) {
                            sample(
                                out,
                                &format!("{name}_bucket"),
                                labels,
                                Some(&format_float(*bound)),
                                *c as f64,
                            );
                        }
                        sample(out, &format!("{name}_bucket"), labels, Some("+Inf"), *count as f64);
                        sample(out, &format!("{name}_sum"), labels, None, *sum);
                        sample(out, &format!("{name}_count"), labels, None, *count as f64);
                    }
                }
            }
        }
    }

    /// Every series, for `GET /metrics/series`.
    pub fn list(&self) -> Vec<SeriesInfo> {
        let mut out = Vec::new();
        for (name, family) in &self.families {
            for (labels, series) in &family.series {
                let (value, sum) = match &series.value {
                    Value::Scalar(v) => (*v, None),
                    Value::Histogram { count, sum, .. } => (*count as f64, Some(*sum)),
                };
                out.push(SeriesInfo {
                    name: name.clone(),
                    kind: family.kind.as_str(),
                    labels: labels.iter().cloned().collect(),
                    value,
                    sum,
                    last_push: series.last_push,
                    source: "tracked".into(),
                });
            }
        }
        out.sort_by(|a, b| (&a.name, &a.labels).cmp(&(&b.name, &b.labels)));
        out
    }

    /// Samples of a family (by exported or pushed name) since `since`, across its series.
    pub fn history(&self, name: &str, since: f64) -> Option<Vec<(f64, f64)>> {
        let family =
            self.families.get(name).or_else(|| self.families.get(&format!("{name}_total")))?;
        let mut points: Vec<(f64, f64)> = family
            .series
            .values()
            .flat_map(|s| s.history.iter().copied().filter(|(t, _)| *t >= since))
            .collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        Some(points)
    }
}

impl Tracked {
    /// A counter family's increase per tenant (the `tenant_id` label) in `step`-second buckets
    /// since `since`: each sample's rise over the one before it (a series' first sample counts
    /// whole when its history was never trimmed, i.e. it holds fewer than `cap` samples). `None`
    /// when there is no such family or it is not a counter.
    pub fn usage_by_tenant(
        &self,
        name: &str,
        since: f64,
        step: f64,
        cap: usize,
    ) -> Option<BTreeMap<String, BTreeMap<i64, f64>>> {
        let family =
            self.families.get(name).or_else(|| self.families.get(&format!("{name}_total")))?;
        if family.kind != Kind::Counter {
            return None;
        }
        let mut out: BTreeMap<String, BTreeMap<i64, f64>> = BTreeMap::new();
        for (labels, series) in &family.series {
            let tenant = labels
                .iter()
                .find(|(k, _)| k == "tenant_id")
                .map(|(_, v)| v.clone())
                .unwrap_or_default();
            let mut previous: Option<f64> = None;
            for (i, (t, value)) in series.history.iter().enumerate() {
                let rise = match previous {
                    Some(p) => (value - p).max(0.0),
                    None if i == 0 && series.history.len() < cap => *value,
                    None => 0.0,
                };
                previous = Some(*value);
                if *t >= since {
                    let bucket = ((t / step).floor() * step) as i64;
                    *out.entry(tenant.clone()).or_default().entry(bucket).or_default() += rise;
                }
            }
        }
        Some(out)
    }
}

impl Default for Tracked {
    fn default() -> Self {
        Self::new()
    }
}

/// Writes one sample line.
pub fn sample(out: &mut String, name: &str, labels: &Labels, le: Option<&str>, value: f64) {
    out.push_str(name);
    if !labels.is_empty() || le.is_some() {
        out.push('{');
        let mut first = true;
        for (k, v) in
            labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).chain(le.map(|le| ("le", le)))
        {
            if !first {
                out.push(',');
            }
            first = false;
            let _ = write!(out, "{k}=\"{}\"", escape_label(v));
        }
        out.push('}');
    }
    let _ = writeln!(out, " {}", format_float(value));
}

/// Prometheus float formatting (`+Inf`, `-Inf`, `NaN`).
pub fn format_float(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        v.to_string()
    }
}

/// Label values escape `\`, `"` and newlines.
pub fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Help text escapes `\` and newlines.
pub fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// min, max, average and direction of samples.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Trend {
    /// Samples in the window.
    pub samples: usize,
    /// Smallest.
    pub min: Option<f64>,
    /// Largest.
    pub max: Option<f64>,
    /// Mean.
    pub average: Option<f64>,
    /// `up`, `down` or `flat`: the later half's mean against the earlier half's.
    #[schema(example = "up")]
    pub direction: &'static str,
}

/// Summarises time-ordered samples.
pub fn trend(points: &[(f64, f64)]) -> Trend {
    if points.is_empty() {
        return Trend { samples: 0, min: None, max: None, average: None, direction: "flat" };
    }
    let values: Vec<f64> = points.iter().map(|p| p.1).collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let direction = if values.len() < 2 {
        "flat"
    } else {
        let (early, late) = values.split_at(values.len() / 2);
        let (a, b) = (mean(early), mean(late));
        let tolerance = (max - min).abs() * 0.01;
        if b > a + tolerance {
            "up"
        } else if b < a - tolerance {
            "down"
        } else {
            "flat"
        }
    };
    Trend {
        samples: values.len(),
        min: Some(min),
        max: Some(max),
        average: Some(mean(&values)),
        direction,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_labels: 4,
            max_label_value_length: 8,
            max_series_per_metric: 3,
            max_series: 5,
            buckets: vec![0.1, 1.0],
            history: 10,
        }
    }

    fn point(name: &str, kind: Kind, value: f64, labels: &[(&str, &str)]) -> Point {
        Point {
            name: name.into(),
            value,
            kind,
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            service: None,
            tenant_id: None,
            help: None,
        }
    }

    fn ingest(t: &mut Tracked, p: &Point) -> Result<Accepted, Rejection> {
        let p = &mut p.clone();
        t.ingest(p, 100.0, &limits(), 0, |_| false)
    }

    #[test]
    fn counters_add_gauges_set_histograms_observe() {
        let mut t = Tracked::new();
        ingest(&mut t, &point("jobs", Kind::Counter, 2.0, &[])).unwrap();
        ingest(&mut t, &point("jobs", Kind::Counter, 3.0, &[])).unwrap();
        ingest(&mut t, &point("depth", Kind::Gauge, 7.0, &[])).unwrap();
        ingest(&mut t, &point("depth", Kind::Gauge, 4.0, &[])).unwrap();
        ingest(&mut t, &point("latency_seconds", Kind::Histogram, 0.05, &[])).unwrap();
        ingest(&mut t, &point("latency_seconds", Kind::Histogram, 0.5, &[])).unwrap();
        // The labels' order does not make another series.
        ingest(&mut t, &point("k", Kind::Gauge, 1.0, &[("a", "1"), ("b", "2")])).unwrap();
        ingest(&mut t, &point("k", Kind::Gauge, 2.0, &[("b", "2"), ("a", "1")])).unwrap();
        assert_eq!(t.series_count(), 4);
        let mut out = String::new();
        t.render(&limits().buckets, &mut out);
        assert!(out.contains("# TYPE jobs_total counter\njobs_total 5\n"), "{out}");
        assert!(out.contains("# TYPE depth gauge\ndepth 4\n"), "{out}");
        assert!(out.contains("# TYPE k gauge\nk{a=\"1\",b=\"2\"} 2\n"), "{out}");
        assert!(out.contains("latency_seconds_bucket{le=\"0.1\"} 1\n"), "{out}");
        assert!(out.contains("latency_seconds_bucket{le=\"1\"} 2\n"), "{out}");
        assert!(out.contains("latency_seconds_bucket{le=\"+Inf\"} 2\nlatency_seconds_sum 0.55\nlatency_seconds_count 2\n"), "{out}");
    }

    #[test]
    fn every_guard_has_its_reason() {
        let mut t = Tracked::new();
        let cases = [
            (point("9lives", Kind::Gauge, 1.0, &[]), Rejection::InvalidName),
            (point("a-b", Kind::Gauge, 1.0, &[]), Rejection::InvalidName),
            (point("access_http_requests", Kind::Counter, 1.0, &[]), Rejection::ReservedName),
            (point("g", Kind::Gauge, 1.0, &[("__name__", "x")]), Rejection::InvalidLabel),
            (point("g", Kind::Gauge, 1.0, &[("bad-label", "x")]), Rejection::InvalidLabel),
            (
                point(
                    "g",
                    Kind::Gauge,
                    1.0,
                    &[("a", "1"), ("b", "1"), ("c", "1"), ("d", "1"), ("e", "1")],
                ),
                Rejection::TooManyLabels,
            ),
            (point("g", Kind::Gauge, 1.0, &[("a", "123456789")]), Rejection::LabelValueTooLong),
            (point("g", Kind::Gauge, f64::NAN, &[]), Rejection::InvalidValue),
            (point("c", Kind::Counter, -1.0, &[]), Rejection::InvalidValue),
        ];
        for (p, reason) in cases {
            assert_eq!(ingest(&mut t, &p), Err(reason), "{p:?}");
        }
        ingest(&mut t, &point("x", Kind::Gauge, 1.0, &[])).unwrap();
        assert_eq!(
            ingest(&mut t, &point("x", Kind::Histogram, 1.0, &[])),
            Err(Rejection::TypeConflict)
        );
        assert_eq!(
            t.ingest(&mut point("y", Kind::Gauge, 1.0, &[]), 1.0, &limits(), 0, |n| n == "y"),
            Err(Rejection::TypeConflict)
        );
        assert!(
            ingest(&mut t, &point("access_usage_requests_total", Kind::Counter, 1.0, &[])).is_ok(),
            "usage is allowed"
        );
    }

    /// The names a second metric of type `second` may be given that are the first's (of type
    /// `first`, named `base`) as `base` plus each suffix: the name itself, with `_total` when a
    /// counter is involved, and a histogram's sample names.
    fn suffixes(first: Kind, second: Kind) -> Vec<&'static str> {
        let mut out = vec![""];
        if first == Kind::Counter || second == Kind::Counter {
            out.push("_total");
        }
        if first == Kind::Histogram {
            out.extend(["_bucket", "_sum", "_count"]);
        }
        out
    }

    #[test]
    fn a_name_has_one_type_with_or_without_a_suffix() {
        let kinds = [Kind::Counter, Kind::Gauge, Kind::Histogram];
        let mut case = 0;
        for first in kinds {
            for second in kinds.into_iter().filter(|k| *k != first) {
                for suffix in suffixes(first, second) {
                    case += 1;
                    let mut t = Tracked::new();
                    let base = format!("m{case}");
                    ingest(&mut t, &point(&base, first, 1.0, &[])).unwrap();
                    let name = format!("{base}{suffix}");
                    assert_eq!(
                        ingest(&mut t, &point(&name, second, 1.0, &[])),
                        Err(Rejection::TypeConflict),
                        "{first:?} {base}, then {second:?} {name}"
                    );
                }
            }
        }
        // One counter, with or without `_total`.
        let mut t = Tracked::new();
        ingest(&mut t, &point("jobs", Kind::Counter, 1.0, &[])).unwrap();
        ingest(&mut t, &point("jobs_total", Kind::Counter, 2.0, &[])).unwrap();
        let mut out = String::new();
        t.render(&limits().buckets, &mut out);
        assert!(out.contains("jobs_total 3\n"), "{out}");
        // A pushed group's names count too.
        assert_eq!(
            t.ingest(&mut point("z", Kind::Counter, 1.0, &[]), 1.0, &limits(), 0, |n| n == "z"),
            Err(Rejection::TypeConflict)
        );
    }

    #[test]
    fn excess_series_fold_into_one_overflow_series_and_the_total_is_capped() {
        let mut t = Tracked::new();
        let mut outcomes = Vec::new();
        for i in 0..5 {
            outcomes.push(
                ingest(&mut t, &point("g", Kind::Gauge, 1.0, &[("id", &i.to_string())])).unwrap(),
            );
        }
        assert_eq!(
            outcomes,
            vec![
                Accepted::Stored,
                Accepted::Stored,
                Accepted::Overflowed,
                Accepted::Overflowed,
                Accepted::Overflowed
            ]
        );
        assert_eq!(t.series_count(), 3, "two own series and the overflow series");
        // A series that exists keeps its points, whatever the cap, in its own series.
        assert_eq!(
            ingest(&mut t, &point("g", Kind::Gauge, 7.0, &[("id", "1")])),
            Ok(Accepted::Stored)
        );
        assert_eq!(t.series_count(), 3);
        let mut out = String::new();
        t.render(&[], &mut out);
        assert!(out.contains("g{overflow=\"true\"} 1\n"), "{out}");
        ingest(&mut t, &point("h", Kind::Gauge, 1.0, &[])).unwrap();
        ingest(&mut t, &point("i", Kind::Gauge, 1.0, &[])).unwrap();
        assert_eq!(ingest(&mut t, &point("j", Kind::Gauge, 1.0, &[])), Err(Rejection::SeriesCap));
        assert!(!t.has_family("j"), "a refused family leaves nothing behind");
    }

    #[test]
    fn series_expire_after_their_ttl() {
        let mut t = Tracked::new();
        t.ingest(&mut point("old", Kind::Gauge, 1.0, &[]), 10.0, &limits(), 0, |_| false).unwrap();
        t.ingest(&mut point("new", Kind::Gauge, 1.0, &[]), 100.0, &limits(), 0, |_| false).unwrap();
        assert_eq!(t.expire(50.0), 1);
        assert!(!t.has_family("old") && t.has_family("new"));
        assert_eq!(t.series_count(), 1);
    }

    #[test]
    fn trends_summarise_a_window() {
        let t = trend(&[(1.0, 1.0), (2.0, 2.0), (3.0, 5.0), (4.0, 8.0)]);
        assert_eq!((t.min, t.max, t.average, t.direction), (Some(1.0), Some(8.0), Some(4.0), "up"));
        assert_eq!(trend(&[(1.0, 5.0), (2.0, 1.0)]).direction, "down");
        assert_eq!(trend(&[(1.0, 5.0), (2.0, 5.0)]).direction, "flat");
        assert_eq!(trend(&[]).samples, 0);
    }

    #[test]
    fn label_values_are_escaped() {
        let mut out = String::new();
        sample(&mut out, "m", &vec![("a".into(), "q\"\\\n".into())], None, 1.0);
        assert_eq!(out, "m{a=\"q\\\"\\\\\\n\"} 1\n");
    }
}

//! The metrics role over HTTP: each type's semantics, every guard and its reason, TTL expiry, the
//! Pushgateway round trip, and `promtool check metrics` on the exported text.

use std::time::Duration;

use access::role::Role;
use serde_json::{json, Value};

use crate::support::{config, eventually, http, start, wait_ready, DevKeys, Running};

struct Metrics {
    s: Running,
    service: String,
}

impl Metrics {
    async fn start(keys: &DevKeys, extra: &[(&str, &str)]) -> Metrics {
        let mut env = vec![("ACCESS_AUTH__DEV_KEY_FILE", keys.path.as_str())];
        env.extend_from_slice(extra);
        let s = start(Role::Metrics, config(&env)).await;
        wait_ready(&s.url("")).await;
        Metrics { s, service: keys.token("service:gateway", "platform", &["service"]) }
    }

    async fn track(&self, body: Value) -> (u16, Value) {
        let r = http()
            .post(self.s.url("/metrics/track"))
            .bearer_auth(&self.service)
            .json(&body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    async fn push(&self, method: reqwest::Method, group: &str, text: &str) -> (u16, Value) {
        let r = http()
            .request(method, self.s.url(&format!("/metrics/job/{group}")))
            .bearer_auth(&self.service)
            .body(text.to_string())
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn exposition(&self) -> String {
        http().get(self.s.url("/metrics")).send().await.unwrap().text().await.unwrap()
    }

    async fn get(&self, path: &str) -> Value {
        http()
            .get(self.s.url(path))
            .bearer_auth(&self.service)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

fn promtool_check(text: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus) is installed by tests/services.sh");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n--- text ---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn line_value(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn each_type_has_its_semantics_and_the_output_passes_promtool() {
    let keys = DevKeys::new();
    let m = Metrics::start(&keys, &[]).await;
    for v in [2.0, 3.0] {
        let (status, _) = m.track(json!({"name": "jobs_processed", "type": "counter", "value": v, "labels": {"queue": "prices"}, "service": "loader"})).await;
        assert_eq!(status, 200);
    }
    for v in [7.0, 4.0] {
        m.track(json!({"name": "queue_depth", "type": "gauge", "value": v, "tenant_id": "t1"}))
            .await;
    }
    for v in [0.003, 0.2, 3.0] {
        m.track(json!({"name": "job_duration_seconds", "type": "histogram", "value": v, "help": "How long a job took."})).await;
    }
    let (status, _) = m
        .track(json!({"name": "access_usage_requests_total", "type": "counter", "value": 5, "tenant_id": "t1", "labels": {"route": "prices", "status_class": "2xx"}}))
        .await;
    assert_eq!(status, 200, "usage metrics from the edge are accepted");

    let text = m.exposition().await;
    assert!(text.contains("# TYPE jobs_processed_total counter"), "counters get _total:\n{text}");
    assert_eq!(
        line_value(&text, "jobs_processed_total{queue=\"prices\",service=\"loader\"}"),
        Some(5.0)
    );
    assert_eq!(line_value(&text, "queue_depth{tenant_id=\"t1\"}"), Some(4.0));
    assert_eq!(line_value(&text, "job_duration_seconds_bucket{le=\"0.005\"}"), Some(1.0));
    assert_eq!(line_value(&text, "job_duration_seconds_bucket{le=\"0.25\"}"), Some(2.0));
    assert_eq!(line_value(&text, "job_duration_seconds_bucket{le=\"+Inf\"}"), Some(3.0));
    assert_eq!(line_value(&text, "job_duration_seconds_count"), Some(3.0));
    assert!(text.contains("# HELP job_duration_seconds How long a job took."));
    assert!(
        text.contains("access_build_info{role=\"metrics\""),
        "the role's own metrics come first"
    );
    promtool_check(&text);
}

#[tokio::test]
async fn every_guard_refuses_with_a_reason_and_a_counter() {
    let keys = DevKeys::new();
    let m = Metrics::start(
        &keys,
        &[
            ("ACCESS_METRICS__MAX_LABELS", "3"),
            ("ACCESS_METRICS__MAX_LABEL_VALUE_LENGTH", "10"),
            ("ACCESS_METRICS__MAX_SERIES_PER_METRIC", "3"),
            ("ACCESS_METRICS__MAX_SERIES", "6"),
        ],
    )
    .await;
    let cases = [
        (json!({"name": "bad-name", "type": "gauge", "value": 1}), 422, "invalid_name"),
        (
            json!({"name": "access_http_requests", "type": "counter", "value": 1}),
            422,
            "reserved_name",
        ),
        (
            json!({"name": "g", "type": "gauge", "value": 1, "labels": {"__x": "1"}}),
            422,
            "invalid_label",
        ),
        (
            json!({"name": "g", "type": "gauge", "value": 1, "labels": {"a": "1", "b": "1", "c": "1", "d": "1"}}),
            422,
            "too_many_labels",
        ),
        (
            json!({"name": "g", "type": "gauge", "value": 1, "labels": {"a": "12345678901"}}),
            422,
            "label_value_too_long",
        ),
        (json!({"name": "c", "type": "counter", "value": -1}), 422, "invalid_value"),
    ];
    for (body, status, reason) in cases {
        let (got, v) = m.track(body.clone()).await;
        assert_eq!((got, v["reason"].as_str()), (status, Some(reason)), "{body} -> {v}");
    }
    let (status, v) = m.track(json!({"name": "g", "type": "gauge", "value": "x"})).await;
    assert_eq!(
        (status, v["code"].as_str()),
        (422, Some("validation_failed")),
        "a non-number value"
    );
    m.track(json!({"name": "typed", "type": "gauge", "value": 1})).await;
    let (status, v) = m.track(json!({"name": "typed", "type": "histogram", "value": 1})).await;
    assert_eq!((status, v["reason"].as_str()), (409, Some("type_conflict")));

    // Per-metric limit: the excess folds into one overflow series.
    for i in 0..5 {
        let (status, v) = m.track(json!({"name": "per_user", "type": "gauge", "value": i, "labels": {"user": format!("u{i}")}})).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["overflowed"], i >= 2);
    }
    // Total cap: typed (1) + per_user (3) = 4 of 6.
    m.track(json!({"name": "a", "type": "gauge", "value": 1})).await;
    m.track(json!({"name": "b", "type": "gauge", "value": 1})).await;
    let (status, v) = m.track(json!({"name": "one_too_many", "type": "gauge", "value": 1})).await;
    assert_eq!((status, v["reason"].as_str()), (422, Some("series_cap")), "{v}");

    let text = m.exposition().await;
    assert!(text.contains("per_user{overflow=\"true\"} 4"), "{text}");
    for reason in [
        "invalid_name",
        "reserved_name",
        "invalid_label",
        "too_many_labels",
        "label_value_too_long",
        "invalid_value",
        "type_conflict",
        "series_cap",
    ] {
        let counted = line_value(
            &text,
            &format!("access_metrics_rejected_total{{role=\"metrics\",reason=\"{reason}\"}}"),
        )
        .or_else(|| {
            line_value(
                &text,
                &format!("access_metrics_rejected_total{{reason=\"{reason}\",role=\"metrics\"}}"),
            )
        });
        assert!(counted.is_some_and(|n| n >= 1.0), "no counter for {reason}");
    }
    assert!(line_value(&text, "access_metrics_overflowed_total").is_some_and(|n| n >= 3.0));
    promtool_check(&text);
}

#[tokio::test]
async fn batches_answer_for_each_point() {
    let keys = DevKeys::new();
    let m = Metrics::start(&keys, &[]).await;
    let r = http()
        .post(m.s.url("/metrics/track/batch"))
        .bearer_auth(&m.service)
        .json(&json!([
            {"name": "ok_one", "type": "gauge", "value": 1},
            {"name": "bad name", "type": "gauge", "value": 1},
            {"name": "ok_two", "type": "counter", "value": 2},
            {"nonsense": true}
        ]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!((v["accepted"].as_u64(), v["rejected"].as_u64()), (Some(2), Some(2)));
    let oks: Vec<bool> =
        v["results"].as_array().unwrap().iter().map(|r| r["ok"].as_bool().unwrap()).collect();
    assert_eq!(oks, vec![true, false, true, false]);
    assert_eq!(v["results"][1]["reason"], "invalid_name");
    assert_eq!(v["results"][3]["reason"], "invalid_point");
}

#[tokio::test]
async fn ingest_needs_a_service_token_unless_open() {
    let keys = DevKeys::new();
    let m = Metrics::start(&keys, &[]).await;
    let point = json!({"name": "g", "type": "gauge", "value": 1});
    let r = http().post(m.s.url("/metrics/track")).json(&point).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let user = keys.token("alice", "t1", &["trader"]);
    let r = http()
        .post(m.s.url("/metrics/track"))
        .bearer_auth(&user)
        .json(&point)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = http().put(m.s.url("/metrics/job/nightly")).body("x 1\n").send().await.unwrap();
    assert_eq!(r.status(), 401);

    let open = Metrics::start(&keys, &[("ACCESS_METRICS__OPEN_INGEST", "true")]).await;
    let r = http().post(open.s.url("/metrics/track")).json(&point).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn series_not_pushed_within_the_ttl_are_dropped() {
    let keys = DevKeys::new();
    let m = Metrics::start(&keys, &[("ACCESS_METRICS__SERIES_TTL", "1s")]).await;
    m.track(json!({"name": "short_lived", "type": "gauge", "value": 1})).await;
    m.push(reqwest::Method::PUT, "ephemeral", "pushed_gauge 3\n").await;
    let text = m.exposition().await;
    assert!(
        text.contains("short_lived 1") && text.contains("pushed_gauge{job=\"ephemeral\"} 3"),
        "{text}"
    );
    eventually(Duration::from_secs(4), "both expire", || async {
        let text = m.exposition().await;
        (!text.contains("short_lived") && !text.contains("pushed_gauge")).then_some(())
    })
    .await;
    let text = m.exposition().await;
    assert!(
        line_value(&text, "access_metrics_expired_series_total").is_some_and(|n| n >= 2.0),
        "{text}"
    );
}

#[tokio::test]
async fn the_pushgateway_round_trip() {
    let keys = DevKeys::new();
    let m = Metrics::start(&keys, &[]).await;
    let first = "# HELP rows_loaded_total Rows loaded.\n# TYPE rows_loaded_total counter\nrows_loaded_total{table=\"prices\"} 100\n# TYPE last_run_seconds gauge\nlast_run_seconds 12\n";
    assert_eq!(m.push(reqwest::Method::PUT, "loader/instance/db1", first).await.0, 200);
    let text = m.exposition().await;
    assert_eq!(
        line_value(&text, "rows_loaded_total{instance=\"db1\",job=\"loader\",table=\"prices\"}"),
        Some(100.0),
        "{text}"
    );
    assert_eq!(line_value(&text, "last_run_seconds{instance=\"db1\",job=\"loader\"}"), Some(12.0));
    assert!(line_value(&text, "push_time_seconds{instance=\"db1\",job=\"loader\"}").is_some());
    promtool_check(&text);

    // POST replaces only the families it names; values are absolute, not added.
    assert_eq!(
        m.push(
            reqwest::Method::POST,
            "loader/instance/db1",
            "# TYPE rows_loaded_total counter\nrows_loaded_total{table=\"prices\"} 150\n"
        )
        .await
        .0,
        200
    );
    let text = m.exposition().await;
    assert_eq!(
        line_value(&text, "rows_loaded_total{instance=\"db1\",job=\"loader\",table=\"prices\"}"),
        Some(150.0)
    );
    assert_eq!(
        line_value(&text, "last_run_seconds{instance=\"db1\",job=\"loader\"}"),
        Some(12.0),
        "untouched by POST"
    );

    // PUT replaces the whole group.
    assert_eq!(
        m.push(
            reqwest::Method::PUT,
            "loader/instance/db1",
            "# TYPE rows_loaded_total counter\nrows_loaded_total{table=\"curves\"} 7\n"
        )
        .await
        .0,
        200
    );
    let text = m.exposition().await;
    assert!(!text.contains("last_run_seconds"), "{text}");
    assert!(!text.contains("table=\"prices\""));

    // Kept apart from tracked series, and consistent across groups.
    let (status, v) = m.track(json!({"name": "rows_loaded", "type": "counter", "value": 1})).await;
    assert_eq!((status, v["reason"].as_str()), (409, Some("type_conflict")));
    let (status, v) = m
        .push(
            reqwest::Method::PUT,
            "other",
            "# TYPE rows_loaded_total gauge\nrows_loaded_total 1\n",
        )
        .await;
    assert_eq!((status, v["reason"].as_str()), (409, Some("type_conflict")));
    let (status, v) = m.push(reqwest::Method::PUT, "loader", "broken{ 1\n").await;
    assert_eq!((status, v["code"].as_str()), (400, Some("invalid_request")));
    let (status, v) = m.push(reqwest::Method::PUT, "loader", "m{job=\"not-loader\"} 1\n").await;
    assert_eq!((status, v["reason"].as_str()), (422, Some("invalid_label")));

    let series = m.get("/metrics/series?name=rows_loaded_total").await;
    assert_eq!(series["count"], 1);
    assert_eq!(series["series"][0]["labels"]["instance"], "db1");
    assert!(series["series"][0]["last_push"].as_f64().unwrap() > 0.0);

    let r = http()
        .delete(m.s.url("/metrics/job/loader/instance/db1"))
        .bearer_auth(&m.service)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert!(!m.exposition().await.contains("rows_loaded_total"));
}

#[tokio::test]
async fn series_stats_and_trends() {
    let keys = DevKeys::new();
    let m = Metrics::start(&keys, &[]).await;
    for v in [1.0, 2.0, 6.0, 9.0] {
        m.track(json!({"name": "queue_depth", "type": "gauge", "value": v, "service": "loader", "tenant_id": "t1"})).await;
    }
    m.track(json!({"name": "other", "type": "gauge", "value": 1, "service": "x"})).await;
    let series = m.get("/metrics/series?service=loader").await;
    assert_eq!(series["count"], 1);
    assert_eq!(series["series"][0]["value"], 9.0);
    assert_eq!(m.get("/metrics/series?tenant_id=t1").await["count"], 1);
    let stats = m.get("/metrics/stats").await;
    assert_eq!(stats["series"], 2);
    let trend = m.get("/metrics/trends/queue_depth?window=1m").await;
    assert_eq!(trend["trend"]["min"], 1.0);
    assert_eq!(trend["trend"]["max"], 9.0);
    assert_eq!(trend["trend"]["average"], 4.5);
    assert_eq!(trend["trend"]["direction"], "up");
    let r =
        http().get(m.s.url("/metrics/trends/nope")).bearer_auth(&m.service).send().await.unwrap();
    assert_eq!(r.status(), 404);
}

/// Tracks one point through `/metrics/track` or `/metrics/track/batch`; the refusal's reason, if
/// refused.
async fn track_via(m: &Metrics, batch: bool, point: Value) -> Option<String> {
    if !batch {
        let (status, body) = m.track(point).await;
        return match status {
            200 => None,
            409 => Some(body["reason"].as_str().unwrap_or_default().to_string()),
            other => panic!("HTTP {other}: {body}"),
        };
    }
    let r = http()
        .post(m.s.url("/metrics/track/batch"))
        .bearer_auth(&m.service)
        .json(&json!([point]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    let result = &body["results"][0];
    match result["ok"].as_bool() {
        Some(true) => None,
        _ => Some(result["reason"].as_str().unwrap_or_default().to_string()),
    }
}

/// A name has one type: every pair of types, in both orders, through both ingest paths, with and
/// without a counter's `_total` (and a histogram's sample names) is refused with `type_conflict`,
/// and only the first type is exported. A counter is the same counter with or without `_total`.
#[tokio::test]
async fn one_name_has_one_type_whatever_the_order_path_or_suffix() {
    let keys = DevKeys::new();
    let m = Metrics::start(&keys, &[]).await;
    let kinds = ["counter", "gauge", "histogram"];
    let mut case = 0;
    for first in kinds {
        for second in kinds.into_iter().filter(|k| *k != first) {
            for batch in [false, true] {
                // The name itself; with `_total` when a counter is involved; a histogram's
                // sample names.
                let mut seconds = vec![""];
                if first == "counter" || second == "counter" {
                    seconds.push("_total");
                }
                if first == "histogram" {
                    seconds.extend(["_sum", "_count", "_bucket"]);
                }
                for suffix in seconds {
                    case += 1;
                    let base = format!("jobs_{case}");
                    let point =
                        |name: &str, kind: &str| json!({"name": name, "type": kind, "value": 1});
                    assert_eq!(track_via(&m, batch, point(&base, first)).await, None);
                    let second_name = format!("{base}{suffix}");
                    assert_eq!(
                        track_via(&m, batch, point(&second_name, second)).await.as_deref(),
                        Some("type_conflict"),
                        "{first} {base} then {second} {second_name} (batch: {batch})"
                    );
                    let text = m.exposition().await;
                    let names: Vec<String> = ["", "_total", "_sum", "_count", "_bucket"]
                        .iter()
                        .map(|s| format!("{base}{s}"))
                        .collect();
                    let types: Vec<&str> = text
                        .lines()
                        .filter(|l| {
                            l.strip_prefix("# TYPE ")
                                .and_then(|l| l.split(' ').next())
                                .is_some_and(|name| names.iter().any(|n| n == name))
                        })
                        .collect();
                    assert_eq!(types.len(), 1, "one family for {base}: {types:?}");
                    assert!(types[0].ends_with(&format!(" {first}")), "{types:?}");
                }
            }
        }
    }
    // A counter tracked as `done` and as `done_total` is one counter.
    for name in ["done", "done_total"] {
        assert_eq!(
            track_via(&m, false, json!({"name": name, "type": "counter", "value": 2})).await,
            None
        );
    }
    let text = m.exposition().await;
    assert_eq!(line_value(&text, "done_total "), Some(4.0), "{text}");
    promtool_check(&text);
}

use super::*;

#[test]
fn visibility_filters_series() {
    let m = Metrics::new();
    m.record_request(vec![
        ("route".into(), "/v1/embeddings".into()),
        ("tenant".into(), "acme".into()),
    ]);
    m.record_request(vec![
        ("route".into(), "/v1/embeddings".into()),
        ("tenant".into(), "acme-2".into()),
    ]);
    let all = m.encode_visible(&Visibility::All);
    assert!(all.contains("tenant=\"acme\"") && all.contains("tenant=\"acme-2\""));
    let acme = m.encode_visible(&Visibility::Matching(vec![(
        "tenant".into(),
        "acme".into(),
    )]));
    assert!(acme.contains("tenant=\"acme\""), "{acme}");
    assert!(!acme.contains("acme-2"), "{acme}");
    let none = m.encode_visible(&Visibility::Nothing);
    assert!(none.lines().all(|l| l.starts_with('#')), "{none}");
    assert!(none.contains("# TYPE warden_requests counter"), "{none}");
}

#[test]
fn label_values_are_escaped_in_both_formats() {
    let m = Metrics::new();
    let forged = "x\"} 1\nwarden_forged_total 424242\n# x";
    m.record_request(vec![
        ("route".into(), "/v1/models".into()),
        ("tenant".into(), forged.into()),
    ]);
    m.model_loaded("a\\b\"c");
    let openmetrics = m.encode();
    for text in [openmetrics.clone(), to_prometheus_text(&openmetrics)] {
        assert!(
            !text.lines().any(|l| l.starts_with("warden_forged")),
            "{text}"
        );
        assert!(
            text.contains(r#"tenant="x\"} 1\nwarden_forged_total 424242\n# x""#),
            "{text}"
        );
        assert!(text.contains(r#"model="a\\b\"c""#), "{text}");
    }
    // Visibility matches the value itself, escapes and all, and nothing that merely
    // contains it.
    let only = m.encode_visible(&Visibility::Matching(vec![(
        "tenant".into(),
        forged.into(),
    )]));
    assert_eq!(
        only.lines().filter(|l| !l.starts_with('#')).count(),
        1,
        "{only}"
    );
    let x = m.encode_visible(&Visibility::Matching(vec![("tenant".into(), "x".into())]));
    assert!(x.lines().all(|l| l.starts_with('#')), "{x}");
}

#[test]
fn sample_labels_are_parsed_with_their_escapes() {
    assert_eq!(
        sample_labels("m{a=\"1\",b=\"x\\\"}\\\\y\\nz\"} 3"),
        Some(vec![
            ("a", "1".to_string()),
            ("b", "x\"}\\y\nz".to_string())
        ])
    );
    assert_eq!(sample_labels("m 3"), None);
    assert_eq!(sample_labels(r#"m{a="unterminated} 3"#), None);
    assert_eq!(sample_labels("m{} 3"), Some(vec![]));
}

#[test]
fn per_model_and_per_plugin_counters_start_at_zero() {
    let m = Metrics::new();
    m.model_loaded("m");
    m.plugin_live(Slot::Auth, "auth-api-key");
    let text = m.encode();
    assert!(
        text.contains(r#"warden_engine_errors_total{model="m"} 0"#),
        "{text}"
    );
    assert!(
        text.contains(r#"warden_queue_timeouts_total{model="m"} 0"#),
        "{text}"
    );
    for kind in crate::plugins::FaultKind::ALL {
        let line = format!(
            r#"warden_plugin_faults_total{{slot="auth",plugin="auth-api-key",kind="{}"}} 0"#,
            kind.as_str()
        );
        assert!(text.contains(&line), "{line} in {text}");
    }
}

#[test]
fn label_sets_are_capped() {
    let m = Metrics::new();
    for i in 0..MAX_LABEL_SETS + 50 {
        m.record_request(vec![("tenant".into(), format!("t{i}"))]);
    }
    assert_eq!(m.label_sets.lock().unwrap().len(), MAX_LABEL_SETS);
    let text = m.encode();
    assert!(
        text.contains("warden_requests_total{overflow=\"true\"} 50"),
        "{text}"
    );
}

#[test]
fn faults_are_counted() {
    let m = Metrics::new();
    let f = Fault {
        slot: crate::plugins::Slot::Sanitizer,
        plugin: "p".into(),
        kind: crate::plugins::FaultKind::Deadline,
    };
    m.fault(&f);
    m.fault(&f);
    assert_eq!(m.fault_count("sanitizer", "deadline"), 2);
    assert_eq!(m.fault_count("auth", "deadline"), 0);
}

#[test]
fn a_stream_is_counted_while_open_and_timed_when_closed() {
    let m = Arc::new(Metrics::new());
    let guard = m.stream_opened("m");
    assert_eq!(m.streams_in_flight(), 1);
    assert!(!m.encode().contains("warden_stream_duration_seconds_count"));
    drop(guard);
    assert_eq!(m.streams_in_flight(), 0);
    let text = m.encode();
    assert!(
        text.contains("warden_stream_duration_seconds_count{model=\"m\"} 1"),
        "{text}"
    );
}

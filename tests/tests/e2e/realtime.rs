//! The Realtime API over WebSocket (`/v1/realtime`), with a real WebSocket client: the
//! upgrade decided as HTTP is, a two-turn text conversation with streamed deltas, the
//! sanitizer on items, every bad event answered with an `error` event, and a shutdown that
//! lets a response finish and then closes with 1001.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use warden_tests::{INFERENCE_KEY, METRICS_KEY, TestServer, config, start};

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

const MODEL: &str = "SmolLM2-135M-Instruct";

async fn connect(t: &TestServer, key: Option<&str>, model: &str) -> Result<Socket, WsError> {
    let url = format!(
        "{}/v1/realtime?model={model}",
        t.base.replace("http://", "ws://")
    );
    let mut request = url.into_client_request().unwrap();
    if let Some(key) = key {
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {key}").parse().unwrap());
    }
    tokio_tungstenite::connect_async(request)
        .await
        .map(|(socket, _)| socket)
}

async fn send(ws: &mut Socket, event: Value) {
    ws.send(Message::text(event.to_string())).await.unwrap();
}

/// The next server event (pings skipped), within ten seconds.
async fn next(ws: &mut Socket) -> Value {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("an event in time")
            .expect("the socket is open")
            .expect("a frame");
        match m {
            Message::Text(text) => return serde_json::from_str(&text).unwrap(),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("not an event: {other:?}"),
        }
    }
}

/// Events up to and including the next of `kind`.
async fn until(ws: &mut Socket, kind: &str) -> Vec<Value> {
    let mut events = Vec::new();
    loop {
        let e = next(ws).await;
        let done = e["type"] == kind;
        events.push(e);
        if done {
            return events;
        }
    }
}

/// Add a user message; returns its `conversation.item.created`, after checking that the
/// GA protocol's `conversation.item.added` and `.done` follow it for the same item.
async fn add(ws: &mut Socket, text: &str) -> Value {
    send(ws, user(text)).await;
    let created = next(ws).await;
    assert_eq!(created["type"], "conversation.item.created", "{created}");
    for kind in ["conversation.item.added", "conversation.item.done"] {
        let e = next(ws).await;
        assert_eq!(e["type"], kind, "{e}");
        assert_eq!(e["item"], created["item"], "{e}");
    }
    created
}

fn user(text: &str) -> Value {
    json!({"type": "conversation.item.create", "item": {"type": "message", "role": "user",
           "content": [{"type": "input_text", "text": text}]}})
}

/// One response: its deltas joined, and its `response.done`.
async fn respond(ws: &mut Socket, max_tokens: u32) -> (String, Value) {
    send(
        ws,
        json!({"type": "response.create", "response": {"max_output_tokens": max_tokens}}),
    )
    .await;
    let events = until(ws, "response.done").await;
    assert_eq!(events[0]["type"], "response.created", "{events:?}");
    // The GA protocol's frame around the deltas, in order, all about one item.
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .filter(|k| *k != "response.output_text.delta")
        .collect();
    assert_eq!(
        kinds,
        [
            "response.created",
            "response.output_item.added",
            "conversation.item.added",
            "response.content_part.added",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "conversation.item.done",
            "response.done",
        ],
        "{events:?}"
    );
    let item_id = &events[1]["item"]["id"];
    assert!(
        events
            .iter()
            .filter_map(|e| e.get("item_id").or(e.get("item").map(|i| &i["id"])))
            .all(|id| id == item_id),
        "{events:?}"
    );
    assert_eq!(
        events.last().unwrap()["response"]["output"][0]["id"],
        *item_id
    );
    let deltas: String = events
        .iter()
        .filter(|e| e["type"] == "response.output_text.delta")
        .map(|e| e["delta"].as_str().unwrap())
        .collect();
    let done_text = events
        .iter()
        .find(|e| e["type"] == "response.output_text.done")
        .map(|e| e["text"].as_str().unwrap().to_string());
    assert_eq!(done_text.as_deref(), Some(deltas.as_str()), "{events:?}");
    (deltas, events.last().unwrap().clone())
}

#[tokio::test]
async fn a_two_turn_conversation_streams_and_remembers() {
    let t = start(config()).await;
    let mut ws = connect(&t, Some(INFERENCE_KEY), MODEL).await.unwrap();
    let created = next(&mut ws).await;
    assert_eq!(created["type"], "session.created");
    assert_eq!(created["session"]["model"], MODEL);

    send(
        &mut ws,
        json!({"type": "session.update", "session": {"instructions": "Answer in a few words.",
               "temperature": 0}}),
    )
    .await;
    let updated = next(&mut ws).await;
    assert_eq!(updated["type"], "session.updated");
    assert_eq!(updated["session"]["instructions"], "Answer in a few words.");

    add(&mut ws, "What is the capital of France?").await;
    let (first, done) = respond(&mut ws, 8).await;
    assert!(!first.is_empty());
    let response = &done["response"];
    assert!(
        ["completed", "incomplete"].contains(&response["status"].as_str().unwrap()),
        "{done}"
    );
    assert_eq!(response["output"][0]["content"][0]["text"], first.as_str());
    let first_input = response["usage"]["input_tokens"].as_u64().unwrap();
    assert!(response["usage"]["output_tokens"].as_u64().unwrap() > 0);

    // The second turn sees the first: its prompt holds the answer too.
    add(&mut ws, "And of Italy?").await;
    let (second, done) = respond(&mut ws, 8).await;
    assert!(!second.is_empty());
    let second_input = done["response"]["usage"]["input_tokens"].as_u64().unwrap();
    assert!(
        second_input > first_input,
        "{second_input} <= {first_input}"
    );
    // And it did not compute the first turn again: the conversation's cache was kept.
    let cached = done["response"]["usage"]["input_token_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(cached >= first_input, "{cached} < {first_input}: {done}");

    // The sanitizer checks items before they join: an address is redacted, a control
    // character refused.
    let item = add(&mut ws, "mail bob@example.com please").await;
    let text = item["item"]["content"][0]["text"].as_str().unwrap();
    assert!(!text.contains("bob@example.com"), "{item}");
    send(&mut ws, user("a\u{7}b")).await;
    let refused = next(&mut ws).await;
    assert_eq!(refused["type"], "error", "{refused}");
    ws.close(None).await.unwrap();
    t.server.shutdown().await;
}

#[tokio::test]
async fn every_bad_event_is_an_error_event_and_the_session_goes_on() {
    let t = start(config()).await;
    let mut ws = connect(&t, Some(INFERENCE_KEY), MODEL).await.unwrap();
    assert_eq!(next(&mut ws).await["type"], "session.created");
    for (frame, code) in [
        (Message::text("{not json"), "invalid_json"),
        (
            Message::text(r#"{"type": "input_audio_buffer.append", "event_id": "c7"}"#),
            "unknown_event_type",
        ),
        (Message::binary(vec![1u8, 2, 3]), "binary_not_supported"),
        (
            Message::text(r#"{"type": "conversation.item.delete", "item_id": "nope"}"#),
            "item_not_found",
        ),
        (
            Message::text(r#"{"type": "response.cancel"}"#),
            "response_cancel_not_active",
        ),
    ] {
        ws.send(frame).await.unwrap();
        let e = next(&mut ws).await;
        assert_eq!(e["type"], "error", "{e}");
        assert_eq!(e["error"]["code"], code, "{e}");
        if code == "unknown_event_type" {
            assert_eq!(e["error"]["event_id"], "c7");
        }
    }
    // An event over 1 MiB is too large to read past: said, then closed with 1009.
    let mut big = connect(&t, Some(INFERENCE_KEY), MODEL).await.unwrap();
    assert_eq!(next(&mut big).await["type"], "session.created");
    let huge = user(&"x".repeat(1 << 20)).to_string();
    big.send(Message::text(huge)).await.unwrap();
    let e = next(&mut big).await;
    assert_eq!(e["error"]["code"], "event_too_large", "{e}");
    assert_eq!(close_code(&mut big).await, CloseCode::Size);

    // A response while one runs is refused; the running one can be cancelled.
    add(&mut ws, "Count from one to one hundred.").await;
    send(
        &mut ws,
        json!({"type": "response.create", "response": {"max_output_tokens": 200}}),
    )
    .await;
    assert_eq!(next(&mut ws).await["type"], "response.created");
    send(&mut ws, json!({"type": "response.create"})).await;
    let events = until(&mut ws, "error").await;
    assert_eq!(
        events.last().unwrap()["error"]["code"],
        "conversation_already_has_active_response"
    );
    // An item may come while the response runs: it joins after the response's own item.
    let answer = events
        .iter()
        .find(|e| e["type"] == "response.output_item.added")
        .map(|e| e["item"]["id"].clone())
        .expect("the response's item");
    send(&mut ws, user("Meanwhile, one more question.")).await;
    let created = until(&mut ws, "conversation.item.created").await;
    assert_eq!(
        created.last().unwrap()["previous_item_id"],
        answer,
        "{created:?}"
    );
    send(&mut ws, json!({"type": "response.cancel"})).await;
    let done = until(&mut ws, "response.done").await;
    assert_eq!(done.last().unwrap()["response"]["status"], "cancelled");
    // And the session still answers.
    let (text, _) = respond(&mut ws, 4).await;
    assert!(!text.is_empty());
    t.server.shutdown().await;
}

#[tokio::test]
async fn the_upgrade_is_decided_as_http_is() {
    let t = start(config()).await;
    for (key, model, status) in [
        (None, MODEL, 401),
        (Some("wrong-key-0123456789"), MODEL, 401),
        (Some(METRICS_KEY), MODEL, 403),
        (Some(INFERENCE_KEY), "no-such-model", 404),
    ] {
        match connect(&t, key, model).await {
            Err(WsError::Http(response)) => {
                assert_eq!(response.status().as_u16(), status, "{key:?} {model}");
            }
            other => panic!("{key:?} {model}: upgraded: {:?}", other.is_ok()),
        }
    }
    // Without upgrade headers: 426 with an error body.
    let r = t.get("/v1/realtime?model=x", Some(INFERENCE_KEY)).await;
    assert_eq!(r.error(426)["code"], "upgrade_required");
    assert!(r.headers.contains_key("x-request-id"));
    t.server.shutdown().await;
}

#[tokio::test]
async fn shutdown_finishes_the_response_then_closes_with_going_away() {
    let t = start(config()).await;
    let mut ws = connect(&t, Some(INFERENCE_KEY), MODEL).await.unwrap();
    assert_eq!(next(&mut ws).await["type"], "session.created");
    add(&mut ws, "Tell me about the sea.").await;
    send(
        &mut ws,
        json!({"type": "response.create", "response": {"max_output_tokens": 24}}),
    )
    .await;
    assert_eq!(next(&mut ws).await["type"], "response.created");
    let registry = t.server.state().connections.clone();
    assert_eq!(registry.open(), 1);
    let server = t.server;
    let stopping = tokio::spawn(server.shutdown());
    // The response in progress finishes whole.
    let events = until(&mut ws, "response.done").await;
    assert_ne!(
        events.last().unwrap()["response"]["status"],
        "cancelled",
        "{events:?}"
    );
    // Then the server says it is going away: a final event, then the close frame, and the
    // handshake completes.
    let last = next(&mut ws).await;
    assert_eq!(last["type"], "error", "{last}");
    assert_eq!(last["error"]["code"], "server_shutting_down", "{last}");
    let close = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("a close in time");
    match close {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Away),
        other => panic!("not a close frame: {other:?}"),
    }
    let _ = ws.close(None).await;
    tokio::time::timeout(Duration::from_secs(30), stopping)
        .await
        .expect("the server stops")
        .unwrap();
    assert_eq!(registry.open(), 0);
}

/// The value of the series `name` (a whole line's name, labels included) in `/v1/metrics`.
async fn metric(t: &TestServer, name: &str) -> f64 {
    let r = t.get("/v1/metrics", Some(METRICS_KEY)).await;
    r.text
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {}", r.text))
}

/// Waits, bounded, until `name` reads `value`.
async fn metric_reaches(t: &TestServer, name: &str, value: f64) {
    for _ in 0..100 {
        if metric(t, name).await == value {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{name} never reached {value}: {}", metric(t, name).await);
}

/// The next frame, which must be a close frame, within ten seconds (events before it are
/// skipped).
async fn close_code(ws: &mut Socket) -> CloseCode {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a close in time");
        match m {
            Some(Ok(Message::Close(Some(frame)))) => return frame.code,
            Some(Ok(Message::Text(_) | Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("not a close frame: {other:?}"),
        }
    }
}

#[tokio::test]
async fn the_registry_limits_counts_and_revokes() {
    let mut config = config();
    config.realtime.max_connections_per_principal = 2;
    let t = start(config).await;
    let mut first = connect(&t, Some(INFERENCE_KEY), MODEL).await.unwrap();
    let mut second = connect(&t, Some(INFERENCE_KEY), MODEL).await.unwrap();
    for ws in [&mut first, &mut second] {
        assert_eq!(next(ws).await["type"], "session.created");
    }
    // A third for the same principal is refused before the upgrade, with a clear body.
    let url = format!("{}/v1/realtime?model={MODEL}", t.base);
    let r = t
        .send(
            t.client
                .get(&url)
                .bearer_auth(INFERENCE_KEY)
                .header("connection", "upgrade")
                .header("upgrade", "websocket")
                .header("sec-websocket-version", "13")
                .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        )
        .await;
    assert_eq!(r.error(429)["code"], "too_many_connections");
    assert!(r.headers.contains_key("retry-after"));

    // The registry's metrics.
    assert_eq!(metric(&t, "warden_realtime_connections").await, 2.0);
    send(&mut first, json!({"type": "session.update", "session": {}})).await;
    assert_eq!(next(&mut first).await["type"], "session.updated");
    assert!(metric(&t, r#"warden_realtime_events_total{direction="in"}"#).await >= 1.0);
    assert!(metric(&t, r#"warden_realtime_events_total{direction="out"}"#).await >= 3.0);
    second.close(None).await.unwrap();
    metric_reaches(&t, r#"warden_realtime_closes_total{reason="client"}"#, 1.0).await;
    metric_reaches(&t, "warden_realtime_connections", 1.0).await;

    // An auth plugin that faults: the event is refused (fail closed) but the session
    // stays; the next event, once the auth plugin answers again, is served.
    let plugins = &t.server.state().services().unwrap().plugins;
    let auth =
        |config: Value| warden_tests::source(warden::plugins::Slot::Auth, "auth-api-key", config);
    plugins
        .replace(&warden_tests::source(
            warden::plugins::Slot::Auth,
            "misbehave",
            json!({"mode": "trap", "spare_smoke": true}),
        ))
        .unwrap();
    send(&mut first, json!({"type": "session.update", "session": {}})).await;
    let refused = next(&mut first).await;
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["error"]["code"], "policy_unavailable", "{refused}");
    let keys = warden::keys::auth_plugin_config(&warden_tests::config()).unwrap();
    plugins
        .replace(&auth(serde_json::from_str(&keys).unwrap()))
        .unwrap();
    send(&mut first, json!({"type": "session.update", "session": {}})).await;
    assert_eq!(next(&mut first).await["type"], "session.updated");

    // An auth plugin that no longer knows the key: the session's next event is refused
    // and the session closed, not left open on credentials that were revoked.
    let other = "another-key-0123456789abcdef";
    plugins
        .replace(&auth(warden_tests::auth_keys(&[
            ("other", other, &["inference"]),
            ("scraper", METRICS_KEY, &["metrics"]),
        ])))
        .unwrap();
    send(&mut first, json!({"type": "session.update", "session": {}})).await;
    let refused = next(&mut first).await;
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["error"]["code"], "invalid_api_key", "{refused}");
    assert_eq!(close_code(&mut first).await, CloseCode::from(4001));
    metric_reaches(
        &t,
        r#"warden_realtime_closes_total{reason="unauthorized"}"#,
        1.0,
    )
    .await;
    metric_reaches(&t, "warden_realtime_connections", 0.0).await;
    // The new key is accepted.
    let mut third = connect(&t, Some(other), MODEL).await.unwrap();
    assert_eq!(next(&mut third).await["type"], "session.created");
    t.server.shutdown().await;
}

#[tokio::test]
async fn slow_readers_and_idle_sessions_are_closed() {
    let mut config = config();
    config.realtime.max_queued_events = 16;
    config.realtime.idle_timeout_secs = 3;
    config.realtime.ping_interval_secs = 1;
    let t = start(config).await;

    // A client that sends and never reads: once the kernel's buffers and the session's
    // 16 queued events are full, the session closes it (1008) instead of buffering.
    let ws = connect(&t, Some(INFERENCE_KEY), MODEL).await.unwrap();
    let (mut sink, mut stream) = ws.split();
    let update = json!({"type": "session.update",
        "session": {"instructions": "x".repeat(4000)}})
    .to_string();
    let writer = tokio::spawn(async move {
        for _ in 0..20_000 {
            if sink.send(Message::text(update.clone())).await.is_err() {
                break;
            }
        }
    });
    metric_reaches(
        &t,
        r#"warden_realtime_closes_total{reason="slow_reader"}"#,
        1.0,
    )
    .await;
    // Read now: what was sent, then the close frame that says why.
    let mut code = None;
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(10), stream.next()).await {
        if let Message::Close(frame) = m {
            code = frame.map(|f| f.code);
            break;
        }
    }
    assert_eq!(code, Some(CloseCode::Policy));
    writer.abort();
    metric_reaches(&t, "warden_realtime_connections", 0.0).await;

    // A session with no event for the idle timeout is closed normally. It is pinged every
    // second meanwhile, and the pongs its client's library sends do not count as events.
    let mut ws = connect(&t, Some(INFERENCE_KEY), MODEL).await.unwrap();
    assert_eq!(next(&mut ws).await["type"], "session.created");
    let mut pings = 0;
    let code = loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Ping(_)))) => pings += 1,
            Ok(Some(Ok(Message::Close(Some(frame))))) => break frame.code,
            other => panic!("not a ping or a close: {other:?}"),
        }
    };
    assert_eq!(code, CloseCode::Normal);
    assert!(pings >= 1, "no ping in {pings}");
    metric_reaches(&t, r#"warden_realtime_closes_total{reason="idle"}"#, 1.0).await;
    t.server.shutdown().await;
}

/// A response's text through the output filter: an address the model writes, over several
/// deltas, never reaches the client, in the deltas or in the done text.
#[tokio::test]
async fn addresses_the_model_writes_are_redacted_across_deltas() {
    let all_off = json!({"email": "off", "phone": "off", "card": "off", "ssn": "off"});
    let sanitizer = |output: Value| {
        let mut c = config();
        c.plugins.sanitizer.config = json!({"input": all_off, "output": output})
            .as_object()
            .unwrap()
            .clone();
        c
    };
    let ask = "Repeat these lines exactly:\nTo: alice@example.com\nTo: bob@example.com\n\
               To: carol@example.com";
    let run = |t: TestServer| async move {
        let mut ws = connect(&t, Some(INFERENCE_KEY), MODEL).await.unwrap();
        assert_eq!(next(&mut ws).await["type"], "session.created");
        send(
            &mut ws,
            json!({"type": "session.update", "session": {"temperature": 0}}),
        )
        .await;
        next(&mut ws).await;
        add(&mut ws, ask).await;
        send(
            &mut ws,
            json!({"type": "response.create", "response": {"max_output_tokens": 40}}),
        )
        .await;
        let events = until(&mut ws, "response.done").await;
        t.server.shutdown().await;
        let deltas: Vec<String> = events
            .iter()
            .filter(|e| e["type"] == "response.output_text.delta")
            .map(|e| e["delta"].as_str().unwrap().to_string())
            .collect();
        let done = events
            .iter()
            .find(|e| e["type"] == "response.output_text.done")
            .map(|e| e["text"].as_str().unwrap().to_string())
            .unwrap();
        (deltas, done)
    };
    // Unfiltered, the model writes the addresses, each over several deltas.
    let (raw, raw_text) = run(start(sanitizer(all_off.clone())).await).await;
    let addresses = raw_text.matches("@example.com").count();
    assert!(addresses >= 2, "{raw_text:?}");
    let pieces = raw
        .iter()
        .filter(|d| d.contains('@') || d.contains("example"))
        .count();
    assert!(pieces >= 2, "addresses arrive across deltas: {raw:?}");

    // With the output filter: redacted in the deltas and the done text alike.
    let (deltas, text) = run(start(sanitizer(json!({}))).await).await;
    assert_eq!(deltas.concat(), text);
    assert!(!text.contains("@example"), "{text:?}");
    assert_eq!(text.matches("[EMAIL]").count(), addresses, "{text:?}");
    for d in &deltas {
        assert!(!d.contains("@example"), "{d:?}");
    }
}

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

    send(&mut ws, user("What is the capital of France?")).await;
    let item = next(&mut ws).await;
    assert_eq!(item["type"], "conversation.item.created", "{item}");
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
    send(&mut ws, user("And of Italy?")).await;
    assert_eq!(next(&mut ws).await["type"], "conversation.item.created");
    let (second, done) = respond(&mut ws, 8).await;
    assert!(!second.is_empty());
    let second_input = done["response"]["usage"]["input_tokens"].as_u64().unwrap();
    assert!(
        second_input > first_input,
        "{second_input} <= {first_input}"
    );

    // The sanitizer checks items before they join: an address is redacted, a control
    // character refused.
    send(&mut ws, user("mail bob@example.com please")).await;
    let item = next(&mut ws).await;
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
    // A response while one runs is refused; the running one can be cancelled.
    send(&mut ws, user("Count from one to one hundred.")).await;
    assert_eq!(next(&mut ws).await["type"], "conversation.item.created");
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
    send(&mut ws, user("Tell me about the sea.")).await;
    assert_eq!(next(&mut ws).await["type"], "conversation.item.created");
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
    // Then the server says it is going away, and the handshake completes.
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

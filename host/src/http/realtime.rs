//! `GET /v1/realtime?model=…`: the OpenAI Realtime API over WebSocket, for text.
//!
//! The upgrade is decided as any HTTP request is: the auth plugin and the `inference`
//! scope (401/403 before any upgrade), the model, the server's phase and the connection
//! registry's limits (429 before any upgrade). A session then lives in its connection
//! ([`realtime::Session`]); every item is checked by the sanitizer before it joins the
//! conversation, and every response is a generation through [`app::Admitted::generate`] with
//! the plugins current when it starts (a swap applies to the next event, never half-way
//! through one), its text through the output filter, recorded under the metrics policy's
//! labels. Events to the client wait in a bounded queue: a reader too slow to keep up is
//! closed (1008), not buffered for. On shutdown a session finishes its response in
//! progress, then closes with 1001 (going away); once the grace period is over the
//! response is cut short first.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use warp::filters::ws::{Message, WebSocket, Ws};
use warp::reply::{Reply, Response};

use crate::AppState;
use crate::app::connections::{Full, Guard};
use crate::app::realtime::{self, ClientEvent, EventError, Item, Role, Session, Settings};
use crate::app::{self, Phase, Step};
use crate::error::ApiError;
use crate::plugins::{ChatMessage, Principal, RequestMeta};

const ROUTE: &str = "/v1/realtime";
/// A session with no client event for this long is closed (1000).
const IDLE: Duration = Duration::from_secs(300);
/// How often the server pings a session.
const PING: Duration = Duration::from_secs(30);
/// Events queued for a client; a client this far behind is closed (1008).
const QUEUE: usize = 1024;
/// How long a closing session waits for the client's close frame.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Decide the upgrade, then hand the socket to a session. Every answer, the upgrade
/// included, carries `x-request-id`, as on every other route.
pub async fn upgrade(
    state: Arc<AppState>,
    meta: RequestMeta,
    query: HashMap<String, String>,
    ws: Option<Ws>,
) -> Response {
    let request_id = meta.request_id.clone();
    let response = decide(state, meta, query, ws).await;
    super::handlers::with_request_id(response, &request_id)
}

async fn decide(
    state: Arc<AppState>,
    meta: RequestMeta,
    query: HashMap<String, String>,
    ws: Option<Ws>,
) -> Response {
    let request_id = meta.request_id.clone();
    let flow = match app::Flow::begin(&state, request_id, ROUTE) {
        Ok(flow) => flow,
        Err(e) => return e.into_response(),
    };
    let admitted = match flow.admit(meta.clone(), "inference").await {
        Ok(a) => a,
        Err(e) => {
            let status = e.status().as_u16();
            flow.finish(status, None, None).await;
            return e.into_response();
        }
    };
    let tenant = admitted.principal.tenant.clone();
    let decided = (|| {
        if state.phase() != Phase::Serving {
            return Err(ApiError::ShuttingDown);
        }
        let ws = ws.ok_or(ApiError::UpgradeRequired)?;
        let name = query
            .get("model")
            .ok_or_else(|| ApiError::bad("model", "name the model: /v1/realtime?model=…"))?;
        let model = admitted.text_model(Some(name))?.id.clone();
        let guard = state
            .connections
            .admit(&admitted.principal.id)
            .map_err(|full| ApiError::TooManyConnections {
                per_principal: full == Full::Principal,
            })?;
        Ok((ws, model, guard))
    })();
    match decided {
        Err(e) => {
            flow.finish(e.status().as_u16(), None, tenant).await;
            e.into_response()
        }
        Ok((ws, model, guard)) => {
            flow.finish(101, Some(model.clone()), tenant).await;
            let principal = admitted.principal.clone();
            ws.max_message_size(realtime::MAX_EVENT_BYTES)
                .max_frame_size(realtime::MAX_EVENT_BYTES)
                .on_upgrade(move |socket| {
                    let session = Connection::new(state, meta, principal, model, guard);
                    session.run(socket)
                })
                .into_response()
        }
    }
}

/// How a response ended, for `response.done`.
struct Finished {
    status: &'static str,
    text: String,
    usage: Option<(usize, usize)>,
    error: Option<Value>,
    /// The client did not read the deltas in time: the session closes it (1008).
    slow: bool,
}

/// One session and its connection's plumbing.
struct Connection {
    state: Arc<AppState>,
    meta: RequestMeta,
    principal: Principal,
    session: Session,
    out: mpsc::Sender<Message>,
    queue: Option<mpsc::Receiver<Message>>,
    /// Set when the client fell [`QUEUE`] events behind.
    overflowed: bool,
    _guard: Guard,
}

impl Connection {
    fn new(
        state: Arc<AppState>,
        meta: RequestMeta,
        principal: Principal,
        model: String,
        guard: Guard,
    ) -> Self {
        let (out, queue) = mpsc::channel(QUEUE);
        let id: String = meta
            .request_id
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(24)
            .collect();
        Self {
            state,
            meta,
            principal,
            session: Session::new(format!("sess_{id}"), model),
            out,
            queue: Some(queue),
            overflowed: false,
            _guard: guard,
        }
    }

    /// Queue a server event; a full queue marks the client as too slow.
    fn send(&mut self, kind: &str, mut fields: Value) {
        fields["type"] = json!(kind);
        fields["event_id"] = json!(self.session.new_id("event"));
        if self
            .out
            .try_send(Message::text(fields.to_string()))
            .is_err()
        {
            self.overflowed = true;
        }
    }

    fn refuse(&mut self, e: &EventError) {
        let event = realtime::error_event(self.session.new_id("event"), e);
        if self.out.try_send(Message::text(event.to_string())).is_err() {
            self.overflowed = true;
        }
    }

    fn refuse_api(&mut self, event_id: Option<String>, e: &ApiError) {
        let body = e.body();
        let error = &body["error"];
        let code: &'static str = match error["code"].as_str() {
            Some("invalid_api_key" | "missing_api_key") => "unauthorized",
            _ => "request_refused",
        };
        let mut event = realtime::error_event(
            self.session.new_id("event"),
            &EventError {
                code,
                message: error["message"].as_str().unwrap_or_default().to_string(),
                param: error["param"].as_str().map(str::to_string),
                event_id,
            },
        );
        // The API's own code (a sanitizer's refusal code, `context_length_exceeded`…).
        event["error"]["code"] = error["code"].clone();
        event["error"]["type"] = error["type"].clone();
        if self.out.try_send(Message::text(event.to_string())).is_err() {
            self.overflowed = true;
        }
    }

    async fn run(mut self, socket: WebSocket) {
        let (mut sink, mut stream) = socket.split();
        let (close_now, close_rx) = oneshot::channel::<(u16, &'static str)>();
        let mut queue = self.queue.take().expect("queue");
        // The writer sends queued events in order; a close asked for out of band goes first.
        let writer = tokio::spawn(async move {
            let mut close_rx = std::pin::pin!(close_rx);
            loop {
                tokio::select! {
                    biased;
                    code = &mut close_rx => {
                        if let Ok((code, reason)) = code {
                            let _ = sink.send(Message::close_with(code, reason)).await;
                        }
                        break;
                    }
                    m = queue.recv() => match m {
                        Some(m) => {
                            let close = m.is_close();
                            if sink.send(m).await.is_err() || close {
                                break;
                            }
                        }
                        None => break,
                    },
                }
            }
        });
        let session = self.session.json();
        self.send("session.created", json!({"session": session}));

        let mut phase = self.state.phase_watch();
        let mut running: Option<(String, JoinHandle<Finished>)> = None;
        let mut draining = false;
        let idle = tokio::time::sleep(IDLE);
        tokio::pin!(idle);
        let mut ping = tokio::time::interval(PING);
        ping.tick().await;
        let close: Option<(u16, &'static str)> = loop {
            if self.overflowed {
                break Some((1008, "slow reader: events were not read in time"));
            }
            tokio::select! {
                frame = stream.next() => match frame {
                    None | Some(Err(_)) => break None,
                    Some(Ok(m)) => {
                        idle.as_mut().reset(tokio::time::Instant::now() + IDLE);
                        if m.is_close() {
                            break None;
                        } else if let Ok(text) = m.to_str() {
                            self.event(text, &mut running).await;
                        } else if m.is_binary() {
                            self.refuse(&EventError {
                                code: "binary_not_supported",
                                message: "events are JSON text frames".into(),
                                param: None,
                                event_id: None,
                            });
                        }
                    }
                },
                finished = async { (&mut running.as_mut().expect("running").1).await }, if running.is_some() => {
                    let (id, _) = running.take().expect("running");
                    let finished = finished.unwrap_or_else(|_| Finished::failed(&ApiError::Internal));
                    self.overflowed |= finished.slow;
                    self.done(id, finished);
                    if draining {
                        break Some((1001, "the server is shutting down"));
                    }
                },
                changed = phase.changed() => {
                    let now = if changed.is_ok() { *phase.borrow() } else { Phase::Aborting };
                    match now {
                        Phase::Serving => {}
                        Phase::Draining => {
                            draining = true;
                            if running.is_none() {
                                break Some((1001, "the server is shutting down"));
                            }
                        }
                        Phase::Aborting => {
                            if let Some((id, task)) = running.take() {
                                task.abort();
                                self.done(id, Finished {
                                    status: "cancelled",
                                    ..Finished::failed(&ApiError::ShuttingDown)
                                });
                            }
                            break Some((1001, "the server is shutting down"));
                        }
                    }
                },
                () = &mut idle => break Some((1000, "idle")),
                _ = ping.tick() => {
                    let _ = self.out.try_send(Message::ping(Vec::new()));
                },
            }
        };
        if let Some((_, task)) = running.take() {
            task.abort();
        }
        if let Some((code, reason)) = close {
            // After the events already queued, unless the queue is full: then at once.
            let queued =
                !self.overflowed && self.out.try_send(Message::close_with(code, reason)).is_ok();
            if !queued {
                let _ = close_now.send((code, reason));
            }
        }
        drop(self.out);
        // A writer stuck on a client that does not read is cut off with the socket.
        let mut writer = writer;
        if tokio::time::timeout(CLOSE_WAIT, &mut writer).await.is_err() {
            writer.abort();
            return;
        }
        // The close handshake: wait, bounded, for the client's close frame.
        if close.is_some() {
            let _ = tokio::time::timeout(CLOSE_WAIT, async {
                while let Some(Ok(m)) = stream.next().await {
                    if m.is_close() {
                        break;
                    }
                }
            })
            .await;
        }
    }

    async fn event(&mut self, text: &str, running: &mut Option<(String, JoinHandle<Finished>)>) {
        let parsed = match realtime::parse(text) {
            Ok(p) => p,
            Err(e) => return self.refuse(&e),
        };
        let event_id = parsed.event_id;
        let refuse = |code, message: &str| EventError {
            code,
            message: message.into(),
            param: None,
            event_id: event_id.clone(),
        };
        match parsed.event {
            ClientEvent::SessionUpdate(patch) => {
                self.session.update(patch);
                let session = self.session.json();
                self.send("session.updated", json!({"session": session}));
            }
            ClientEvent::ItemCreate {
                previous_item_id,
                item,
            } => {
                if running.is_some() {
                    return self.refuse(&refuse(
                        "conversation_busy",
                        "wait for the response in progress to finish (or cancel it)",
                    ));
                }
                // Checked by the sanitizer before it joins the conversation; events are
                // handled in order, so the next waits for this check.
                let item = match self.check(item).await {
                    Ok(item) => item,
                    Err(e) => return self.refuse_api(event_id, &e),
                };
                match self.session.add(previous_item_id.as_deref(), item) {
                    Ok((previous, id)) => {
                        let added = self.session.items().iter().find(|i| i.id == id);
                        let json = added.map_or(Value::Null, Item::json);
                        self.send(
                            "conversation.item.created",
                            json!({"previous_item_id": previous, "item": json}),
                        );
                    }
                    Err(mut e) => {
                        e.event_id = event_id;
                        self.refuse(&e);
                    }
                }
            }
            ClientEvent::ItemDelete { item_id } => match self.session.delete(&item_id) {
                Ok(()) => self.send("conversation.item.deleted", json!({"item_id": item_id})),
                Err(mut e) => {
                    e.event_id = event_id;
                    self.refuse(&e);
                }
            },
            ClientEvent::ResponseCreate(options) => {
                if running.is_some() {
                    return self.refuse(&refuse(
                        "conversation_already_has_active_response",
                        "a response is in progress: wait for response.done or cancel it",
                    ));
                }
                *running = Some(self.start(&options));
            }
            ClientEvent::ResponseCancel => match running.take() {
                Some((id, task)) => {
                    task.abort();
                    self.done(
                        id,
                        Finished {
                            status: "cancelled",
                            error: None,
                            ..Finished::failed(&ApiError::Internal)
                        },
                    );
                }
                None => self.refuse(&refuse(
                    "response_cancel_not_active",
                    "there is no response in progress",
                )),
            },
        }
    }

    /// The sanitizer's check of an item, with the plugins current now.
    fn check(&self, item: Item) -> impl std::future::Future<Output = Result<Item, ApiError>> {
        let state = self.state.clone();
        let meta = self.meta.clone();
        let principal = self.principal.clone();
        async move {
            let flow = app::Flow::begin(&state, meta.request_id.clone(), ROUTE)?;
            let admitted = flow.admitted_as(meta, principal);
            let message = ChatMessage {
                role: match item.role {
                    Role::System => "system",
                    Role::User => "user",
                    Role::Assistant => "assistant",
                }
                .into(),
                content: item.text,
            };
            let checked = admitted.check_message(message).await?;
            Ok(Item {
                text: checked.content,
                ..item
            })
        }
    }

    /// Start a response: `response.created` now, deltas from its task, `response.done` when
    /// [`Connection::done`] is given its end.
    fn start(&mut self, options: &Settings) -> (String, JoinHandle<Finished>) {
        let response_id = self.session.new_id("resp");
        let item_id = self.session.new_id("item");
        self.send(
            "response.created",
            json!({"response": {"id": response_id, "object": "realtime.response",
                   "status": "in_progress", "output": []}}),
        );
        let request = self.session.request(options);
        let state = self.state.clone();
        let mut meta = self.meta.clone();
        meta.request_id = format!("{}-{response_id}", self.meta.request_id).into();
        let principal = self.principal.clone();
        let out = self.out.clone();
        let ids = (response_id.clone(), item_id);
        let mut next_event = {
            let mut n = 0u64;
            let prefix = format!("event_{}", ids.0);
            move || {
                n += 1;
                format!("{prefix}_{n}")
            }
        };
        let task = tokio::spawn(async move {
            let flow = match app::Flow::begin(&state, meta.request_id.clone(), ROUTE) {
                Ok(flow) => flow,
                Err(e) => return Finished::failed(&e),
            };
            let tenant = principal.tenant.clone();
            let admitted = flow.admitted_as(meta, principal);
            let model = request.model.clone();
            let mut generation = match admitted.generate(request).await {
                Ok(g) => g,
                Err(e) => {
                    flow.finish(e.status().as_u16(), Some(model), tenant).await;
                    return Finished::failed(&e);
                }
            };
            let mut text = String::new();
            let delta = |delta: &str, event: String| {
                json!({"type": "response.output_text.delta", "event_id": event,
                       "response_id": ids.0, "item_id": ids.1, "output_index": 0,
                       "content_index": 0, "delta": delta})
                .to_string()
            };
            let finished = loop {
                match generation.next().await {
                    Ok(Step::Text(piece)) => {
                        if !piece.is_empty() {
                            // Awaited: a slow reader slows its own generation, and the
                            // session closes it once the queue is full.
                            if out
                                .send(Message::text(delta(&piece, next_event())))
                                .await
                                .is_err()
                            {
                                break Finished::failed(&ApiError::Internal);
                            }
                            text.push_str(&piece);
                        }
                    }
                    Ok(Step::Done {
                        rest,
                        prompt_tokens,
                        completion_tokens,
                        reason,
                    }) => {
                        let mut slow = false;
                        if !rest.is_empty() {
                            slow |= out
                                .try_send(Message::text(delta(&rest, next_event())))
                                .is_err();
                            text.push_str(&rest);
                        }
                        let done = json!({"type": "response.output_text.done",
                            "event_id": next_event(), "response_id": ids.0, "item_id": ids.1,
                            "output_index": 0, "content_index": 0, "text": text});
                        slow |= out.try_send(Message::text(done.to_string())).is_err();
                        let status = if reason == crate::engine::FinishReason::Length {
                            "incomplete"
                        } else {
                            "completed"
                        };
                        break Finished {
                            status,
                            text,
                            usage: Some((prompt_tokens, completion_tokens)),
                            error: None,
                            slow,
                        };
                    }
                    Err(e) => break Finished::failed(&e),
                }
            };
            let status = if finished.error.is_some() { 500 } else { 200 };
            flow.finish(status, Some(model), tenant).await;
            finished
        });
        (response_id, task)
    }

    /// A response ended: its text joins the conversation, and `response.done` says how.
    fn done(&mut self, response_id: String, finished: Finished) {
        let mut output = Vec::new();
        if !finished.text.is_empty() {
            let item = Item {
                id: String::new(),
                role: Role::Assistant,
                text: finished.text,
            };
            if let Ok((_, id)) = self.session.add(None, item)
                && let Some(item) = self.session.items().iter().find(|i| i.id == id)
            {
                output.push(item.json());
            }
        }
        let usage = finished.usage.map(|(input, output)| {
            json!({"total_tokens": input + output, "input_tokens": input, "output_tokens": output})
        });
        self.send(
            "response.done",
            json!({"response": {"id": response_id, "object": "realtime.response",
                   "status": finished.status,
                   "status_details": finished.error.map(|e| json!({"type": "failed", "error": e})),
                   "output": output, "usage": usage}}),
        );
    }
}

impl Finished {
    fn failed(e: &ApiError) -> Self {
        Self {
            status: "failed",
            text: String::new(),
            usage: None,
            error: Some(e.body()["error"].clone()),
            slow: false,
        }
    }
}

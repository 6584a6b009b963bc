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
use hyper::upgrade::OnUpgrade;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role as WsRole, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use warp::Filter;
use warp::http::{HeaderMap, StatusCode, header};
use warp::reply::{Reply, Response};

use crate::AppState;
use crate::app::connections::{Full, Guard};
use crate::app::realtime::{self, ClientEvent, EventError, Item, Role, Session, Settings};
use crate::app::{self, Phase, Step};
use crate::error::ApiError;
use crate::metrics::{CloseReason, RealtimeCounters};
use crate::plugins::{ChatMessage, PluginSet, Principal, RequestMeta};

const ROUTE: &str = "/v1/realtime";
/// How long a closing session waits for the client's close frame.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// An upgraded connection.
type WebSocket = WebSocketStream<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>;

/// A WebSocket upgrade a request asks for (RFC 6455, 4.2.1), not yet answered.
pub struct Ws {
    accept: String,
    on_upgrade: OnUpgrade,
}

/// The request's WebSocket upgrade, or `None` when it does not ask for one the way RFC 6455
/// says (the route then answers 426). Done here rather than with warp's `ws()` filter so
/// that the socket's buffers are this server's to size: tungstenite's default read buffer
/// is 128 KiB per connection, allocated at once, which alone is twice the memory an idle
/// session may hold.
pub fn upgrade_request()
-> impl Filter<Extract = (Option<Ws>,), Error = std::convert::Infallible> + Clone {
    warp::header::headers_cloned()
        .and(warp::ext::optional::<OnUpgrade>())
        .map(|headers: HeaderMap, on_upgrade: Option<OnUpgrade>| {
            let value = |name| headers.get(name).and_then(|v| v.to_str().ok());
            let connection_upgrade = value(header::CONNECTION).is_some_and(|v| {
                v.split(',')
                    .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
            });
            let websocket =
                value(header::UPGRADE).is_some_and(|v| v.trim().eq_ignore_ascii_case("websocket"));
            let version = value(header::SEC_WEBSOCKET_VERSION).map(str::trim) == Some("13");
            let key = value(header::SEC_WEBSOCKET_KEY).map(str::trim)?;
            if !(connection_upgrade && websocket && version) || key.len() != 24 {
                return None;
            }
            Some(Ws {
                accept: tokio_tungstenite::tungstenite::handshake::derive_accept_key(
                    key.as_bytes(),
                ),
                on_upgrade: on_upgrade?,
            })
        })
}

/// The socket's settings: events of at most [`realtime::MAX_EVENT_BYTES`], and a small
/// read buffer that grows only for the frame being read.
fn socket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_message_size(Some(realtime::MAX_EVENT_BYTES))
        .max_frame_size(Some(realtime::MAX_EVENT_BYTES))
}

impl Ws {
    /// Answer 101 and, once hyper hands over the connection, run `session` on it.
    fn on_upgrade<F, U>(self, session: F) -> Response
    where
        F: FnOnce(WebSocket) -> U + Send + 'static,
        U: std::future::Future<Output = ()> + Send + 'static,
    {
        let on_upgrade = self.on_upgrade;
        tokio::spawn(async move {
            match on_upgrade.await {
                Ok(upgraded) => {
                    let io = hyper_util::rt::TokioIo::new(upgraded);
                    let socket =
                        WebSocketStream::from_raw_socket(io, WsRole::Server, Some(socket_config()))
                            .await;
                    session(socket).await;
                }
                Err(e) => tracing::debug!(error = %e, "the WebSocket upgrade did not complete"),
            }
        });
        let mut response = warp::reply::with_status(warp::reply(), StatusCode::SWITCHING_PROTOCOLS)
            .into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONNECTION,
            header::HeaderValue::from_static("upgrade"),
        );
        headers.insert(
            header::UPGRADE,
            header::HeaderValue::from_static("websocket"),
        );
        if let Ok(accept) = header::HeaderValue::from_str(&self.accept) {
            headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
        }
        response
    }
}

/// A close frame with `code` and `reason`.
fn close_frame(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    }))
}

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
            let auth = admitted.plugins.clone();
            ws.on_upgrade(move |socket| {
                let session = Connection::new(state, meta, (principal, auth), model, guard);
                session.run(socket)
            })
        }
    }
}

/// How a response ended, for `response.done`.
struct Finished {
    status: &'static str,
    text: String,
    usage: Option<Usage>,
    error: Option<Value>,
    /// The client did not read the deltas in time: the session closes it (1008).
    slow: bool,
}

/// A finished response's tokens.
struct Usage {
    input: usize,
    /// Of the input, those whose keys and values a kept cache held (the conversation so
    /// far, when it is unchanged since the last response).
    cached: usize,
    output: usize,
}

/// The response in progress: its ids, its task, and the way to stop it.
struct Running {
    response_id: String,
    item_id: String,
    task: JoinHandle<Finished>,
    /// Sending (or dropping) it cuts the response short: the task ends it as cancelled,
    /// with the text so far, and records it.
    cancel: Option<oneshot::Sender<()>>,
}

impl Running {
    /// Cut the response short and wait for its task to say how it ended.
    async fn cancel(mut self) -> (Self, Finished) {
        drop(self.cancel.take());
        let finished = (&mut self.task)
            .await
            .unwrap_or_else(|_| Finished::failed(&ApiError::Internal));
        (self, finished)
    }
}

/// A session's bounds, from `[realtime]` in the configuration.
struct Bounds {
    idle: Duration,
    ping: Duration,
    queue: usize,
}

/// One session and its connection's plumbing.
struct Connection {
    state: Arc<AppState>,
    meta: RequestMeta,
    principal: Principal,
    /// The plugin set whose auth plugin admitted the session: once the auth slot changes,
    /// the next client event is authenticated again.
    auth: Arc<PluginSet>,
    session: Session,
    out: mpsc::Sender<Message>,
    queue: Option<mpsc::Receiver<Message>>,
    /// Set when the client fell [`Bounds::queue`] events behind.
    overflowed: bool,
    bounds: Bounds,
    counters: RealtimeCounters,
    _guard: Guard,
}

/// Why the session loop ended, and the close frame it sends (none when the client left).
fn close_reason(close: Option<(u16, &'static str)>) -> CloseReason {
    match close.map(|(code, _)| code) {
        None => CloseReason::Client,
        Some(1000) => CloseReason::Idle,
        Some(1008) => CloseReason::SlowReader,
        Some(1009) => CloseReason::TooLarge,
        Some(CLOSE_UNAUTHORIZED) => CloseReason::Unauthorized,
        Some(_) => CloseReason::Shutdown,
    }
}

/// The close code of a session whose credentials the auth plugin no longer accepts
/// (4000-4999 are the application's own).
const CLOSE_UNAUTHORIZED: u16 = 4001;

impl Connection {
    fn new(
        state: Arc<AppState>,
        meta: RequestMeta,
        (principal, auth): (Principal, Arc<PluginSet>),
        model: String,
        guard: Guard,
    ) -> Self {
        let config = &state.config.realtime;
        let bounds = Bounds {
            idle: Duration::from_secs(config.idle_timeout_secs),
            ping: Duration::from_secs(config.ping_interval_secs),
            queue: config.max_queued_events,
        };
        let (out, queue) = mpsc::channel(bounds.queue);
        let id: String = meta
            .request_id
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(24)
            .collect();
        let counters = state.metrics.realtime.clone();
        Self {
            state,
            meta,
            principal,
            auth,
            session: Session::new(format!("sess_{id}"), model),
            out,
            queue: Some(queue),
            overflowed: false,
            bounds,
            counters,
            _guard: guard,
        }
    }

    /// Queue an event; a full queue marks the client as too slow.
    fn queue(&mut self, event: &Value) {
        if self.out.try_send(Message::text(event.to_string())).is_err() {
            self.overflowed = true;
        }
    }

    /// Queue a server event of type `kind`.
    fn send(&mut self, kind: &str, mut fields: Value) {
        fields["type"] = json!(kind);
        fields["event_id"] = json!(self.session.new_id("event"));
        self.queue(&fields);
    }

    fn refuse(&mut self, e: &EventError) {
        let event = realtime::error_event(self.session.new_id("event"), e);
        self.queue(&event);
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
        self.queue(&event);
    }

    /// After a change of the auth slot, ask the auth plugin again whether the session's
    /// credentials (the upgrade's headers) are still good: a revoked key ends the session
    /// at its next event, not at its next reconnect. Nothing is asked while the slot is
    /// unchanged.
    async fn still_authorized(&mut self) -> Result<(), ApiError> {
        let Some(services) = self.state.services() else {
            return Ok(());
        };
        if services.plugins.current().same_auth(&self.auth) {
            return Ok(());
        }
        let flow = app::Flow::begin(&self.state, self.meta.request_id.clone(), ROUTE)?;
        let admitted = flow.admit(self.meta.clone(), "inference").await?;
        self.auth = admitted.plugins.clone();
        Ok(())
    }

    async fn run(mut self, socket: WebSocket) {
        let (mut sink, mut stream) = socket.split();
        let (close_now, close_rx) = oneshot::channel::<(u16, &'static str)>();
        let mut queue = self.queue.take().expect("queue");
        let events_out = self.counters.events_out.clone();
        // The writer sends queued events in order; a close asked for out of band goes first.
        let writer = tokio::spawn(async move {
            let mut close_rx = std::pin::pin!(close_rx);
            loop {
                tokio::select! {
                    biased;
                    code = &mut close_rx => {
                        if let Ok((code, reason)) = code {
                            let _ = sink.send(close_frame(code, reason)).await;
                        }
                        break;
                    }
                    m = queue.recv() => match m {
                        Some(m) => {
                            let close = m.is_close();
                            let event = m.is_text();
                            if sink.send(m).await.is_err() || close {
                                break;
                            }
                            if event {
                                events_out.inc();
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
        let mut running: Option<Running> = None;
        let mut draining = false;
        let idle = tokio::time::sleep(self.bounds.idle);
        tokio::pin!(idle);
        let mut ping = tokio::time::interval(self.bounds.ping);
        ping.tick().await;
        let shutting_down = (1001, "the server is shutting down");
        let close: Option<(u16, &'static str)> = loop {
            if self.overflowed {
                break Some((1008, "slow reader: events were not read in time"));
            }
            tokio::select! {
                frame = stream.next() => match frame {
                    // Larger than an event may be: said, then closed (1009, message too
                    // big), since the rest of that frame cannot be read past.
                    Some(Err(WsError::Capacity(_))) => {
                        self.refuse(&EventError {
                            code: "event_too_large",
                            message: format!(
                                "an event may be at most {} bytes",
                                realtime::MAX_EVENT_BYTES
                            ),
                            param: None,
                            event_id: None,
                        });
                        break Some((1009, "event too large"));
                    }
                    None | Some(Err(_)) => break None,
                    Some(Ok(m)) => {
                        if m.is_close() {
                            break None;
                        }
                        // Only events are activity: a client's library answers pings on
                        // its own, and a session kept alive by pongs alone is idle.
                        if !(m.is_text() || m.is_binary()) {
                            continue;
                        }
                        idle.as_mut().reset(tokio::time::Instant::now() + self.bounds.idle);
                        self.counters.events_in.inc();
                        match self.still_authorized().await {
                            Ok(()) => {}
                            // Refused: the session ends.
                            Err(e) if e.status().is_client_error() => {
                                self.refuse_api(None, &e);
                                break Some((CLOSE_UNAUTHORIZED, "the credentials are no longer accepted"));
                            }
                            // The plugin could not answer (a fault, a deadline): this event
                            // is refused, as any request would be, and the next asks again.
                            Err(e) => {
                                self.refuse_api(None, &e);
                                continue;
                            }
                        }
                        if let Message::Text(text) = &m {
                            self.event(text.as_str(), &mut running).await;
                        } else {
                            self.refuse(&EventError {
                                code: "binary_not_supported",
                                message: "events are JSON text frames".into(),
                                param: None,
                                event_id: None,
                            });
                        }
                    }
                },
                finished = async { (&mut running.as_mut().expect("running").task).await }, if running.is_some() => {
                    let r = running.take().expect("running");
                    let finished = finished.unwrap_or_else(|_| Finished::failed(&ApiError::Internal));
                    self.overflowed |= finished.slow;
                    self.done(&r, finished);
                    if draining {
                        break Some(shutting_down);
                    }
                },
                changed = phase.changed() => {
                    let now = if changed.is_ok() { *phase.borrow() } else { Phase::Aborting };
                    match now {
                        Phase::Serving => {}
                        Phase::Draining => {
                            draining = true;
                            if running.is_none() {
                                break Some(shutting_down);
                            }
                        }
                        Phase::Aborting => {
                            if let Some(r) = running.take() {
                                let (r, finished) = r.cancel().await;
                                self.done(&r, finished);
                            }
                            break Some(shutting_down);
                        }
                    }
                },
                () = &mut idle => break Some((1000, "idle")),
                _ = ping.tick() => {
                    let _ = self.out.try_send(Message::Ping(Default::default()));
                },
            }
        };
        if let Some(r) = running.take() {
            // The client left, or is closed, with a response running: it stops, recorded
            // as cancelled.
            let _ = r.cancel().await;
        }
        let reason = close_reason(close);
        self.counters.closed(reason);
        if reason == CloseReason::Shutdown {
            // The final event, as an SSE stream gets: what the close frame's code means.
            self.refuse_api(None, &ApiError::ShuttingDown);
        }
        if let Some((code, reason)) = close {
            // After the events already queued, unless the queue is full: then at once.
            let queued = !self.overflowed && self.out.try_send(close_frame(code, reason)).is_ok();
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

    async fn event(&mut self, text: &str, running: &mut Option<Running>) {
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
                // An item may come while a response runs, as OpenAI's server allows: it
                // joins after the response's own item, which was added when it started,
                // and the next response sees it. Checked by the sanitizer before it joins the conversation; events are
                // handled in order, so the next waits for this check.
                let item = match self.check(item).await {
                    Ok(item) => item,
                    Err(e) => return self.refuse_api(event_id, &e),
                };
                match self.session.add(previous_item_id.as_deref(), item) {
                    Ok((previous, id)) => {
                        let added = self.session.items().iter().find(|i| i.id == id);
                        let item = added.map_or(Value::Null, Item::json);
                        let event = json!({"previous_item_id": previous, "item": item});
                        // The beta protocol's name, then the GA protocol's pair.
                        self.send("conversation.item.created", event.clone());
                        self.send("conversation.item.added", event.clone());
                        self.send("conversation.item.done", event);
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
                match self.start(&options) {
                    Ok(r) => *running = Some(r),
                    Err(mut e) => {
                        e.event_id = event_id;
                        self.refuse(&e);
                    }
                }
            }
            ClientEvent::ResponseCancel => match running.take() {
                Some(r) => {
                    let (r, finished) = r.cancel().await;
                    self.done(&r, finished);
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

    /// The assistant item a response writes, as it stands.
    fn output_item(item_id: &str, status: &str, text: Option<&str>) -> Value {
        let content = match text {
            Some(text) => json!([{"type": "output_text", "text": text}]),
            None => json!([]),
        };
        json!({"id": item_id, "object": "realtime.item", "type": "message", "status": status,
               "role": "assistant", "content": content})
    }

    /// Start a response: `response.created` and the item and part it writes now, deltas
    /// from its task, the rest when [`Connection::done`] is given its end.
    fn start(&mut self, options: &Settings) -> Result<Running, EventError> {
        let request = self.session.request(options);
        let response_id = self.session.new_id("resp");
        let item_id = self.session.new_id("item");
        // The response's item joins now, empty, so that items the client adds while it
        // runs come after it; its text is filled in when the response ends.
        let placeholder = Item {
            id: item_id.clone(),
            role: Role::Assistant,
            text: String::new(),
        };
        let (previous, _) = self.session.add(None, placeholder)?;
        self.send(
            "response.created",
            json!({"response": {"id": response_id, "object": "realtime.response",
                   "status": "in_progress", "output": []}}),
        );
        let item = Self::output_item(&item_id, "in_progress", None);
        self.send(
            "response.output_item.added",
            json!({"response_id": response_id, "output_index": 0, "item": item}),
        );
        self.send(
            "conversation.item.added",
            json!({"previous_item_id": previous, "item": item}),
        );
        self.send(
            "response.content_part.added",
            json!({"response_id": response_id, "item_id": item_id, "output_index": 0,
                   "content_index": 0, "part": {"type": "text", "text": ""}}),
        );
        let state = self.state.clone();
        let mut meta = self.meta.clone();
        meta.request_id = format!("{}-{response_id}", self.meta.request_id).into();
        let principal = self.principal.clone();
        let out = self.out.clone();
        let ids = (response_id.clone(), item_id.clone());
        let mut next_event = {
            let mut n = 0u64;
            let prefix = format!("event_{}", ids.0);
            move || {
                n += 1;
                format!("{prefix}_{n}")
            }
        };
        let (cancel, mut cancelled) = oneshot::channel::<()>();
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
                let step = tokio::select! {
                    biased;
                    _ = &mut cancelled => break Finished::cancelled(std::mem::take(&mut text)),
                    step = generation.next() => step,
                };
                match step {
                    Ok(Step::Text(piece)) => {
                        if !piece.is_empty() {
                            // Never awaited: a client a whole queue behind is closed as a
                            // slow reader, and this task always sees a cancel at once.
                            text.push_str(&piece);
                            if out
                                .try_send(Message::text(delta(&piece, next_event())))
                                .is_err()
                            {
                                break Finished {
                                    slow: true,
                                    ..Finished::cancelled(std::mem::take(&mut text))
                                };
                            }
                        }
                    }
                    Ok(Step::Done {
                        rest,
                        prompt_tokens,
                        cached_tokens,
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
                            usage: Some(Usage {
                                input: prompt_tokens,
                                cached: cached_tokens,
                                output: completion_tokens,
                            }),
                            error: None,
                            slow,
                        };
                    }
                    Err(e) => break Finished::failed(&e),
                }
            };
            // Recorded as every request is; a cancelled response as 499, the status that
            // proxies give a request its client gave up on.
            let status = match finished.status {
                "cancelled" => 499,
                _ if finished.error.is_some() => 500,
                _ => 200,
            };
            flow.finish(status, Some(model), tenant).await;
            finished
        });
        Ok(Running {
            response_id,
            item_id,
            task,
            cancel: Some(cancel),
        })
    }

    /// A response ended: its text joins the conversation (cut short or not), and the
    /// closing events say how it ended, `response.done` last.
    fn done(&mut self, running: &Running, finished: Finished) {
        let (response_id, item_id) = (&running.response_id, &running.item_id);
        let mut output = Vec::new();
        if finished.text.is_empty() {
            // Nothing to keep: the empty item leaves the conversation, and the client is
            // told, since it was told it joined.
            if self.session.delete(item_id).is_ok() {
                self.send("conversation.item.deleted", json!({"item_id": item_id}));
            }
        } else {
            let part = json!({"type": "text", "text": finished.text});
            let at = self.session.items().iter().position(|i| &i.id == item_id);
            let previous = at
                .and_then(|at| at.checked_sub(1))
                .map(|i| self.session.items()[i].id.clone());
            if self.session.fill(item_id, finished.text).is_ok()
                && let Some(item) = self.session.items().iter().find(|i| &i.id == item_id)
            {
                let mut item = item.json();
                if finished.status != "completed" {
                    item["status"] = json!("incomplete");
                }
                self.send(
                    "response.content_part.done",
                    json!({"response_id": response_id, "item_id": item_id, "output_index": 0,
                           "content_index": 0, "part": part}),
                );
                self.send(
                    "response.output_item.done",
                    json!({"response_id": response_id, "output_index": 0, "item": item}),
                );
                self.send(
                    "conversation.item.done",
                    json!({"previous_item_id": previous, "item": item}),
                );
                output.push(item);
            }
        }
        let usage = finished.usage.map(|u| {
            json!({"total_tokens": u.input + u.output, "input_tokens": u.input,
                   "output_tokens": u.output,
                   "input_token_details": {"cached_tokens": u.cached, "text_tokens": u.input},
                   "output_token_details": {"text_tokens": u.output}})
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

    fn cancelled(text: String) -> Self {
        Self {
            status: "cancelled",
            text,
            usage: None,
            error: None,
            slow: false,
        }
    }
}

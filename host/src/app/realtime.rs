//! The OpenAI Realtime API's text protocol as a session's state, without I/O: client events
//! parsed and checked, the conversation they build, the generation a `response.create` asks
//! for, and the server events that answer. A transport (the WebSocket route of issue 19)
//! feeds it text frames and sends what it returns; the generation itself goes through
//! [`Admitted::generate`](super::Admitted::generate), under the same policies as HTTP.
//!
//! Served by `http/realtime.rs`.

use serde_json::{Map, Value, json};

use super::generation::{GenerationInput, GenerationRequest};
use crate::engine::SamplingParams;
use crate::plugins::{ChatMessage, InputKind};

/// The most items a conversation holds; more is refused with `conversation_full`.
pub const MAX_ITEMS: usize = 512;
/// The largest client event, in bytes, and so the largest item or instructions.
pub const MAX_EVENT_BYTES: usize = 1 << 20;
/// The most text a conversation holds, in bytes: a connection's memory stays bounded
/// (and far more than the text model's window can take in any case).
pub const MAX_CONVERSATION_BYTES: usize = 4 << 20;

/// A client event the session refuses: an `error` server event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventError {
    /// Machine-readable code, e.g. `unknown_event_type`.
    pub code: &'static str,
    /// What was wrong, for the client.
    pub message: String,
    /// The offending field, e.g. `item.content`.
    pub param: Option<String>,
    /// The client's `event_id`, when it sent one.
    pub event_id: Option<String>,
}

fn refuse(code: &'static str, param: &str, message: impl Into<String>) -> EventError {
    EventError {
        code,
        message: message.into(),
        param: (!param.is_empty()).then(|| param.to_string()),
        event_id: None,
    }
}

/// How many tokens a response may have: a number, or `"inf"` (up to the window).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputLimit {
    /// At most this many.
    Tokens(usize),
    /// Up to the context window.
    Inf,
}

impl OutputLimit {
    fn json(self) -> Value {
        match self {
            Self::Tokens(n) => json!(n),
            Self::Inf => json!("inf"),
        }
    }
}

/// What a `session.update` or a `response.create` may set.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Settings {
    /// The system instructions.
    pub instructions: Option<String>,
    /// Sampling temperature, 0 to 2.
    pub temperature: Option<f64>,
    /// The response length limit.
    pub max_output_tokens: Option<OutputLimit>,
}

/// A conversation item's author.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Instructions inside the conversation.
    System,
    /// The client.
    User,
    /// The model.
    Assistant,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Self::System => "system",
            Self::User => "user",
            Self::Assistant => "assistant",
        }
    }
}

/// A text message in the conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// Its id, the client's or one the session made.
    pub id: String,
    /// Who wrote it.
    pub role: Role,
    /// Its text.
    pub text: String,
}

impl Item {
    /// The item as the server describes it.
    pub fn json(&self) -> Value {
        let part = if self.role == Role::Assistant {
            "output_text"
        } else {
            "input_text"
        };
        json!({"id": self.id, "object": "realtime.item", "type": "message", "status": "completed",
               "role": self.role.as_str(), "content": [{"type": part, "text": self.text}]})
    }
}

/// A client event, parsed and checked.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientEvent {
    /// `session.update`.
    SessionUpdate(Settings),
    /// `conversation.item.create`: a message after `previous_item_id` (at the end without
    /// one, at the start with `root`).
    ItemCreate {
        /// Where it goes.
        previous_item_id: Option<String>,
        /// The message (its id may be empty: the session makes one).
        item: Item,
    },
    /// `conversation.item.delete`.
    ItemDelete {
        /// The item.
        item_id: String,
    },
    /// `response.create`, with settings for this response only.
    ResponseCreate(Settings),
    /// `response.cancel`.
    ResponseCancel,
}

/// A parsed event and the client's id for it.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    /// The client's `event_id`, echoed in an error about it.
    pub event_id: Option<String>,
    /// The event.
    pub event: ClientEvent,
}

fn text_field(
    object: &Map<String, Value>,
    key: &str,
    param: &str,
) -> Result<Option<String>, EventError> {
    match object.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(refuse(
            "invalid_type",
            param,
            format!("`{param}` must be a string"),
        )),
    }
}

fn settings(object: &Map<String, Value>, prefix: &str) -> Result<Settings, EventError> {
    let param = |key: &str| format!("{prefix}.{key}");
    if let Some(modalities) = object.get("output_modalities").or(object.get("modalities")) {
        let text_only = modalities
            .as_array()
            .is_some_and(|m| !m.is_empty() && m.iter().all(|m| m == "text"));
        if !text_only {
            return Err(refuse(
                "unsupported_modality",
                &param("output_modalities"),
                "this server speaks text only: output_modalities must be [\"text\"]",
            ));
        }
    }
    let temperature = match object.get("temperature") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_f64() {
            Some(t) if (0.0..=2.0).contains(&t) => Some(t),
            _ => {
                return Err(refuse(
                    "invalid_value",
                    &param("temperature"),
                    "temperature must be a number from 0 to 2",
                ));
            }
        },
    };
    let limit = object
        .get("max_output_tokens")
        .or(object.get("max_response_output_tokens"));
    let max_output_tokens = match limit {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s == "inf" => Some(OutputLimit::Inf),
        Some(v) => match v.as_u64() {
            Some(n @ 1..=4096) => Some(OutputLimit::Tokens(n as usize)),
            _ => {
                return Err(refuse(
                    "invalid_value",
                    &param("max_output_tokens"),
                    "max_output_tokens must be \"inf\" or a whole number from 1 to 4096",
                ));
            }
        },
    };
    Ok(Settings {
        instructions: text_field(object, "instructions", &param("instructions"))?,
        temperature,
        max_output_tokens,
    })
}

fn item(object: &Map<String, Value>) -> Result<Item, EventError> {
    if object.get("type").and_then(Value::as_str) != Some("message") {
        return Err(refuse(
            "unsupported_item_type",
            "item.type",
            "only `message` items are supported",
        ));
    }
    let role = match object.get("role").and_then(Value::as_str) {
        Some("user") => Role::User,
        Some("system") => Role::System,
        Some("assistant") => Role::Assistant,
        _ => {
            return Err(refuse(
                "invalid_value",
                "item.role",
                "role must be `user`, `system` or `assistant`",
            ));
        }
    };
    let parts = object
        .get("content")
        .and_then(Value::as_array)
        .filter(|parts| !parts.is_empty())
        .ok_or_else(|| {
            refuse(
                "invalid_value",
                "item.content",
                "content is a non-empty list of text parts",
            )
        })?;
    let mut text = String::new();
    for part in parts {
        match part.get("type").and_then(Value::as_str) {
            Some("input_text" | "text" | "output_text") => {}
            _ => {
                return Err(refuse(
                    "unsupported_content_type",
                    "item.content",
                    "content parts must be text (`input_text`)",
                ));
            }
        }
        let piece = part
            .get("text")
            .and_then(Value::as_str)
            .ok_or_else(|| refuse("invalid_value", "item.content", "a text part needs `text`"))?;
        text.push_str(piece);
    }
    Ok(Item {
        id: text_field(object, "id", "item.id")?.unwrap_or_default(),
        role,
        text,
    })
}

/// Parse one text frame as a client event.
pub fn parse(frame: &str) -> Result<Parsed, EventError> {
    if frame.len() > MAX_EVENT_BYTES {
        return Err(refuse(
            "event_too_large",
            "",
            format!("an event may be at most {MAX_EVENT_BYTES} bytes"),
        ));
    }
    let value: Value = serde_json::from_str(frame)
        .map_err(|_| refuse("invalid_json", "", "the event is not valid JSON"))?;
    let object = value
        .as_object()
        .ok_or_else(|| refuse("invalid_json", "", "an event is a JSON object"))?;
    let event_id = object
        .get("event_id")
        .and_then(Value::as_str)
        .map(str::to_string);
    let with_id = |mut e: EventError| {
        e.event_id.clone_from(&event_id);
        e
    };
    let empty = Map::new();
    let nested = |key: &str| object.get(key).and_then(Value::as_object).unwrap_or(&empty);
    let event = match object.get("type").and_then(Value::as_str) {
        None => Err(refuse("missing_type", "type", "an event needs a `type`")),
        Some("session.update") => {
            settings(nested("session"), "session").map(ClientEvent::SessionUpdate)
        }
        Some("conversation.item.create") => {
            let previous_item_id = text_field(object, "previous_item_id", "previous_item_id");
            match object.get("item").and_then(Value::as_object) {
                None => Err(refuse("missing_field", "item", "the event needs an `item`")),
                Some(o) => previous_item_id.and_then(|previous_item_id| {
                    Ok(ClientEvent::ItemCreate {
                        previous_item_id,
                        item: item(o)?,
                    })
                }),
            }
        }
        Some("conversation.item.delete") => match text_field(object, "item_id", "item_id") {
            Ok(Some(item_id)) => Ok(ClientEvent::ItemDelete { item_id }),
            Ok(None) => Err(refuse(
                "missing_field",
                "item_id",
                "the event needs an `item_id`",
            )),
            Err(e) => Err(e),
        },
        Some("response.create") => {
            settings(nested("response"), "response").map(ClientEvent::ResponseCreate)
        }
        Some("response.cancel") => Ok(ClientEvent::ResponseCancel),
        Some(other) => Err(refuse(
            "unknown_event_type",
            "type",
            format!(
                "unknown event type `{}`",
                other.chars().take(64).collect::<String>()
            ),
        )),
    };
    event
        .map(|event| Parsed {
            event_id: event_id.clone(),
            event,
        })
        .map_err(with_id)
}

/// One connection's session: its settings and conversation, and the ids it hands out.
#[derive(Debug, Clone)]
pub struct Session {
    id: String,
    model: String,
    settings: Settings,
    items: Vec<Item>,
    next_id: u64,
}

impl Session {
    /// A new session `id` on `model`, with no instructions and no items.
    pub fn new(id: String, model: String) -> Self {
        Self {
            id,
            model,
            settings: Settings::default(),
            items: Vec::new(),
            next_id: 0,
        }
    }

    /// A new id with `prefix` (`item`, `resp`, `event`), unique in this session.
    pub fn new_id(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        format!("{prefix}_{}_{}", self.id, self.next_id)
    }

    /// The `session` object of `session.created` and `session.updated`.
    pub fn json(&self) -> Value {
        json!({
            "id": self.id, "object": "realtime.session", "type": "realtime", "model": self.model,
            "output_modalities": ["text"],
            "instructions": self.settings.instructions.clone().unwrap_or_default(),
            "temperature": self.settings.temperature,
            "max_output_tokens": self.settings.max_output_tokens.unwrap_or(OutputLimit::Inf).json(),
        })
    }

    /// Apply a `session.update`: the settings it names change, the others stay.
    pub fn update(&mut self, patch: Settings) {
        let s = &mut self.settings;
        s.instructions = patch.instructions.or(s.instructions.take());
        s.temperature = patch.temperature.or(s.temperature);
        s.max_output_tokens = patch.max_output_tokens.or(s.max_output_tokens);
    }

    /// The conversation, in order.
    pub fn items(&self) -> &[Item] {
        &self.items
    }

    /// Add `item` after `previous` (`None`: at the end; `root`: at the start). Returns the
    /// id of the item it follows, for `conversation.item.created`, and its own.
    pub fn add(
        &mut self,
        previous: Option<&str>,
        mut item: Item,
    ) -> Result<(Option<String>, String), EventError> {
        let held: usize = self.items.iter().map(|i| i.text.len()).sum();
        if self.items.len() >= MAX_ITEMS || held + item.text.len() > MAX_CONVERSATION_BYTES {
            return Err(refuse(
                "conversation_full",
                "item",
                format!(
                    "a conversation holds at most {MAX_ITEMS} items and \
                     {MAX_CONVERSATION_BYTES} bytes of text: delete some first"
                ),
            ));
        }
        if item.id.is_empty() {
            item.id = self.new_id("item");
        } else if item.id.len() > 64 || self.items.iter().any(|i| i.id == item.id) {
            return Err(refuse(
                "invalid_value",
                "item.id",
                "an item id is at most 64 bytes and unique in the conversation",
            ));
        }
        let at = match previous {
            None => self.items.len(),
            Some("root") => 0,
            Some(id) => {
                self.items.iter().position(|i| i.id == id).ok_or_else(|| {
                    refuse(
                        "item_not_found",
                        "previous_item_id",
                        "no item with that id in the conversation",
                    )
                })? + 1
            }
        };
        let follows = at.checked_sub(1).map(|i| self.items[i].id.clone());
        let id = item.id.clone();
        self.items.insert(at, item);
        Ok((follows, id))
    }

    /// Give the item `id` its text: a response's assistant item, added empty when the
    /// response started, once the response has ended. Refused if the item is gone (the
    /// client deleted it meanwhile) or the text would overflow the conversation.
    pub fn fill(&mut self, id: &str, text: String) -> Result<(), EventError> {
        let held: usize = self.items.iter().map(|i| i.text.len()).sum();
        let item = self.items.iter_mut().find(|i| i.id == id).ok_or_else(|| {
            refuse(
                "item_not_found",
                "item_id",
                "no item with that id in the conversation",
            )
        })?;
        if held - item.text.len() + text.len() > MAX_CONVERSATION_BYTES {
            return Err(refuse(
                "conversation_full",
                "item",
                format!("a conversation holds at most {MAX_CONVERSATION_BYTES} bytes of text"),
            ));
        }
        item.text = text;
        Ok(())
    }

    /// Delete the item `id`.
    pub fn delete(&mut self, id: &str) -> Result<(), EventError> {
        let at = self.items.iter().position(|i| i.id == id).ok_or_else(|| {
            refuse(
                "item_not_found",
                "item_id",
                "no item with that id in the conversation",
            )
        })?;
        self.items.remove(at);
        Ok(())
    }

    /// The generation a `response.create` with `options` asks for: the session's settings,
    /// overridden by the response's, and the conversation after the instructions.
    pub fn request(&self, options: &Settings) -> GenerationRequest {
        let instructions = options
            .instructions
            .as_ref()
            .or(self.settings.instructions.as_ref());
        let mut messages: Vec<ChatMessage> = instructions
            .filter(|i| !i.is_empty())
            .map(|i| ChatMessage {
                role: "system".into(),
                content: i.clone(),
            })
            .into_iter()
            .collect();
        messages.extend(self.items.iter().map(|i| ChatMessage {
            role: i.role.as_str().into(),
            content: i.text.clone(),
        }));
        let limit = options
            .max_output_tokens
            .or(self.settings.max_output_tokens)
            .unwrap_or(OutputLimit::Inf);
        GenerationRequest {
            kind: InputKind::Chat,
            model: self.model.clone(),
            input: GenerationInput::Messages(messages),
            max_tokens: match limit {
                OutputLimit::Tokens(n) => Some(n),
                OutputLimit::Inf => None,
            },
            sampling: SamplingParams {
                temperature: options
                    .temperature
                    .or(self.settings.temperature)
                    .unwrap_or(0.8),
                ..SamplingParams::default()
            },
            stop: Vec::new(),
        }
    }
}

/// The `error` server event for `e`.
pub fn error_event(event_id: String, e: &EventError) -> Value {
    json!({"type": "error", "event_id": event_id, "error": {
        "type": "invalid_request_error", "code": e.code, "message": e.message,
        "param": e.param, "event_id": e.event_id,
    }})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(role: &str, t: &str) -> String {
        json!({"type": "conversation.item.create", "event_id": "c1", "item": {
            "type": "message", "role": role, "content": [{"type": "input_text", "text": t}]}})
        .to_string()
    }

    #[test]
    fn a_response_item_is_filled_in_place_within_the_bounds() {
        let mut s = Session::new("s".into(), "m".into());
        let item = |id: &str, role, text: &str| Item {
            id: id.into(),
            role,
            text: text.into(),
        };
        s.add(None, item("q", Role::User, "question")).unwrap();
        s.add(None, item("a", Role::Assistant, "")).unwrap();
        // An item added while the response runs comes after the response's.
        s.add(None, item("q2", Role::User, "meanwhile")).unwrap();
        s.fill("a", "answer".into()).unwrap();
        let texts: Vec<&str> = s.items().iter().map(|i| i.text.as_str()).collect();
        assert_eq!(texts, ["question", "answer", "meanwhile"]);
        assert_eq!(
            s.fill("gone", "x".into()).unwrap_err().code,
            "item_not_found"
        );
        let huge = "x".repeat(MAX_CONVERSATION_BYTES);
        assert_eq!(s.fill("a", huge).unwrap_err().code, "conversation_full");
        assert_eq!(s.items()[1].text, "answer");
    }

    #[test]
    fn a_two_turn_conversation_becomes_chat_messages() {
        let mut s = Session::new("s1".into(), "SmolLM2-135M-Instruct".into());
        let update = json!({"type": "session.update", "session": {
            "instructions": "Be brief.", "temperature": 0.0, "max_output_tokens": 16}});
        let ClientEvent::SessionUpdate(patch) = parse(&update.to_string()).unwrap().event else {
            panic!("not an update")
        };
        s.update(patch);
        assert_eq!(s.json()["max_output_tokens"], 16);
        for (role, t) in [("user", "Hi"), ("assistant", "Hello."), ("user", "Bye")] {
            let ClientEvent::ItemCreate {
                previous_item_id,
                item,
            } = parse(&text(role, t)).unwrap().event
            else {
                panic!("not an item")
            };
            s.add(previous_item_id.as_deref(), item).unwrap();
        }
        let r = s.request(&Settings {
            max_output_tokens: Some(OutputLimit::Tokens(4)),
            ..Settings::default()
        });
        let GenerationInput::Messages(m) = r.input else {
            panic!("not messages")
        };
        let roles: Vec<&str> = m.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "user"]);
        assert_eq!((r.max_tokens, r.sampling.temperature), (Some(4), 0.0));
    }

    #[test]
    fn items_go_where_previous_item_id_says_and_ids_are_unique() {
        let mut s = Session::new("s".into(), "m".into());
        let item = |id: &str| Item {
            id: id.into(),
            role: Role::User,
            text: "x".into(),
        };
        let follows = |r: Result<(Option<String>, String), EventError>| r.unwrap().0;
        assert_eq!(follows(s.add(None, item("a"))), None);
        assert_eq!(follows(s.add(None, item("c"))).as_deref(), Some("a"));
        assert_eq!(follows(s.add(Some("a"), item("b"))).as_deref(), Some("a"));
        assert_eq!(follows(s.add(Some("root"), item("z"))), None);
        let ids: Vec<&str> = s.items().iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, ["z", "a", "b", "c"]);
        assert_eq!(s.add(None, item("a")).unwrap_err().code, "invalid_value");
        assert_eq!(
            s.add(Some("nope"), item("d")).unwrap_err().code,
            "item_not_found"
        );
        s.delete("b").unwrap();
        assert_eq!(s.delete("b").unwrap_err().code, "item_not_found");
        assert!(s.add(None, item("")).unwrap().1.starts_with("item_"));
        // Memory per connection is bounded by bytes as well as items.
        let big = |id: &str| Item {
            id: id.into(),
            role: Role::User,
            text: "x".repeat(MAX_EVENT_BYTES - 100),
        };
        for i in 0..4 {
            s.add(None, big(&format!("big{i}"))).unwrap();
        }
        assert_eq!(
            s.add(None, big("big4")).unwrap_err().code,
            "conversation_full"
        );
    }

    #[test]
    fn every_bad_event_is_an_error_with_a_code_and_the_clients_event_id() {
        let cases = [
            ("{not json", "invalid_json"),
            ("[1]", "invalid_json"),
            (r#"{"event_id": "e9"}"#, "missing_type"),
            (
                r#"{"type": "input_audio_buffer.append", "event_id": "e9"}"#,
                "unknown_event_type",
            ),
            (
                r#"{"type": "conversation.item.create", "event_id": "e9"}"#,
                "missing_field",
            ),
            (
                r#"{"type": "conversation.item.create", "event_id": "e9", "item": {"type": "function_call"}}"#,
                "unsupported_item_type",
            ),
            (
                r#"{"type": "conversation.item.create", "event_id": "e9", "item": {"type": "message", "role": "user", "content": [{"type": "input_audio", "audio": ""}]}}"#,
                "unsupported_content_type",
            ),
            (
                r#"{"type": "conversation.item.create", "event_id": "e9", "item": {"type": "message", "role": "tool", "content": [{"type": "input_text", "text": "x"}]}}"#,
                "invalid_value",
            ),
            (
                r#"{"type": "session.update", "event_id": "e9", "session": {"output_modalities": ["audio"]}}"#,
                "unsupported_modality",
            ),
            (
                r#"{"type": "response.create", "event_id": "e9", "response": {"temperature": 7}}"#,
                "invalid_value",
            ),
            (
                r#"{"type": "response.create", "event_id": "e9", "response": {"max_output_tokens": 0}}"#,
                "invalid_value",
            ),
            (
                r#"{"type": "conversation.item.delete", "event_id": "e9"}"#,
                "missing_field",
            ),
        ];
        for (frame, code) in cases {
            let e = parse(frame).unwrap_err();
            assert_eq!(e.code, code, "{frame}");
            if frame.contains("e9") {
                assert_eq!(e.event_id.as_deref(), Some("e9"), "{frame}");
            }
            let event = error_event("ev1".into(), &e);
            assert_eq!(event["type"], "error");
            assert_eq!(event["error"]["code"], code);
        }
        let huge = format!(
            r#"{{"type": "x", "pad": "{}"}}"#,
            "a".repeat(MAX_EVENT_BYTES)
        );
        assert_eq!(parse(&huge).unwrap_err().code, "event_too_large");
    }
}

//! `sanitize-basic`: the wit-bindgen shim. All logic lives in [`logic`] and [`pii`].
// The wit-bindgen glue expands to `unsafe` ABI code; the plugin's own logic forbids it.
#![allow(unsafe_code)]

pub mod logic;
pub mod pii;

wit_bindgen::generate!({
    path: "../../wit",
    world: "warden:policy/sanitizer-plugin@0.1.0",
});

use std::cell::RefCell;

use exports::warden::policy::lifecycle::Guest as Lifecycle;
use exports::warden::policy::sanitizer::{
    ChatMessage, Guest as Sanitizer, GuestOutputFilter, InferenceInput, InputKind, InputVerdict,
    Payload, Refusal,
};

thread_local! {
    static CONFIG: RefCell<logic::Config> = RefCell::new(logic::Config::default());
}

fn refusal(r: logic::Refused) -> Refusal {
    Refusal {
        status: r.status,
        code: r.code.into(),
        message: r.message,
    }
}

struct Plugin;

impl Lifecycle for Plugin {
    fn configure(config: String) -> Result<(), String> {
        let parsed = logic::Config::from_json(&config)?;
        CONFIG.with(|c| *c.borrow_mut() = parsed);
        Ok(())
    }
}

impl Sanitizer for Plugin {
    type OutputFilter = OutputFilter;

    fn check_input(input: InferenceInput) -> Result<InputVerdict, Refusal> {
        CONFIG.with(|c| {
            let config = c.borrow();
            let rewritten = match &input.payload {
                Payload::Texts(texts) => {
                    let names = |i: usize| match input.kind {
                        InputKind::Completion => "prompt".to_string(),
                        _ => format!("input[{i}]"),
                    };
                    config
                        .check_texts(names, texts)
                        .map_err(refusal)?
                        .map(Payload::Texts)
                }
                Payload::Messages(messages) => {
                    let contents: Vec<&str> = messages.iter().map(|m| m.content.as_str()).collect();
                    config
                        .check_messages(&contents)
                        .map_err(refusal)?
                        .map(|new| {
                            Payload::Messages(
                                messages
                                    .iter()
                                    .zip(new)
                                    .map(|(m, content)| ChatMessage {
                                        role: m.role.clone(),
                                        content,
                                    })
                                    .collect(),
                            )
                        })
                }
            };
            Ok(rewritten.map_or(InputVerdict::Pass, InputVerdict::Rewrite))
        })
    }
}

/// The WIT `output-filter` resource over [`logic::StreamFilter`].
pub struct OutputFilter(RefCell<logic::StreamFilter>);

impl GuestOutputFilter for OutputFilter {
    fn new(_kind: InputKind) -> Self {
        let policy = CONFIG.with(|c| c.borrow().output);
        Self(RefCell::new(logic::StreamFilter::new(policy)))
    }

    fn push(&self, chunk: String) -> Result<String, Refusal> {
        self.0.borrow_mut().push(&chunk).map_err(refusal)
    }

    fn finish(&self) -> Result<String, Refusal> {
        self.0.borrow_mut().finish().map_err(refusal)
    }
}

// Only the wasm build exports the ABI: native builds (unit tests, clippy) cannot link
// symbol names such as `warden:policy/auth@0.1.0#authenticate`.
#[cfg(target_arch = "wasm32")]
export!(Plugin);

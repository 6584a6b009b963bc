//! `sanitize-basic`: size limits, control characters and personal data in inference input,
//! and redaction of the generated text as it streams. The policy lives in [`logic`] and
//! [`pii`]; this is its binding through `warden-policy`.

pub mod logic;
pub mod pii;

use warden_policy::sanitizer::{
    ChatMessage, InferenceInput, InputKind, InputVerdict, Payload, Refusal,
};

fn refusal(r: logic::Refused) -> Refusal {
    warden_policy::refusal(r.status, r.code, r.message).into()
}

impl warden_policy::Sanitizer for logic::Config {
    type Config = logic::Config;
    type Filter = logic::StreamFilter;

    fn new(config: logic::Config) -> Result<Self, String> {
        config.validated()
    }

    fn check_input(&self, input: InferenceInput) -> Result<InputVerdict, Refusal> {
        let rewritten = match &input.payload {
            Payload::Texts(texts) => {
                let names = |i: usize| match input.kind {
                    InputKind::Completion => "prompt".to_string(),
                    _ => format!("input[{i}]"),
                };
                self.check_texts(names, texts)
                    .map_err(refusal)?
                    .map(Payload::Texts)
            }
            Payload::Messages(messages) => {
                let contents: Vec<&str> = messages.iter().map(|m| m.content.as_str()).collect();
                self.check_messages(&contents).map_err(refusal)?.map(|new| {
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
    }

    fn output_filter(&self, _kind: InputKind) -> logic::StreamFilter {
        logic::StreamFilter::new(self.output)
    }
}

impl warden_policy::OutputFilter for logic::StreamFilter {
    fn push(&mut self, chunk: &str) -> Result<String, Refusal> {
        logic::StreamFilter::push(self, chunk).map_err(refusal)
    }

    fn finish(&mut self) -> Result<String, Refusal> {
        logic::StreamFilter::finish(self).map_err(refusal)
    }
}

warden_policy::export_sanitizer!(logic::Config);

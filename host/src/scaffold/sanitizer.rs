//! A sanitizer: refuses input that contains a configured word; output passes through.

use warden_policy::sanitizer::{InferenceInput, InputKind, InputVerdict, Payload, Refusal};

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Words no input may contain (compared in lower case).
    blocked: Vec<String>,
}

pub struct Plugin(Config);

pub struct PassThrough;

impl warden_policy::OutputFilter for PassThrough {
    fn push(&mut self, chunk: &str) -> Result<String, Refusal> {
        Ok(chunk.to_string())
    }

    fn finish(&mut self) -> Result<String, Refusal> {
        Ok(String::new())
    }
}

impl warden_policy::Sanitizer for Plugin {
    type Config = Config;
    type Filter = PassThrough;

    fn new(config: Config) -> Result<Self, String> {
        Ok(Self(config))
    }

    fn check_input(&self, input: InferenceInput) -> Result<InputVerdict, Refusal> {
        let texts: Vec<String> = match input.payload {
            Payload::Texts(t) => t,
            Payload::Messages(m) => m.into_iter().map(|m| m.content).collect(),
        };
        for (i, text) in texts.iter().enumerate() {
            let lower = text.to_lowercase();
            if let Some(word) = self.0.blocked.iter().find(|w| lower.contains(w.as_str())) {
                let message = format!("input {i} contains the blocked word `{word}`");
                return Err(warden_policy::bad_input("blocked_word", message).into());
            }
        }
        Ok(InputVerdict::Pass)
    }

    fn output_filter(&self, _kind: InputKind) -> PassThrough {
        PassThrough
    }
}

warden_policy::export_sanitizer!(Plugin);

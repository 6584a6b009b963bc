//! The model's chat template rendered over any conversation: a prompt or an error, never
//! a panic; every message's content appears in the prompt as it was sent.
#![no_main]

use libfuzzer_sys::fuzz_target;

mod common;
use common::TOOLS;
use warden::engine::TemplateMessage;

const ROLES: [&str; 4] = ["system", "user", "assistant", "user"];

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Messages separated by U+001E; each starts with a role selector character.
    let messages: Vec<TemplateMessage> = text
        .split('\u{1e}')
        .take(64)
        .map(|m| {
            let mut chars = m.chars();
            let role = chars.next().map_or(0, |c| c as usize % ROLES.len());
            TemplateMessage {
                role: ROLES[role].to_string(),
                content: chars.as_str().to_string(),
            }
        })
        .collect();
    if let Ok(prompt) = TOOLS.1.render(&messages) {
        for m in &messages {
            assert!(prompt.contains(&m.content), "{:?} missing", m.content);
        }
        assert!(prompt.ends_with("<|im_start|>assistant\n"), "{prompt:?}");
    }
});

//! What the text-model targets share: the tokenizer and chat template of the GGUF in
//! `$WARDEN_MODELS_DIR` (default `../../models`), read once per process.

use std::sync::LazyLock;

use warden::engine::{ChatTemplate, GgufTokenizer};

pub static TOOLS: LazyLock<(GgufTokenizer, ChatTemplate)> = LazyLock::new(|| {
    let dir = std::env::var("WARDEN_MODELS_DIR").unwrap_or_else(|_| "../../models".into());
    warden::http::fuzz::text_tools(
        &std::path::Path::new(&dir).join("SmolLM2-135M-Instruct.Q4_1.gguf"),
    )
    .expect("the text model (make models)")
});

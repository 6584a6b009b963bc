//! A generative model as the rest of the server sees it: its engine thread, and the work
//! on its text that happens before the engine (the chat template, tokenizing, the context
//! window), so that no caller reaches into the tokenizer or the template.

use std::path::Path;
use std::sync::Arc;

use super::decoder;
use super::{
    ChatTemplate, EngineError, GenerateConfig, GenerateEvent, GenerateHandle, GenerateRequest,
    GgufTokenizer, ModelLoadError, TemplateMessage,
};
use tokio::sync::mpsc::UnboundedReceiver;

/// What a prompt is made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromptInput {
    /// A conversation, rendered with the model's chat template.
    Messages(Vec<TemplateMessage>),
    /// Text, tokenized as it is.
    Text(String),
    /// Token ids, taken as they are.
    Tokens(Vec<u32>),
}

/// Why a prompt cannot be made. All but [`PromptError::Engine`] are the client's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PromptError {
    /// The model has no chat template, so it takes no conversation.
    #[error("this model has no chat template; use /v1/completions")]
    NoTemplate,
    /// The template refused the conversation (`raise_exception`, a bad role).
    #[error("{0}")]
    Template(String),
    /// The prompt has more tokens than the context window.
    #[error("the prompt is longer than the context window")]
    TooLong,
    /// Token ids that are not in the vocabulary.
    #[error("{0}")]
    Tokens(String),
    /// The tokenizer failed on input it should take: the model's fault.
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// A generative model: its engine thread, its tokenizer and its chat template.
#[derive(Debug)]
pub struct TextModel {
    /// The id clients use.
    pub id: String,
    /// The engine thread.
    pub handle: GenerateHandle,
    /// The GGUF's chat template, if it has one.
    pub template: Option<ChatTemplate>,
}

impl TextModel {
    /// Load a llama-family GGUF from `path` and start its engine thread.
    pub fn load(id: &str, path: &Path, config: GenerateConfig) -> Result<Self, ModelLoadError> {
        let file = crate::plugins::file_name(path);
        let invalid = |reason: String| ModelLoadError::Invalid {
            model: id.into(),
            file: file.clone(),
            reason,
        };
        let mut reader = std::fs::File::open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ModelLoadError::NotFound {
                model: id.into(),
                file: file.clone(),
            },
            kind => invalid(kind.to_string()),
        })?;
        let mut reader = std::io::BufReader::new(&mut reader);
        let content = candle_core::quantized::gguf_file::Content::read(&mut reader)
            .map_err(|e| invalid(format!("not a GGUF file: {e}")))?;
        let tokenizer = GgufTokenizer::from_gguf(&content)
            .map_err(|e| invalid(format!("tokenizer metadata: {e}")))?;
        let weights = decoder::TextWeights::from_gguf(&content, &mut reader)
            .map_err(|e| invalid(e.to_string()))?;
        let template = match content
            .metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
        {
            Some(source) => Some(
                ChatTemplate::new(source, &tokenizer.bos_text, &tokenizer.eos_text)
                    .map_err(invalid)?,
            ),
            None => None,
        };
        let handle = GenerateHandle::spawn(id, Arc::new(weights), Arc::new(tokenizer), config)
            .map_err(|e| invalid(format!("cannot start the engine thread: {e}")))?;
        Ok(Self {
            id: id.into(),
            handle,
            template,
        })
    }

    /// The context window, in tokens.
    pub fn context_length(&self) -> usize {
        self.handle.context_length()
    }

    /// The most bytes of text one token stands for: text longer than the window times this
    /// cannot fit, without tokenizing it.
    pub fn max_token_bytes(&self) -> usize {
        self.handle.tokenizer().max_token_bytes()
    }

    /// Whether the model takes a conversation (it has a chat template).
    pub fn has_template(&self) -> bool {
        self.template.is_some()
    }

    /// The prompt's token ids: a conversation through the chat template, text through the
    /// tokenizer (with the model's special tokens), ids as they are. Longer than the
    /// context window is [`PromptError::TooLong`]. Blocking: run it off the reactor.
    pub fn prompt(&self, input: PromptInput) -> Result<Vec<u32>, PromptError> {
        let context = self.context_length();
        let text = match input {
            PromptInput::Tokens(ids) if ids.len() > context => return Err(PromptError::TooLong),
            PromptInput::Tokens(ids) => return Ok(ids),
            PromptInput::Text(text) => text,
            PromptInput::Messages(messages) => self
                .template
                .as_ref()
                .ok_or(PromptError::NoTemplate)?
                .render(&messages)
                .map_err(PromptError::Template)?,
        };
        let encoded = self
            .handle
            .tokenizer()
            .encode_at_most(&text, true, true, context)
            .map_err(|e| EngineError::Model(e.to_string()))?;
        if !encoded.complete {
            return Err(PromptError::TooLong);
        }
        Ok(encoded.ids)
    }

    /// `text` as token ids, with the model's framing tokens if `add_special`, and special
    /// tokens written in the text recognised if `parse_special`. Blocking.
    pub fn tokenize(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>, EngineError> {
        self.handle
            .tokenizer()
            .encode(text, add_special, parse_special)
            .map_err(|e| EngineError::Model(e.to_string()))
    }

    /// The text of `ids`; ids outside the vocabulary are [`PromptError::Tokens`]. Blocking.
    pub fn detokenize(&self, ids: &[u32]) -> Result<String, PromptError> {
        self.handle
            .tokenizer()
            .decode(ids)
            .map_err(|e| PromptError::Tokens(e.to_string()))
    }

    /// Queue a generation. Events arrive on the returned channel; dropping it cancels.
    pub fn submit(
        &self,
        request: GenerateRequest,
    ) -> Result<UnboundedReceiver<GenerateEvent>, EngineError> {
        self.handle.submit(request)
    }
}

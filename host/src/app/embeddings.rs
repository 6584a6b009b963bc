//! An embeddings request as domain work: token-id inputs checked against the model's
//! vocabulary and shown to the sanitizer as their text, the sanitizer's check of every
//! input, the breaker, the engine's batch.

use tracing::Instrument;

use super::Admitted;
use super::engines::{engine_permit, settle};
use crate::engine::{EmbedInput, Embedding, EmbeddingsHandle};
use crate::error::ApiError;
use crate::plugins::{InferenceInput, InputKind, Payload};

/// What an embeddings request produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Embedded {
    /// The id of the model that made them.
    pub model: String,
    /// One per input, in order.
    pub embeddings: Vec<Embedding>,
}

impl Admitted {
    /// Embed `inputs` with the model `model` names, under the sanitizer's input check.
    pub async fn embed(&self, model: &str, inputs: Vec<EmbedInput>) -> Result<Embedded, ApiError> {
        let model = self.embedding_model(model)?;
        let (texts, tokens) = texts_for_the_sanitizer(model, inputs)?;
        let texts = async {
            let session = self
                .plugins
                .sanitizer_session(&self.meta.request_id)
                .await?;
            let input = InferenceInput {
                kind: InputKind::Embeddings,
                model: model.id().to_string(),
                principal: self.principal.clone(),
                payload: Payload::Texts(texts),
                max_tokens: None,
            };
            match session.check_input(input).await? {
                Err(refusal) => Err(ApiError::Refused(refusal)),
                Ok(checked) => Ok(checked.into_payload().into_texts()),
            }
        }
        .instrument(tracing::debug_span!("plugin.sanitizer"))
        .await?;
        // Token ids whose text the sanitizer let through unchanged run as sent; a
        // rewritten one runs as its new text.
        let inputs: Vec<EmbedInput> = texts
            .into_iter()
            .zip(tokens)
            .map(|(text, sent)| match sent {
                Some((ids, decoded)) if decoded == text => EmbedInput::Tokens(ids),
                _ => EmbedInput::Text(text),
            })
            .collect();

        let permit = engine_permit(&self.state, model.id())?;
        let embeddings = model
            .embed(inputs)
            .instrument(tracing::debug_span!("engine.embed"))
            .await;
        settle(permit, embeddings.as_ref().map(|_| ()));
        let embeddings = embeddings.map_err(|e| self.engine_failed(model.id(), e))?;
        Ok(Embedded {
            model: model.id().to_string(),
            embeddings,
        })
    }
}

/// Token ids sent as input, with the text they decode to.
type SentTokens = Option<(Vec<u32>, String)>;

/// The text of every input, as the sanitizer sees it (token ids decoded, checked against
/// the model's vocabulary first), and the token ids of those sent as ids.
fn texts_for_the_sanitizer(
    model: &EmbeddingsHandle,
    inputs: Vec<EmbedInput>,
) -> Result<(Vec<String>, Vec<SentTokens>), ApiError> {
    let mut texts = Vec::with_capacity(inputs.len());
    let mut tokens = Vec::with_capacity(inputs.len());
    for (i, input) in inputs.into_iter().enumerate() {
        match input {
            EmbedInput::Text(t) => {
                texts.push(t);
                tokens.push(None);
            }
            EmbedInput::Tokens(ids) => {
                let vocabulary = model.vocabulary().ok_or_else(|| {
                    ApiError::bad("input", "this model takes text only, not token ids")
                })?;
                if let Some(id) = ids.iter().find(|&&id| id as usize >= vocabulary.size()) {
                    return Err(ApiError::bad(
                        "input",
                        format!(
                            "token id {id} in input[{i}] is not in the model's vocabulary \
                             (ids 0 to {})",
                            vocabulary.size() - 1
                        ),
                    ));
                }
                let text = vocabulary
                    .decode(&ids)
                    .map_err(|_| ApiError::bad("input", format!("input[{i}] cannot be decoded")))?;
                texts.push(text.clone());
                tokens.push(Some((ids, text)));
            }
        }
    }
    Ok((texts, tokens))
}

//! A `tokenizers` tokenizer built from a GGUF file's own `tokenizer.ggml.*` metadata, so that
//! token ids equal llama.cpp's for the same file.
//!
//! Only byte-level BPE (`tokenizer.ggml.model = "gpt2"`) is supported. The pre-tokenizer
//! follows `tokenizer.ggml.pre`: `smollm` splits every digit into its own token before the
//! GPT-2 split (candle's own conversion treats it as plain GPT-2 and gets numbers wrong);
//! `gpt2`, `default` and an absent value use the GPT-2 split alone. Control and user-defined
//! tokens (`token_type` 3 and 4) become special added tokens, matched in text when special
//! tokens are parsed.

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, Tokenizer};

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// Why a GGUF tokenizer could not be built, or a text or ids could not be converted.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TokenizerError(String);

/// Token ids, and whether they are all of the text's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// The ids.
    pub ids: Vec<u32>,
    /// `false` when encoding stopped early (past its `max`).
    pub complete: bool,
}

fn err(e: impl std::fmt::Display) -> TokenizerError {
    TokenizerError(e.to_string())
}

/// The tokenizer of a GGUF model, with the ids that matter for generation.
pub struct GgufTokenizer {
    /// Special tokens in text are parsed into their ids.
    parse_special: Tokenizer,
    /// Special tokens in text are tokenized as ordinary text.
    plain: Tokenizer,
    /// Beginning-of-sequence token, added when the model asks for it.
    pub bos: Option<u32>,
    /// Whether `add_special` prepends `bos` (`tokenizer.ggml.add_bos_token`).
    pub add_bos: bool,
    /// Tokens that end generation: the EOS and EOT tokens and `<|im_end|>`-like control
    /// tokens the chat template closes turns with.
    pub stop_tokens: Vec<u32>,
    /// Token text of each control token, for rendering templates.
    pub bos_text: String,
    /// End-of-sequence token text.
    pub eos_text: String,
    vocab_size: usize,
    /// The special tokens' texts, which no piece of a long text may cut through.
    special_texts: Vec<String>,
    /// The most bytes of text one token stands for.
    max_token_bytes: usize,
}

impl std::fmt::Debug for GgufTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufTokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("bos", &self.bos)
            .field("stop_tokens", &self.stop_tokens)
            .finish()
    }
}

fn strings(content: &Content, key: &str) -> Result<Vec<String>, TokenizerError> {
    let values = content
        .metadata
        .get(key)
        .ok_or_else(|| err(format!("{key} is missing")))?
        .to_vec()
        .map_err(err)?;
    values
        .iter()
        .map(|v| v.to_string().cloned().map_err(err))
        .collect()
}

fn get<'a>(content: &'a Content, key: &str) -> Option<&'a Value> {
    content.metadata.get(key)
}

fn u32_of(content: &Content, key: &str) -> Option<u32> {
    get(content, key).and_then(|v| v.to_u32().ok())
}

impl GgufTokenizer {
    /// Build from the metadata of a GGUF file.
    pub fn from_gguf(content: &Content) -> Result<Self, TokenizerError> {
        let model = get(content, "tokenizer.ggml.model")
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
            .unwrap_or("");
        if model != "gpt2" {
            return Err(err(format!(
                "tokenizer model `{model}` is not supported (only byte-level BPE, `gpt2`)"
            )));
        }
        let pre = get(content, "tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
            .unwrap_or("default");
        let split_digits = match pre {
            "smollm" => true,
            "gpt2" | "default" => false,
            other => {
                return Err(err(format!(
                    "pre-tokenizer `{other}` is not supported (smollm, gpt2)"
                )));
            }
        };

        let tokens = strings(content, "tokenizer.ggml.tokens")?;
        let merges = strings(content, "tokenizer.ggml.merges")?;
        let types: Vec<i32> = match get(content, "tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()
                .map_err(err)?
                .iter()
                .map(|t| t.to_i32().map_err(err))
                .collect::<Result<_, _>>()?,
            None => vec![1; tokens.len()],
        };
        if types.len() != tokens.len() {
            return Err(err("token_type and tokens differ in length"));
        }

        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let merges = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| err(format!("malformed merge `{m}`")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(err)?;

        let byte_level = ByteLevel::new(false, false, true);
        let pre_tokenizer = if split_digits {
            PreTokenizerWrapper::Sequence(Sequence::new(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                PreTokenizerWrapper::ByteLevel(byte_level),
            ]))
        } else {
            PreTokenizerWrapper::ByteLevel(byte_level)
        };
        let mut tokenizer = Tokenizer::new(bpe);
        tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
        tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, t)| matches!(**t, TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED))
            .map(|(tok, _)| AddedToken::from(tok.clone(), true))
            .collect();
        let special_texts: Vec<String> = specials.iter().map(|t| t.content.clone()).collect();
        // A byte-level token's text has one character per byte; special tokens stand for
        // their own text.
        let max_token_bytes = tokens
            .iter()
            .map(|t| t.chars().count().max(t.len()))
            .max()
            .unwrap_or(1)
            .max(1);
        tokenizer.add_special_tokens(specials).map_err(err)?;
        let mut plain = tokenizer.clone();
        plain.set_encode_special_tokens(true);

        let text_of = |id: Option<u32>| {
            id.and_then(|i| tokens.get(i as usize))
                .cloned()
                .unwrap_or_default()
        };
        let bos = u32_of(content, "tokenizer.ggml.bos_token_id");
        let eos = u32_of(content, "tokenizer.ggml.eos_token_id");
        let eot = u32_of(content, "tokenizer.ggml.eot_token_id");
        let mut stop_tokens: Vec<u32> = eos.into_iter().chain(eot).collect();
        // Chat templates close turns with a control token; llama.cpp treats these as EOG too.
        for name in ["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>"] {
            if let Some(i) = tokens.iter().position(|t| t == name)
                && types.get(i) == Some(&TOKEN_TYPE_CONTROL)
            {
                stop_tokens.push(i as u32);
            }
        }
        stop_tokens.sort_unstable();
        stop_tokens.dedup();
        let add_bos = get(content, "tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false);
        Ok(Self {
            parse_special: tokenizer,
            plain,
            bos,
            add_bos,
            stop_tokens,
            bos_text: text_of(bos),
            eos_text: text_of(eos),
            vocab_size: tokens.len(),
            special_texts,
            max_token_bytes,
        })
    }

    /// Token ids of `text`. `add_special` prepends BOS when the model wants it;
    /// `parse_special` turns special-token text such as `<|im_start|>` into its id.
    pub fn encode(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        self.encode_at_most(text, add_special, parse_special, usize::MAX)
            .map(|e| e.ids)
    }

    /// [`Self::encode`], but stop once more than `max` ids are known: a prompt longer than
    /// the context window is refused without tokenizing all of it. The text is tokenized in
    /// pieces cut where the pre-tokenizer would split anyway ([`chunks`](super::chunks)),
    /// so the ids are the same as in one pass and memory stays proportional to a piece.
    pub fn encode_at_most(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
        max: usize,
    ) -> Result<Encoded, TokenizerError> {
        self.encode_in_pieces_of(
            text,
            add_special,
            parse_special,
            max,
            super::chunks::PIECE_BYTES,
        )
    }

    /// [`Self::encode_at_most`] with pieces of `piece_bytes` (tests cut small pieces).
    #[doc(hidden)]
    pub fn encode_in_pieces_of(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
        max: usize,
        piece_bytes: usize,
    ) -> Result<Encoded, TokenizerError> {
        let (tokenizer, specials): (&Tokenizer, &[String]) = if parse_special {
            (&self.parse_special, &self.special_texts)
        } else {
            (&self.plain, &[])
        };
        let mut ids = Vec::new();
        if add_special
            && self.add_bos
            && let Some(bos) = self.bos
        {
            ids.push(bos);
        }
        let boundary = super::chunks::ByteLevelWords { specials };
        for piece in super::chunks::pieces(text, piece_bytes, &boundary) {
            let encoding = tokenizer.encode(piece, false).map_err(err)?;
            ids.extend_from_slice(encoding.get_ids());
            if ids.len() > max {
                return Ok(Encoded {
                    ids,
                    complete: false,
                });
            }
        }
        Ok(Encoded {
            ids,
            complete: true,
        })
    }

    /// [`Self::encode`] in one pass over the whole text: the reference the pieces are
    /// tested against.
    #[doc(hidden)]
    pub fn encode_in_one_pass(
        &self,
        text: &str,
        parse_special: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        let tokenizer = if parse_special {
            &self.parse_special
        } else {
            &self.plain
        };
        Ok(tokenizer
            .encode(text, false)
            .map_err(err)?
            .get_ids()
            .to_vec())
    }

    /// The most bytes of text one token stands for: a text longer than `n` times this has
    /// more than `n` tokens, whatever it says.
    pub fn max_token_bytes(&self) -> usize {
        self.max_token_bytes
    }

    /// Text of `ids`, special tokens included as their text. Unknown ids are an error.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= self.vocab_size) {
            return Err(err(format!(
                "token id {bad} is out of range (vocabulary of {})",
                self.vocab_size
            )));
        }
        self.parse_special.decode(ids, false).map_err(err)
    }

    /// Number of tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Whether `id` ends generation.
    pub fn is_stop(&self, id: u32) -> bool {
        self.stop_tokens.contains(&id)
    }
}

/// GPT-2's byte-level alphabet: the character each byte is written as in a vocabulary.
fn byte_char(b: u8) -> char {
    let visible = |b: u8| matches!(b, 33..=126 | 161..=172 | 174..=255);
    if visible(b) {
        return char::from(b);
    }
    let shifted = (0..b).filter(|&x| !visible(x)).count() as u32;
    char::from_u32(256 + shifted).unwrap_or('?')
}

impl GgufTokenizer {
    /// A tokenizer of one token per byte (ids 0 to 255, no merges) and `<|im_end|>` (256,
    /// the end of a turn), with no model behind it: what per-sequence text state and
    /// scripted models in tests use.
    #[doc(hidden)]
    pub fn one_token_per_byte() -> GgufTokenizer {
        let mut tokens: Vec<Value> = (0..=255u8)
            .map(|b| Value::String(byte_char(b).to_string()))
            .collect();
        tokens.push(Value::String("<|im_end|>".into()));
        let mut types = vec![Value::I32(1); 256];
        types.push(Value::I32(3));
        let metadata = std::collections::HashMap::from([
            ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
            ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
            ("tokenizer.ggml.merges".into(), Value::Array(Vec::new())),
            ("tokenizer.ggml.token_type".into(), Value::Array(types)),
            ("tokenizer.ggml.eos_token_id".into(), Value::U32(256)),
        ]);
        let content = Content {
            magic: candle_core::quantized::gguf_file::VersionedMagic::GgufV3,
            metadata,
            tensor_infos: std::collections::HashMap::new(),
            tensor_data_offset: 0,
        };
        Self::from_gguf(&content).expect("a byte tokenizer")
    }
}

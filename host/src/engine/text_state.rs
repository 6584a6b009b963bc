//! What one sequence's generated tokens release as text: incremental detokenization that
//! waits for whole characters, and stop strings that may span tokens.

use super::gguf_tokenizer::{GgufTokenizer, TokenizerError};

/// Incremental detokenization and stop strings.
///
/// Text is released only when it is complete UTF-8 and cannot be the start of a stop
/// string; at a stop string, everything before it is released and the rest dropped.
pub struct TextState {
    stop: Vec<String>,
    /// Decoded text of all generated tokens so far (complete characters only).
    text: String,
    /// Tokens before `prefix` are decoded and out of reach; `prefix..read` were decoded
    /// last time and give the context the next tokens are decoded in (a token's text may
    /// depend on the one before it). Each step decodes only from `prefix`, so a long answer
    /// costs linear, not quadratic, decoding.
    prefix: usize,
    read: usize,
    /// Bytes of `text` already released.
    released: usize,
    stopped: bool,
}

/// What one token released.
pub struct Piece {
    /// Text released by this token, if any.
    pub delta: Option<String>,
    /// Whether a stop string was reached (the text from it on is never released).
    pub stopped: bool,
}

impl TextState {
    /// A new answer that ends at the first of `stop` (empty strings are ignored).
    pub fn new(stop: Vec<String>) -> Self {
        Self {
            stop: stop.into_iter().filter(|s| !s.is_empty()).collect(),
            text: String::new(),
            prefix: 0,
            read: 0,
            released: 0,
            stopped: false,
        }
    }

    /// Take the answer's tokens so far (`generated`, one more than last time, or more if
    /// the last ones ended inside a character) and release what text is final.
    pub fn push(
        &mut self,
        tokenizer: &GgufTokenizer,
        generated: &[u32],
    ) -> Result<Piece, TokenizerError> {
        self.advance(tokenizer, generated, false)
    }

    /// The answer ended with `generated`: release everything not yet released, up to a
    /// stop string. Tokens that never completed a character are released as decoding
    /// them renders them (U+FFFD), so that the streamed text is the whole answer decoded.
    pub fn finish(
        &mut self,
        tokenizer: &GgufTokenizer,
        generated: &[u32],
    ) -> Result<Option<String>, TokenizerError> {
        if self.stopped {
            return Ok(None);
        }
        let mut out = String::new();
        if self.read < generated.len() {
            let piece = self.advance(tokenizer, generated, true)?;
            out.push_str(piece.delta.as_deref().unwrap_or(""));
            if piece.stopped {
                return Ok((!out.is_empty()).then_some(out));
            }
        }
        out.push_str(self.flush().as_deref().unwrap_or(""));
        Ok((!out.is_empty()).then_some(out))
    }

    fn advance(
        &mut self,
        tokenizer: &GgufTokenizer,
        generated: &[u32],
        end: bool,
    ) -> Result<Piece, TokenizerError> {
        let before = tokenizer.decode(&generated[self.prefix..self.read])?;
        let decoded = tokenizer.decode(&generated[self.prefix..])?;
        // A token may end inside a multi-byte character: wait for the rest.
        // Cut by length, not by comparing text: some decoders render a slice's first token
        // differently (a leading space), the same way in both decodings.
        let added = match decoded.get(before.len()..) {
            Some(added) if !added.is_empty() && (end || !decoded.ends_with('\u{FFFD}')) => added,
            _ => {
                return Ok(Piece {
                    delta: None,
                    stopped: false,
                });
            }
        };
        self.text.push_str(added);
        self.prefix = self.read;
        self.read = generated.len();
        if let Some(at) = self
            .stop
            .iter()
            .filter_map(|s| self.text.find(s.as_str()))
            .min()
        {
            self.stopped = true;
            let delta = self.text.get(self.released..at).map(str::to_string);
            self.released = at.max(self.released);
            return Ok(Piece {
                delta,
                stopped: true,
            });
        }
        let safe = self.text.len() - self.held_back();
        let delta = if safe > self.released {
            let d = self.text.get(self.released..safe).map(str::to_string);
            self.released = safe;
            d
        } else {
            None
        };
        Ok(Piece {
            delta,
            stopped: false,
        })
    }

    /// Length of the longest suffix of `text` that is a proper prefix of a stop string.
    fn held_back(&self) -> usize {
        let mut hold = 0;
        for s in &self.stop {
            for (i, _) in s.char_indices().skip(1) {
                if self.text.ends_with(&s[..i]) {
                    hold = hold.max(i);
                }
            }
        }
        hold
    }

    /// Release what was held back for a possible stop string.
    fn flush(&mut self) -> Option<String> {
        let rest = self.text.get(self.released..)?.to_string();
        self.released = self.text.len();
        (!rest.is_empty()).then_some(rest)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// One token per byte, with no model behind it.
    pub(crate) fn byte_tokenizer() -> GgufTokenizer {
        GgufTokenizer::one_token_per_byte()
    }

    /// Push `text`'s bytes one token at a time; the deltas and whether a stop was reached.
    fn run(stop: &[&str], text: &str) -> (Vec<String>, Option<String>, bool) {
        let tokenizer = byte_tokenizer();
        let mut state = TextState::new(stop.iter().map(|s| s.to_string()).collect());
        let ids: Vec<u32> = text.bytes().map(u32::from).collect();
        let mut deltas = Vec::new();
        for n in 1..=ids.len() {
            let piece = state.push(&tokenizer, &ids[..n]).expect("push");
            deltas.extend(piece.delta);
            if piece.stopped {
                return (deltas, None, true);
            }
        }
        let rest = state.finish(&tokenizer, &ids).expect("finish");
        (deltas, rest, false)
    }

    #[test]
    fn characters_split_across_tokens_are_released_whole() {
        let (deltas, rest, stopped) = run(&[], "aé€😀b");
        assert!(!stopped);
        assert_eq!(deltas, ["a", "é", "€", "😀", "b"]);
        assert_eq!(rest, None);
    }

    #[test]
    fn a_stop_string_across_tokens_ends_the_text_before_it() {
        let (deltas, _, stopped) = run(&["END"], "hello ENDworld");
        assert!(stopped);
        assert_eq!(deltas.concat(), "hello ");
        // A possible start of the stop string is held back until it is not one.
        let (deltas, rest, stopped) = run(&["END"], "an ENTry");
        assert!(!stopped);
        assert_eq!(deltas.concat() + rest.as_deref().unwrap_or(""), "an ENTry");
    }

    #[test]
    fn what_was_held_back_for_a_stop_string_is_released_at_the_end() {
        let (deltas, rest, stopped) = run(&["</s>"], "done </");
        assert!(!stopped);
        assert_eq!(deltas.concat(), "done ");
        assert_eq!(rest.as_deref(), Some("</"));
    }

    #[test]
    fn an_unfinished_character_at_the_end_is_rendered_as_decoding_does() {
        let tokenizer = byte_tokenizer();
        let mut state = TextState::new(Vec::new());
        // "é" is 0xC3 0xA9: the answer ends after its first byte.
        let ids = [u32::from(b'a'), 0xC3];
        let piece = state.push(&tokenizer, &ids[..1]).unwrap();
        assert_eq!(piece.delta.as_deref(), Some("a"));
        assert!(state.push(&tokenizer, &ids).unwrap().delta.is_none());
        assert_eq!(
            state.finish(&tokenizer, &ids).unwrap().as_deref(),
            Some("\u{FFFD}")
        );
    }
}

//! Long texts cut into pieces that tokenize exactly as the whole does.
//!
//! The `tokenizers` crate keeps, for every byte of the text it is given, an alignment
//! entry and copies of the pieces it splits the text into: tens of bytes of memory per
//! byte of input, so a 2 MiB prompt cost hundreds of MiB for a moment. Both tokenizers
//! Warden uses split their input into words before any model sees it, and no word crosses
//! certain boundaries; cut at those boundaries, the pieces tokenize to the same ids, one
//! after the other, as the text does whole. So a long text is tokenized piece by piece,
//! each of about [`PIECE_BYTES`], and memory stays proportional to a piece.

/// The size pieces are cut at, in bytes (the cut is at the next safe boundary).
pub const PIECE_BYTES: usize = 16 << 10;

/// Which boundaries are safe to cut at.
pub trait Boundary {
    /// Whether `text` may be cut at byte `i`, between `before` and `at`, where `after`
    /// follows `at`.
    fn safe(&self, text: &str, i: usize, before: char, at: char, after: Option<char>) -> bool;
}

/// Byte-level BPE with the GPT-2 pre-tokenizer (SmolLM's): a word starts at a single
/// space before a non-space (`" hello"`), and an ASCII letter or digit never shares a word
/// with the ASCII punctuation after it. Special tokens (`<|im_start|>`) are found in the
/// text before it is split into words, so no cut may fall inside one of them.
#[derive(Debug, Clone, Copy)]
pub struct ByteLevelWords<'a> {
    /// The special tokens' texts, when they are parsed as special tokens.
    pub specials: &'a [String],
}

impl Boundary for ByteLevelWords<'_> {
    fn safe(&self, text: &str, i: usize, before: char, at: char, after: Option<char>) -> bool {
        let space_before_word =
            at == ' ' && !before.is_whitespace() && after.is_some_and(|c| !c.is_whitespace());
        let alnum_then_punct = before.is_ascii_alphanumeric() && at.is_ascii_punctuation();
        (space_before_word || alnum_then_punct) && !self.inside_special(text, i)
    }
}

impl ByteLevelWords<'_> {
    /// Whether an occurrence of a special token spans byte `i` of `text`.
    fn inside_special(&self, text: &str, i: usize) -> bool {
        let bytes = text.as_bytes();
        self.specials.iter().any(|s| {
            let s = s.as_bytes();
            (1..s.len()).any(|k| {
                i >= k && i - k + s.len() <= bytes.len() && &bytes[i - k..i - k + s.len()] == s
            })
        })
    }
}

/// BERT's WordPiece: whitespace separates words and is dropped, and every punctuation
/// character is a word of its own.
#[derive(Debug, Clone, Copy)]
pub struct BertWords;

impl Boundary for BertWords {
    fn safe(&self, _text: &str, _i: usize, before: char, at: char, _after: Option<char>) -> bool {
        at.is_ascii_whitespace()
            || before.is_ascii_whitespace()
            || at.is_ascii_punctuation()
            || before.is_ascii_punctuation()
    }
}

/// `text` in pieces of at least `size` bytes (the last may be shorter), each ending at a
/// boundary `boundary` calls safe. A text with no safe boundary is one piece.
pub fn pieces<'a, B: Boundary>(
    text: &'a str,
    size: usize,
    boundary: &'a B,
) -> impl Iterator<Item = &'a str> + 'a {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let cut = cut_after(rest, size, boundary).unwrap_or(rest.len());
        let (piece, tail) = rest.split_at(cut);
        rest = tail;
        Some(piece)
    })
}

/// The first safe cut at or after byte `from` of `text` (never at 0 or the end).
fn cut_after<B: Boundary>(text: &str, from: usize, boundary: &B) -> Option<usize> {
    if from >= text.len() {
        return None;
    }
    let mut start = from;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    let mut before = text[..start].chars().next_back()?;
    let mut chars = text[start..].char_indices().peekable();
    while let Some((i, at)) = chars.next() {
        let after = chars.peek().map(|&(_, c)| c);
        if boundary.safe(text, start + i, before, at, after) {
            return Some(start + i);
        }
        before = at;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_the_text_and_end_at_safe_boundaries() {
        let text = "Hello, world! It's 2024 and the sky is blue.  Two  spaces.";
        let plain = ByteLevelWords { specials: &[] };
        for size in [1, 3, 7, 100] {
            let parts: Vec<&str> = pieces(text, size, &plain).collect();
            assert_eq!(parts.concat(), text, "{size}");
            let mut at_byte = 0;
            for w in parts.windows(2) {
                at_byte += w[0].len();
                let before = w[0].chars().next_back().unwrap();
                let mut next = w[1].chars();
                let at = next.next().unwrap();
                assert!(plain.safe(text, at_byte, before, at, next.next()), "{w:?}");
            }
        }
        let none: Vec<&str> = pieces("aaaaaaaaaa", 2, &plain).collect();
        assert_eq!(none, ["aaaaaaaaaa"]);
        // Never inside a special token.
        let specials = ["<|im_start|>".to_string()];
        let chat = "a<|im_start|>user hi";
        let boundary = ByteLevelWords {
            specials: &specials,
        };
        let parts: Vec<&str> = pieces(chat, 1, &boundary).collect();
        assert_eq!(parts, ["a", "<|im_start|>user", " hi"]);
        assert_eq!(pieces("", 2, &BertWords).count(), 0);
    }
}

//! Long texts are tokenized in pieces, so that memory stays proportional to a piece; the
//! ids must equal one pass over the whole text, for every way a text can be cut. Texts are
//! drawn from fragments that sit on and around every kind of boundary (spaces, runs of
//! whitespace, punctuation, contractions, digits, special tokens, multi-byte characters),
//! and cut into pieces far smaller than in production, so that every boundary is a cut.

use std::sync::OnceLock;

use proptest::prelude::*;
use warden::engine::{GgufTokenizer, MiniLm};

const FRAGMENTS: &[&str] = &[
    "hello",
    " world",
    "  ",
    "   ",
    "\n",
    "\n\n",
    "\t",
    ",",
    ".",
    "...",
    "!?",
    "don't",
    "'s",
    " 'll",
    "12345",
    " 42",
    "3.14",
    "<|im_start|>",
    "<|im_end|>",
    "user\n",
    "é",
    " café",
    "東京",
    "🌤️",
    "👩‍👩‍👧",
    "naïve",
    "(x)",
    "a_b",
    "snake_case",
    "URL: https://x.y/z?q=1",
    "\u{a0}",
    "\u{2028}",
    "Σ",
    "ΟΔΟΣ",
    "\u{301}",
    "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
    "-",
    "--",
    "@",
    "\u{0}",
    "\u{7f}",
    "\u{200b}",
];

fn gguf() -> &'static GgufTokenizer {
    static T: OnceLock<GgufTokenizer> = OnceLock::new();
    T.get_or_init(|| {
        let path = warden_tests::models_dir().join(warden::config::DEFAULT_TEXT_MODEL);
        let mut file = std::fs::File::open(&path).unwrap();
        let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
        GgufTokenizer::from_gguf(&content).unwrap()
    })
}

fn minilm() -> &'static MiniLm {
    static M: OnceLock<MiniLm> = OnceLock::new();
    M.get_or_init(|| {
        let dir = warden_tests::models_dir().join(warden::EMBEDDING_MODEL);
        MiniLm::load(warden::EMBEDDING_MODEL, &dir).unwrap()
    })
}

fn text() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(FRAGMENTS), 1..400).prop_map(|f| f.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn gguf_pieces_tokenize_as_the_whole(text in text(), piece in 1usize..64) {
        for parse_special in [true, false] {
            let whole = gguf().encode_in_one_pass(&text, parse_special).unwrap();
            let cut = gguf()
                .encode_in_pieces_of(&text, false, parse_special, usize::MAX, piece)
                .unwrap();
            prop_assert!(cut.complete);
            prop_assert_eq!(&cut.ids, &whole, "parse_special {}", parse_special);
            // Stopping early keeps a prefix of the ids.
            let few = gguf()
                .encode_in_pieces_of(&text, false, parse_special, whole.len() / 2, piece)
                .unwrap();
            prop_assert!(few.ids.len() > whole.len() / 2 || few.complete);
            prop_assert_eq!(&whole[..few.ids.len()], &few.ids[..]);
        }
    }

    #[test]
    fn minilm_pieces_tokenize_as_the_whole(text in text(), piece in 1usize..64) {
        let whole = minilm().encode_in_one_pass(&text).unwrap();
        let cut = minilm().encode_in_pieces_of(&text, piece).unwrap();
        prop_assert_eq!(cut, whole);
    }
}

#[test]
fn a_long_prompt_is_refused_without_tokenizing_all_of_it() {
    let text = "word ".repeat(400_000);
    let e = gguf().encode_at_most(&text, true, true, 8192).unwrap();
    assert!(!e.complete);
    assert!(
        e.ids.len() > 8192 && e.ids.len() < 8192 + 20_000,
        "{}",
        e.ids.len()
    );
    assert!(gguf().max_token_bytes() >= 1);
}

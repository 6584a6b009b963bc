//! The GGUF tokenizer and detokenizer: any text encodes and decodes back to itself (with
//! special-token text taken literally) when each of its characters does alone (SmolLM2's
//! vocabulary has no token for a few bytes, such as U+0004 and U+0006, and Hugging Face's
//! tokenizer drops them; the sanitizer refuses control characters by default); piecewise
//! encoding equals one pass;
//! any ids decode without a panic, and a stream of them released token by token is the
//! same text as decoding them at once.
#![no_main]

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};

use libfuzzer_sys::fuzz_target;

mod common;
use common::TOOLS;

/// Whether `c` encodes and decodes back to itself alone (memoized).
fn representable(c: char) -> bool {
    static SEEN: LazyLock<Mutex<HashMap<char, bool>>> = LazyLock::new(Mutex::default);
    *SEEN.lock().unwrap().entry(c).or_insert_with(|| {
        let s = c.to_string();
        let ids = TOOLS.0.encode(&s, false, false).expect("encode");
        TOOLS.0.decode(&ids).expect("decode") == s
    })
}

fuzz_target!(|data: &[u8]| {
    let tokenizer = &TOOLS.0;
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        let Ok(text) = std::str::from_utf8(rest) else {
            return;
        };
        let ids = tokenizer.encode(text, false, false).expect("encode");
        if text.chars().all(representable) {
            assert_eq!(tokenizer.decode(&ids).expect("decode"), text);
        }
        for parse_special in [false, true] {
            let once = tokenizer.encode(text, true, parse_special).expect("encode");
            let pieces = tokenizer
                .encode_in_pieces_of(
                    text,
                    true,
                    parse_special,
                    usize::MAX,
                    1 + usize::from(mode >> 1),
                )
                .expect("pieces");
            assert!(pieces.complete);
            assert_eq!(pieces.ids, once, "piecewise encoding differs");
        }
    } else {
        let vocab = u32::try_from(tokenizer.vocab_size()).unwrap();
        let ids: Vec<u32> = rest
            .chunks_exact(2)
            .map(|c| u32::from(u16::from_le_bytes([c[0], c[1]])) % vocab)
            .collect();
        let whole = tokenizer.decode(&ids).expect("decode");
        let (streamed, stopped) =
            warden::http::fuzz::stream_text(tokenizer, &ids, vec![]).expect("stream");
        assert!(!stopped);
        assert_eq!(streamed, whole, "{ids:?}");
    }
});

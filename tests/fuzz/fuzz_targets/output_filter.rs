//! The output filter's invariant: whatever the chunking, the concatenation of what it
//! releases equals the redaction of the whole text (for texts whose every cluster fits in
//! what the filter may hold back).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sanitize_basic::logic::{MAX_HELD_BYTES, PiiPolicy, StreamFilter};
use sanitize_basic::pii;

fuzz_target!(|data: &[u8]| {
    // The first bytes choose the cuts, the rest is the text.
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let cuts_len = usize::from(n % 16).min(rest.len());
    let (cuts, text) = rest.split_at(cuts_len);
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    if pii::clusters(text).iter().any(|c| c.len() > MAX_HELD_BYTES) {
        return;
    }
    let policy = PiiPolicy::default();
    let whole = policy.apply(text).unwrap().into_owned();
    let mut bounds: Vec<usize> = cuts
        .iter()
        .map(|&c| usize::from(c) * text.len() / 255)
        .map(|mut i| {
            while !text.is_char_boundary(i) {
                i -= 1;
            }
            i
        })
        .collect();
    bounds.push(text.len());
    bounds.sort_unstable();
    let mut filter = StreamFilter::new(policy);
    let mut out = String::new();
    let mut start = 0;
    for end in bounds {
        out.push_str(&filter.push(&text[start..end]).unwrap());
        start = end;
    }
    out.push_str(&filter.finish().unwrap());
    assert_eq!(out, whole, "{text:?}");
});

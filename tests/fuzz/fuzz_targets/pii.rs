//! The sanitizer's PII scanner and input checks: no panic on any text; a redacted text
//! never contains what was found, and redacting it again changes nothing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sanitize_basic::logic::{Config, PiiPolicy, forbidden_character};
use sanitize_basic::pii;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let policy = PiiPolicy::default();
    let redacted = policy.apply(text).expect("redact never refuses");
    for cluster in pii::clusters(&redacted) {
        assert!(
            pii::find_in_cluster(&redacted[cluster.clone()]).is_empty(),
            "left in {:?}",
            &redacted[cluster]
        );
    }
    assert_eq!(policy.apply(&redacted).unwrap(), redacted);
    let _ = forbidden_character(text);
    let config = Config::default();
    let _ = config.check_text("input[0]", text);
    assert!(pii::open_tail_start(text) <= text.len());
});

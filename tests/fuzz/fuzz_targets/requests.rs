//! Every route's request parsing and validation: `Ok`, or a 4xx error with an OpenAI
//! error body; never a panic, never a 5xx. Also the request-id header.
#![no_main]

use libfuzzer_sys::fuzz_target;
use warden::http::fuzz::{ROUTES, parse_request, request_id};

const CONTENT_TYPES: [Option<&str>; 4] = [
    Some("application/json"),
    None,
    Some("application/json; charset=utf-8"),
    Some("text/plain"),
];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let route = ROUTES[usize::from(selector & 0x7) % ROUTES.len()];
    let content_type = CONTENT_TYPES[usize::from(selector >> 6)];
    if let Err(e) = parse_request(route, content_type, body) {
        let status = e.status().as_u16();
        assert!((400..500).contains(&status), "{route}: {status} {e}");
        assert!(!e.to_string().is_empty());
    }
    let id = request_id(body);
    assert!(!id.is_empty() && id.len() <= 128, "{id:?}");
    assert!(
        id.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')),
        "{id:?}"
    );
});

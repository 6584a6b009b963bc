//! The admin API's `PUT /admin/plugins/{slot}` parsing: headers and a body (JSON or a
//! raw component); `Ok` or a 4xx, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use warden::http::fuzz::admin_change;

const NAMES: [&[u8]; 5] = [
    b"content-type",
    b"x-warden-plugin-sha256",
    b"x-warden-plugin-name",
    b"x-warden-plugin-config",
    b"content-length",
];

fuzz_target!(|data: &[u8]| {
    // Up to four headers, each a name selector byte, a length byte and the value.
    let mut rest = data;
    let mut headers = Vec::new();
    while headers.len() < 4 {
        let [selector, len, tail @ ..] = rest else {
            break;
        };
        if selector & 0x80 == 0 {
            break;
        }
        let len = usize::from(*len).min(tail.len());
        let name = NAMES[usize::from(selector & 0x7f) % NAMES.len()];
        headers.push((name, &tail[..len]));
        rest = &tail[len..];
    }
    if let Err(e) = admin_change(&headers, rest) {
        let status = e.status().as_u16();
        assert!((400..500).contains(&status), "{status} {e}");
    }
});

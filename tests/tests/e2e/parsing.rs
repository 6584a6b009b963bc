//! Request parsing as a property: any body, on any route, is accepted or refused with a
//! 4xx, never a panic or a 5xx (`make fuzz` runs the same entry points under libFuzzer).

use proptest::prelude::*;
use serde_json::{Map, Value};
use warden::http::fuzz::{ROUTES, admin_change, parse_request};

const KEYS: [&str; 20] = [
    "model",
    "messages",
    "role",
    "content",
    "input",
    "prompt",
    "max_tokens",
    "max_completion_tokens",
    "stream",
    "stream_options",
    "include_usage",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "n",
    "encoding_format",
    "dimensions",
    "tokens",
    "logprobs",
];

/// JSON built from the fields the routes read, with values of every type.
fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        (0u32..70_000).prop_map(Value::from),
        "[a-z \\u{0}-\\u{1f}ü<|>]{0,12}".prop_map(Value::String),
        prop_oneof![
            Just("SmolLM2-135M-Instruct"),
            Just("all-MiniLM-L6-v2"),
            Just("user"),
            Just("system"),
            Just("assistant"),
            Just("base64"),
            Just("float"),
        ]
        .prop_map(|s| Value::String(s.into())),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(&KEYS[..]), inner), 0..6).prop_map(
                |pairs| {
                    Value::Object(
                        pairs
                            .into_iter()
                            .map(|(k, v)| (k.to_string(), v))
                            .collect::<Map<_, _>>(),
                    )
                }
            ),
        ]
    })
}

fn refused_with_4xx(result: Result<(), warden::error::ApiError>) -> Result<(), TestCaseError> {
    if let Err(e) = result {
        let status = e.status().as_u16();
        prop_assert!((400..500).contains(&status), "{status}: {e}");
    }
    Ok(())
}

proptest! {
    #[test]
    fn any_json_on_any_route_is_ok_or_4xx(route in prop::sample::select(&ROUTES[..]), body in json()) {
        let bytes = serde_json::to_vec(&body).unwrap();
        refused_with_4xx(parse_request(route, Some("application/json"), &bytes))?;
    }

    #[test]
    fn any_bytes_on_any_route_are_ok_or_4xx(
        route in prop::sample::select(&ROUTES[..]),
        body in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        refused_with_4xx(parse_request(route, None, &body))?;
    }

    #[test]
    fn any_admin_change_is_ok_or_4xx(
        sha in "[0-9a-fA-F]{0,66}",
        name in "[a-z./ -]{0,12}",
        body in json(),
    ) {
        let headers: [(&[u8], &[u8]); 2] = [
            (b"content-type", b"application/json"),
            (b"x-warden-plugin-sha256", sha.as_bytes()),
        ];
        let mut body = body;
        if let Value::Object(map) = &mut body {
            map.insert("path".into(), Value::String(name));
        }
        refused_with_4xx(admin_change(&headers, &serde_json::to_vec(&body).unwrap()))?;
    }
}

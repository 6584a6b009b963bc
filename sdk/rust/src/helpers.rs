//! What most plugins need: header lookup, constant-time comparison of secrets, and
//! refusals and principals built in one line.

use subtle::ConstantTimeEq;

/// A refusal, before it becomes the WIT type of the slot it is given in (`.into()`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// HTTP status, 400 to 499.
    pub status: u16,
    /// Machine-readable code: 1 to 64 of `[A-Za-z0-9_.-]`.
    pub code: String,
    /// For the client, at most 4 KiB, no control characters but tab and line feed.
    pub message: String,
}

/// A refusal with `status`, `code` and `message`.
pub fn refusal(status: u16, code: &str, message: impl Into<String>) -> Refused {
    Refused {
        status,
        code: code.into(),
        message: message.into(),
    }
}

/// A 401: the host adds `WWW-Authenticate: Bearer`.
pub fn unauthorized(code: &str, message: impl Into<String>) -> Refused {
    refusal(401, code, message)
}

/// A 400 naming what is wrong with the input.
pub fn bad_input(code: &str, message: impl Into<String>) -> Refused {
    refusal(400, code, message)
}

/// What a call before a successful `configure` answers (the host never makes one).
#[doc(hidden)]
pub fn unconfigured() -> Refused {
    refusal(401, "not_configured", "the plugin is not configured")
}

/// Whether `given` equals `expected`, in time that does not depend on where they differ.
/// Compare digests (for example sha256) rather than the secrets themselves when their
/// lengths must not leak either.
pub fn same_secret(given: &str, expected: &str) -> bool {
    given.len() == expected.len() && bool::from(given.as_bytes().ct_eq(expected.as_bytes()))
}

macro_rules! slot_types {
    ($module:ident) => {
        impl From<Refused> for crate::$module::Refusal {
            fn from(r: Refused) -> Self {
                Self {
                    status: r.status,
                    code: r.code,
                    message: r.message,
                }
            }
        }
    };
}

slot_types!(auth);
slot_types!(sanitizer);

/// The value of the first header `name` (lower-case), if the request has one.
pub fn header<'a>(request: &'a crate::auth::RequestInfo, name: &str) -> Option<&'a str> {
    request
        .headers
        .iter()
        .find(|h| h.name == name)
        .map(|h| h.value.as_str())
}

/// The token of `Authorization: Bearer <token>`, if the request has one.
pub fn bearer(request: &crate::auth::RequestInfo) -> Option<&str> {
    header(request, "authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// A principal `id` with `scopes` and no tenant.
pub fn principal<'a>(
    id: &str,
    scopes: impl IntoIterator<Item = &'a str>,
) -> crate::auth::Principal {
    crate::auth::Principal {
        id: id.into(),
        tenant: None,
        scopes: scopes.into_iter().map(str::to_string).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_by_value_and_length() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "abcd"));
        assert!(!same_secret("", "a"));
    }

    #[test]
    fn the_vendored_contract_is_the_hosts() {
        for (vendored, host) in [
            (
                include_str!("../wit/0.1.0/types.wit"),
                include_str!("../../../wit/types.wit"),
            ),
            (
                include_str!("../wit/0.1.0/auth.wit"),
                include_str!("../../../wit/auth.wit"),
            ),
            (
                include_str!("../wit/0.1.0/sanitizer.wit"),
                include_str!("../../../wit/sanitizer.wit"),
            ),
            (
                include_str!("../wit/0.1.0/metrics.wit"),
                include_str!("../../../wit/metrics.wit"),
            ),
            (
                include_str!("../wit/0.1.0/worlds.wit"),
                include_str!("../../../wit/worlds.wit"),
            ),
        ] {
            assert_eq!(vendored, host, "sdk/rust/wit/0.1.0 has drifted from wit/");
        }
        assert!(include_str!("../../../wit/types.wit").contains(crate::WIT_VERSION));
    }
}

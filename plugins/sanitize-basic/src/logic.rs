//! Input limits, control-character checks, and PII redaction for inputs and outputs.

#![forbid(unsafe_code)]

use std::borrow::Cow;

use serde::Deserialize;

use crate::pii::{self, PiiKind};

/// What to do when personal data of one kind is found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Replace it with a placeholder such as `[EMAIL]`.
    #[default]
    Redact,
    /// Refuse the request (input) or abort the response (output).
    Reject,
    /// Let it through.
    Off,
}

/// Policy per kind of personal data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct PiiPolicy {
    /// E-mail addresses.
    pub email: Action,
    /// Phone numbers.
    pub phone: Action,
    /// Luhn-valid card numbers.
    pub card: Action,
    /// US social security numbers.
    pub ssn: Action,
}

impl PiiPolicy {
    fn action(&self, kind: PiiKind) -> Action {
        match kind {
            PiiKind::Email => self.email,
            PiiKind::Phone => self.phone,
            PiiKind::Card => self.card,
            PiiKind::Ssn => self.ssn,
        }
    }

    fn all_off(&self) -> bool {
        [self.email, self.phone, self.card, self.ssn]
            .iter()
            .all(|a| *a == Action::Off)
    }

    /// Apply the policy to `text`: `Ok` with the (possibly) redacted text, or the kind of
    /// the first match whose action is `reject`.
    pub fn apply<'a>(&self, text: &'a str) -> Result<Cow<'a, str>, PiiKind> {
        if self.all_off() {
            return Ok(Cow::Borrowed(text));
        }
        let mut out: Option<String> = None;
        let mut copied = 0;
        for cluster in pii::scan(text).filter(|c| c.candidate) {
            let range = cluster.range;
            if let Some(redacted) = self.redact_cluster(&text[range.clone()])? {
                let o = out.get_or_insert_with(|| String::with_capacity(text.len()));
                o.push_str(&text[copied..range.start]);
                o.push_str(&redacted);
                copied = range.end;
            }
        }
        Ok(match out {
            Some(mut o) => {
                o.push_str(&text[copied..]);
                Cow::Owned(o)
            }
            None => Cow::Borrowed(text),
        })
    }

    /// One cluster redacted until nothing in it is found any more (a placeholder is new
    /// context for its neighbours: `5-6789+123-4567…` only reads as a phone number once
    /// what stood before it is gone), or `None` if nothing was. A cluster that still
    /// changes after [`MAX_PASSES`] is replaced whole, so the cost stays bounded.
    fn redact_cluster(&self, cluster: &str) -> Result<Option<String>, PiiKind> {
        let mut current = Cow::Borrowed(cluster);
        let mut strongest: Option<PiiKind> = None;
        for _ in 0..MAX_PASSES {
            let mut out = String::new();
            let mut copied = 0;
            for (range, kind) in pii::find_in_cluster(&current) {
                match self.action(kind) {
                    Action::Off => {}
                    Action::Reject => return Err(kind),
                    Action::Redact => {
                        out.push_str(&current[copied..range.start]);
                        out.push_str(kind.placeholder());
                        copied = range.end;
                        strongest = Some(strongest.map_or(kind, |s| stronger(s, kind)));
                    }
                }
            }
            if strongest.is_none() {
                return Ok(None);
            }
            if copied == 0 {
                // This pass found nothing more to redact.
                return Ok(Some(current.into_owned()));
            }
            out.push_str(&current[copied..]);
            current = Cow::Owned(out);
        }
        Ok(strongest.map(|k| k.placeholder().to_string()))
    }
}

/// Of two kinds, the one that names a redaction covering both.
fn stronger(a: PiiKind, b: PiiKind) -> PiiKind {
    let rank = |k| match k {
        PiiKind::Phone => 0,
        PiiKind::Email => 1,
        PiiKind::Ssn => 2,
        PiiKind::Card => 3,
    };
    if rank(b) > rank(a) { b } else { a }
}

/// Redaction passes over one cluster before it is replaced whole.
const MAX_PASSES: usize = 4;

/// The plugin's configuration. Every field is optional.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Most texts in one embeddings request (OpenAI allows 2048).
    pub max_texts: usize,
    /// Most messages in one chat request.
    pub max_messages: usize,
    /// Most bytes in one text, message or prompt.
    pub max_text_bytes: usize,
    /// What to do with personal data in inputs.
    pub input: PiiPolicy,
    /// What to do with personal data in generated output.
    pub output: PiiPolicy,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_texts: 2048,
            max_messages: 1024,
            max_text_bytes: 256 * 1024,
            input: PiiPolicy::default(),
            output: PiiPolicy::default(),
        }
    }
}

impl Config {
    /// Parse the plugin configuration (`{}` gives the defaults).
    pub fn from_json(json: &str) -> Result<Self, String> {
        let config: Config =
            serde_json::from_str(json).map_err(|e| format!("invalid configuration: {e}"))?;
        config.validated()
    }

    /// The configuration, if its limits are positive.
    pub fn validated(self) -> Result<Self, String> {
        let config = self;
        if config.max_texts == 0 || config.max_messages == 0 || config.max_text_bytes == 0 {
            return Err("max_texts, max_messages and max_text_bytes must be positive".into());
        }
        Ok(config)
    }
}

/// A refusal, before it is turned into the WIT type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// HTTP status (400 or 413).
    pub status: u16,
    /// Machine-readable code.
    pub code: &'static str,
    /// Message naming the offending input.
    pub message: String,
}

impl Refused {
    fn bad(code: &'static str, message: String) -> Self {
        Self {
            status: 400,
            code,
            message,
        }
    }
}

/// Where the first control character other than tab, line feed and carriage return
/// starts. Control characters are C0 and DEL (one byte each) and C1 (U+0080..=U+009F,
/// encoded 0xC2 0x80..=0x9F), so bytes are scanned eight at a time for any byte below
/// 0x20, 0x7F or 0xC2, and only such a word is looked at closely.
fn first_control(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // Whether any byte of `w` is zero.
    let has_zero = |w: u64| w.wrapping_sub(ONES) & !w & HIGH != 0;
    let suspicious = |w: u64| {
        // A byte below 0x20: (b - 0x20) borrows into the high bit only when b < 0x20,
        // for bytes below 0x80 (bytes from 0x80 have the high bit set and are excluded).
        let below_space = w.wrapping_sub(ONES * 0x20) & !w & HIGH != 0;
        below_space || has_zero(w ^ (ONES * 0x7f)) || has_zero(w ^ (ONES * 0xc2))
    };
    let is_control = |i: usize| {
        let b = bytes[i];
        (b < 0x20 && !matches!(b, b'\t' | b'\n' | b'\r'))
            || b == 0x7f
            || (b == 0xc2 && bytes.get(i + 1).is_some_and(|n| (0x80..=0x9f).contains(n)))
    };
    let mut i = 0;
    while i + 8 <= bytes.len() {
        let mut word = [0u8; 8];
        word.copy_from_slice(&bytes[i..i + 8]);
        if suspicious(u64::from_le_bytes(word))
            && let Some(k) = (i..i + 8).find(|&k| is_control(k))
        {
            return Some(k);
        }
        i += 8;
    }
    (i..bytes.len()).find(|&k| is_control(k))
}

/// Why a text is refused outright, whatever the PII policy: NUL, ANSI escapes and other
/// control characters except tab, line feed and carriage return.
pub fn forbidden_character(text: &str) -> Option<String> {
    let at = first_control(text.as_bytes())?;
    let c = text[at..].chars().next()?;
    Some(match c {
        '\0' => format!("contains a NUL character at byte {at}"),
        '\u{1b}' => format!("contains an ANSI escape sequence at byte {at}"),
        c => format!(
            "contains control character U+{:04X} at byte {at}",
            u32::from(c)
        ),
    })
}

impl Config {
    /// Check one text, named `name` in messages (`input[3]`, `messages[0].content`).
    /// Returns the rewritten text when redaction changed it.
    pub fn check_text(&self, name: &str, text: &str) -> Result<Option<String>, Refused> {
        if text.len() > self.max_text_bytes {
            return Err(Refused::bad(
                "input_too_long",
                format!(
                    "{name} is {} bytes long; at most {} are allowed",
                    text.len(),
                    self.max_text_bytes
                ),
            ));
        }
        if let Some(why) = forbidden_character(text) {
            return Err(Refused::bad("invalid_characters", format!("{name} {why}")));
        }
        match self.input.apply(text) {
            Ok(Cow::Borrowed(_)) => Ok(None),
            Ok(Cow::Owned(redacted)) => Ok(Some(redacted)),
            Err(kind) => Err(Refused::bad(
                "personal_data",
                format!(
                    "{name} contains {}, which this server does not accept",
                    kind.name()
                ),
            )),
        }
    }

    /// Check embedding inputs or a prompt, named by `names(i)` in messages.
    /// `Ok(None)`: pass unchanged.
    pub fn check_texts(
        &self,
        names: impl Fn(usize) -> String,
        texts: &[String],
    ) -> Result<Option<Vec<String>>, Refused> {
        self.check_all(texts, ("inputs", "too_many_inputs", self.max_texts), names)
    }

    /// Check chat messages' contents. `Ok(None)`: pass unchanged.
    pub fn check_messages(&self, contents: &[&str]) -> Result<Option<Vec<String>>, Refused> {
        let names = |i: usize| format!("messages[{i}].content");
        self.check_all(
            contents,
            ("messages", "too_many_messages", self.max_messages),
            names,
        )
    }

    /// Check a count limit, then every text; the rewritten list if any text changed.
    fn check_all<S: AsRef<str>>(
        &self,
        texts: &[S],
        (what, code, max): (&str, &'static str, usize),
        names: impl Fn(usize) -> String,
    ) -> Result<Option<Vec<String>>, Refused> {
        if texts.len() > max {
            return Err(Refused::bad(
                code,
                format!("{} {what} given; at most {max} are allowed", texts.len()),
            ));
        }
        let mut rewritten: Option<Vec<String>> = None;
        for (i, text) in texts.iter().enumerate() {
            if let Some(new) = self.check_text(&names(i), text.as_ref())? {
                rewritten.get_or_insert_with(|| {
                    texts.iter().map(|t| t.as_ref().to_string()).collect()
                })[i] = new;
            }
        }
        Ok(rewritten)
    }
}

/// Most text held back while a cluster is still open. A longer cluster is released as it
/// is (redacted as far as it can be judged); this bounds the filter's memory.
pub const MAX_HELD_BYTES: usize = 4096;

/// Streaming output redaction: holds back only the trailing cluster that more text could
/// still turn into (or extend) a secret.
#[derive(Debug)]
pub struct StreamFilter {
    policy: PiiPolicy,
    pending: String,
}

impl StreamFilter {
    /// A filter applying `policy`.
    pub fn new(policy: PiiPolicy) -> Self {
        Self {
            policy,
            pending: String::new(),
        }
    }

    fn refuse(kind: PiiKind) -> Refused {
        Refused::bad(
            "personal_data_in_output",
            format!(
                "the response was stopped because it contained {}",
                kind.name()
            ),
        )
    }

    /// Feed a chunk; returns what may be released now.
    pub fn push(&mut self, chunk: &str) -> Result<String, Refused> {
        self.pending.push_str(chunk);
        let mut cut = pii::open_tail_start(&self.pending);
        if self.pending.len() - cut > MAX_HELD_BYTES {
            cut = self.pending.len();
        }
        let ready = self
            .policy
            .apply(&self.pending[..cut])
            .map_err(Self::refuse)?
            .into_owned();
        self.pending.drain(..cut);
        Ok(ready)
    }

    /// The stream ended: release the rest.
    pub fn finish(&mut self) -> Result<String, Refused> {
        let rest = std::mem::take(&mut self.pending);
        Ok(self.policy.apply(&rest).map_err(Self::refuse)?.into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> Config {
        Config::from_json(json).expect("valid config")
    }

    #[test]
    fn defaults_allow_2048_texts() {
        let c = config("{}");
        let texts = vec!["a".to_string(); 2048];
        assert_eq!(c.check_texts(|i| format!("input[{i}]"), &texts), Ok(None));
        let texts = vec!["a".to_string(); 2049];
        let err = c
            .check_texts(|i| format!("input[{i}]"), &texts)
            .unwrap_err();
        assert_eq!(err.code, "too_many_inputs");
    }

    #[test]
    fn refuses_control_characters_naming_the_input() {
        let c = config("{}");
        let texts = vec!["fine".to_string(), "bad\u{0}".to_string()];
        let err = c
            .check_texts(|i| format!("input[{i}]"), &texts)
            .unwrap_err();
        assert_eq!(err.status, 400);
        assert_eq!(err.message, "input[1] contains a NUL character at byte 3");
        let err = c.check_text("prompt", "red \u{1b}[31m").unwrap_err();
        assert!(err.message.contains("ANSI escape"), "{}", err.message);
        let err = c.check_text("prompt", "bell \u{7}").unwrap_err();
        assert!(err.message.contains("U+0007"), "{}", err.message);
        let err = c.check_text("prompt", "c1 \u{85}").unwrap_err();
        assert!(err.message.contains("U+0085"), "{}", err.message);
        assert_eq!(c.check_text("prompt", "tab\tnl\ncr\r ünïcödé ✓"), Ok(None));
    }

    #[test]
    fn enforces_text_length() {
        let c = config(r#"{"max_text_bytes": 4}"#);
        assert_eq!(c.check_text("input[0]", "abcd"), Ok(None));
        let err = c.check_text("input[0]", "abcde").unwrap_err();
        assert_eq!(
            err.message,
            "input[0] is 5 bytes long; at most 4 are allowed"
        );
    }

    #[test]
    fn redacts_inputs_by_default() {
        let c = config("{}");
        let out = c
            .check_text("input[0]", "mail bob@example.org or 555-123-4567")
            .unwrap();
        assert_eq!(out.as_deref(), Some("mail [EMAIL] or [PHONE]"));
    }

    #[test]
    fn policies_per_kind() {
        let c = config(r#"{"input": {"email": "reject", "card": "off"}}"#);
        let err = c.check_text("input[2]", "bob@example.org").unwrap_err();
        assert_eq!(err.code, "personal_data");
        assert!(
            err.message
                .starts_with("input[2] contains an e-mail address")
        );
        assert_eq!(c.check_text("input[0]", "4111 1111 1111 1111"), Ok(None));
        assert!(Config::from_json(r#"{"input": {"email": "maybe"}}"#).is_err());
        assert!(
            Config::from_json(r#"{"max_text": 1}"#)
                .unwrap_err()
                .contains("unknown field")
        );
    }

    #[test]
    fn messages_are_named_by_index() {
        let c = config("{}");
        let err = c.check_messages(&["hi", "x\u{1b}"]).unwrap_err();
        assert!(
            err.message.starts_with("messages[1].content"),
            "{}",
            err.message
        );
        let out = c.check_messages(&["hi", "ssn 123-45-6789"]).unwrap();
        assert_eq!(out, Some(vec!["hi".to_string(), "ssn [SSN]".to_string()]));
    }

    fn stream(policy: PiiPolicy, chunks: &[&str]) -> Result<String, Refused> {
        let mut f = StreamFilter::new(policy);
        let mut out = String::new();
        for c in chunks {
            out.push_str(&f.push(c)?);
        }
        out.push_str(&f.finish()?);
        Ok(out)
    }

    #[test]
    fn stream_redacts_secrets_split_across_chunks() {
        let p = PiiPolicy::default();
        let out = stream(
            p,
            &[
                "Write to jo",
                "hn.doe@exa",
                "mple.com or call 555-",
                "123-4567.",
            ],
        );
        assert_eq!(out.unwrap(), "Write to [EMAIL] or call [PHONE].");
        let out = stream(p, &["card 4111 ", "1111 1111 11", "11 thanks"]);
        assert_eq!(out.unwrap(), "card [CARD] thanks");
    }

    #[test]
    fn stream_equals_whole_text_for_every_split() {
        let p = PiiPolicy::default();
        let text = "Hi! Mail a.b@example.com, card 4111-1111-1111-1111, ssn 123-45-6789, \
                    tel +1 (555) 123-4567; pi 3.14159 and ünïcödé.";
        let whole = p.apply(text).unwrap().into_owned();
        let cuts: Vec<usize> = (0..=text.len())
            .filter(|&i| text.is_char_boundary(i))
            .collect();
        for &a in &cuts {
            for &b in cuts.iter().filter(|&&b| b >= a).step_by(7) {
                let out = stream(p, &[&text[..a], &text[a..b], &text[b..]]).unwrap();
                assert_eq!(out, whole, "cuts at {a}, {b}");
            }
        }
        // One character at a time.
        let chars: Vec<String> = text.chars().map(String::from).collect();
        let refs: Vec<&str> = chars.iter().map(String::as_str).collect();
        assert_eq!(stream(p, &refs).unwrap(), whole);
    }

    #[test]
    fn stream_holds_back_only_the_open_tail() {
        let mut f = StreamFilter::new(PiiPolicy::default());
        assert_eq!(
            f.push("Hello there, my friend").unwrap(),
            "Hello there, my "
        );
        assert_eq!(f.push("! How").unwrap(), "friend! ");
        assert_eq!(f.finish().unwrap(), "How");
    }

    #[test]
    fn stream_reject_policy_aborts() {
        let p = PiiPolicy {
            ssn: Action::Reject,
            ..PiiPolicy::default()
        };
        let err = stream(p, &["ssn 123-4", "5-6789 ok"]).unwrap_err();
        assert_eq!(err.code, "personal_data_in_output");
    }

    #[test]
    fn redacting_leaves_nothing_a_second_look_would_find() {
        // Found by the property test below: a card number run into an address, and an
        // address whose domain runs into a number.
        let p = PiiPolicy::default();
        for (text, redacted) in [
            (
                "4111 1111 1111 1111bob@example.orgbob@example.org",
                "[PHONE] [EMAIL]@example.org",
            ),
            (
                "bob@example.org-4111 1111 1111 1111bob@example.org",
                "[EMAIL]-[PHONE] [EMAIL]",
            ),
            (
                "Ma(lg,45-6789, tEl 111 1111 5-6789+123-4567123-4567.",
                "Ma(lg,45-6789, tEl [PHONE][PHONE].",
            ),
        ] {
            let once = p.apply(text).unwrap().into_owned();
            assert_eq!(once, redacted);
            assert_eq!(p.apply(&once).unwrap(), once);
        }
    }

    #[test]
    fn stream_memory_is_bounded() {
        let mut f = StreamFilter::new(PiiPolicy::default());
        let long = "x".repeat(MAX_HELD_BYTES + 10);
        assert_eq!(f.push(&long).unwrap().len(), long.len());
    }

    /// Text in which personal data is common: digits, separators, address characters,
    /// words and a few non-ASCII characters.
    fn pii_text() -> impl proptest::strategy::Strategy<Value = String> {
        proptest::string::string_regex(
            "([0-9]{1,5}|[ .()+@-]|[a-z]{1,6}|4111 1111 1111 1111|bob@example\\.org|ü|✓|\n)*",
        )
        .expect("regex")
    }

    proptest::proptest! {
        #[test]
        fn stream_output_is_the_whole_redaction_for_any_chunking(
            text in pii_text(),
            cuts in proptest::collection::vec(0usize..=1000, 0..12),
        ) {
            let p = PiiPolicy::default();
            let whole = p.apply(&text).unwrap().into_owned();
            let mut bounds: Vec<usize> = cuts
                .iter()
                .map(|c| {
                    let mut i = c * text.len() / 1000;
                    while !text.is_char_boundary(i) {
                        i -= 1;
                    }
                    i
                })
                .collect();
            bounds.push(text.len());
            bounds.sort_unstable();
            let mut start = 0;
            let mut chunks = Vec::new();
            for end in bounds {
                chunks.push(&text[start..end]);
                start = end;
            }
            proptest::prop_assert_eq!(stream(p, &chunks).unwrap(), whole);
        }

        #[test]
        fn redaction_leaves_nothing_to_find(text in pii_text()) {
            let p = PiiPolicy::default();
            let redacted = p.apply(&text).unwrap().into_owned();
            for cluster in pii::clusters(&redacted) {
                proptest::prop_assert!(pii::find_in_cluster(&redacted[cluster]).is_empty());
            }
            proptest::prop_assert_eq!(p.apply(&redacted).unwrap(), redacted.as_str());
        }
    }
}

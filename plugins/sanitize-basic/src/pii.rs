//! Detection of e-mail addresses, phone numbers, card numbers and US SSNs.
//!
//! Text is split into *clusters*: maximal runs of characters a secret can be made of
//! (letters, digits, `._%+-@()`, and a single space between digit groups). Every secret lies
//! inside one cluster, and whether a piece of a cluster is a secret depends on that cluster
//! alone. So redacting text cluster by cluster gives the same result however the text is cut,
//! provided no cut falls inside a cluster; the stream filter relies on exactly that.

#![forbid(unsafe_code)]

use std::ops::Range;

/// What kind of personal data a match is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PiiKind {
    /// An e-mail address.
    Email,
    /// A phone number.
    Phone,
    /// A payment card number (Luhn-valid).
    Card,
    /// A US social security number.
    Ssn,
}

impl PiiKind {
    /// Replacement text.
    pub fn placeholder(self) -> &'static str {
        match self {
            PiiKind::Email => "[EMAIL]",
            PiiKind::Phone => "[PHONE]",
            PiiKind::Card => "[CARD]",
            PiiKind::Ssn => "[SSN]",
        }
    }

    /// Human-readable name, for refusals.
    pub fn name(self) -> &'static str {
        match self {
            PiiKind::Email => "an e-mail address",
            PiiKind::Phone => "a phone number",
            PiiKind::Card => "a card number",
            PiiKind::Ssn => "a US social security number",
        }
    }
}

fn is_cluster_char(c: char) -> bool {
    c.is_ascii() && is_cluster_byte(c as u8)
}

/// A byte that is a cluster character.
const IN: u8 = 1;
/// A byte that makes its cluster a candidate: an ASCII digit or `@`.
const CANDIDATE: u8 = 2;

/// Cluster characters are all ASCII, so the scan works on bytes: a byte of a multi-byte
/// UTF-8 character (0x80 and up) is never one.
const fn class_table() -> [u8; 256] {
    let mut t = [0; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        if c.is_ascii_alphanumeric()
            || matches!(c, b'.' | b'_' | b'%' | b'+' | b'-' | b'@' | b'(' | b')')
        {
            t[b] = IN;
        }
        if c.is_ascii_digit() || c == b'@' {
            t[b] |= CANDIDATE;
        }
        b += 1;
    }
    t
}

static CLASS: [u8; 256] = class_table();

#[inline]
fn is_cluster_byte(b: u8) -> bool {
    CLASS[usize::from(b)] & IN != 0
}

/// A space continues a cluster only between digit groups (`4111 1111`, `(555) 123`).
fn space_joins(prev: Option<char>, next: Option<char>) -> bool {
    matches!(prev, Some(c) if c.is_ascii_digit() || c == ')')
        && matches!(next, Some(c) if c.is_ascii_digit() || c == '(' || c == '+')
}

#[inline]
fn space_joins_bytes(prev: u8, next: Option<u8>) -> bool {
    (prev.is_ascii_digit() || prev == b')')
        && matches!(next, Some(c) if c.is_ascii_digit() || c == b'(' || c == b'+')
}

/// One cluster, and whether it could hold a secret at all: every secret has an `@` (an
/// address) or digits (the rest), so a cluster with neither is skipped without a look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// Byte range in the text.
    pub range: Range<usize>,
    /// Whether it contains `@` or an ASCII digit.
    pub candidate: bool,
}

/// The clusters of `text`, in order, found in one pass over its bytes.
pub fn scan(text: &str) -> impl Iterator<Item = Cluster> + '_ {
    let b = text.as_bytes();
    let mut i = 0;
    std::iter::from_fn(move || {
        while i < b.len() && !is_cluster_byte(b[i]) {
            i += 1;
        }
        if i >= b.len() {
            return None;
        }
        let start = i;
        let mut flags = 0;
        while i < b.len() {
            let c = b[i];
            let class = CLASS[usize::from(c)];
            if class & IN != 0 {
                flags |= class;
                i += 1;
            } else if c == b' ' && space_joins_bytes(b[i - 1], b.get(i + 1).copied()) {
                i += 1;
            } else {
                break;
            }
        }
        Some(Cluster {
            range: start..i,
            candidate: flags & CANDIDATE != 0,
        })
    })
}

/// Byte ranges of the clusters of `text`, in order.
pub fn clusters(text: &str) -> Vec<Range<usize>> {
    scan(text).map(|c| c.range).collect()
}

/// Where the text after the last *closed* cluster begins: everything before it is final,
/// everything from it on may still change as more text is appended. For text ending in a
/// cluster character, or a space that could join two digit groups, that is the start of
/// the trailing cluster; otherwise it is the end of the text.
pub fn open_tail_start(text: &str) -> usize {
    let mut cut = text.len();
    let mut next: Option<char> = None;
    let mut rev = text.char_indices().rev().peekable();
    while let Some((i, c)) = rev.next() {
        let prev = rev.peek().map(|&(_, p)| p);
        let at_end = i + c.len_utf8() == text.len();
        let joins = c == ' '
            && matches!(prev, Some(p) if p.is_ascii_digit() || p == ')')
            && (at_end || space_joins(prev, next));
        if is_cluster_char(c) || joins {
            cut = i;
            next = Some(c);
        } else {
            break;
        }
    }
    cut
}

/// All secrets inside one cluster, as byte ranges relative to the cluster, in order and
/// non-overlapping. Numbers are looked for between the e-mail addresses, each stretch on
/// its own, as they will stand once the addresses are replaced: a card number run into an
/// address is found as it would be once the address is gone, so that redacting never
/// turns what is left into something a second look would find.
pub fn find_in_cluster(cluster: &str) -> Vec<(Range<usize>, PiiKind)> {
    let emails = emails(cluster);
    let mut found = Vec::with_capacity(emails.len());
    let mut from = 0;
    for (range, kind) in emails
        .into_iter()
        .chain([(cluster.len()..cluster.len(), PiiKind::Email)])
    {
        let gap = &cluster[from..range.start];
        found.extend(
            digit_secrets(gap)
                .into_iter()
                .map(|(r, k)| (from + r.start..from + r.end, k)),
        );
        from = range.end;
        if !range.is_empty() {
            found.push((range, kind));
        }
    }
    found
}

fn is_local_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'%' | b'+' | b'-')
}

fn is_domain_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-')
}

/// Longest local part (RFC 5321) and domain (RFC 1035) an address is looked for in, so
/// that a cluster of many `@` costs linear time, not quadratic.
const MAX_LOCAL: usize = 64;
const MAX_DOMAIN: usize = 255;

fn emails(s: &str) -> Vec<(Range<usize>, PiiKind)> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut from = 0;
    for at in memchr_all(b, b'@') {
        if at < from {
            continue;
        }
        let floor = from.max(at.saturating_sub(MAX_LOCAL));
        let mut start = at;
        while start > floor && is_local_char(b[start - 1]) {
            start -= 1;
        }
        while start < at && b[start] == b'.' {
            start += 1;
        }
        let ceiling = b.len().min(at + 1 + MAX_DOMAIN);
        let mut end = at + 1;
        while end < ceiling && is_domain_char(b[end]) {
            end += 1;
        }
        // The domain ends after its last label of letters: `bob@example.org-4111` is
        // `bob@example.org` followed by something else.
        // One pass backwards: `run` counts the letters that follow position `k`.
        let mut run = 0;
        let mut domain_end = None;
        for k in (at + 1..end).rev() {
            if b[k] == b'.' && run >= 2 && k > at + 1 {
                domain_end = Some(k + 1 + run);
                break;
            }
            run = if b[k].is_ascii_alphabetic() {
                run + 1
            } else {
                0
            };
        }
        if let Some(end) = domain_end.filter(|_| start < at) {
            out.push((start..end, PiiKind::Email));
            from = end;
        }
    }
    out
}

fn memchr_all(b: &[u8], needle: u8) -> impl Iterator<Item = usize> + '_ {
    b.iter()
        .enumerate()
        .filter(move |&(_, &c)| c == needle)
        .map(|(i, _)| i)
}

/// Most digits a secret has (a 19-digit card); a run's digits past this are counted, not
/// kept, since no longer run is a secret.
const MAX_DIGITS: usize = 19;

/// A run of digit blocks joined by short separators, e.g. `+1 (555) 123-4567`, described
/// by what [`classify`] needs, without a heap allocation.
struct DigitRun {
    range: Range<usize>,
    /// The first [`MAX_DIGITS`] digits, and how many there are in all.
    digits: [u8; MAX_DIGITS],
    n_digits: usize,
    /// The first three block lengths, how many blocks, and the longest.
    first_blocks: [usize; 3],
    n_blocks: usize,
    longest_block: usize,
    /// Whether every separator is `-`; `-` or a space; `.`.
    seps_dash: bool,
    seps_dash_or_space: bool,
    seps_dot: bool,
    plus: bool,
}

impl DigitRun {
    fn new(start: usize, plus: bool) -> Self {
        Self {
            range: start..start,
            digits: [0; MAX_DIGITS],
            n_digits: 0,
            first_blocks: [0; 3],
            n_blocks: 0,
            longest_block: 0,
            seps_dash: true,
            seps_dash_or_space: true,
            seps_dot: true,
            plus,
        }
    }

    fn digit(&mut self, d: u8) {
        if self.n_digits < MAX_DIGITS {
            self.digits[self.n_digits] = d;
        }
        self.n_digits += 1;
    }

    fn block(&mut self, len: usize) {
        if self.n_blocks < 3 {
            self.first_blocks[self.n_blocks] = len;
        }
        self.n_blocks += 1;
        self.longest_block = self.longest_block.max(len);
    }

    fn separator(&mut self, sep: &[u8]) {
        self.seps_dash &= sep == b"-";
        self.seps_dash_or_space &= sep == b"-" || sep == b" ";
        self.seps_dot &= sep == b".";
    }

    fn digits(&self) -> &[u8] {
        &self.digits[..self.n_digits.min(MAX_DIGITS)]
    }
}

fn is_sep(b: u8) -> bool {
    matches!(b, b' ' | b'-' | b'.' | b'(' | b')')
}

fn digit_runs(s: &str) -> Vec<DigitRun> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        // A run starts at a digit, `+digit` or `(digit`, not glued to a letter or digit.
        let start = i;
        let mut j = i;
        let plus = b[j] == b'+';
        if plus || b[j] == b'(' {
            j += 1;
        }
        let glued = start > 0 && b[start - 1].is_ascii_alphanumeric();
        if j >= b.len() || !b[j].is_ascii_digit() || glued {
            i += 1;
            continue;
        }
        let mut run = DigitRun::new(start, plus);
        loop {
            let block_start = j;
            while j < b.len() && b[j].is_ascii_digit() {
                run.digit(b[j] - b'0');
                j += 1;
            }
            run.block(j - block_start);
            run.range.end = j;
            // Up to two separator characters, then another block.
            let mut k = j;
            while k < b.len() && k - j < 2 && is_sep(b[k]) {
                k += 1;
            }
            if k > j && k < b.len() && b[k].is_ascii_digit() {
                run.separator(&b[j..k]);
                j = k;
            } else {
                break;
            }
        }
        // A trailing `)` closes a `(555)` group.
        if b.get(run.range.end) == Some(&b')') && b[start..run.range.end].contains(&b'(') {
            run.range.end += 1;
        }
        let glued_after = b
            .get(run.range.end)
            .is_some_and(|c| c.is_ascii_alphanumeric());
        i = run.range.end.max(start + 1);
        if !glued_after {
            out.push(run);
        }
    }
    out
}

fn luhn(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            let d = u32::from(d);
            if i % 2 == 1 {
                let x = d * 2;
                if x > 9 { x - 9 } else { x }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

fn classify(run: &DigitRun, text: &str) -> Option<PiiKind> {
    let n = run.n_digits;
    let separated = run.n_blocks > 1;
    if run.n_blocks == 3
        && run.first_blocks == [3, 2, 4]
        && run.seps_dash
        && !run.plus
        && !text.starts_with('(')
    {
        let d = run.digits();
        let area = &d[0..3];
        let group = &d[3..5];
        let serial = &d[5..9];
        let valid = area != [0, 0, 0]
            && area != [6, 6, 6]
            && area[0] != 9
            && group != [0, 0]
            && serial != [0, 0, 0, 0];
        return valid.then_some(PiiKind::Ssn);
    }
    if (13..=19).contains(&n) && !run.plus && run.seps_dash_or_space && luhn(run.digits()) {
        return Some(PiiKind::Card);
    }
    let ipv4_like = run.n_blocks == 4 && run.seps_dot;
    let short_blocks = run.longest_block <= 4;
    if (10..=15).contains(&n) && !ipv4_like && (run.plus || (separated && short_blocks)) {
        return Some(PiiKind::Phone);
    }
    None
}

fn digit_secrets(s: &str) -> Vec<(Range<usize>, PiiKind)> {
    digit_runs(s)
        .into_iter()
        .filter_map(|run| classify(&run, &s[run.range.clone()]).map(|k| (run.range, k)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(text: &str) -> Vec<(String, PiiKind)> {
        clusters(text)
            .into_iter()
            .flat_map(|c| {
                let cluster = &text[c.clone()];
                find_in_cluster(cluster)
                    .into_iter()
                    .map(move |(r, k)| (cluster[r].to_string(), k))
            })
            .collect()
    }

    #[test]
    fn finds_emails() {
        assert_eq!(
            kinds("mail john.doe+x@mail.example.com, please."),
            [("john.doe+x@mail.example.com".to_string(), PiiKind::Email)]
        );
        assert!(kinds("an @ sign, user@localhost, a@b.c").is_empty());
        // The domain ends after its last label of letters.
        assert_eq!(
            kinds("bob@example.org-4111 x")[0].0,
            "bob@example.org".to_string()
        );
        assert_eq!(kinds("to bob@example.org.")[0].0, "bob@example.org");
    }

    #[test]
    fn many_at_signs_cost_linear_time() {
        let text = "a@".repeat(128 * 1024);
        let started = std::time::Instant::now();
        assert!(kinds(&text).is_empty());
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
    }

    #[test]
    fn finds_cards_only_when_luhn_valid() {
        assert_eq!(kinds("card 4111 1111 1111 1111 ok")[0].1, PiiKind::Card);
        assert_eq!(kinds("card 4111-1111-1111-1111")[0].1, PiiKind::Card);
        assert_eq!(kinds("5500005555555559")[0].1, PiiKind::Card);
        assert!(
            kinds("4111 1111 1111 1112")
                .iter()
                .all(|(_, k)| *k != PiiKind::Card)
        );
    }

    #[test]
    fn finds_ssns_with_valid_ranges() {
        assert_eq!(
            kinds("ssn 123-45-6789.")[0],
            ("123-45-6789".into(), PiiKind::Ssn)
        );
        assert!(kinds("000-12-3456 666-12-3456 900-12-3456 123-00-4567").is_empty());
    }

    #[test]
    fn finds_phone_numbers() {
        for p in [
            "+1 (555) 123-4567",
            "555-123-4567",
            "555.123.4567",
            "+44 20 7946 0958",
        ] {
            let found = kinds(&format!("call {p} now"));
            assert_eq!(found, [(p.to_string(), PiiKind::Phone)], "{p}");
        }
        assert_eq!(kinds("+15551234567")[0].1, PiiKind::Phone);
    }

    #[test]
    fn leaves_ordinary_numbers_alone() {
        for t in [
            "in 2024-01-15 at 12:30",
            "pi is 3.14159265358979",
            "host 192.168.100.200",
            "version 1.2.3",
            "order 5551234567",
            "hash a3f5551234567890b",
            "call 555-1234",
        ] {
            assert!(kinds(t).is_empty(), "{t}: {:?}", kinds(t));
        }
    }

    /// The char-by-char definition of clusters that [`scan`] must agree with.
    fn clusters_by_chars(text: &str) -> Vec<Range<usize>> {
        let mut out = Vec::new();
        let mut start: Option<usize> = None;
        let mut prev: Option<char> = None;
        let mut chars = text.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            let next = chars.peek().map(|&(_, n)| n);
            let inside =
                is_cluster_char(c) || (c == ' ' && start.is_some() && space_joins(prev, next));
            match (inside, start) {
                (true, None) => start = Some(i),
                (false, Some(s)) => {
                    out.push(s..i);
                    start = None;
                }
                _ => {}
            }
            prev = Some(c);
        }
        if let Some(s) = start {
            out.push(s..text.len());
        }
        out
    }

    #[test]
    fn the_byte_scan_agrees_with_the_char_definition() {
        for t in [
            "hi 4111 1111 x (555) 123 y",
            "é4 5é (5) +4 a@b.co  9 9",
            " 1 ",
            "1 ",
            "ü 1 2 ",
            "",
        ] {
            assert_eq!(clusters(t), clusters_by_chars(t), "{t:?}");
        }
    }

    #[test]
    fn clusters_join_digit_groups_only() {
        let t = "hi 4111 1111 x (555) 123 y";
        let cs: Vec<&str> = clusters(t).into_iter().map(|r| &t[r]).collect();
        assert_eq!(cs, ["hi", "4111 1111", "x", "(555) 123", "y"]);
    }

    #[test]
    fn open_tail_holds_what_may_still_grow() {
        assert_eq!(open_tail_start("mail john"), 5);
        assert_eq!(open_tail_start("mail john "), 10);
        assert_eq!(open_tail_start("card 4111 "), 5);
        assert_eq!(open_tail_start("card 4111 1111"), 5);
        assert_eq!(open_tail_start("done! "), 6);
        assert_eq!(open_tail_start(""), 0);
    }
}

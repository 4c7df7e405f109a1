//! The canonical request target: one form of a request's path and query, computed once before any
//! route is matched, and used for matching, entitlement resources, cache keys and forwarding alike
//! (`docs/contracts.md`, "The canonical request target").
//!
//! Why: a gateway that checks one spelling of a path and forwards another lets a client read what a
//! rule denies (`NG%2DH27` checked as itself, served as `NG-H27`), or reach what no route names
//! (`/instruments/..`). So there is exactly one spelling, and every byte of it is either decoded
//! (unreserved characters) or refused:
//!
//! - `%XX` of an unreserved character (`A-Z a-z 0-9 - . _ ~`) is decoded (RFC 3986 6.2.2.2 says
//!   they are equivalent); any other escape is kept, with upper-case hex;
//! - refused, with 400 `invalid_request` and reason `invalid_path`: an encoded `/` (`%2F`) or `%`
//!   (`%25`, which also closes every double encoding), NUL or another control character, a
//!   backslash (plain or `%5C`), a `.` or `..` segment (plain, encoded, any case), an empty segment
//!   (`//`), a `;` (path parameters, which upstream servers strip differently), a malformed escape,
//!   and escapes that do not decode to UTF-8 (overlong forms included);
//! - the query keeps its bytes but for the same escape normalisation; a malformed escape, NUL and
//!   control characters are refused there too.
//!
//! A path segment of the canonical form decodes ([`decode`]) to exactly one string, the one the
//! upstream will see: route parameters are decoded with it before they are rendered into a
//! resource.

use std::borrow::Cow;
use std::fmt;

/// Why a request target was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    /// The target is not an absolute path (`*`, or no leading `/`).
    NotAbsolute,
    /// `%2F`: a slash inside a segment.
    EncodedSlash,
    /// `%25`: an encoded percent (double encoding).
    EncodedPercent,
    /// NUL or another control character, plain or encoded.
    ControlCharacter,
    /// A backslash, plain or encoded.
    Backslash,
    /// A `.` or `..` segment, plain or encoded.
    DotSegment,
    /// `//`: an empty segment.
    EmptySegment,
    /// `;`: a path parameter.
    Semicolon,
    /// `%` not followed by two hex digits.
    MalformedEscape,
    /// Escapes that do not decode to UTF-8.
    NotUtf8,
}

impl Invalid {
    /// What the client is told.
    pub fn message(self) -> &'static str {
        match self {
            Invalid::NotAbsolute => "the request target must be an absolute path",
            Invalid::EncodedSlash => "an encoded slash (%2F) is not accepted in a path",
            Invalid::EncodedPercent => "an encoded percent (%25) is not accepted in a path",
            Invalid::ControlCharacter => "control characters (NUL included) are not accepted",
            Invalid::Backslash => "a backslash is not accepted in a path",
            Invalid::DotSegment => "'.' and '..' segments are not accepted in a path",
            Invalid::EmptySegment => "empty path segments (//) are not accepted",
            Invalid::Semicolon => "path parameters (;) are not accepted",
            Invalid::MalformedEscape => "a % must be followed by two hex digits",
            Invalid::NotUtf8 => "percent-escapes must decode to UTF-8",
        }
    }

    /// A closed label set for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Invalid::NotAbsolute => "not_absolute",
            Invalid::EncodedSlash => "encoded_slash",
            Invalid::EncodedPercent => "encoded_percent",
            Invalid::ControlCharacter => "control_character",
            Invalid::Backslash => "backslash",
            Invalid::DotSegment => "dot_segment",
            Invalid::EmptySegment => "empty_segment",
            Invalid::Semicolon => "semicolon",
            Invalid::MalformedEscape => "malformed_escape",
            Invalid::NotUtf8 => "not_utf8",
        }
    }
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// The escape at `bytes[i]` (a `%`), decoded.
fn escape_at(bytes: &[u8], i: usize) -> Result<u8, Invalid> {
    match (
        bytes.get(i + 1).copied().and_then(hex_value),
        bytes.get(i + 2).copied().and_then(hex_value),
    ) {
        (Some(hi), Some(lo)) => Ok(hi << 4 | lo),
        _ => Err(Invalid::MalformedEscape),
    }
}

/// The canonical form of a path, or why it is refused. Borrows when the path is already
/// canonical (the usual case: no escapes at all).
pub fn canonical_path(path: &str) -> Result<Cow<'_, str>, Invalid> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(Invalid::NotAbsolute);
    }
    let mut out: Option<Vec<u8>> = None;
    let mut segment_start = 1;
    let mut i = 1;
    // The segment as decoded so far: is it "." or ".."? Tracked as (length, all dots).
    let (mut seg_len, mut seg_dots) = (0usize, true);
    // Escaped non-ASCII bytes of the segment, checked for UTF-8 at its end.
    let mut seg_escaped_high = false;
    loop {
        let at_end = i == bytes.len();
        if at_end || bytes[i] == b'/' {
            if seg_len == 0 && !at_end {
                return Err(Invalid::EmptySegment);
            }
            if seg_len > 0 && seg_len <= 2 && seg_dots {
                return Err(Invalid::DotSegment);
            }
            if seg_escaped_high && decode(&path[segment_start..i]).is_none() {
                return Err(Invalid::NotUtf8);
            }
            if at_end {
                break;
            }
            if let Some(out) = &mut out {
                out.push(b'/');
            }
            i += 1;
            segment_start = i;
            (seg_len, seg_dots, seg_escaped_high) = (0, true, false);
            continue;
        }
        let b = bytes[i];
        let (decoded, width) = if b == b'%' { (escape_at(bytes, i)?, 3) } else { (b, 1) };
        match decoded {
            b'/' if width == 3 => return Err(Invalid::EncodedSlash),
            b'%' if width == 3 => return Err(Invalid::EncodedPercent),
            b'\\' => return Err(Invalid::Backslash),
            b';' if width == 1 => return Err(Invalid::Semicolon),
            0..=0x1f | 0x7f => return Err(Invalid::ControlCharacter),
            _ => {}
        }
        seg_len += 1;
        seg_dots &= decoded == b'.';
        seg_escaped_high |= decoded >= 0x80;
        // Unreserved characters and other plain ASCII stay as they are; escapes of unreserved
        // characters are decoded; every other escape, and a raw non-ASCII byte, is written as
        // an escape with upper-case hex (so what is forwarded is ASCII). Only a unit that
        // changes starts a copy: a path already canonical is returned borrowed.
        let escaped = [b'%', HEX[usize::from(decoded >> 4)], HEX[usize::from(decoded & 15)]];
        let plain = [decoded];
        let canonical: &[u8] = if is_unreserved(decoded) || (width == 1 && decoded < 0x80) {
            &plain
        } else {
            &escaped
        };
        if out.is_some() || canonical != &bytes[i..i + width] {
            out.get_or_insert_with(|| bytes[..i].to_vec()).extend_from_slice(canonical);
        }
        i += width;
    }
    Ok(match out {
        None => Cow::Borrowed(path),
        // Only ASCII was pushed: escapes stay escapes, decoded bytes are unreserved ASCII.
        Some(out) => Cow::Owned(String::from_utf8(out).map_err(|_| Invalid::NotUtf8)?),
    })
}

/// The canonical form of a query: escapes normalised as in a path; a malformed escape, NUL and
/// control characters refused. Everything else (`%2F`, `%25`, `+`, `;`) is data and kept.
pub fn canonical_query(query: &str) -> Result<Cow<'_, str>, Invalid> {
    let bytes = query.as_bytes();
    let mut out: Option<Vec<u8>> = None;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b != b'%' {
            if b < 0x20 || b == 0x7f {
                return Err(Invalid::ControlCharacter);
            }
            if b >= 0x80 {
                // Raw non-ASCII is forwarded escaped, as in a path.
                let out = out.get_or_insert_with(|| bytes[..i].to_vec());
                out.extend_from_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
            } else if let Some(out) = &mut out {
                out.push(b);
            }
            i += 1;
            continue;
        }
        let decoded = escape_at(bytes, i)?;
        if decoded < 0x20 || decoded == 0x7f {
            return Err(Invalid::ControlCharacter);
        }
        let canonical = if is_unreserved(decoded) {
            vec![decoded]
        } else {
            vec![b'%', HEX[usize::from(decoded >> 4)], HEX[usize::from(decoded & 15)]]
        };
        if out.is_some() || canonical != bytes[i..i + 3] {
            let out = out.get_or_insert_with(|| bytes[..i].to_vec());
            out.extend_from_slice(&canonical);
        }
        i += 3;
    }
    Ok(match out {
        None => Cow::Borrowed(query),
        Some(out) => Cow::Owned(String::from_utf8(out).map_err(|_| Invalid::NotUtf8)?),
    })
}

/// Percent-decodes a segment of a canonical path: the one string an upstream sees for it.
/// `None` when the escapes are not UTF-8 (never for a segment of a canonical path).
pub fn decode(segment: &str) -> Option<Cow<'_, str>> {
    if !segment.contains('%') {
        return Some(Cow::Borrowed(segment));
    }
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            out.push(escape_at(bytes, i).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok().map(Cow::Owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreserved_escapes_decode_and_others_are_normalised() {
        assert_eq!(canonical_path("/a/NG-H27").unwrap(), "/a/NG-H27");
        assert!(matches!(canonical_path("/a/NG-H27").unwrap(), Cow::Borrowed(_)));
        for spelling in ["/a/NG%2DH27", "/a/NG%2dH27", "/a/%4E%47-H27", "/a/%4e%47%2d%48%32%37"] {
            assert_eq!(canonical_path(spelling).unwrap(), "/a/NG-H27", "{spelling}");
        }
        assert_eq!(canonical_path("/a/x%3ay%20z").unwrap(), "/a/x%3Ay%20z");
        // A canonical path with escapes is returned as it is (borrowed).
        assert!(matches!(canonical_path("/a/NG%3AH27%C3%A9").unwrap(), Cow::Borrowed(_)));
        // Raw non-ASCII is forwarded escaped, and decodes to the same string.
        assert_eq!(canonical_path("/a/CAFÉ").unwrap(), "/a/CAF%C3%89");
        assert_eq!(decode("CAF%C3%89").unwrap(), "CAFÉ");
        assert_eq!(canonical_query("q=é").unwrap(), "q=%C3%A9");
        assert_eq!(canonical_path("/a/caf%C3%A9").unwrap(), "/a/caf%C3%A9");
        assert_eq!(canonical_path("/ws/").unwrap(), "/ws/");
        assert_eq!(canonical_path("/").unwrap(), "/");
        assert_eq!(canonical_path("/a/.x/..y/...").unwrap(), "/a/.x/..y/...");
    }

    #[test]
    fn every_spelling_of_a_dangerous_target_is_refused() {
        let cases: &[(&str, Invalid)] = &[
            ("*", Invalid::NotAbsolute),
            ("a/b", Invalid::NotAbsolute),
            ("/a/..", Invalid::DotSegment),
            ("/a/../b", Invalid::DotSegment),
            ("/a/./b", Invalid::DotSegment),
            ("/a/%2e%2e", Invalid::DotSegment),
            ("/a/%2E%2E/b", Invalid::DotSegment),
            ("/a/.%2e", Invalid::DotSegment),
            ("/a/%2e", Invalid::DotSegment),
            ("/a/%252e%252e", Invalid::EncodedPercent),
            ("/a/%25", Invalid::EncodedPercent),
            ("/a%2Fb", Invalid::EncodedSlash),
            ("/a%2fb", Invalid::EncodedSlash),
            ("/a/b%00", Invalid::ControlCharacter),
            ("/a/b%0a", Invalid::ControlCharacter),
            ("/a/b%7F", Invalid::ControlCharacter),
            ("/a\\b", Invalid::Backslash),
            ("/a%5cb", Invalid::Backslash),
            ("/a%5C..%5Cb", Invalid::Backslash),
            ("/a//b", Invalid::EmptySegment),
            ("//a", Invalid::EmptySegment),
            ("/a/NG-H27;x=1", Invalid::Semicolon),
            ("/a/..;/b", Invalid::Semicolon),
            ("/a/%", Invalid::MalformedEscape),
            ("/a/%4", Invalid::MalformedEscape),
            ("/a/%zz", Invalid::MalformedEscape),
            ("/a/%C0%AE%C0%AE", Invalid::NotUtf8),
            ("/a/%FF", Invalid::NotUtf8),
            ("/a/%C3", Invalid::NotUtf8),
        ];
        for (target, why) in cases {
            assert_eq!(canonical_path(target), Err(*why), "{target}");
        }
    }

    #[test]
    fn queries_keep_data_and_refuse_control_characters() {
        assert_eq!(canonical_query("a=1&b=x%2fy").unwrap(), "a=1&b=x%2Fy");
        assert_eq!(canonical_query("a=%41%2d").unwrap(), "a=A-");
        assert_eq!(canonical_query("a=%25&b=+").unwrap(), "a=%25&b=+");
        assert!(matches!(canonical_query("a=1&b=%2F").unwrap(), Cow::Borrowed(_)));
        for bad in ["a=%00", "a=%0d%0a", "a=%", "a=%g1", "a=%1"] {
            assert!(canonical_query(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_canonical_segment_decodes_to_what_every_spelling_meant() {
        // Property: for generated segments and random spellings of them (each byte plain or
        // escaped, hex in either case), the canonical form is the same, and its decoding is the
        // segment; or the spelling is refused, never served as something else.
        let alphabet: Vec<u8> = (0x20u8..0x7f).collect();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20_000 {
            let len = 1 + (next() % 8) as usize;
            let segment: Vec<u8> =
                (0..len).map(|_| alphabet[(next() % alphabet.len() as u64) as usize]).collect();
            let spell = |segment: &[u8], next: &mut dyn FnMut() -> u64| -> String {
                let mut s = String::new();
                for &b in segment {
                    let must_escape = !b.is_ascii_graphic() || b"%/?#\\ ".contains(&b);
                    if must_escape || next() % 2 == 0 {
                        let hex = format!("{b:02X}");
                        s.push('%');
                        s.push_str(&if next() % 2 == 0 { hex.to_lowercase() } else { hex });
                    } else {
                        s.push(b as char);
                    }
                }
                s
            };
            let a = format!("/p/{}", spell(&segment, &mut next));
            let b = format!("/p/{}", spell(&segment, &mut next));
            let dangerous = segment == b"."
                || segment == b".."
                || segment.iter().any(|&b| b"/%\\".contains(&b) || b < 0x20 || b == 0x7f);
            let (ca, cb) = (canonical_path(&a), canonical_path(&b));
            for (spelling, canonical) in [(&a, &ca), (&b, &cb)] {
                match canonical {
                    Ok(c) => {
                        assert!(!dangerous, "{spelling} accepted as {c}");
                        let seg = &c["/p/".len()..];
                        assert_eq!(decode(seg).unwrap().as_bytes(), &segment[..], "{spelling}");
                    }
                    // Only a plain `;` may be refused in a harmless segment.
                    Err(why) => {
                        assert!(dangerous || *why == Invalid::Semicolon, "{spelling}: {why:?}")
                    }
                }
            }
            // Two accepted spellings may differ only in reserved characters, kept as the client
            // wrote them (RFC 3986: `@` and `%40` need not mean the same to a server); they still
            // decode to one string, checked above. With no reserved character, they are equal.
            if let (Ok(ca), Ok(cb)) = (&ca, &cb) {
                if segment.iter().all(|&b| is_unreserved(b)) {
                    assert_eq!(ca, cb, "{a} and {b} differ");
                }
            }
        }
    }
}

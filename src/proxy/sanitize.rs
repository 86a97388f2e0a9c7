//! What a request may look like before it is forwarded: paths that mean one thing only,
//! one unambiguous body length, no protocol upgrade. Plain functions over the request, tested
//! without a socket.

use http::header;
use pingora::http::RequestHeader;
use std::borrow::Cow;

/// Is `path` under an allowed prefix, and does it mean one thing only? The upstream must see
/// exactly the path that was checked, so anything a server might normalise differently is
/// refused: dot segments (also `..;` and percent-encoded dots), empty segments (`//`), path
/// parameters (`;`), encoded separators, double encoding (`%252e`), invalid escapes, control
/// characters, and bytes that do not decode to UTF-8 (overlong dots like `%c0%ae`). Unless
/// `non_ascii` (`proxy.allow_non_ascii_paths`), anything outside ASCII once decoded is
/// refused too: Genesys API paths are ASCII, and a server that normalises Unicode (NFKC)
/// reads lookalikes such as fullwidth dots `%EF%BC%8E%EF%BC%8E`, the one-dot leader `%E2%80%A4`,
/// the fullwidth solidus `%EF%BC%8F` or the division slash `%E2%88%95` as `..` or `/`.
pub fn path_allowed(path: &str, prefixes: &[String], non_ascii: bool) -> bool {
    let plain = match plain_path_allowed(path.as_bytes()) {
        Some(ok) => ok,
        None => general_path_allowed(path) && (non_ascii || decodes_to_ascii(path)),
    };
    plain && prefixes.iter().any(|p| path.starts_with(p.as_str()))
}

/// The common case in one pass over the bytes: an ASCII path with no escape. `None` when the
/// path has a `%` or a non-ASCII byte, for [`general_path_allowed`] to decide.
fn plain_path_allowed(path: &[u8]) -> Option<bool> {
    if path.first() != Some(&b'/') {
        return Some(false);
    }
    // Each segment starts after a '/'; `seg` is where the current one began.
    let mut seg = 1;
    for i in 1..=path.len() {
        let b = path.get(i).copied();
        match b {
            Some(b'%') => return None,
            Some(b) if !b.is_ascii() => return None,
            Some(b'\\' | b';') => return Some(false),
            Some(b) if b.is_ascii_control() => return Some(false),
            Some(b'/') | None => {
                let segment = &path[seg..i];
                if segment == b"." || segment == b".." || (segment.is_empty() && b.is_some()) {
                    return Some(false);
                }
                seg = i + 1;
            }
            Some(_) => {}
        }
    }
    Some(true)
}

/// Paths with escapes or non-ASCII characters: decode once, refuse anything whose meaning
/// changes with a second decoding or a different separator count.
fn general_path_allowed(path: &str) -> bool {
    if !path.starts_with('/') || path.contains(['\\', ';']) {
        return false;
    }
    // Most paths have no escape: then the decoded path is the path itself, and so is its
    // second decoding.
    let decoded: Cow<str> = if path.contains('%') {
        match percent_decode(path).and_then(|b| String::from_utf8(b).ok()) {
            Some(d) => Cow::Owned(d),
            None => return false,
        }
    } else {
        Cow::Borrowed(path)
    };
    let separators = |p: &str| p.matches('/').count();
    if separators(&decoded) != separators(path)
        || decoded.contains(['\\', ';'])
        || decoded.chars().any(char::is_control)
        || (decoded.contains('%')
            && percent_decode(&decoded).is_some_and(|again| again != decoded.as_bytes()))
    {
        return false;
    }
    let mut segments = decoded.split('/').skip(1).peekable();
    while let Some(seg) = segments.next() {
        let last = segments.peek().is_none();
        if matches!(seg, "." | "..") || (seg.is_empty() && !last) {
            return false;
        }
    }
    true
}

/// Is the path, once decoded, ASCII? (Called after [`general_path_allowed`], which refuses
/// undecodable paths.)
fn decodes_to_ascii(path: &str) -> bool {
    path.is_ascii() && percent_decode(path).is_some_and(|d| d.is_ascii())
}

/// Decodes `%XX` escapes; `None` when a `%` is not followed by two hex digits.
fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out)
}

/// Collapses `Content-Length: 5, 5` and repeated identical `Content-Length` headers into one
/// value, so the upstream reads the body exactly as the proxy did. Returns false when the
/// values differ or do not parse: the request's framing is ambiguous (a smuggling vector) and
/// must be refused.
pub fn normalise_content_length(req: &mut RequestHeader) -> bool {
    let lengths: Option<Vec<u64>> = req
        .headers
        .get_all(header::CONTENT_LENGTH)
        .iter()
        .map(|v| v.to_str().ok())
        .collect::<Option<Vec<&str>>>()
        .and_then(|values| {
            values
                .iter()
                .flat_map(|v| v.split(','))
                .map(|part| {
                    let part = part.trim();
                    let digits = !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
                    digits.then(|| part.parse::<u64>().ok()).flatten()
                })
                .collect()
        });
    let Some(lengths) = lengths else {
        return false;
    };
    let Some(&first) = lengths.first() else {
        return true;
    };
    if lengths.iter().any(|l| *l != first) {
        return false;
    }
    if lengths.len() > 1 {
        req.remove_header(&header::CONTENT_LENGTH);
        return req
            .insert_header(header::CONTENT_LENGTH, first.to_string())
            .is_ok();
    }
    true
}

/// Removes what would turn the request into a protocol switch (`Upgrade: websocket`, `h2c`):
/// a 101 answer would hand the client a raw tunnel past every check. The Genesys REST API
/// needs none, and `Upgrade: h2c` is only an offer, so the request goes on as plain HTTP/1.1.
pub fn strip_upgrade(req: &mut RequestHeader) {
    let upgrade = req.headers.contains_key(header::UPGRADE);
    req.remove_header(&header::UPGRADE);
    req.remove_header("http2-settings");
    if !upgrade {
        return;
    }
    let kept: Vec<String> = req
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| {
            !t.is_empty()
                && !t.eq_ignore_ascii_case("upgrade")
                && !t.eq_ignore_ascii_case("http2-settings")
        })
        .map(str::to_string)
        .collect();
    req.remove_header(&header::CONNECTION);
    if !kept.is_empty() {
        let _ = req.insert_header(header::CONNECTION, kept.join(", "));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_that_could_mean_two_things_are_refused() {
        let p = vec!["/api/v2/".to_string()];
        for bad in [
            "/api/v2/..;/x",
            "/api/v2/x/..;/../y",
            "/api/v2/users;jsessionid=1",
            "/api/v2//x",
            "/api/v2/a//b",
            "/api/v2/%252e%252e/x",
            "/api/v2/%252fadmin",
            "/api/v2/%c0%ae%c0%ae/x",
            "/api/v2/%e0%80%ae/x",
            "/api/v2/%ff",
            "/api/v2/%zz",
            "/api/v2/%2",
            "/api/v2/a%00b",
            "/api/v2/a%0ab",
            "/api/v2/%5cx",
        ] {
            assert!(!path_allowed(bad, &p, false), "{bad} must be refused");
        }
        for good in [
            "/api/v2/users",
            "/api/v2/users/",
            "/api/v2/users/5f3c-11/roles",
            "/api/v2/search%20term",
        ] {
            assert!(path_allowed(good, &p, false), "{good} must pass");
        }
    }

    // Regression (issue 21): Unicode lookalikes of "." and "/" reached the upstream.
    #[test]
    fn non_ascii_paths_are_refused_unless_allowed() {
        let p = vec!["/api/v2/".to_string()];
        for lookalike in [
            "/api/v2/%EF%BC%8E%EF%BC%8E/admin",
            "/api/v2/a%E2%80%A4%E2%80%A4/x",
            "/api/v2/a%EF%BC%8Fb",
            "/api/v2/a%E2%88%95b",
            "/api/v2/a%E2%80%8Bb",
            "/api/v2/users/caf%C3%A9",
            "/api/v2/users/café",
        ] {
            assert!(!path_allowed(lookalike, &p, false), "{lookalike}");
        }
        // With the key set, a decoded non-ASCII name passes; the structural checks still hold.
        assert!(path_allowed("/api/v2/users/caf%C3%A9", &p, true));
        assert!(path_allowed("/api/v2/users/café", &p, true));
        assert!(!path_allowed("/api/v2/%c0%ae%c0%ae/x", &p, true));
    }

    #[test]
    fn content_lengths_are_collapsed_or_refused() {
        let req = |values: &[&str]| {
            let mut r = RequestHeader::build("POST", b"/api/v2/x", None).unwrap();
            for v in values {
                r.append_header(header::CONTENT_LENGTH, *v).unwrap();
            }
            r
        };
        for ok in [&["5, 5"][..], &["5", "5"], &["5,5, 5"], &["5"]] {
            let mut r = req(ok);
            assert!(normalise_content_length(&mut r), "{ok:?}");
            let all: Vec<_> = r.headers.get_all(header::CONTENT_LENGTH).iter().collect();
            assert_eq!(all, vec!["5"], "{ok:?}");
        }
        for bad in [
            &["5, 6"][..],
            &["5", "6"],
            &["-5"],
            &["5,"],
            &["0x5"],
            &["99999999999999999999999"],
        ] {
            assert!(!normalise_content_length(&mut req(bad)), "{bad:?}");
        }
    }

    #[test]
    fn upgrades_are_stripped_other_connection_options_kept() {
        let mut req = RequestHeader::build("GET", b"/api/v2/users", None).unwrap();
        req.insert_header(header::UPGRADE, "websocket").unwrap();
        req.insert_header(header::CONNECTION, "keep-alive, Upgrade")
            .unwrap();
        req.insert_header("http2-settings", "AAA").unwrap();
        strip_upgrade(&mut req);
        assert!(req.headers.get(header::UPGRADE).is_none());
        assert!(req.headers.get("http2-settings").is_none());
        assert_eq!(req.headers.get(header::CONNECTION).unwrap(), "keep-alive");
    }

    #[test]
    fn the_one_pass_check_agrees_with_the_general_one() {
        // Every string up to 6 characters over an alphabet with every character either check
        // looks at: both must give the same answer.
        let alphabet = ['/', '.', 'a', ';', '\\', '\t', '\u{7f}'];
        let mut paths = vec![String::new()];
        let mut compared = 0;
        for _ in 0..6 {
            let mut next = Vec::with_capacity(paths.len() * alphabet.len());
            for p in &paths {
                for c in alphabet {
                    let q = format!("{p}{c}");
                    assert_eq!(
                        plain_path_allowed(q.as_bytes()),
                        Some(general_path_allowed(&q)),
                        "{q:?}"
                    );
                    compared += 1;
                    next.push(q);
                }
            }
            paths = next;
        }
        assert!(compared > 100_000);
        // Escapes and non-ASCII go to the general check.
        assert_eq!(plain_path_allowed(b"/api/v2/a%20b"), None);
        assert_eq!(plain_path_allowed("/api/v2/café".as_bytes()), None);
    }

    #[test]
    fn paths_are_checked_without_tricks() {
        let p = vec!["/api/v2/".to_string()];
        assert!(path_allowed("/api/v2/users", &p, false));
        assert!(!path_allowed("/api/v1/users", &p, false));
        assert!(!path_allowed("/api/v2/../../admin", &p, false));
        assert!(!path_allowed("/api/v2/%2e%2e/secret", &p, false));
        assert!(!path_allowed("/api/v2/a%2Fb", &p, false));
        assert!(!path_allowed("/api/v2/./x", &p, false));
        assert!(!path_allowed("/api/v2\\..\\x", &p, false));
        assert!(!path_allowed("api/v2/users", &p, false));
        assert!(!path_allowed("/__sim/stats", &p, false));
    }
}

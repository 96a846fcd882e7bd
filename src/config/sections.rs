//! A hook reads one domain's part of the config: this finds, without parsing the TOML,
//! the `[domain.NAME...]` sections of every other domain and blanks them (each line of
//! theirs becomes an empty line, so line and column numbers of what remains stay true).
//! With 10,000 forwards configured, parsing the whole file costs the hook more than all
//! the rest of its work.
//!
//! A small lexer knows what can hide a `[` at the start of a line: strings (all four
//! kinds), comments, and arrays or inline tables that span lines. Whatever it cannot be
//! sure of (a name with escapes, an unterminated string, an unbalanced bracket) keeps the
//! section, or gives up and leaves the text whole: keeping text is always correct, only
//! slower.

/// A table header at the start of a line: its key path and where its line starts.
struct Header {
    start: usize,
    path: Vec<Option<String>>,
}

/// `text` with the sections of domains other than the wanted ones blanked; `None` when
/// nothing was blanked or the text is not understood (parse it whole then).
/// `wanted(name, section_text)` says whether a domain is wanted, given the text of one
/// of its sections (called for each).
pub fn only_domains(text: &str, wanted: impl Fn(&str, &str) -> bool) -> Option<String> {
    let headers = headers(text)?;
    // sections: from one header to the next
    let mut spans: Vec<(usize, usize, Option<&str>)> = Vec::new();
    for (i, h) in headers.iter().enumerate() {
        let end = headers.get(i + 1).map_or(text.len(), |n| n.start);
        let domain = match h.path.as_slice() {
            [Some(d), Some(name), ..] if d == "domain" => Some(name.as_str()),
            _ => None,
        };
        spans.push((h.start, end, domain));
    }
    let mut keep_domain: std::collections::HashMap<&str, bool> = Default::default();
    for (s, e, d) in &spans {
        if let Some(d) = d {
            let k = keep_domain.entry(d).or_insert(false);
            if !*k && wanted(d, &text[*s..*e]) {
                *k = true;
            }
        }
    }
    if keep_domain.values().all(|k| *k) {
        return None;
    }
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for (s, e, d) in spans {
        if let Some(d) = d
            && !keep_domain.get(d).copied().unwrap_or(true)
        {
            out.push_str(&text[at..s]);
            out.extend(std::iter::repeat_n('\n', text[s..e].matches('\n').count()));
            at = e;
        }
    }
    out.push_str(&text[at..]);
    Some(out)
}

/// Every table header, or None if the lexer is not sure of the text.
fn headers(text: &str) -> Option<Vec<Header>> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let mut depth = 0usize;
    let mut line_start = true;
    while i < b.len() {
        let c = b[i];
        if line_start && depth == 0 {
            // skip indentation; a `[` first on a line outside any value is a header
            let mut j = i;
            while j < b.len() && (b[j] == b' ' || b[j] == b'\t') {
                j += 1;
            }
            if j < b.len() && b[j] == b'[' {
                let (path, end) = header(b, j)?;
                out.push(Header { start: i, path });
                i = end;
                line_start = false;
                continue;
            }
            line_start = false;
            i = j;
            continue;
        }
        match c {
            b'\n' => {
                line_start = true;
                i += 1;
            }
            b'#' => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'"' | b'\'' => i = string_end(b, i)?,
            b'[' | b'{' => {
                depth += 1;
                i += 1;
            }
            b']' | b'}' => {
                depth = depth.checked_sub(1)?;
                i += 1;
            }
            _ => i += 1,
        }
    }
    (depth == 0).then_some(out)
}

/// Where the string starting at `i` ends (the index after its closing quote).
fn string_end(b: &[u8], i: usize) -> Option<usize> {
    let q = b[i];
    let triple = b.get(i..i + 3) == Some(&[q, q, q][..]);
    let mut j = if triple { i + 3 } else { i + 1 };
    while j < b.len() {
        let c = b[j];
        if q == b'"' && c == b'\\' {
            j += 2;
            continue;
        }
        if !triple && c == b'\n' {
            return None;
        }
        if c == q {
            if !triple {
                return Some(j + 1);
            }
            if b.get(j..j + 3) == Some(&[q, q, q][..]) {
                // up to two more quotes belong to the content
                let mut end = j + 3;
                while end < b.len() && b[end] == q && end < j + 5 {
                    end += 1;
                }
                return Some(end);
            }
        }
        j += 1;
    }
    None
}

/// The key path of the header at `i` (`[a.b]` or `[[a.b]]`), each key `None` if it cannot
/// be compared (a basic string with escapes), and where the header ends.
fn header(b: &[u8], i: usize) -> Option<(Vec<Option<String>>, usize)> {
    let array = b.get(i + 1) == Some(&b'[');
    let mut j = if array { i + 2 } else { i + 1 };
    let mut path = Vec::new();
    loop {
        while j < b.len() && (b[j] == b' ' || b[j] == b'\t') {
            j += 1;
        }
        let c = *b.get(j)?;
        let key = if c == b'"' || c == b'\'' {
            let end = string_end(b, j)?;
            let inner = std::str::from_utf8(b.get(j + 1..end - 1)?).ok()?;
            if end - j >= 6 && b[j + 1] == c {
                return None; // a multi-line string is no key
            }
            j = end;
            (c == b'\'' || !inner.contains('\\')).then(|| inner.to_string())
        } else {
            let s = j;
            while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_' || b[j] == b'-') {
                j += 1;
            }
            if j == s {
                return None;
            }
            Some(String::from_utf8_lossy(&b[s..j]).into_owned())
        };
        path.push(key);
        while j < b.len() && (b[j] == b' ' || b[j] == b'\t') {
            j += 1;
        }
        match b.get(j)? {
            b'.' => j += 1,
            b']' => {
                j += 1;
                if array {
                    if b.get(j) != Some(&b']') {
                        return None;
                    }
                    j += 1;
                }
                return Some((path, j));
            }
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keep(name: &'static str) -> impl Fn(&str, &str) -> bool {
        move |d, _| d == name
    }

    #[test]
    fn other_domains_are_blanked_line_for_line() {
        let text = "[settings]\nbackend = \"auto\"\n\n[domain.web]\nforwards = [\n  \"8080:80\",\n]\n\n[domain.db]\nforwards = [\"5432\"]\n[[domain.db.forward]]\nhost_port = 1\n\n[domain.\"web\".x]\n";
        let out = only_domains(text, keep("web")).unwrap();
        assert_eq!(out.lines().count(), text.lines().count());
        assert!(out.contains("[domain.web]\nforwards = [\n  \"8080:80\",\n]"));
        assert!(out.contains("[domain.\"web\".x]"));
        assert!(!out.contains("5432") && !out.contains("host_port"));
        assert!(out.contains("[settings]\nbackend"));
        assert_eq!(only_domains(text, |_, _| true), None, "nothing to blank");
    }

    #[test]
    fn brackets_in_strings_comments_and_values_are_no_headers() {
        let text = concat!(
            "[domain.a]\n",
            "forwards = [\n",
            "[1, 2],\n", // an array of arrays: no header
            "]\n",
            "d = \"\"\"\n[domain.b]\n\"\"\"\n",
            "e = '''\n[domain.c]\n'''\n",
            "f = { x = [\n] }\n",
            "# [domain.d]\n",
            "g = \"[domain.e] # \\\" ]\"\n",
            "[domain.z]\n",
            "h = 1\n",
        );
        let hs = headers(text).unwrap();
        let paths: Vec<_> = hs.iter().map(|h| h.path.clone()).collect();
        assert_eq!(
            paths,
            vec![
                vec![Some("domain".into()), Some("a".into())],
                vec![Some("domain".into()), Some("z".into())]
            ]
        );
        let out = only_domains(text, keep("a")).unwrap();
        assert!(out.starts_with(&text[..text.find("[domain.z]").unwrap()]));
        assert!(!out.contains("h = 1"));
    }

    #[test]
    fn unsure_text_is_left_whole() {
        for text in [
            "[domain.a]\nx = \"unterminated\n[domain.b]\n",
            "[domain.a]\nx = [1,\n[domain.b]\n",
            "[domain.a\n[domain.b]\n",
            "[domain.a]\nx = ]\n",
        ] {
            assert_eq!(only_domains(text, keep("a")), None, "{text}");
        }
        // a name that cannot be compared is kept
        let text = "[domain.\"w\\u0065b\"]\nx = 1\n[domain.db]\ny = 2\n";
        let out = only_domains(text, keep("web")).unwrap();
        assert!(out.contains("x = 1") && !out.contains("y = 2"));
    }

    #[test]
    fn a_domain_is_kept_whole_if_any_of_its_sections_is_wanted() {
        let text = "[domain.api]\nx = 1\n[[domain.api.forward]]\nuuid_here = \"u-1\"\n[domain.b]\n";
        let out = only_domains(text, |d, s| d == "web" || s.contains("u-1")).unwrap();
        assert!(out.contains("x = 1") && out.contains("uuid_here"));
        assert!(!out.contains("[domain.b]"));
    }
}

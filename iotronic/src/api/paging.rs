//! Long lists come in pages, as in the original API (S4T-REFERENCE §3, "Lists"): `limit`
//! (1-1000, default 1000), `marker` (the last item of the previous page), `sort_key`,
//! `sort_dir` (`asc`|`desc`); a full page carries `next`, the path and query of the page after
//! it. The database does the cutting ([`Page`]).

use std::collections::HashMap;

use serde_json::{Value, json};

use crate::Error;
use crate::db::{MAX_LIMIT, Page};

/// The page `q` asks for. `keys` maps the `sort_key`s this list accepts to their columns; the
/// first is the default. The marker is returned as given: the caller resolves it to the uuid
/// of an item the caller may see.
pub fn page(q: &HashMap<String, String>, keys: &[(&str, &'static str)]) -> Result<Page, Error> {
    let limit = match q.get("limit") {
        None => MAX_LIMIT,
        Some(l) => l
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| Error::Invalid(format!("?limit={l}: a number from 1 to {MAX_LIMIT}")))?,
    };
    let key = match q.get("sort_key") {
        None => keys[0].1,
        Some(k) => keys.iter().find(|(name, _)| name == k).map(|(_, col)| *col).ok_or_else(|| {
            let names: Vec<_> = keys.iter().map(|(n, _)| *n).collect();
            Error::Invalid(format!("?sort_key={k}: one of {}", names.join(", ")))
        })?,
    };
    let desc = match q.get("sort_dir").map(String::as_str) {
        None | Some("asc") => false,
        Some("desc") => true,
        Some(d) => return Err(Error::Invalid(format!("?sort_dir={d}: asc or desc"))),
    };
    Ok(Page { limit, marker: q.get("marker").cloned(), key, desc })
}

/// The `next` link after a page that came back full (`got` = the limit), whose last item is
/// `last`: the same query with that marker. `None` when the list ended on this page.
pub fn next(path: &str, q: &HashMap<String, String>, page: &Page, got: usize, last: Option<&str>) -> Option<String> {
    if (got as i64) < page.limit {
        return None;
    }
    let mut pairs: Vec<_> = q.iter().filter(|(k, _)| !matches!(k.as_str(), "marker" | "limit")).collect();
    pairs.sort();
    let mut ser = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        ser.append_pair(k, v);
    }
    ser.append_pair("limit", &page.limit.to_string());
    ser.append_pair("marker", last?);
    Some(format!("{path}?{}", ser.finish()))
}

/// The answer to a `marker` that names nothing in the list the caller may see: the same
/// whether the object does not exist or belongs to another project (as for boards and requests).
pub fn unknown_marker(marker: &str, what: &str) -> Error {
    Error::Invalid(format!("?marker={marker}: no such {what} in this list"))
}

/// `{key: [...]}`, with `"next"` when there is a page after this one.
pub fn list_json(key: &str, items: Vec<Value>, next: Option<String>) -> Value {
    let mut out = json!({ key: items });
    if let Some(n) = next {
        out["next"] = json!(n);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    const KEYS: &[(&str, &str)] = &[("id", "created_at"), ("name", "name")];

    #[test]
    fn pages_are_parsed_and_bad_ones_refused() {
        assert_eq!(page(&q(&[]), KEYS).unwrap(), Page::first("created_at"));
        let p = page(&q(&[("limit", "5"), ("marker", "m"), ("sort_key", "name"), ("sort_dir", "desc")]), KEYS);
        assert_eq!(p.unwrap(), Page { limit: 5, marker: Some("m".into()), key: "name", desc: true });
        for bad in [("limit", "0"), ("limit", "1001"), ("limit", "x"), ("sort_key", "secret_key"), ("sort_dir", "up")] {
            let e = page(&q(&[bad]), KEYS).unwrap_err().to_string();
            assert!(e.contains(bad.0), "{bad:?}: {e}");
        }
    }

    #[test]
    fn next_keeps_the_query_and_moves_the_marker() {
        let query = q(&[("limit", "2"), ("status", "online"), ("marker", "old"), ("project", "a b&c")]);
        let p = page(&query, KEYS).unwrap();
        assert_eq!(next("/v1/boards", &query, &p, 1, Some("u1")), None, "a short page is the last");
        assert_eq!(
            next("/v1/boards", &query, &p, 2, Some("u2")).unwrap(),
            "/v1/boards?project=a+b%26c&status=online&limit=2&marker=u2"
        );
    }
}

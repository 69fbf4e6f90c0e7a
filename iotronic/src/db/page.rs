//! Keyset pagination of long lists (boards, requests, services, fleets, VPNs and their members,
//! plugins, leases): at most `limit` rows after the row named
//! by `marker` (the uuid of the previous page's last row), ordered by one whitelisted column and
//! then by uuid. Stable while rows come and go, and no OFFSET scan however deep the page.

/// Most rows one page holds (and the default), as the original's `[api] max_limit`.
pub const MAX_LIMIT: i64 = 1000;

/// One page of a list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// 1..=[`MAX_LIMIT`].
    pub limit: i64,
    /// The uuid of the last row of the previous page; it must exist (callers check that the
    /// caller may see it).
    pub marker: Option<String>,
    /// The sort column, from the list's whitelist (never caller text).
    pub key: &'static str,
    pub desc: bool,
}

impl Page {
    /// The first page of up to [`MAX_LIMIT`] rows in `key` order.
    pub fn first(key: &'static str) -> Page {
        Page { limit: MAX_LIMIT, marker: None, key, desc: false }
    }

    /// What follows a list's `WHERE` filters: the rows after the marker, ordered, limited. The
    /// marker is bound twice, at `$p` and `$p+1` (the `($p = '' OR …)` idiom of this module).
    pub(crate) fn sql(&self, table: &str, p: usize) -> String {
        self.sql_keyed(table, "uuid", "", p)
    }

    /// [`sql`](Self::sql) for rows named by the column `id` rather than `uuid`, unique only
    /// among the rows that `within` selects (an SQL condition ending in `AND`, on the list's
    /// own bound parameters, e.g. `"vpn_uuid = $1 AND "` for the members of one VPN, named by
    /// their board): the marker row is looked up there.
    pub(crate) fn sql_keyed(&self, table: &str, id: &str, within: &str, p: usize) -> String {
        let (k, limit) = (self.key, self.limit.clamp(1, MAX_LIMIT));
        let (cmp, dir) = if self.desc { ("<", "DESC") } else { (">", "ASC") };
        format!(
            " AND (${p} = '' OR ({k}, {id}) {cmp} (SELECT {k}, {id} FROM {table} WHERE {within}{id} = ${q})) \
             ORDER BY {k} {dir}, {id} {dir} LIMIT {limit}",
            q = p + 1
        )
    }

    pub(crate) fn marker(&self) -> &str {
        self.marker.as_deref().unwrap_or("")
    }
}

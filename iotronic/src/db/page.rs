//! Keyset pagination of long lists (boards, requests, services, fleets, VPNs and their members,
//! plugins, leases): at most `limit` rows after the row named
//! by `marker` (the uuid of the previous page's last row), ordered by one whitelisted column and
//! then by uuid. Stable while rows come and go, and no OFFSET scan however deep the page.
//!
//! A list's `WHERE` clause is built in Rust ([`Filters`]): only the filters given and the page
//! start only with a marker, each bound once. SQLite does not fold a `($1 = '' OR col = $2)`
//! with its bound value, so such a clause made it scan the whole table and sort it for every
//! page (the `(project_uuid, created_at)` index of the requests was never used).

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

    /// The `WHERE` clause of `f`, with the page start (the rows after the marker, only when
    /// there is one), then the order and the limit: what follows `FROM table`. The marker row
    /// is looked up by `id` (`uuid` for most lists) among the rows `within` selects (an SQL
    /// condition ending in `AND`, on `f`'s placeholders, e.g. `"vpn_uuid = $1 AND "` for the
    /// members of one VPN, named by their board; "" elsewhere). The row-value comparison
    /// `(k, id) > (SELECT k, id …)` is a range on an index that starts with the list's
    /// equality filters and `k`, on SQLite as on PostgreSQL.
    pub(crate) fn clause(&self, f: &mut Filters, table: &str, id: &str, within: &str) -> String {
        let (k, limit) = (self.key, self.limit.clamp(1, MAX_LIMIT));
        let (cmp, dir) = if self.desc { ("<", "DESC") } else { (">", "ASC") };
        if let Some(m) = self.marker.as_deref().filter(|m| !m.is_empty()) {
            let m = f.arg(m);
            f.and(format!("({k}, {id}) {cmp} (SELECT {k}, {id} FROM {table} WHERE {within}{id} = {m})"));
        }
        format!("{} ORDER BY {k} {dir}, {id} {dir} LIMIT {limit}", f.sql())
    }
}

/// A value bound to a list's query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Arg {
    Text(String),
    Int(i64),
}

impl From<&str> for Arg {
    fn from(s: &str) -> Arg {
        Arg::Text(s.to_owned())
    }
}

impl From<i64> for Arg {
    fn from(i: i64) -> Arg {
        Arg::Int(i)
    }
}

/// The conditions of a list's `WHERE` clause and the values they bind, in placeholder order:
/// only the filters that are given, so the database sees plain equalities and ranges it can
/// find in an index.
#[derive(Debug, Default)]
pub(crate) struct Filters {
    conds: Vec<String>,
    args: Vec<Arg>,
}

impl Filters {
    /// Binds `a` and returns its placeholder (`$n`).
    pub(crate) fn arg(&mut self, a: impl Into<Arg>) -> String {
        self.args.push(a.into());
        format!("${}", self.args.len())
    }

    /// Adds a condition (on placeholders from [`arg`](Self::arg)).
    pub(crate) fn and(&mut self, cond: String) {
        self.conds.push(cond);
    }

    /// Adds `col = value` when a value is given; `None` and "" filter nothing (as the
    /// `($1 = '' OR col = $2)` these replace).
    pub(crate) fn eq(&mut self, col: &str, value: Option<&str>) {
        if let Some(v) = value.filter(|v| !v.is_empty()) {
            let p = self.arg(v);
            self.and(format!("{col} = {p}"));
        }
    }

    /// ` WHERE a AND b …`, or "" without conditions.
    pub(crate) fn sql(&self) -> String {
        if self.conds.is_empty() { String::new() } else { format!(" WHERE {}", self.conds.join(" AND ")) }
    }

    /// `sql` with the values bound.
    pub(crate) fn query(&self, sql: String) -> sqlx::query::Query<'static, sqlx::Any, sqlx::any::AnyArguments> {
        self.args.iter().fold(sqlx::query(sqlx::AssertSqlSafe(sql)), |q, a| match a {
            Arg::Text(s) => q.bind(s.clone()),
            Arg::Int(i) => q.bind(*i),
        })
    }
}

#[cfg(test)]
mod tests {
    use sqlx::Row;

    use super::*;
    use crate::db::{AuditQuery, DatabaseUrl, Db};

    /// SQLite's plan of the query `q` builds, one step a line.
    async fn plan(db: &Db, (sql, f): (String, Filters)) -> String {
        let rows = f.query(format!("EXPLAIN QUERY PLAN {sql}")).fetch_all(db.pool()).await.unwrap();
        rows.iter().map(|r| r.try_get::<String, _>("detail").unwrap()).collect::<Vec<_>>().join("\n")
    }

    /// A project's page of requests, boards or audit entries after a marker is a range of an
    /// index, not a scan of the whole table sorted again for every page (`($1 = '' OR …)`
    /// filters kept SQLite from using any index: millions of requests read per page).
    #[tokio::test]
    async fn a_projects_pages_use_its_indexes() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&DatabaseUrl::sqlite_in(dir.path())).await.unwrap();
        for desc in [false, true] {
            let page = Page { limit: 50, marker: Some("m".into()), key: "created_at", desc };
            let p = plan(&db, Db::requests_page_sql(Some("p"), None, &page)).await;
            assert!(p.contains("USING INDEX requests_project_created (project_uuid=? AND created_at"), "{p}");
            assert!(!p.contains("SCAN requests") && !p.contains("TEMP B-TREE FOR ORDER BY"), "{p}");
            let p = plan(&db, Db::requests_page_sql(Some("p"), Some("b"), &page)).await;
            assert!(!p.contains("SCAN requests"), "{p}");
            let p = plan(&db, Db::requests_page_sql(None, Some("b"), &page)).await;
            assert!(p.contains("USING INDEX requests_destination_status (destination_uuid=?)"), "{p}");
            let p = plan(&db, Db::requests_page_sql(Some("p"), None, &Page { marker: None, ..page.clone() })).await;
            assert!(p.contains("USING INDEX requests_project_created (project_uuid=?)"), "{p}");
            assert!(!p.contains("TEMP B-TREE FOR ORDER BY"), "{p}");
            // An administrator's page of every request, and a project's boards (0012).
            let p = plan(&db, Db::requests_page_sql(None, None, &page)).await;
            assert!(p.contains("USING INDEX requests_created"), "{p}");
            assert!(!p.contains("SCAN requests") && !p.contains("TEMP B-TREE FOR ORDER BY"), "{p}");
            let p = plan(&db, Db::boards_page_sql(Some("p"), Some("online"), None, &page)).await;
            assert!(p.contains("USING INDEX boards_project_created (project_uuid=?"), "{p}");
            assert!(!p.contains("SCAN boards") && !p.contains("TEMP B-TREE FOR ORDER BY"), "{p}");
        }
        for marker in [None, Some((1000, "m"))] {
            let q = AuditQuery { project: Some("p".into()), action: "tunnel.".into(), limit: 10, ..Default::default() };
            let p = plan(&db, Db::audit_sql(&q, marker)).await;
            assert!(p.contains("USING INDEX audit_project_at (project_uuid=? AND at>? AND at<?)"), "{p}");
            assert!(!p.contains("TEMP B-TREE FOR ORDER BY"), "{p}");
            let p = plan(&db, Db::audit_sql(&AuditQuery { project: None, ..q }, marker)).await;
            assert!(p.contains("USING INDEX audit_at (at>? AND at<?)"), "{p}");
        }
    }

    #[test]
    fn only_the_filters_given_are_bound() {
        let mut f = Filters::default();
        f.eq("project_uuid", Some("p"));
        f.eq("status", None);
        f.eq("fleet_uuid", Some(""));
        let page = Page { limit: 5000, marker: Some("m".into()), key: "name", desc: true };
        assert_eq!(
            page.clause(&mut f, "boards", "uuid", ""),
            " WHERE project_uuid = $1 AND (name, uuid) < (SELECT name, uuid FROM boards WHERE uuid = $2) \
             ORDER BY name DESC, uuid DESC LIMIT 1000"
        );
        assert_eq!(f.args, [Arg::from("p"), Arg::from("m")]);
        let mut f = Filters::default();
        assert_eq!(
            Page::first("created_at").clause(&mut f, "t", "uuid", ""),
            " ORDER BY created_at ASC, uuid ASC LIMIT 1000"
        );
        assert!(f.args.is_empty());
    }
}

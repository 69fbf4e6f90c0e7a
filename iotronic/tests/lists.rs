//! Lists a tenant can grow without bound come in pages (services, fleets and a fleet's boards,
//! VPNs and a VPN's members, plugins, leases), as boards and requests do: `limit`, `marker`
//! (the last item of the previous page), `sort_key`/`sort_dir`, and `next` on a full page.
//! Against the real REST API on both databases; the `s4t` list commands follow `next`.

mod common;

use std::collections::HashSet;
use std::process::Stdio;
use std::time::Duration;

use common::TestDb;
use iotronic::bus::Bus;
use iotronic::db::{NewBoard, Plugin};
use iotronic::serve::run_api;
use iotronic::{ServeConfig, db::Db};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// What a marker naming nothing the caller may see gets (another project's object, or none):
/// the board list's answer.
const FOREIGN_MARKER: StatusCode = StatusCode::BAD_REQUEST;

/// The REST API alone (lists need neither conductor nor agents), on a port the system chose.
struct Cloud {
    url: String,
    db: Db,
    http: reqwest::Client,
    stop: CancellationToken,
}

impl Drop for Cloud {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn start(t: &TestDb) -> Cloud {
    let stop = CancellationToken::new();
    let mut config = ServeConfig::new(std::env::temp_dir());
    config.bind = "127.0.0.1".parse().unwrap();
    config.plaintext = true;
    config.rest_port = 0;
    config.admin_password = Some("admin-password".into());
    iotronic::auth::bootstrap_admin(&t.db, Some("admin-password")).await.unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (db, bus, s) = (t.db.clone(), Bus::in_process(), stop.clone());
    tokio::spawn(async move { run_api(&config, db, bus, s, Some(tx)).await });
    let addr = rx.await.unwrap().rest;
    Cloud { url: format!("http://{addr}"), db: t.db.clone(), http: reqwest::Client::new(), stop }
}

impl Cloud {
    async fn req(&self, method: &str, path: &str, token: &str, body: Option<Value>) -> (StatusCode, Value) {
        common::rest::call(&self.http, &self.url, method, path, Some(token), body).await
    }

    async fn create(&self, path: &str, token: &str, body: Value) -> Value {
        let (s, v) = self.req("POST", path, token, Some(body)).await;
        assert_eq!(s, StatusCode::CREATED, "POST {path}: {v}");
        v
    }

    async fn token(&self, user: &str, password: &str) -> String {
        let body = json!({"username": user, "password": password});
        let r = self.http.post(format!("{}/v1/auth/tokens", self.url)).json(&body).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        r.json::<Value>().await.unwrap()["token"].as_str().unwrap().to_owned()
    }

    /// Projects alpha and beta with their managers: (ann of alpha, bob of beta).
    async fn tenants(&self) -> (String, String) {
        let admin = self.token("admin", "admin-password").await;
        for p in ["alpha", "beta"] {
            self.create("/v1/projects", &admin, json!({"name": p})).await;
        }
        for (u, p) in [("ann", "alpha"), ("bob", "beta")] {
            let body = json!({"name": u, "password": "password-1", "project": p, "role": "manager"});
            self.create("/v1/users", &admin, body).await;
        }
        (self.token("ann", "password-1").await, self.token("bob", "password-1").await)
    }

    /// Every item of the list at `first`, page after page by `next`: each page but the last
    /// is full (`limit`) and links the next, the last does not.
    async fn walk(&self, first: &str, token: &str, key: &str, limit: usize) -> Vec<Value> {
        let (mut all, mut next, mut pages) = (Vec::new(), Some(first.to_owned()), 0);
        while let Some(page) = next {
            let (s, v) = self.req("GET", &page, token, None).await;
            assert_eq!(s, StatusCode::OK, "{page}: {v}");
            let items = v[key].as_array().unwrap_or_else(|| panic!("{page}: no {key}: {v}"));
            next = v["next"].as_str().map(str::to_owned);
            assert!(items.len() <= limit, "{page}: {} items, limit {limit}", items.len());
            assert_eq!(next.is_some(), items.len() == limit, "{page}: a full page, and only a full one, links on: {v}");
            all.extend(items.iter().cloned());
            pages += 1;
            assert!(pages <= 100, "{first}: pages never end");
        }
        all
    }
}

/// `field` of every item.
fn ids(items: &[Value], field: &str) -> Vec<String> {
    items.iter().map(|i| i[field].as_str().unwrap_or_else(|| panic!("no {field} in {i}")).to_owned()).collect()
}

/// Walks `list` by pages of 2 and of exactly the item count (the last page is then empty) and
/// compares with the whole list in one page: every item once, in the same order.
async fn pages_match_whole(cloud: &Cloud, list: &str, token: &str, key: &str, id: &str, count: usize) -> Vec<String> {
    let (s, whole) = cloud.req("GET", list, token, None).await;
    assert_eq!(s, StatusCode::OK, "{list}: {whole}");
    assert!(whole.get("next").is_none(), "{list}: a short page links on: {whole}");
    let whole = ids(whole[key].as_array().unwrap(), id);
    assert_eq!(whole.len(), count, "{list}: {whole:?}");
    assert_eq!(whole.iter().collect::<HashSet<_>>().len(), count, "{list}: {whole:?}");
    let sep = if list.contains('?') { '&' } else { '?' };
    for limit in [2, count] {
        let walked = ids(&cloud.walk(&format!("{list}{sep}limit={limit}"), token, key, limit).await, id);
        assert_eq!(walked, whole, "{list} by pages of {limit}");
    }
    whole
}

/// `GET list?marker=m` as `token`: `FOREIGN_MARKER` for another project's object or none.
async fn refused_markers(cloud: &Cloud, list: &str, token: &str, markers: &[&str]) {
    let sep = if list.contains('?') { '&' } else { '?' };
    for m in markers {
        let (s, v) = cloud.req("GET", &format!("{list}{sep}limit=2&marker={m}"), token, None).await;
        assert_eq!(
            (s, v["code"].as_u64()),
            (FOREIGN_MARKER, Some(u64::from(FOREIGN_MARKER.as_u16()))),
            "{list}?marker={m}: {v}"
        );
    }
}

/// The body of the `i`th item of a kind.
type Body = fn(usize) -> Value;

#[tokio::test]
async fn services_fleets_vpns_and_plugins_page_by_marker() {
    for t in TestDb::all().await {
        let cloud = start(&t).await;
        let (ann, bob) = cloud.tenants().await;
        // (list, key, body of item i); names sort as they are made.
        let kinds: [(&str, &str, Body); 4] = [
            ("/v1/services", "services", |i| json!({"name": format!("s{i}"), "port": 8000 + i})),
            ("/v1/fleets", "fleets", |i| json!({"name": format!("f{i}")})),
            ("/v1/vpns", "vpns", |i| json!({"name": format!("v{i}"), "cidr": format!("10.{}.0.0/24", 10 + i)})),
            ("/v1/plugins", "plugins", |i| json!({"name": format!("p{i}"), "code": "print(1)", "kind": "python"})),
        ];
        for (list, key, body) in kinds {
            let (mut names, mut made) = (Vec::new(), Vec::new());
            for i in 0..5 {
                let v = cloud.create(list, &ann, body(i)).await;
                names.push(v["name"].as_str().unwrap().to_owned());
                made.push(v["uuid"].as_str().unwrap().to_owned());
            }
            let theirs = cloud.create(list, &bob, body(9)).await["uuid"].as_str().unwrap().to_owned();
            let whole = pages_match_whole(&cloud, list, &ann, key, "uuid", 5).await;
            let (_, mine) = cloud.req("GET", list, &bob, None).await;
            assert_eq!(ids(mine[key].as_array().unwrap(), "uuid"), std::slice::from_ref(&theirs), "{}: {mine}", t.name);

            // Another order, and `next` keeps it.
            let desc = cloud.walk(&format!("{list}?limit=2&sort_key=name&sort_dir=desc"), &ann, key, 2).await;
            names.reverse();
            assert_eq!(ids(&desc, "name"), names, "{} {list}", t.name);
            // A marker by name, as boards take it.
            let (s, v) = cloud.req("GET", &format!("{list}?limit=2&marker={}", names[4]), &ann, None).await;
            let at = whole.iter().position(|u| *u == made[0]).unwrap();
            let after: Vec<_> = whole.iter().skip(at + 1).take(2).cloned().collect();
            assert_eq!((s, ids(v[key].as_array().unwrap(), "uuid")), (StatusCode::OK, after), "{v}");
            refused_markers(&cloud, list, &ann, &[&theirs, "no-such-thing"]).await;
            // The original's `/detail` list pages alike, and its `next` stays on `/detail`.
            if list != "/v1/vpns" {
                let detail = format!("{list}/detail");
                let (_, v) = cloud.req("GET", &format!("{detail}?limit=2"), &ann, None).await;
                assert!(v["next"].as_str().is_some_and(|n| n.starts_with(&format!("{detail}?"))), "{v}");
                let walked = cloud.walk(&format!("{detail}?limit=2"), &ann, key, 2).await;
                assert_eq!(ids(&walked, "uuid"), whole, "{} {detail}", t.name);
            }
            let (s, v) = cloud.req("GET", &format!("{list}?limit=2&marker={}", whole[0]), &bob, None).await;
            assert_eq!(s, FOREIGN_MARKER, "{} {list}: bob pages after ann's item: {v}", t.name);
            for bad in ["limit=0", "limit=1001", "sort_key=project_uuid", "sort_dir=up"] {
                let (s, v) = cloud.req("GET", &format!("{list}?{bad}"), &ann, None).await;
                assert_eq!(s, StatusCode::BAD_REQUEST, "{list}?{bad}: {v}");
            }
        }

        // Plugins: ?public=true is filtered by the database, so its pages are full; another
        // project's public plugin is a marker the caller may use, its private one is not.
        let (_, all) = cloud.req("GET", "/v1/plugins", &ann, None).await;
        let mine = ids(all["plugins"].as_array().unwrap(), "uuid");
        for p in [&mine[1], &mine[3]] {
            let (s, v) = cloud.req("PATCH", &format!("/v1/plugins/{p}"), &ann, Some(json!({"public": true}))).await;
            assert_eq!(s, StatusCode::OK, "{v}");
        }
        let public =
            cloud.create("/v1/plugins", &bob, json!({"name": "pub", "code": "print(2)", "public": true})).await;
        let public = public["uuid"].as_str().unwrap().to_owned();
        let walked = ids(&cloud.walk("/v1/plugins?public=true&limit=1", &ann, "plugins", 1).await, "uuid");
        assert_eq!(walked, [mine[1].clone(), mine[3].clone(), public.clone()], "{}", t.name);
        let with_public = pages_match_whole(&cloud, "/v1/plugins?with_public=true", &ann, "plugins", "uuid", 6).await;
        assert_eq!(with_public.last(), Some(&public));
        let (s, v) = cloud.req("GET", &format!("/v1/plugins?with_public=true&marker={public}"), &ann, None).await;
        assert_eq!((s, v["plugins"].as_array().map(Vec::len)), (StatusCode::OK, Some(0)), "{v}");
        let (_, theirs) = cloud.req("GET", "/v1/plugins", &bob, None).await;
        let theirs = theirs["plugins"].as_array().unwrap();
        let private = theirs.iter().find(|p| p["name"] == "p9").unwrap()["uuid"].as_str().unwrap().to_owned();
        refused_markers(&cloud, "/v1/plugins?with_public=true", &ann, &[&private]).await;
    }
}

#[tokio::test]
async fn a_fleets_boards_and_a_vpns_members_page_by_marker() {
    for t in TestDb::all().await {
        let cloud = start(&t).await;
        let (ann, bob) = cloud.tenants().await;
        let fleet = cloud.create("/v1/fleets", &ann, json!({"name": "f"})).await["uuid"].as_str().unwrap().to_owned();
        let board = |name: &str, fleet: Option<&str>| {
            json!({"name": name, "code": format!("code-{name}"), "type": "generic", "fleet": fleet,
                   "location": [{"latitude": "38.2", "longitude": "15.5", "altitude": "3"}]})
        };
        let mut boards = Vec::new();
        for i in 0..5 {
            let b = cloud.create("/v1/boards", &ann, board(&format!("b{i}"), Some(&fleet))).await;
            boards.push(b["uuid"].as_str().unwrap().to_owned());
        }
        let outside = cloud.create("/v1/boards", &ann, board("b9", None)).await["uuid"].as_str().unwrap().to_owned();
        let theirs = cloud.create("/v1/boards", &bob, board("z", None)).await["uuid"].as_str().unwrap().to_owned();

        let list = format!("/v1/fleets/{fleet}/boards");
        let whole = pages_match_whole(&cloud, &list, &ann, "boards", "uuid", 5).await;
        let mut sorted = boards.clone();
        sorted.sort();
        assert_eq!(whole.iter().collect::<HashSet<_>>(), boards.iter().collect::<HashSet<_>>());
        let desc = cloud.walk(&format!("{list}?limit=2&sort_key=name&sort_dir=desc"), &ann, "boards", 2).await;
        assert_eq!(ids(&desc, "name"), ["b4", "b3", "b2", "b1", "b0"], "{}", t.name);
        let by_uuid = cloud.walk(&format!("{list}?limit=3&sort_key=uuid"), &ann, "boards", 3).await;
        assert_eq!(ids(&by_uuid, "uuid"), sorted, "{}", t.name);
        refused_markers(&cloud, &list, &ann, &[&theirs, "no-such-board"]).await;

        // A VPN's members, by address (as before paging), by board.
        let vpn = cloud.create("/v1/vpns", &ann, json!({"name": "v", "cidr": "10.77.0.0/24"})).await;
        let vpn = cloud.db.vpn(vpn["uuid"].as_str().unwrap(), None).await.unwrap().unwrap();
        for b in &boards {
            cloud.db.add_vpn_member(&vpn, b, None, None).await.unwrap();
        }
        // The same boards in another VPN, at other addresses: a marker is the member of this one.
        let other = cloud.create("/v1/vpns", &ann, json!({"name": "w", "cidr": "10.78.0.0/24"})).await;
        let other = cloud.db.vpn(other["uuid"].as_str().unwrap(), None).await.unwrap().unwrap();
        for b in boards.iter().rev() {
            cloud.db.add_vpn_member(&other, b, None, None).await.unwrap();
        }
        let list = format!("/v1/vpns/{}/boards", vpn.uuid);
        let whole = pages_match_whole(&cloud, &list, &ann, "members", "board", 5).await;
        let (_, v) = cloud.req("GET", &list, &ann, None).await;
        let mut addresses = ids(v["members"].as_array().unwrap(), "address");
        let listed = addresses.clone();
        addresses.sort();
        assert_eq!(listed, addresses, "{}", t.name);
        let by_board = cloud.walk(&format!("{list}?limit=2&sort_key=board&sort_dir=desc"), &ann, "members", 2).await;
        assert_eq!(ids(&by_board, "board"), sorted.iter().rev().cloned().collect::<Vec<_>>(), "{}", t.name);
        // The marker is a member, by board uuid or name.
        let (s, v) = cloud.req("GET", &format!("{list}?limit=2&marker=b0"), &ann, None).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let after_b0 = whole.iter().skip_while(|b| **b != boards[0]).skip(1).take(2).cloned().collect::<Vec<_>>();
        assert_eq!(ids(v["members"].as_array().unwrap(), "board"), after_b0, "{}", t.name);
        refused_markers(&cloud, &list, &ann, &[&theirs, &outside, "no-such-board"]).await;
        let (s, _) = cloud.req("GET", &list, &bob, None).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "bob sees ann's VPN");
    }
}

#[tokio::test]
async fn leases_page_with_their_boards() {
    for t in TestDb::all().await {
        let cloud = start(&t).await;
        let (ann, bob) = cloud.tenants().await;
        let mut boards = Vec::new();
        for i in 0..7 {
            let body = json!({"name": format!("l{i}"), "code": format!("code-l{i}"), "type": "generic",
                              "location": [{"latitude": "1", "longitude": "2", "altitude": "3"}]});
            boards.push(cloud.create("/v1/boards", &ann, body).await["uuid"].as_str().unwrap().to_owned());
        }
        // Four leases of 1, 2, 3 and 1 boards, each shorter than the one before.
        let mut leases = Vec::new();
        for (i, held) in [&boards[0..1], &boards[1..3], &boards[3..6], &boards[6..7]].into_iter().enumerate() {
            let body = json!({"boards": held, "duration": 4000 - 1000 * i});
            let l = cloud.create("/v1/leases", &ann, body).await;
            let mut held = held.to_vec();
            held.sort();
            leases.push((l["uuid"].as_str().unwrap().to_owned(), held));
        }
        let z = json!({"name": "z", "code": "code-z", "type": "generic",
                       "location": [{"latitude": "1", "longitude": "2", "altitude": "3"}]});
        let z = cloud.create("/v1/boards", &bob, z).await["uuid"].as_str().unwrap().to_owned();
        let theirs = cloud.create("/v1/leases", &bob, json!({"boards": [z], "duration": 60})).await;
        let theirs = theirs["uuid"].as_str().unwrap().to_owned();

        let holds = |items: &[Value]| -> Vec<(String, Vec<String>)> {
            let strings = |v: &Value| v.as_array().unwrap().iter().map(|b| b.as_str().unwrap().to_owned()).collect();
            items.iter().map(|l| (l["uuid"].as_str().unwrap().to_owned(), strings(&l["boards"]))).collect()
        };
        let whole = pages_match_whole(&cloud, "/v1/leases", &ann, "leases", "uuid", 4).await;
        for limit in [1, 2, 3] {
            let walked = holds(&cloud.walk(&format!("/v1/leases?limit={limit}"), &ann, "leases", limit).await);
            assert_eq!(walked.iter().map(|(l, _)| l.clone()).collect::<Vec<_>>(), whole, "{}", t.name);
            for (lease, held) in &walked {
                let made = &leases.iter().find(|(l, _)| l == lease).unwrap().1;
                assert_eq!(held, made, "{} lease {lease} by pages of {limit}", t.name);
            }
        }
        let soonest = cloud.walk("/v1/leases?limit=3&sort_key=expires_at", &ann, "leases", 3).await;
        assert_eq!(holds(&soonest), leases.iter().rev().cloned().collect::<Vec<_>>(), "{}", t.name);

        // Released: out of ?status=active, still listed (with its boards) otherwise.
        let (s, _) = cloud.req("DELETE", &format!("/v1/leases/{}", leases[1].0), &ann, None).await;
        assert_eq!(s, StatusCode::NO_CONTENT);
        let active = holds(&cloud.walk("/v1/leases?status=active&limit=1", &ann, "leases", 1).await);
        let still: Vec<_> = whole.iter().filter(|l| **l != leases[1].0).cloned().collect();
        assert_eq!(active.iter().map(|(l, _)| l.clone()).collect::<Vec<_>>(), still, "{}", t.name);
        for (lease, held) in &active {
            assert_eq!(held, &leases.iter().find(|(l, _)| l == lease).unwrap().1, "{}", t.name);
        }
        let all = holds(&cloud.walk("/v1/leases?limit=2", &ann, "leases", 2).await);
        assert!(all.contains(&leases[1]), "{} released lease keeps its boards: {all:?}", t.name);
        refused_markers(&cloud, "/v1/leases", &ann, &[&theirs, "no-such-lease"]).await;
        let (s, v) = cloud.req("GET", &format!("/v1/leases?marker={}", leases[0].0), &bob, None).await;
        assert_eq!(s, FOREIGN_MARKER, "{v}");
    }
}

/// `s4t <noun> list` fetches every page: 1,001 items are more than the largest page.
#[tokio::test]
async fn cli_lists_follow_next() {
    let t = TestDb::sqlite().await;
    let cloud = start(&t).await;
    let (ann, _) = cloud.tenants().await;
    let project = cloud.db.project("alpha").await.unwrap().unwrap().uuid;
    let owner = cloud.db.user_by_name("ann").await.unwrap().unwrap().uuid;
    const N: usize = 1001;
    let extra = json!({});
    for i in 0..N {
        cloud.db.create_service(&format!("s{i}"), &project, 1 + i as i64, "TCP", &extra).await.unwrap();
        cloud.db.create_fleet(&format!("f{i}"), &project, "", &extra).await.unwrap();
        let cidr = format!("10.{}.{}.0/24", 100 + i / 256, i % 256);
        cloud.db.create_vpn(&format!("v{i}"), &project, "l2", &cidr).await.unwrap();
        let plugin = Plugin {
            uuid: String::new(),
            name: format!("p{i}"),
            owner: owner.clone(),
            project: project.clone(),
            public: false,
            code: "print(1)".into(),
            callable: false,
            parameters: json!({}),
            extra: json!({}),
            kind: "python".into(),
            grants: json!({}),
            code_sha256: String::new(),
            code_size: 8,
            created_at: 0,
            updated_at: 0,
        };
        cloud.db.create_plugin(&plugin).await.unwrap();
        let b = NewBoard {
            name: format!("b{i}"),
            code: format!("code-{i}"),
            board_type: "generic".into(),
            owner: owner.clone(),
            project: project.clone(),
            extra: json!({}),
            ..Default::default()
        };
        let b = cloud.db.insert_board(b).await.unwrap();
        cloud.db.create_lease(&project, &owner, &[b.uuid], iotronic::db::now_ms() + 3_600_000).await.unwrap();
    }
    let (_, first) = cloud.req("GET", "/v1/services", &ann, None).await;
    assert!(first["next"].is_string(), "the list is longer than a page");
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["service", "list", "-q"][..],
        &["fleet", "list", "-q"],
        &["vpn", "list", "-q"],
        &["plugin", "list", "-q"],
        &["lease", "list", "-q"],
    ] {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_s4t"))
            .args(args)
            .env("S4T_CONFIG", dir.path().join("config.toml"))
            .env("S4T_URL", &cloud.url)
            .env("S4T_TOKEN", &ann)
            .env_remove("S4T_PASSWORD")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(90), out).await.expect("s4t hung").unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        let lines: HashSet<&str> = stdout.lines().collect();
        assert_eq!((stdout.lines().count(), lines.len()), (N, N), "{args:?}: every item once");
    }
}

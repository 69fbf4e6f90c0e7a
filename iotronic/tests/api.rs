//! The REST API, conductor and agent worker in one process over the in-process bus, against
//! both databases. Boards are a fake `BoardCaller` (the WAMP router is not embedded yet) that
//! answers like lightning-rod's sim HAL; board login and logout are driven through the same
//! database calls and bus message the wamp-agent uses.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::TestDb;
use iotronic::Error;
use iotronic::agent::{BoardCaller, BoxFuture, run_worker};
use iotronic::bus::{Bus, ConductorMsg};
use iotronic::db::Db;
use iotronic::serve::run_api;
use iotronic::{ServeConfig, conductor::Conductor};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// A board like the sim HAL: GPIO lines that read back, an I2C register that reads back.
#[derive(Default)]
struct FakeBoards {
    gpio: Mutex<HashMap<String, u64>>,
    i2c: Mutex<Vec<u64>>,
    /// Boards (uuids) that answer `VpnLeave` with an error.
    refuse_leave: Mutex<Vec<String>>,
    /// While set, `PluginInject` says it arrived (`inject_arrived`) and waits for a permit of
    /// it. A plugin named "refused" is refused.
    inject_gate: Mutex<Option<Arc<tokio::sync::Semaphore>>>,
    inject_arrived: tokio::sync::Notify,
}

fn reply(result: &str, message: Value) -> Value {
    Value::String(json!({"message": message, "result": result, "req_id": "x"}).to_string())
}

impl BoardCaller for FakeBoards {
    fn call<'a>(&'a self, procedure: &'a str, args: Vec<Value>) -> BoxFuture<'a, Result<Value, Error>> {
        Box::pin(async move {
            let name = procedure.rsplit('.').next().unwrap_or_default();
            let refuses = self.refuse_leave.lock().unwrap().iter().any(|b| procedure.contains(b.as_str()));
            if name == "VpnLeave" && refuses {
                return Ok(reply("ERROR", json!("cannot save vpns.json")));
            }
            assert!(args[0]["uuid"].is_string(), "the first argument is the request dict");
            let a = args.get(1).cloned().unwrap_or(Value::Null);
            if name == "PluginInject" {
                let gate = self.inject_gate.lock().unwrap().clone();
                if let Some(gate) = gate {
                    self.inject_arrived.notify_one();
                    let _ = gate.acquire().await;
                }
                return Ok(match a["name"].as_str() {
                    Some("refused") => reply("ERROR", json!("no room for it")),
                    _ => reply("SUCCESS", json!("INJECTED")),
                });
            }
            Ok(match name {
                "DevicePing" => reply("SUCCESS", json!("pong")),
                "GpioWrite" => {
                    let line = a["line"].as_str().unwrap_or_default().to_owned();
                    self.gpio.lock().unwrap().insert(line.clone(), a["value"].as_u64().unwrap_or(0));
                    reply("SUCCESS", json!({"name": line, "value": a["value"]}))
                }
                "GpioRead" => {
                    let line = a["line"].as_str().unwrap_or_default();
                    let v = self.gpio.lock().unwrap().get(line).copied().unwrap_or(0);
                    reply("SUCCESS", json!({"name": line, "value": v}))
                }
                "I2cWrite" => {
                    *self.i2c.lock().unwrap() =
                        a["data"].as_array().unwrap().iter().filter_map(Value::as_u64).collect();
                    reply("SUCCESS", json!({"written": a["data"].as_array().unwrap().len()}))
                }
                "I2cRead" => reply("SUCCESS", json!({"data": *self.i2c.lock().unwrap()})),
                "ServiceEnable" | "ServiceDisable" | "ServiceRestore" | "VpnJoin" | "VpnLeave" => {
                    reply("SUCCESS", json!("ok"))
                }
                "DeviceReboot" => reply("ERROR", json!("not allowed in the sim")),
                other => reply("ERROR", json!(format!("no procedure {other}"))),
            })
        })
    }
}

struct Cloud {
    url: String,
    db: Db,
    bus: Bus,
    http: reqwest::Client,
    stop: CancellationToken,
    boards: Arc<FakeBoards>,
    /// Stops the conductor alone; `conductor` is its task.
    conductor_stop: CancellationToken,
    conductor: tokio::task::JoinHandle<Result<(), Error>>,
}

impl Drop for Cloud {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn start(t: &TestDb) -> Cloud {
    start_with(t, |_| {}).await
}

/// [`start`] with `configure` applied to the cloud's configuration.
async fn start_with(t: &TestDb, configure: impl FnOnce(&mut ServeConfig)) -> Cloud {
    let stop = CancellationToken::new();
    let bus = Bus::in_process();
    let mut config = ServeConfig::new(std::env::temp_dir());
    config.bind = "127.0.0.1".parse().unwrap();
    config.plaintext = true;
    config.rest_port = 0;
    config.admin_password = Some("admin-password".into());
    config.call_timeout = Duration::from_secs(10);
    configure(&mut config);
    iotronic::auth::bootstrap_admin(&t.db, Some("admin-password")).await.unwrap();
    let conductor_stop = stop.child_token();
    let conductor = tokio::spawn(Conductor::new(t.db.clone(), bus.clone()).run(conductor_stop.clone()));
    let boards = Arc::new(FakeBoards::default());
    tokio::spawn(run_worker("agent".into(), bus.clone(), boards.clone(), stop.clone()));
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (db, b, s) = (t.db.clone(), bus.clone(), stop.clone());
    tokio::spawn(async move { run_api(&config, db, b, s, Some(tx)).await });
    let addr = rx.await.unwrap().rest;
    let http = reqwest::Client::new();
    Cloud { url: format!("http://{addr}"), db: t.db.clone(), bus, http, stop, boards, conductor_stop, conductor }
}

impl Cloud {
    async fn req(&self, method: &str, path: &str, token: Option<&str>, body: Option<Value>) -> (StatusCode, Value) {
        common::rest::call(&self.http, &self.url, method, path, token, body).await
    }

    async fn token(&self, user: &str, password: &str) -> String {
        let (s, v) =
            self.req("POST", "/v1/auth/tokens", None, Some(json!({"username": user, "password": password}))).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        v["token"].as_str().unwrap().to_owned()
    }

    /// What the wamp-agent does on `connection`: the board is online, queued work goes out.
    async fn login(&self, board: &str, session: &str) {
        assert!(self.db.board_online(board, "agent", session, Some("0.5.0"), &json!({})).await.unwrap());
        self.bus.to_conductor(&ConductorMsg::BoardOnline { board: board.into() }).await.unwrap();
    }

    async fn wait_request(&self, token: &str, uuid: &str, status: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (_, v) = self.req("GET", &format!("/v1/requests/{uuid}"), Some(token), None).await;
            if v["status"] == status {
                return v;
            }
            assert!(Instant::now() < deadline, "request {uuid} never reached {status}: {v}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn board_body(name: &str) -> Value {
    json!({"name": name, "code": format!("code-{name}"), "type": "generic",
           "location": [{"latitude": "38.2", "longitude": "15.5", "altitude": "3"}]})
}

/// [`tenants`], plus "uma", a member of alpha with the user role: (admin, ann, uma).
async fn alpha_with_a_user(cloud: &Cloud) -> (String, String, String) {
    let (admin, ann, _) = tenants(cloud).await;
    let body = json!({"name": "uma", "password": "password-1", "project": "alpha", "role": "user"});
    let (s, v) = cloud.req("POST", "/v1/users", Some(&admin), Some(body)).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let uma = cloud.token("uma", "password-1").await;
    (admin, ann, uma)
}

async fn tenants(cloud: &Cloud) -> (String, String, String) {
    let admin = cloud.token("admin", "admin-password").await;
    for p in ["alpha", "beta"] {
        let (s, v) = cloud.req("POST", "/v1/projects", Some(&admin), Some(json!({"name": p}))).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
    }
    for (u, p) in [("ann", "alpha"), ("bob", "beta")] {
        let body = json!({"name": u, "password": "password-1", "project": p, "role": "manager"});
        let (s, v) = cloud.req("POST", "/v1/users", Some(&admin), Some(body)).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
    }
    (admin, cloud.token("ann", "password-1").await, cloud.token("bob", "password-1").await)
}

#[tokio::test]
async fn auth_tenancy_actions_gpio_i2c_and_queued_commands() {
    for t in TestDb::all().await {
        let cloud = start(&t).await;
        let (s, v) = cloud.req("GET", "/v1/boards", None, None).await;
        assert_eq!((s, v["code"].as_u64()), (StatusCode::UNAUTHORIZED, Some(401)), "{v}");
        let (s, _) = cloud.req("GET", "/v1", None, None).await;
        assert_eq!(s, StatusCode::OK);
        let (s, v) =
            cloud.req("POST", "/v1/auth/tokens", None, Some(json!({"username": "admin", "password": "x"}))).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
        let (_, ann, bob) = tenants(&cloud).await;

        let (s, v) = cloud.req("POST", "/v1/boards", Some(&ann), Some(board_body("a1"))).await;
        assert_eq!((s, v["status"].as_str()), (StatusCode::CREATED, Some("registered")), "{v}");
        let a1 = v["uuid"].as_str().unwrap().to_owned();
        // X-Auth-Token works as well as Bearer.
        let r =
            cloud.http.get(format!("{}/v1/boards/a1", cloud.url)).header("X-Auth-Token", &ann).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        // Tenant isolation: bob's project does not see a1, by name or uuid, nor list it.
        for path in ["/v1/boards/a1".to_owned(), format!("/v1/boards/{a1}")] {
            let (s, _) = cloud.req("GET", &path, Some(&bob), None).await;
            assert_eq!(s, StatusCode::NOT_FOUND, "{} sees {path}", t.name);
        }
        let (s, _) = cloud
            .req("POST", &format!("/v1/boards/{a1}/action"), Some(&bob), Some(json!({"action": "DevicePing"})))
            .await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        let (_, v) = cloud.req("GET", "/v1/boards", Some(&bob), None).await;
        assert_eq!(v["boards"].as_array().unwrap().len(), 0);
        let (_, v) = cloud.req("GET", "/v1/boards", Some(&ann), None).await;
        assert_eq!(v["boards"][0]["name"], "a1");
        // Lists come in pages (limit, marker, sort_key, sort_dir): `next` leads to the end.
        for n in ["a2", "a3"] {
            let (s, v) = cloud.req("POST", "/v1/boards", Some(&ann), Some(board_body(n))).await;
            assert_eq!(s, StatusCode::CREATED, "{v}");
        }
        let mut names = Vec::new();
        let mut next = Some("/v1/boards?limit=2&sort_key=name&sort_dir=desc".to_owned());
        while let Some(page) = next {
            let (s, v) = cloud.req("GET", &page, Some(&ann), None).await;
            assert_eq!(s, StatusCode::OK, "{page}: {v}");
            names.extend(v["boards"].as_array().unwrap().iter().map(|b| b["name"].as_str().unwrap().to_owned()));
            next = v["next"].as_str().map(str::to_owned);
        }
        assert_eq!(names, ["a3", "a2", "a1"], "{}", t.name);
        let foreign_marker = format!("/v1/boards?marker={a1}");
        for (who, page) in [
            (&ann, "/v1/boards?limit=0"),
            (&ann, "/v1/boards/detail?sort_key=secret_key"),
            (&bob, foreign_marker.as_str()),
        ] {
            let (s, v) = cloud.req("GET", page, Some(who), None).await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{page}: {v}");
        }

        // Offline: refused with a hint, or queued and delivered at login.
        let ping = json!({"action": "DevicePing", "parameters": {}});
        let (s, v) = cloud.req("POST", "/v1/boards/a1/action", Some(&ann), Some(ping.clone())).await;
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
        assert!(v["error_message"].as_str().unwrap().contains("queue=true"));
        let (s, queued) = cloud.req("POST", "/v1/boards/a1/action?queue=true", Some(&ann), Some(ping.clone())).await;
        assert_eq!((s, queued["status"].as_str()), (StatusCode::ACCEPTED, Some("QUEUED")), "{queued}");
        cloud.login(&a1, "1001").await;
        let uuid = queued["uuid"].as_str().unwrap();
        cloud.wait_request(&ann, uuid, "COMPLETED").await;
        let (_, res) = cloud.req("GET", &format!("/v1/requests/{uuid}/results"), Some(&ann), None).await;
        assert_eq!(
            (res["results"][0]["result"].as_str(), &res["results"][0]["message"]),
            (Some("SUCCESS"), &json!("pong"))
        );

        let (s, v) = cloud.req("POST", "/v1/boards/a1/action", Some(&ann), Some(ping.clone())).await;
        assert_eq!((s, v), (StatusCode::OK, json!("pong")));
        let (s, v) =
            cloud.req("POST", "/v1/boards/a1/action", Some(&ann), Some(json!({"action": "DeviceReboot"}))).await;
        assert_eq!(s, StatusCode::BAD_GATEWAY, "a board ERROR is a 502: {v}");
        let (s, v) = cloud.req("POST", "/v1/boards/a1/action?async=true", Some(&ann), Some(ping.clone())).await;
        assert_eq!(s, StatusCode::ACCEPTED);
        cloud.wait_request(&ann, v["uuid"].as_str().unwrap(), "COMPLETED").await;

        let (s, v) = cloud
            .req("PUT", "/v1/boards/a1/gpio/GPIO17", Some(&ann), Some(json!({"value": 1, "direction": "out"})))
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let (_, v) = cloud.req("GET", "/v1/boards/a1/gpio/GPIO17", Some(&ann), None).await;
        assert_eq!(v, json!({"name": "GPIO17", "value": 1}));
        let (s, _) = cloud
            .req("POST", "/v1/boards/a1/i2c/1/0x48/write", Some(&ann), Some(json!({"register": 0, "data": [7, 9]})))
            .await;
        assert_eq!(s, StatusCode::OK);
        let (_, v) = cloud
            .req("POST", "/v1/boards/a1/i2c/1/72/read", Some(&ann), Some(json!({"register": 0, "length": 2})))
            .await;
        assert_eq!(v, json!({"data": [7, 9]}));

        // Bad input is a 400 in the error shape, never a 500.
        for (m, p, b) in [
            ("POST", "/v1/boards/a1/action", json!({"action": "Format"})),
            ("POST", "/v1/boards/a1/action", json!({"nope": 1})),
            ("PUT", "/v1/boards/a1/gpio/GPIO17", json!({"value": 7})),
            ("POST", "/v1/boards/a1/i2c/1/0x99/read", json!({"length": 1})),
            ("POST", "/v1/boards", json!({"name": "x"})),
            ("POST", "/v1/leases", json!({"boards": ["a1"]})),
            ("POST", "/v1/vpns", json!({"name": "v", "type": "l2", "cidr": "banana"})),
        ] {
            let (s, v) = cloud.req(m, p, Some(&ann), Some(b.clone())).await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{m} {p} {b}: {v}");
            assert!(v["error_message"].is_string(), "{v}");
        }
        let r = cloud
            .http
            .post(format!("{}/v1/boards", cloud.url))
            .bearer_auth(&ann)
            .body("{not json")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);

        // Logout: offline again.
        cloud.db.session_left("1001").await.unwrap();
        let (_, v) = cloud.req("GET", "/v1/boards/a1", Some(&ann), None).await;
        assert_eq!(v["status"], "offline");
    }
}

#[tokio::test]
async fn leases_conflict_expire_and_tear_down() {
    for t in TestDb::all().await {
        let cloud = start(&t).await;
        let (admin, ann, _bob) = tenants(&cloud).await;
        let (_, v) = cloud.req("POST", "/v1/boards", Some(&ann), Some(board_body("l1"))).await;
        let l1 = v["uuid"].as_str().unwrap().to_owned();
        cloud.login(&l1, "2001").await;
        let (s, _) = cloud
            .req("POST", "/v1/services", Some(&ann), Some(json!({"name": "ssh", "port": 22, "protocol": "TCP"})))
            .await;
        assert_eq!(s, StatusCode::CREATED);
        let (s, vpn) = cloud
            .req("POST", "/v1/vpns", Some(&ann), Some(json!({"name": "lab", "type": "l2", "cidr": "10.20.0.0/24"})))
            .await;
        assert_eq!(s, StatusCode::CREATED, "{vpn}");

        // A board named twice (here by name and by uuid) is a bad request, not a conflict.
        let twice = json!({"boards": ["l1", l1.clone()], "duration": 2});
        let (s, v) = cloud.req("POST", "/v1/leases", Some(&ann), Some(twice)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        assert!(v["error_message"].as_str().unwrap().contains("named twice"), "{v}");
        let (s, lease) =
            cloud.req("POST", "/v1/leases", Some(&ann), Some(json!({"boards": ["l1"], "duration": 2}))).await;
        assert_eq!(s, StatusCode::CREATED, "{lease}");
        let lease_id = lease["uuid"].as_str().unwrap().to_owned();
        // Another project (the admin's) acting on the leased board: 409 naming the lease.
        let (s, v) = cloud
            .req("POST", &format!("/v1/boards/{l1}/action"), Some(&admin), Some(json!({"action": "DevicePing"})))
            .await;
        assert_eq!((s, v["lease"].as_str()), (StatusCode::CONFLICT, Some(lease_id.as_str())), "{v}");
        // In Unix seconds, as the lease's own expires_at.
        assert_eq!(v["expires_at"], lease["expires_at"], "{v} {lease}");
        let (s, v) =
            cloud.req("POST", "/v1/leases", Some(&admin), Some(json!({"boards": [l1.clone()], "duration": 60}))).await;
        assert_eq!((s, v["lease"].as_str()), (StatusCode::CONFLICT, Some(lease_id.as_str())), "{v}");

        // Under the lease: expose SSH and join the VPN.
        let (s, ex) = cloud
            .req("POST", "/v1/boards/l1/services/ssh/action", Some(&ann), Some(json!({"action": "ServiceEnable"})))
            .await;
        assert_eq!(s, StatusCode::CREATED, "{ex}");
        let port = ex["public_port"].as_i64().unwrap();
        assert!((50001..=59999).contains(&port));
        let (s, _) = cloud
            .req("POST", "/v1/boards/l1/services/ssh/action", Some(&ann), Some(json!({"action": "ServiceEnable"})))
            .await;
        assert_eq!(s, StatusCode::CONFLICT, "already exposed");
        let (s, m) = cloud.req("POST", "/v1/vpns/lab/boards", Some(&ann), Some(json!({"board": "l1"}))).await;
        assert_eq!((s, m["address"].as_str()), (StatusCode::CREATED, Some("10.20.0.2")), "{m}");
        assert!(m["interface"].is_string());
        let (_, v) = cloud.req("GET", "/v1/boards/l1/services", Some(&ann), None).await;
        assert_eq!(v["exposed"][0]["public_port"].as_i64(), Some(port));

        // Expiry tears down the exposure and the membership, and frees the board.
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let (_, v) = cloud.req("GET", &format!("/v1/leases/{lease_id}"), Some(&ann), None).await;
            let (_, ex) = cloud.req("GET", "/v1/boards/l1/services", Some(&ann), None).await;
            let (_, members) = cloud.req("GET", "/v1/vpns/lab/boards", Some(&ann), None).await;
            if v["status"] == "expired" && ex["exposed"] == json!([]) && members["members"] == json!([]) {
                break;
            }
            assert!(Instant::now() < deadline, "lease not torn down: {v} {ex} {members}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (s, v) = cloud
            .req("POST", &format!("/v1/boards/{l1}/action"), Some(&admin), Some(json!({"action": "DevicePing"})))
            .await;
        assert_eq!((s, v), (StatusCode::OK, json!("pong")));

        // Release: a fresh lease ends at once on DELETE.
        let (_, lease) =
            cloud.req("POST", "/v1/leases", Some(&ann), Some(json!({"boards": ["l1"], "duration": 600}))).await;
        let (s, _) =
            cloud.req("DELETE", &format!("/v1/leases/{}", lease["uuid"].as_str().unwrap()), Some(&ann), None).await;
        assert_eq!(s, StatusCode::NO_CONTENT);
        let (s, _) = cloud
            .req("POST", &format!("/v1/boards/{l1}/action"), Some(&admin), Some(json!({"action": "DevicePing"})))
            .await;
        assert_eq!(s, StatusCode::OK);

        let (_, doc) = cloud.req("GET", "/v1/openapi.json", None, None).await;
        assert!(doc["paths"]["/v1/leases"]["post"]["summary"].is_string(), "{doc}");
        let r = cloud.http.get(format!("{}/metrics", cloud.url)).bearer_auth(&admin).send().await.unwrap();
        let text = r.text().await.unwrap();
        assert!(
            text.contains("iotronic_boards{status=\"online\"} 1")
                && text.contains("iotronic_http_request_duration_seconds_count"),
            "{text}"
        );
    }
}

#[tokio::test]
async fn oversized_logins_are_refused_before_the_throttle() {
    for t in TestDb::all().await {
        let cloud = start(&t).await;
        let admin = cloud.token("admin", "admin-password").await;
        // Longer than any user name (check_name: at most 255 bytes): 400, however often, and
        // never a throttle's 429 (the throttle holds no key for it). Six tries: one more than
        // the per-user burst.
        let long = "u".repeat(300);
        for _ in 0..6 {
            let (s, v) =
                cloud.req("POST", "/v1/auth/tokens", None, Some(json!({"username": long, "password": "x"}))).await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{}: {v}", t.name);
            assert!(v["error_message"].as_str().unwrap().contains("255"), "{v}");
        }
        let (s, v) = cloud
            .req("POST", "/v1/auth/tokens", None, Some(json!({"username": "admin", "password": "p".repeat(1025)})))
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        // The longest valid name is an ordinary wrong login; the real one still works.
        let (s, v) = cloud
            .req("POST", "/v1/auth/tokens", None, Some(json!({"username": "u".repeat(255), "password": "x"})))
            .await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
        cloud.token("admin", "admin-password").await;
        // Nobody gets a password the token endpoint would refuse.
        let (s, v) = cloud.req("POST", "/v1/projects", Some(&admin), Some(json!({"name": "gamma"}))).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        let body = json!({"name": "long", "password": "p".repeat(1025), "project": "gamma"});
        let (s, v) = cloud.req("POST", "/v1/users", Some(&admin), Some(body)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        // Attempts are audited, the refused one with its (cut) name.
        let (_, v) = cloud.req("GET", "/v1/audit?action=auth.login&limit=1000", Some(&admin), None).await;
        let refused = v["audit"].as_array().unwrap().iter().filter(|e| e["status"] == 400).count();
        assert_eq!(refused, 7, "{v}");
    }
}

#[tokio::test]
async fn out_of_range_numbers_are_400_not_a_panic() {
    for t in TestDb::all().await {
        let cloud = start(&t).await;
        let (_, ann, _) = tenants(&cloud).await;
        let (s, v) = cloud.req("POST", "/v1/boards", Some(&ann), Some(board_body("n1"))).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        let (s, lease) =
            cloud.req("POST", "/v1/leases", Some(&ann), Some(json!({"boards": ["n1"], "duration": 600}))).await;
        assert_eq!(s, StatusCode::CREATED, "{lease}");
        let extend = format!("/v1/leases/{}", lease["uuid"].as_str().unwrap());
        for until in [i64::MAX, i64::MIN, i64::MAX / 1000 + 1, -1] {
            let (s, v) =
                cloud.req("POST", "/v1/leases", Some(&ann), Some(json!({"boards": ["n1"], "until": until}))).await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{} until {until}: {v}", t.name);
            let (s, v) = cloud.req("PATCH", &extend, Some(&ann), Some(json!({"until": until}))).await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{} extend until {until}: {v}", t.name);
        }
        for duration in [i64::MAX, i64::MIN] {
            let (s, v) = cloud.req("PATCH", &extend, Some(&ann), Some(json!({"duration": duration}))).await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "duration {duration}: {v}");
        }
        // A range ending at 255.255.255.255 (its board addresses overflowed u32), and the
        // other ranges no VPN can use.
        for cidr in ["255.255.255.0/24", "255.0.0.0/8", "240.0.0.0/24", "224.0.0.0/24", "127.0.0.0/8", "0.0.0.0/8"] {
            let body = json!({"name": "top", "type": "l3", "cidr": cidr, "cloud_address": true});
            let (s, v) = cloud.req("POST", "/v1/vpns", Some(&ann), Some(body)).await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{cidr}: {v}");
        }
        let (s, v) = cloud.req("GET", "/v1/vpns", Some(&ann), None).await;
        assert_eq!((s, v["vpns"].as_array().map(Vec::len)), (StatusCode::OK, Some(0)), "{v}");
    }
}

#[tokio::test]
async fn vpn_ranges_the_cloud_routes_do_not_overlap_across_projects() {
    for t in TestDb::all().await {
        let cloud = start(&t).await;
        let (_, ann, bob) = tenants(&cloud).await;
        let vpn = |name: &str, ty: &str, cidr: &str, cloud_address: bool| json!({"name": name, "type": ty, "cidr": cidr, "cloud_address": cloud_address});
        let (s, a) =
            cloud.req("POST", "/v1/vpns", Some(&ann), Some(vpn("secret-net", "l2", "10.30.0.0/24", true))).await;
        assert_eq!(s, StatusCode::CREATED, "{a}");
        // Another project, an overlapping range with the cloud's address: 409, naming nothing
        // of the other VPN (name, uuid, project).
        for (ty, cidr, cloud_address) in [
            ("l2", "10.30.0.0/24", true),
            ("l3", "10.30.0.128/25", true),
            ("l2", "10.0.0.0/8", true),
            ("l3", "10.30.0.0/24", false),
        ] {
            let (s, v) = cloud.req("POST", "/v1/vpns", Some(&bob), Some(vpn("b1", ty, cidr, cloud_address))).await;
            assert_eq!(s, StatusCode::CONFLICT, "{} {ty} {cidr} {cloud_address}: {v}", t.name);
            let msg = v["error_message"].as_str().unwrap();
            assert!(msg.contains("in use on this cloud"), "{msg}");
            for hidden in ["secret-net", a["uuid"].as_str().unwrap(), "alpha", a["project"].as_str().unwrap()] {
                assert!(!msg.contains(hidden), "{msg} reveals {hidden}");
            }
        }
        // The same project is no different.
        let (s, v) = cloud.req("POST", "/v1/vpns", Some(&ann), Some(vpn("a2", "l2", "10.30.0.0/16", true))).await;
        assert_eq!(s, StatusCode::CONFLICT, "{v}");
        // Not overlapping: 201.
        let (s, v) = cloud.req("POST", "/v1/vpns", Some(&bob), Some(vpn("b1", "l2", "10.31.0.0/24", true))).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        // Overlapping, but the cloud routes none of it: an L2 VPN without the cloud's address.
        let (s, v) = cloud.req("POST", "/v1/vpns", Some(&bob), Some(vpn("b2", "l2", "10.30.0.0/24", false))).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        // Without the cloud's address in both, overlapping ranges are fine (L2 and L3).
        for (who, name) in [(&ann, "a3"), (&bob, "b3")] {
            for (ty, suffix) in [("l2", "-l2"), ("l3", "-l3")] {
                let body = vpn(&format!("{name}{suffix}"), ty, "10.40.0.0/24", false);
                let (s, v) = cloud.req("POST", "/v1/vpns", Some(who), Some(body)).await;
                assert_eq!(s, StatusCode::CREATED, "{name} {ty}: {v}");
            }
        }
        // Concurrent creations of clashing ranges: exactly one wins.
        let tries = (0..8).map(|i| {
            let (who, cloud) = (if i % 2 == 0 { &ann } else { &bob }, &cloud);
            async move {
                let body = vpn(&format!("race{i}"), "l2", "10.50.0.0/16", true);
                cloud.req("POST", "/v1/vpns", Some(who), Some(body)).await
            }
        });
        let answers = futures_util::future::join_all(tries).await;
        let won = answers.iter().filter(|(s, _)| *s == StatusCode::CREATED).count();
        let lost = answers.iter().filter(|(s, _)| *s == StatusCode::CONFLICT).count();
        assert_eq!((won, lost), (1, 7), "{}: {answers:?}", t.name);
    }
}

/// A public plugin another project has injected stays public (that project could no longer
/// see it to stop or remove it), and its owner is not told which boards of others have it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_plugin_injected_by_another_project_stays_public() {
    for t in TestDb::all().await {
        let cloud = start(&t).await;
        let (_, ann, bob) = tenants(&cloud).await;
        let plugin = json!({"name": "shared", "kind": "python", "code": "def main(): pass", "public": true});
        let (s, v) = cloud.req("POST", "/v1/plugins", Some(&ann), Some(plugin)).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        let (s, v) = cloud.req("POST", "/v1/boards", Some(&bob), Some(board_body("bobs-board"))).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        let bobs_board = v["uuid"].as_str().unwrap().to_owned();
        // Bob injects it into his (offline) board: queued, pending until the board is back.
        let body = json!({"plugin": v_str(&cloud, &bob, "/v1/plugins/shared", "uuid").await});
        let (s, v) = cloud.req("PUT", "/v1/boards/bobs-board/plugins?queue=true", Some(&bob), Some(body)).await;
        assert_eq!(s, StatusCode::ACCEPTED, "{v}");
        let (s, v) = cloud.req("PATCH", "/v1/plugins/shared", Some(&ann), Some(json!({"public": false}))).await;
        assert_eq!(s, StatusCode::CONFLICT, "{}: {v}", t.name);
        assert!(v["error_message"].as_str().unwrap().contains("1 board(s) of other projects"), "{v}");
        let (s, _) = cloud.req("GET", "/v1/plugins/shared", Some(&bob), None).await;
        assert_eq!(s, StatusCode::OK, "{}: still visible to the project that uses it", t.name);
        let (s, v) = cloud.req("DELETE", "/v1/plugins/shared", Some(&ann), None).await;
        assert_eq!(s, StatusCode::CONFLICT, "{v}");
        let text = v.to_string();
        assert!(!text.contains(&bobs_board) && !text.contains("bobs-board"), "another project's board named: {v}");
        // Once removed there, it may go private.
        let (s, v) = cloud.req("DELETE", "/v1/boards/bobs-board/plugins/shared?queue=true", Some(&bob), None).await;
        assert!(s.is_success(), "{v}");
        let (s, v) = cloud.req("PATCH", "/v1/plugins/shared", Some(&ann), Some(json!({"public": false}))).await;
        assert_eq!(s, StatusCode::OK, "{}: {v}", t.name);
    }
}

async fn v_str(cloud: &Cloud, token: &str, path: &str, field: &str) -> String {
    let (s, v) = cloud.req("GET", path, Some(token), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v[field].as_str().unwrap_or_else(|| panic!("no {field}: {v}")).to_owned()
}

/// Revoking another user's tokens answers a non-administrator the same 403 whether that user
/// exists or not: the answer tells no names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_user_tokens_tells_no_names() {
    for t in TestDb::all().await {
        let cloud = start(&t).await;
        let (admin, ann, _) = tenants(&cloud).await;
        for who in ["bob", "nobody"] {
            let (s, v) = cloud.req("DELETE", &format!("/v1/users/{who}/tokens"), Some(&ann), None).await;
            assert_eq!(s, StatusCode::FORBIDDEN, "{}: {who}: {v}", t.name);
        }
        let (s, v) = cloud.req("DELETE", "/v1/users/nobody/tokens", Some(&admin), None).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
        let (s, v) = cloud.req("DELETE", "/v1/users/ann/tokens", Some(&ann), None).await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }
}

/// A board's registration code enrolls a device as that board (and hands it the board's new
/// secret after a rotation): members with the user role do not see it, managers do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_codes_are_shown_to_managers_only() {
    for t in TestDb::all().await {
        let cloud = start(&t).await;
        let (_, ann, uma) = alpha_with_a_user(&cloud).await;
        let (s, v) = cloud.req("POST", "/v1/fleets", Some(&ann), Some(json!({"name": "f"}))).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        let board = json!({"name": "coded", "code": "SECRET-CODE-1", "fleet": "f",
                           "location": [{"latitude": "1", "longitude": "2", "altitude": "3"}]});
        let (s, v) = cloud.req("POST", "/v1/boards", Some(&ann), Some(board)).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        for (token, code) in [(&ann, json!("SECRET-CODE-1")), (&uma, Value::Null)] {
            let (s, v) = cloud.req("GET", "/v1/boards/coded", Some(token), None).await;
            assert_eq!((s, &v["code"]), (StatusCode::OK, &code), "{}: {v}", t.name);
            let (_, v) = cloud.req("GET", "/v1/boards", Some(token), None).await;
            assert_eq!(v["boards"][0]["code"], code, "{}: {v}", t.name);
            let (_, v) = cloud.req("GET", "/v1/boards?fields=name,code", Some(token), None).await;
            assert_eq!(v["boards"][0]["code"], code, "{}: {v}", t.name);
            let (_, v) = cloud.req("GET", "/v1/boards/detail", Some(token), None).await;
            assert_eq!(v["boards"][0]["code"], code, "{}: detail: {v}", t.name);
            let (_, v) = cloud.req("GET", "/v1/fleets/f/boards", Some(token), None).await;
            assert_eq!(v["boards"][0]["code"], code, "{}: fleet: {v}", t.name);
        }
    }
}

#[tokio::test]
async fn metrics_are_for_administrators() {
    for t in TestDb::all().await {
        let cloud = start(&t).await;
        let (admin, ann, uma) = alpha_with_a_user(&cloud).await;
        for (who, token) in [("user", &uma), ("manager", &ann)] {
            let (s, v) = cloud.req("GET", "/metrics", Some(token), None).await;
            assert_eq!(s, StatusCode::FORBIDDEN, "{} {who}: {v}", t.name);
            assert!(v["error_message"].is_string(), "{v}");
        }
        let (s, v) = cloud.req("GET", "/metrics", Some(&admin), None).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert!(v.as_str().unwrap().contains("iotronic_boards{status=\"online\"}"), "{v}");
        let (s, _) = cloud.req("GET", "/metrics", None, None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
    }
}

/// Logins refused before any check (oversized, throttled) cost their sender nothing, so they
/// must not each cost the cloud an audit row: a source gets 10 into the log, then one a
/// minute. Checked attempts (a wrong password) are all recorded.
#[tokio::test]
async fn refused_logins_cannot_flood_the_audit_log() {
    for t in TestDb::all().await {
        let cloud = start(&t).await;
        let admin = cloud.token("admin", "admin-password").await;
        let long = "u".repeat(300);
        for _ in 0..40 {
            let (s, v) =
                cloud.req("POST", "/v1/auth/tokens", None, Some(json!({"username": long, "password": "x"}))).await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        }
        let wrong = json!({"username": "admin", "password": "wrong-password"});
        let mut statuses = Vec::new();
        for _ in 0..30 {
            statuses.push(cloud.req("POST", "/v1/auth/tokens", None, Some(wrong.clone())).await.0.as_u16());
        }
        assert_eq!(statuses.iter().filter(|s| **s == 401).count(), 5, "{statuses:?}");
        assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 25, "{statuses:?}");
        let (_, v) = cloud.req("GET", "/v1/audit?action=auth.login&limit=1000", Some(&admin), None).await;
        let count = |status: u16| v["audit"].as_array().unwrap().iter().filter(|e| e["status"] == status).count();
        assert_eq!(count(401), 5, "{}: every checked attempt is audited: {v}", t.name);
        let unchecked = count(400) + count(429);
        assert!((10..=11).contains(&unchecked), "{}: {unchecked} rows for 65 unchecked refusals", t.name);
    }
}

/// One project holds at most `--ports-per-project` public ports, so it cannot take the whole
/// pool from the others (here 2); disabling a service gives its port back, and an
/// administrator is not limited.
#[tokio::test]
async fn one_project_holds_at_most_its_share_of_public_ports() {
    for t in TestDb::all().await {
        let cloud = start_with(&t, |c| c.ports_per_project = 2).await;
        let (admin, ann, _) = tenants(&cloud).await;
        let (s, v) = cloud
            .req("POST", "/v1/services", Some(&ann), Some(json!({"name": "ssh", "port": 22, "protocol": "TCP"})))
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        for (i, name) in ["q1", "q2", "q3"].into_iter().enumerate() {
            let (_, b) = cloud.req("POST", "/v1/boards", Some(&ann), Some(board_body(name))).await;
            cloud.login(b["uuid"].as_str().unwrap(), &format!("{}", 4001 + i)).await;
        }
        let cloud = &cloud;
        let enable = |board: &str, token: &str| {
            let at = format!("/v1/boards/{board}/services/ssh/action");
            let token = token.to_owned();
            async move { cloud.req("POST", &at, Some(&token), Some(json!({"action": "ServiceEnable"}))).await }
        };
        for board in ["q1", "q2"] {
            let (s, v) = enable(board, &ann).await;
            assert_eq!(s, StatusCode::CREATED, "{} {board}: {v}", t.name);
        }
        let (s, v) = enable("q3", &ann).await;
        assert_eq!(s, StatusCode::CONFLICT, "{}: {v}", t.name);
        assert!(v["error_message"].as_str().unwrap().contains("--ports-per-project"), "{v}");
        let (s, v) = enable("q3", &admin).await;
        assert_eq!(s, StatusCode::CREATED, "{}: an administrator: {v}", t.name);
        let off = json!({"action": "ServiceDisable"});
        for board in ["q3", "q1"] {
            let at = format!("/v1/boards/{board}/services/ssh/action");
            let (s, v) = cloud.req("POST", &at, Some(&admin), Some(off.clone())).await;
            assert!(s.is_success(), "{v}");
        }
        let (s, v) = enable("q3", &ann).await;
        assert_eq!(s, StatusCode::CREATED, "{}: a port given back: {v}", t.name);
    }
}

/// Registration codes are unique across the cloud, so `POST /v1/boards` refused as a conflict
/// tells a manager that some board still waits with that code: those refusals are throttled
/// per project like guesses at the agent (20, then 2 a second), created boards do not count,
/// and another project is not held up.
#[tokio::test]
async fn probing_for_registration_codes_is_throttled() {
    for t in TestDb::all().await {
        let cloud = start(&t).await;
        let (_, ann, bob) = tenants(&cloud).await;
        let mut target = board_body("target");
        target["code"] = json!("BETA-CODE-7");
        let (s, v) = cloud.req("POST", "/v1/boards", Some(&bob), Some(target)).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        for i in 0..30 {
            let (s, v) = cloud.req("POST", "/v1/boards", Some(&ann), Some(board_body(&format!("ok{i}")))).await;
            assert_eq!(s, StatusCode::CREATED, "{}: board {i}: {v}", t.name);
        }
        let mut conflicts = 0;
        let throttled = loop {
            let mut probe = board_body(&format!("probe{conflicts}"));
            probe["code"] = json!("BETA-CODE-7");
            let (s, v) = cloud.req("POST", "/v1/boards", Some(&ann), Some(probe)).await;
            match s {
                StatusCode::CONFLICT => conflicts += 1,
                StatusCode::TOO_MANY_REQUESTS => break v,
                _ => panic!("{}: {s} {v}", t.name),
            }
            assert!(conflicts < 200, "{}: 200 probes for a taken code were answered", t.name);
        };
        assert!(conflicts >= 20, "{}: throttled after {conflicts}: {throttled}", t.name);
        let (s, v) = cloud.req("POST", "/v1/boards", Some(&ann), Some(board_body("fresh"))).await;
        assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{}: a right attempt while throttled: {v}", t.name);
        let (s, v) = cloud.req("POST", "/v1/boards", Some(&bob), Some(board_body("beta2"))).await;
        assert_eq!(s, StatusCode::CREATED, "{}: another project: {v}", t.name);
    }
}

/// Two managers PATCH different fields of the same object at the same time: both changes
/// land, for every object that takes PATCH (each request wrote back the whole object as it
/// had read it, so one of them could undo the other's field).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_patches_of_different_fields_both_land() {
    for t in TestDb::all().await {
        let cloud = start(&t).await;
        let (_, ann, _) = tenants(&cloud).await;
        let created = [
            ("/v1/boards", board_body("b0")),
            ("/v1/services", json!({"name": "s0", "port": 22, "protocol": "TCP"})),
            ("/v1/fleets", json!({"name": "f0"})),
            ("/v1/plugins", json!({"name": "p0", "kind": "python", "code": "def main(): pass"})),
        ];
        for (path, body) in created {
            let (s, v) = cloud.req("POST", path, Some(&ann), Some(body)).await;
            assert_eq!(s, StatusCode::CREATED, "{v}");
            let uuid = v["uuid"].as_str().unwrap().to_owned();
            let at = format!("{path}/{uuid}");
            for round in 1..=20 {
                let name = json!({"name": format!("n{round}")});
                let extra = json!({"extra": {"round": round}});
                let ((s1, v1), (s2, v2)) = tokio::join!(
                    cloud.req("PATCH", &at, Some(&ann), Some(name)),
                    cloud.req("PATCH", &at, Some(&ann), Some(extra)),
                );
                assert_eq!((s1, s2), (StatusCode::OK, StatusCode::OK), "{v1} {v2}");
                let (_, v) = cloud.req("GET", &at, Some(&ann), None).await;
                assert_eq!(v["name"], format!("n{round}"), "{} {path}, round {round}: {v}", t.name);
                assert_eq!(v["extra"], json!({"round": round}), "{} {path}, round {round}: {v}", t.name);
            }
        }
    }
}

/// Definitions are the managers': a project user may use services, fleets and VPNs but not
/// create, change or delete them. A VPN range lies in the cloud's VPN ranges (private ones by
/// default): the cloud host routes VPN addresses, so a VPN over 8.8.8.0/24 would take the
/// host's traffic for them to a user's board. A service's port does not change while it is
/// exposed (boards forward to the port they were told). No name reads as a uuid.
#[tokio::test]
async fn definitions_are_for_managers_in_private_ranges_and_stay_consistent() {
    for t in TestDb::all().await {
        let cloud = start(&t).await;
        let (_, ann, uma) = alpha_with_a_user(&cloud).await;
        let who = t.name;
        let vpn = |cidr: &str| json!({"name": "v", "type": "l3", "cidr": cidr});
        for (path, body) in [
            ("/v1/services", json!({"name": "web", "port": 80, "protocol": "TCP"})),
            ("/v1/fleets", json!({"name": "f"})),
            ("/v1/vpns", vpn("10.30.0.0/24")),
            ("/v1/plugins", json!({"name": "p", "kind": "python", "code": "def main(): pass"})),
        ] {
            let (s, v) = cloud.req("POST", path, Some(&uma), Some(body.clone())).await;
            assert_eq!(s, StatusCode::FORBIDDEN, "{who} {path}: {v}");
            let (s, v) = cloud.req("POST", path, Some(&ann), Some(body)).await;
            assert_eq!(s, StatusCode::CREATED, "{who} {path}: {v}");
            let at = format!("{path}/{}", v["uuid"].as_str().unwrap());
            if path != "/v1/vpns" {
                let (s, v) = cloud.req("PATCH", &at, Some(&uma), Some(json!({"extra": {"x": 1}}))).await;
                assert_eq!(s, StatusCode::FORBIDDEN, "{who} {path}: {v}");
            }
            let (s, v) = cloud.req("DELETE", &at, Some(&uma), None).await;
            assert_eq!(s, StatusCode::FORBIDDEN, "{who} {path}: {v}");
        }
        for public in ["8.8.8.0/24", "192.0.2.0/24", "11.0.0.0/8", "172.32.0.0/16"] {
            let (s, v) = cloud.req("POST", "/v1/vpns", Some(&ann), Some(vpn(public))).await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{who} {public}: {v}");
            assert!(v["error_message"].as_str().unwrap().contains("10.0.0.0/8"), "{v}");
        }
        let (s, v) = cloud
            .req("POST", "/v1/vpns", Some(&ann), Some(json!({"name": "c", "type": "l2", "cidr": "100.64.1.0/24"})))
            .await;
        assert_eq!(s, StatusCode::CREATED, "{who}: {v}");

        let (_, b) = cloud.req("POST", "/v1/boards", Some(&ann), Some(board_body("e1"))).await;
        cloud.login(b["uuid"].as_str().unwrap(), "3001").await;
        let (s, ex) = cloud
            .req("POST", "/v1/boards/e1/services/web/action", Some(&ann), Some(json!({"action": "ServiceEnable"})))
            .await;
        assert_eq!(s, StatusCode::CREATED, "{who}: {ex}");
        let (s, v) = cloud.req("PATCH", "/v1/services/web", Some(&ann), Some(json!({"port": 8080}))).await;
        assert_eq!(s, StatusCode::CONFLICT, "{who}: {v}");
        let (s, v) =
            cloud.req("PATCH", "/v1/services/web", Some(&ann), Some(json!({"port": 80, "extra": {"a": 1}}))).await;
        assert_eq!(s, StatusCode::OK, "{who}: the same port is no change: {v}");
        let (s, v) = cloud
            .req("POST", "/v1/boards/e1/services/web/action", Some(&ann), Some(json!({"action": "ServiceDisable"})))
            .await;
        assert!(s.is_success(), "{who}: {v}");
        let (s, v) = cloud.req("PATCH", "/v1/services/web", Some(&ann), Some(json!({"port": 8080}))).await;
        assert_eq!((s, v["port"].as_i64()), (StatusCode::OK, Some(8080)), "{who}: {v}");

        let uuid_name = b["uuid"].as_str().unwrap();
        let (s, v) = cloud.req("POST", "/v1/fleets", Some(&ann), Some(json!({"name": uuid_name}))).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{who}: {v}");
    }
}

/// Deleting a VPN deletes it even when a member cannot be told (here a board another project
/// leases): the rows go first and the board forgets the membership at its next login. It
/// used to stop at that member with the VPN half deleted, and no one could finish it.
#[tokio::test]
async fn a_vpn_is_deleted_even_when_a_member_cannot_be_told() {
    for t in TestDb::all().await {
        let cloud = start(&t).await;
        let (admin, ann, _) = tenants(&cloud).await;
        let who = t.name;
        let (_, b) = cloud.req("POST", "/v1/boards", Some(&ann), Some(board_body("m1"))).await;
        let m1 = b["uuid"].as_str().unwrap().to_owned();
        cloud.login(&m1, "4001").await;
        let body = json!({"name": "lab", "type": "l2", "cidr": "10.21.0.0/24"});
        let (s, v) = cloud.req("POST", "/v1/vpns", Some(&ann), Some(body)).await;
        assert_eq!(s, StatusCode::CREATED, "{who}: {v}");
        let (s, v) = cloud.req("POST", "/v1/vpns/lab/boards", Some(&ann), Some(json!({"board": "m1"}))).await;
        assert_eq!(s, StatusCode::CREATED, "{who}: {v}");
        let (s, v) =
            cloud.req("POST", "/v1/leases", Some(&admin), Some(json!({"boards": [m1], "duration": 600}))).await;
        assert_eq!(s, StatusCode::CREATED, "{who}: {v}");
        let (s, v) = cloud.req("DELETE", "/v1/vpns/lab", Some(&ann), None).await;
        assert_eq!(s, StatusCode::NO_CONTENT, "{who}: {v}");
        let (s, _) = cloud.req("GET", "/v1/vpns/lab", Some(&ann), None).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{who}: the VPN is gone");
    }
}

/// A call the conductor cannot be told about (its bus is gone) is answered 503, try again,
/// and its request is failed at once: it was a 500 "internal error" and a request left
/// PENDING for the sweep's 15 minutes.
#[tokio::test]
async fn a_call_the_conductor_cannot_take_is_a_503() {
    let t = TestDb::sqlite().await;
    let mut cloud = start(&t).await;
    let (_, ann, _) = tenants(&cloud).await;
    let (_, b) = cloud.req("POST", "/v1/boards", Some(&ann), Some(board_body("c1"))).await;
    cloud.login(b["uuid"].as_str().unwrap(), "4003").await;
    cloud.conductor_stop.cancel();
    (&mut cloud.conductor).await.unwrap().unwrap();
    let (s, v) = cloud.req("POST", "/v1/boards/c1/action", Some(&ann), Some(json!({"action": "DevicePing"}))).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert!(v["error_message"].as_str().unwrap().contains("message bus"), "{v}");
    let (_, list) = cloud.req("GET", "/v1/requests", Some(&ann), None).await;
    let statuses: Vec<&str> =
        list["requests"].as_array().unwrap().iter().filter_map(|r| r["status"].as_str()).collect();
    assert_eq!(statuses, ["FAILED"], "{list}");
}

/// A member removed from a VPN is removed whatever the board answers: the row goes first (it
/// is what the data plane and the token renewal go by). A board answering `VpnLeave` with an
/// error (hostile, or unable to save its state) used to stay in the VPN (502, row kept).
#[tokio::test]
async fn a_board_cannot_refuse_to_leave_a_vpn() {
    let t = TestDb::sqlite().await;
    let cloud = start(&t).await;
    let (_, ann, _) = tenants(&cloud).await;
    let (_, b) = cloud.req("POST", "/v1/boards", Some(&ann), Some(board_body("m1"))).await;
    let m1 = b["uuid"].as_str().unwrap().to_owned();
    cloud.login(&m1, "4002").await;
    let body = json!({"name": "lab", "type": "l2", "cidr": "10.22.0.0/24"});
    let (s, v) = cloud.req("POST", "/v1/vpns", Some(&ann), Some(body)).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let vpn = v["uuid"].as_str().unwrap().to_owned();
    let (s, v) = cloud.req("POST", "/v1/vpns/lab/boards", Some(&ann), Some(json!({"board": "m1"}))).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    cloud.boards.refuse_leave.lock().unwrap().push(m1.clone());
    let (s, v) = cloud.req("DELETE", "/v1/vpns/lab/boards/m1", Some(&ann), None).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    assert!(t.db.vpn_member(&vpn, &m1).await.unwrap().is_none(), "the board stayed a member");
}

/// A ServiceEnable queued for an offline board holds its port only while it may still run:
/// once it expires unrun, the exposure goes (it stayed allocated for good).
#[tokio::test]
async fn an_expose_that_never_ran_frees_its_port() {
    for t in TestDb::all().await {
        let cloud = start(&t).await;
        let (_, ann, _) = tenants(&cloud).await;
        let who = t.name;
        cloud.req("POST", "/v1/boards", Some(&ann), Some(board_body("q1"))).await;
        let svc = json!({"name": "ssh", "port": 22, "protocol": "TCP"});
        assert_eq!(cloud.req("POST", "/v1/services", Some(&ann), Some(svc)).await.0, StatusCode::CREATED);
        let (s, v) = cloud
            .req(
                "POST",
                "/v1/boards/q1/services/ssh/action?queue_ttl=1",
                Some(&ann),
                Some(json!({"action": "ServiceEnable"})),
            )
            .await;
        assert!(s.is_success(), "{who}: {v}");
        let (_, v) = cloud.req("GET", "/v1/boards/q1/services", Some(&ann), None).await;
        assert_eq!(v["exposed"].as_array().map(Vec::len), Some(1), "{who}: allocated while queued: {v}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (_, v) = cloud.req("GET", "/v1/boards/q1/services", Some(&ann), None).await;
            if v["exposed"].as_array().is_some_and(Vec::is_empty) {
                break;
            }
            assert!(Instant::now() < deadline, "{who}: the expired expose still holds its port: {v}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// One address holds at most `MAX_CONNECTIONS_PER_SOURCE` REST connections: the next is
/// closed at once (one peer could otherwise open connections faster than the header timeout
/// closes them, up to the descriptor limit), and another address is still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_hold_every_rest_connection() {
    use tokio::io::AsyncReadExt;
    let t = TestDb::sqlite().await;
    let cloud = start(&t).await;
    let addr: std::net::SocketAddr = cloud.url.trim_start_matches("http://").parse().unwrap();
    let from = |ip: &str| {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind(format!("{ip}:0").parse().unwrap()).unwrap();
        s.connect(addr)
    };
    let mut idle = Vec::new();
    for _ in 0..iotronic::listen::MAX_CONNECTIONS_PER_SOURCE {
        idle.push(from("127.0.0.2").await.unwrap());
    }
    let mut extra = from("127.0.0.2").await.unwrap();
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(5), extra.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0) | Err(_))), "the connection beyond the cap was held: {read:?}");
    let (s, v) = cloud.req("GET", "/v1", None, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    drop(idle);
}

/// The REST listener closes connections that do not send a request in time: one that sends
/// nothing, one that stops half way through its headers, one idle after a response, and one
/// whose body stops coming (that request fails). A client that sends in time is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_do_not_send_a_request_in_time_are_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t = TestDb::sqlite().await;
    let timeouts = iotronic::listen::HttpTimeouts {
        header: Duration::from_millis(500),
        body: Duration::from_millis(500),
        ..Default::default()
    };
    let cloud = start_with(&t, |c| c.http_timeouts = timeouts).await;
    let addr = cloud.url.trim_start_matches("http://").to_owned();
    // Sends `sent` and reads until the server closes the connection (or 20 s pass).
    let exchange = |sent: &'static str| {
        let addr = addr.clone();
        async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(sent.as_bytes()).await.unwrap();
            let mut got = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut got)).await;
            assert!(read.is_ok(), "the connection after {sent:?} was held open");
            String::from_utf8_lossy(&got).into_owned()
        }
    };
    assert_eq!(exchange("").await, "", "nothing sent");
    assert_eq!(exchange("GET /v1 HTTP/1.1\r\nHost: x\r\n").await, "", "headers cut short");
    let answered = exchange("GET /v1 HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(answered.starts_with("HTTP/1.1 200"), "kept alive, then idle: {answered}");
    let cut = exchange(
        "POST /v1/auth/tokens HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"user",
    )
    .await;
    assert!(cut.starts_with("HTTP/1.1 4"), "a body that stops coming: {cut}");
    let (s, v) = cloud.req("GET", "/v1", None, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

/// A client that sends requests but stops reading the responses has its connection closed
/// once a response write has waited for room for the write timeout: its pipelined requests
/// (never read) end in a reset instead of waiting for ever. Others are still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_closed() {
    let t = TestDb::sqlite().await;
    let timeouts = iotronic::listen::HttpTimeouts { write: Duration::from_millis(500), ..Default::default() };
    let cloud = start_with(&t, |c| c.http_timeouts = timeouts).await;
    let addr: std::net::SocketAddr = cloud.url.trim_start_matches("http://").parse().unwrap();
    // A blocking client with a small receive buffer writes pipelined requests until a write
    // fails; it reads nothing, so the server's responses fill both sockets' buffers.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let s = sock.connect(addr).await.unwrap().into_std().unwrap();
    s.set_nonblocking(false).unwrap();
    let writer = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut s = s;
        let batch = "GET /v1 HTTP/1.1\r\nHost: x\r\n\r\n".repeat(256);
        let mut sent = 0usize;
        loop {
            match s.write_all(batch.as_bytes()) {
                Ok(()) => sent += batch.len(),
                Err(e) => return (sent, e),
            }
        }
    });
    let (sent, e) = tokio::time::timeout(Duration::from_secs(30), writer)
        .await
        .expect("the connection of a client that reads nothing was held open")
        .unwrap();
    assert!(sent > 0, "nothing was sent before the connection ended: {e}");
    let (s, v) = cloud.req("GET", "/v1", None, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

/// The audit log pages by marker, exactly: entries that share a millisecond are each listed
/// once, in order; and an action prefix matches case and all on both back-ends (SQLite's LIKE
/// ignored ASCII case). Through the REST API: `next` links to the page after a full one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_log_pages_exactly_and_filters_by_exact_prefix() {
    for t in TestDb::all().await {
        sqlx::any::install_default_drivers();
        let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(t.url.expose()).await.unwrap();
        for i in 0..5 {
            let action = if i % 2 == 0 { "TUNNEL.open" } else { "tunnel.open" };
            sqlx::query(
                "INSERT INTO audit (id, at, user_uuid, user_name, project_uuid, action, target, source, status, \
                 detail) VALUES ($1, 1000, '', '', 'p', $2, '', '', 200, '')",
            )
            .bind(format!("id-{i}"))
            .bind(action)
            .execute(&mut conn)
            .await
            .unwrap();
        }
        let mut q = iotronic::db::AuditQuery { limit: 2, ..Default::default() };
        let mut seen = Vec::new();
        loop {
            let page = t.db.list_audit(&q).await.unwrap();
            let Some(last) = page.last() else { break };
            q.marker = Some(last.id.clone());
            seen.extend(page.into_iter().map(|e| e.id));
        }
        assert_eq!(seen, ["id-4", "id-3", "id-2", "id-1", "id-0"], "{}", t.name);
        let q = iotronic::db::AuditQuery { action: "tunnel.".into(), limit: 100, ..Default::default() };
        let ids: Vec<String> = t.db.list_audit(&q).await.unwrap().into_iter().map(|e| e.id).collect();
        assert_eq!(ids, ["id-3", "id-1"], "{}: the prefix is case-sensitive", t.name);
        let q = iotronic::db::AuditQuery { marker: Some("nope".into()), limit: 10, ..Default::default() };
        assert!(matches!(t.db.list_audit(&q).await, Err(Error::NotFound(_))), "{}", t.name);
    }
    let t = TestDb::sqlite().await;
    let cloud = start(&t).await;
    // Each login is audited.
    let admin = cloud.token("admin", "admin-password").await;
    for _ in 0..2 {
        cloud.token("admin", "admin-password").await;
    }
    let (s, v) = cloud.req("GET", "/v1/audit?limit=1", Some(&admin), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let next = v["next"].as_str().unwrap_or_else(|| panic!("a full page has next: {v}"));
    let first = v["audit"][0]["id"].as_str().unwrap().to_owned();
    assert!(next.contains(&format!("marker={first}")), "{next}");
    let (_, v) = cloud.req("GET", next, Some(&admin), None).await;
    assert_ne!(v["audit"][0]["id"].as_str(), Some(first.as_str()), "{v}");
}

/// An administrator acting on a name that two projects use gets 409, not whichever project's
/// object sorts first (a DELETE reached another project's service); the uuid reaches each,
/// and a project's own members still act by name.
#[tokio::test]
async fn an_administrator_cannot_reach_another_projects_object_by_a_shared_name() {
    let t = TestDb::sqlite().await;
    let cloud = start(&t).await;
    let (admin, ann, bob) = tenants(&cloud).await;
    let mut uuids = Vec::new();
    for tok in [&ann, &bob] {
        let svc = json!({"name": "web", "port": 80, "protocol": "TCP"});
        let (s, v) = cloud.req("POST", "/v1/services", Some(tok), Some(svc)).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        uuids.push(v["uuid"].as_str().unwrap().to_owned());
    }
    let (s, v) = cloud.req("DELETE", "/v1/services/web", Some(&admin), None).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    for u in &uuids {
        let (s, v) = cloud.req("GET", &format!("/v1/services/{u}"), Some(&admin), None).await;
        assert_eq!(s, StatusCode::OK, "both services are still there: {v}");
    }
    let (s, v) = cloud.req("DELETE", "/v1/services/web", Some(&bob), None).await;
    assert!(s.is_success(), "{v}");
    let (s, v) = cloud.req("GET", &format!("/v1/services/{}", uuids[0]), Some(&ann), None).await;
    assert_eq!(s, StatusCode::OK, "ann's service is untouched: {v}");
    let (s, v) = cloud.req("GET", "/v1/services/web", Some(&admin), None).await;
    assert_eq!((s, v["uuid"].as_str()), (StatusCode::OK, Some(uuids[0].as_str())), "one left: {v}");

    // Plugins too (they had a lookup of their own, which took the oldest): both projects
    // have a private "blink"; each project's own comes first for its members.
    let mut plugins = Vec::new();
    for tok in [&ann, &bob] {
        let plugin = json!({"name": "blink", "kind": "python", "code": "def main(): pass"});
        let (s, v) = cloud.req("POST", "/v1/plugins", Some(tok), Some(plugin)).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        plugins.push(v["uuid"].as_str().unwrap().to_owned());
    }
    for method in ["GET", "DELETE"] {
        let (s, v) = cloud.req(method, "/v1/plugins/blink", Some(&admin), None).await;
        assert_eq!(s, StatusCode::CONFLICT, "{method}: {v}");
    }
    for (tok, own) in [(&ann, &plugins[0]), (&bob, &plugins[1])] {
        let (s, v) = cloud.req("GET", "/v1/plugins/blink", Some(tok), None).await;
        assert_eq!((s, v["uuid"].as_str()), (StatusCode::OK, Some(own.as_str())), "{v}");
    }
    let (s, v) = cloud.req("GET", &format!("/v1/plugins/{}", plugins[1]), Some(&admin), None).await;
    assert_eq!((s, v["name"].as_str()), (StatusCode::OK, Some("blink")), "by uuid: {v}");
}

/// Free-form JSON (`extra`, `parameters`, `grants`) and free text (a board's type, a
/// location, a fleet's description) are bounded where they are written, with a 400 naming
/// the field: they were stored whatever their size (2 MB each, axum's body limit), kept with
/// their object or request, and parsed again for every row of every list.
#[tokio::test]
async fn free_form_fields_are_bounded_where_they_are_written() {
    let t = TestDb::sqlite().await;
    let cloud = start(&t).await;
    let (_, ann, _) = tenants(&cloud).await;
    let refused = |s: StatusCode, v: &Value, words: &[&str]| {
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        let text = v["error_message"].as_str().unwrap_or_default();
        assert!(words.iter().all(|w| text.contains(w)), "{words:?} not in {v}");
    };
    let mut body = board_body("big");
    body["extra"] = json!(vec![0; 300]);
    let (s, v) = cloud.req("POST", "/v1/boards", Some(&ann), Some(body.clone())).await;
    refused(s, &v, &["extra", "more than 256 values"]);
    body["extra"] = json!({"note": "x".repeat(17_000)});
    let (s, v) = cloud.req("POST", "/v1/boards", Some(&ann), Some(body.clone())).await;
    refused(s, &v, &["extra", "bytes"]);
    body["extra"] = json!({"note": "fits"});
    body["type"] = json!("t".repeat(2_000));
    let (s, v) = cloud.req("POST", "/v1/boards", Some(&ann), Some(body.clone())).await;
    refused(s, &v, &["type"]);
    body["type"] = json!("generic");
    body["location"][0]["latitude"] = json!("9".repeat(2_000));
    let (s, v) = cloud.req("POST", "/v1/boards", Some(&ann), Some(body.clone())).await;
    refused(s, &v, &["location"]);
    body["location"][0]["latitude"] = json!("38.2");
    let (s, v) = cloud.req("POST", "/v1/boards", Some(&ann), Some(body)).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let board = v["uuid"].as_str().unwrap().to_owned();
    let (s, v) = cloud.req("PATCH", "/v1/boards/big", Some(&ann), Some(json!({"extra": vec![0; 300]}))).await;
    refused(s, &v, &["extra"]);

    cloud.login(&board, "3001").await;
    let call = json!({"action": "DevicePing", "parameters": vec![0; 5_000]});
    let (s, v) = cloud.req("POST", "/v1/boards/big/action", Some(&ann), Some(call)).await;
    refused(s, &v, &["parameters", "more than 4096 values"]);
    let call = json!({"action": "DevicePing", "parameters": {"n": 1}});
    let (s, v) = cloud.req("POST", "/v1/boards/big/action", Some(&ann), Some(call)).await;
    assert_eq!((s, v), (StatusCode::OK, json!("pong")));

    let svc = json!({"name": "web", "port": 80, "extra": vec![0; 300]});
    let (s, v) = cloud.req("POST", "/v1/services", Some(&ann), Some(svc)).await;
    refused(s, &v, &["extra"]);
    let fleet = json!({"name": "f", "description": "d".repeat(2_000)});
    let (s, v) = cloud.req("POST", "/v1/fleets", Some(&ann), Some(fleet)).await;
    refused(s, &v, &["description"]);
    let plugin = json!({"name": "p", "kind": "python", "code": "def main(): pass", "parameters": vec![0; 300]});
    let (s, v) = cloud.req("POST", "/v1/plugins", Some(&ann), Some(plugin)).await;
    refused(s, &v, &["parameters"]);
}

/// `GET /v1/boards/{b}/services/restore` (the original API's) changes state, minting tunnel
/// tokens and sending every exposure again: it is audited like any state-changing call (it
/// was skipped as a GET). An expired lease the sweep has not ended yet cannot be extended
/// back to life (it would skip its teardown).
#[tokio::test]
async fn the_acting_get_is_audited_and_an_expired_lease_stays_ended() {
    let t = TestDb::sqlite().await;
    let cloud = start(&t).await;
    let (admin, ann, _) = tenants(&cloud).await;
    let (s, v) = cloud.req("POST", "/v1/boards", Some(&ann), Some(board_body("r1"))).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let board = v["uuid"].as_str().unwrap().to_owned();
    cloud.login(&board, "3002").await;
    let (s, v) = cloud.req("GET", "/v1/boards/r1/services/restore", Some(&ann), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (_, audit) = cloud.req("GET", "/v1/audit?limit=1000", Some(&admin), None).await;
    let restores: Vec<_> = audit["audit"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"].as_str().is_some_and(|a| a.starts_with("GET ") && a.ends_with("/services/restore")))
        .collect();
    assert_eq!(restores.len(), 1, "{audit}");

    // The conductor is stopped so that nothing ends the lease meanwhile.
    cloud.conductor_stop.cancel();
    let (s, lease) = cloud.req("POST", "/v1/leases", Some(&ann), Some(json!({"boards": ["r1"], "duration": 60}))).await;
    assert_eq!(s, StatusCode::CREATED, "{lease}");
    let id = lease["uuid"].as_str().unwrap();
    sqlx::any::install_default_drivers();
    let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(t.url.expose()).await.unwrap();
    sqlx::query("UPDATE leases SET expires_at = 1 WHERE uuid = $1").bind(id).execute(&mut conn).await.unwrap();
    let (s, v) = cloud.req("PATCH", &format!("/v1/leases/{id}"), Some(&ann), Some(json!({"duration": 60}))).await;
    assert_eq!(s, StatusCode::CONFLICT, "an expired lease was extended: {v}");
}

/// Renaming a board to names other projects use is an oracle for their names (board names are
/// unique across the cloud): it is throttled like creation. A rename to a name that looks
/// like a uuid is refused (it would shadow lookups by uuid).
#[tokio::test]
async fn probing_for_board_names_by_renaming_is_throttled() {
    let t = TestDb::sqlite().await;
    let cloud = start(&t).await;
    let (_, ann, bob) = tenants(&cloud).await;
    let (s, v) = cloud.req("POST", "/v1/boards", Some(&bob), Some(board_body("secret-name"))).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (s, v) = cloud.req("POST", "/v1/boards", Some(&ann), Some(board_body("mine"))).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let rename = |to: &str| json!({"name": to});
    let mut conflicts = 0;
    let throttled = loop {
        let (s, v) = cloud.req("PATCH", "/v1/boards/mine", Some(&ann), Some(rename("secret-name"))).await;
        match s {
            StatusCode::CONFLICT => conflicts += 1,
            StatusCode::TOO_MANY_REQUESTS => break v,
            _ => panic!("{s} {v}"),
        }
        assert!(conflicts < 200, "200 probing renames were answered");
    };
    assert!(conflicts >= 20, "throttled after {conflicts}: {throttled}");
    let (s, v) = cloud.req("PATCH", "/v1/boards/mine", Some(&ann), Some(json!({"type": "other"}))).await;
    assert_eq!(s, StatusCode::OK, "an update without a rename is not throttled: {v}");
    let (s, v) = cloud.req("PATCH", "/v1/boards/secret-name", Some(&bob), Some(rename("still-bobs"))).await;
    assert_eq!(s, StatusCode::OK, "another project: {v}");
    let uuid_like = "0b6b8a5e-3c1d-4e2f-9a7b-1c2d3e4f5a6b";
    let (s, v) = cloud.req("PATCH", "/v1/boards/still-bobs", Some(&bob), Some(rename(uuid_like))).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
}

/// Actions that run code as root on the board or replace its software need the Manager role,
/// as plugins do; a project user may still ping it.
#[tokio::test]
async fn package_operations_and_upgrades_are_for_managers() {
    let t = TestDb::sqlite().await;
    let cloud = start(&t).await;
    let (_, ann, uma) = alpha_with_a_user(&cloud).await;
    let (s, v) = cloud.req("POST", "/v1/boards", Some(&ann), Some(board_body("b1"))).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    for action in ["DevicePkgOperation", "DeviceUpgradeLR", "DeviceMountFs", "DeviceFactoryReset"] {
        let body = json!({"action": action, "parameters": {}});
        let (s, v) = cloud.req("POST", "/v1/boards/b1/action", Some(&uma), Some(body.clone())).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "user, {action}: {v}");
        let (s, v) = cloud.req("POST", "/v1/boards/b1/action", Some(&ann), Some(body)).await;
        assert_ne!(s, StatusCode::FORBIDDEN, "manager, {action}: {v}");
    }
    let ping = json!({"action": "DevicePing", "parameters": {}});
    let (s, v) = cloud.req("POST", "/v1/boards/b1/action", Some(&uma), Some(ping)).await;
    assert_ne!(s, StatusCode::FORBIDDEN, "user, ping: {v}");
}

/// The original v1 API's `/detail` lists (services, fleets, plugins, requests) answer as the
/// lists do, instead of being taken for an object named "detail" (404).
#[tokio::test]
async fn detail_lists_of_the_original_api_answer() {
    let t = TestDb::sqlite().await;
    let cloud = start(&t).await;
    let (_, ann, _) = tenants(&cloud).await;
    let svc = json!({"name": "ssh", "port": 22, "protocol": "TCP"});
    assert_eq!(cloud.req("POST", "/v1/services", Some(&ann), Some(svc)).await.0, StatusCode::CREATED);
    assert_eq!(cloud.req("POST", "/v1/fleets", Some(&ann), Some(json!({"name": "f"}))).await.0, StatusCode::CREATED);
    for (list, key) in
        [("services", "services"), ("fleets", "fleets"), ("plugins", "plugins"), ("requests", "requests")]
    {
        let (s, plain) = cloud.req("GET", &format!("/v1/{list}"), Some(&ann), None).await;
        assert_eq!(s, StatusCode::OK, "{list}: {plain}");
        let (s, detail) = cloud.req("GET", &format!("/v1/{list}/detail"), Some(&ann), None).await;
        assert_eq!(s, StatusCode::OK, "{list}/detail: {detail}");
        assert_eq!(detail[key], plain[key], "{list}");
    }
}

/// A plugin a board is taking for the first time cannot be deleted meanwhile (the board would
/// keep code the cloud no longer knows, and the cloud failed to record the answer on its
/// foreign key); a board that does not take it leaves no trace, and the plugin can go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_cannot_be_deleted_while_a_board_takes_it() {
    for t in TestDb::all().await {
        let cloud = start(&t).await;
        let (_, ann, _) = tenants(&cloud).await;
        for name in ["p1", "refused"] {
            let plugin = json!({"name": name, "kind": "python", "code": "def main(): pass"});
            let (s, v) = cloud.req("POST", "/v1/plugins", Some(&ann), Some(plugin)).await;
            assert_eq!(s, StatusCode::CREATED, "{v}");
        }
        let (s, v) = cloud.req("POST", "/v1/boards", Some(&ann), Some(board_body("b1"))).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        let b1 = v["uuid"].as_str().unwrap().to_owned();
        cloud.login(&b1, "5001").await;

        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        *cloud.boards.inject_gate.lock().unwrap() = Some(gate.clone());
        let inject = tokio::spawn({
            let (http, url, ann) = (cloud.http.clone(), cloud.url.clone(), ann.clone());
            let body = json!({"plugin": "p1"});
            async move { common::rest::call(&http, &url, "PUT", "/v1/boards/b1/plugins", Some(&ann), Some(body)).await }
        });
        tokio::time::timeout(Duration::from_secs(10), cloud.boards.inject_arrived.notified()).await.unwrap();
        let (s, v) = cloud.req("DELETE", "/v1/plugins/p1", Some(&ann), None).await;
        assert_eq!(s, StatusCode::CONFLICT, "{}: deleted while the board takes it: {v}", t.name);
        gate.add_permits(1);
        let (s, v) = inject.await.unwrap();
        assert_eq!((s, v["status"].as_str()), (StatusCode::OK, Some("injected")), "{}: {v}", t.name);
        let (s, v) = cloud.req("DELETE", "/v1/plugins/p1", Some(&ann), None).await;
        assert_eq!(s, StatusCode::CONFLICT, "{v}");

        // Refused by the board: no injection recorded, and the plugin may go.
        *cloud.boards.inject_gate.lock().unwrap() = None;
        let (s, v) = cloud.req("PUT", "/v1/boards/b1/plugins", Some(&ann), Some(json!({"plugin": "refused"}))).await;
        assert!(!s.is_success(), "{}: {s} {v}", t.name);
        let refused = v_str(&cloud, &ann, "/v1/plugins/refused", "uuid").await;
        assert!(cloud.db.injection(&b1, &refused).await.unwrap().is_none(), "{}: a refused injection stays", t.name);
        let (s, v) = cloud.req("DELETE", "/v1/plugins/refused", Some(&ann), None).await;
        assert!(s.is_success(), "{}: {s} {v}", t.name);
    }
}

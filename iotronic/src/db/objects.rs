//! Fleets, services and their exposures (public ports), VPNs and their members.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;
use serde_json::Value;
use sqlx::any::AnyRow;

use super::{Db, Page, col, db_err, is_unique_violation, json_col, new_uuid, now_ms, unique_or};
use crate::Error;

#[derive(Debug, Clone)]
pub struct Fleet {
    pub uuid: String,
    pub name: String,
    pub project: String,
    pub description: String,
    pub extra: Value,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Debug, Clone)]
pub struct Service {
    pub uuid: String,
    pub name: String,
    pub project: String,
    pub port: i64,
    pub protocol: String,
    pub extra: Value,
    pub created_at: i64,
    pub updated_at: i64,
}

/// The fields of a service a PATCH changes (`None`: left as it is).
#[derive(Debug, Default)]
pub struct ServiceUpdate {
    pub name: Option<String>,
    pub port: Option<i64>,
    pub protocol: Option<String>,
    pub extra: Option<Value>,
}

/// A project's public-port quota for [`Db::allocate_exposure_within`].
pub struct PortQuota<'a> {
    pub project: &'a str,
    pub max: i64,
    /// The error for a request over the quota, given how many ports the project holds.
    pub refusal: &'a (dyn Fn(i64) -> Error + Sync),
}

/// A service exposed on a public port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exposure {
    pub board: String,
    pub service: String,
    pub public_port: i64,
    pub lease: Option<String>,
    pub created_at: i64,
    /// Sources allowed to connect to the public port, canonical CIDRs (empty: anyone).
    pub allow: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Vpn {
    pub uuid: String,
    pub name: String,
    pub project: String,
    pub vpn_type: String,
    pub cidr: String,
    pub created_at: i64,
    /// The cloud host takes the first host address of the CIDR on the VPN.
    pub cloud_address: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VpnMember {
    pub vpn: String,
    pub board: String,
    pub address: String,
    pub interface: String,
    pub lease: Option<String>,
}

fn fleet_row(r: &AnyRow) -> Result<Fleet, Error> {
    Ok(Fleet {
        uuid: col(r, "uuid")?,
        name: col(r, "name")?,
        project: col(r, "project_uuid")?,
        description: col(r, "description")?,
        extra: json_col(r, "extra")?,
        created_at: col(r, "created_at")?,
        updated_at: col(r, "updated_at")?,
    })
}

fn service_row(r: &AnyRow) -> Result<Service, Error> {
    Ok(Service {
        uuid: col(r, "uuid")?,
        name: col(r, "name")?,
        project: col(r, "project_uuid")?,
        port: col(r, "port")?,
        protocol: col(r, "protocol")?,
        extra: json_col(r, "extra")?,
        created_at: col(r, "created_at")?,
        updated_at: col(r, "updated_at")?,
    })
}

fn exposure_row(r: &AnyRow) -> Result<Exposure, Error> {
    Ok(Exposure {
        board: col(r, "board_uuid")?,
        service: col(r, "service_uuid")?,
        public_port: col(r, "public_port")?,
        lease: col(r, "lease_uuid")?,
        created_at: col(r, "created_at")?,
        // Strict: a list we cannot read must not become "anyone" (the hook refuses the port).
        allow: serde_json::from_str(&col::<String>(r, "allow_from")?)
            .map_err(|e| Error::Invalid(format!("stored allow-list is not a JSON list of strings: {e}")))?,
    })
}

fn vpn_row(r: &AnyRow) -> Result<Vpn, Error> {
    Ok(Vpn {
        uuid: col(r, "uuid")?,
        name: col(r, "name")?,
        project: col(r, "project_uuid")?,
        vpn_type: col(r, "type")?,
        cidr: col(r, "cidr")?,
        created_at: col(r, "created_at")?,
        cloud_address: col::<i64>(r, "cloud_address")? != 0,
    })
}

fn member_row(r: &AnyRow) -> Result<VpnMember, Error> {
    Ok(VpnMember {
        vpn: col(r, "vpn_uuid")?,
        board: col(r, "board_uuid")?,
        address: col(r, "address")?,
        interface: col(r, "interface")?,
        lease: col(r, "lease_uuid")?,
    })
}

/// An IPv4 CIDR: network address and prefix length.
pub fn parse_cidr(cidr: &str) -> Result<(Ipv4Addr, u8), Error> {
    let bad = || Error::Invalid(format!("{cidr:?} is not an IPv4 CIDR such as 10.10.0.0/24"));
    let (addr, len) = cidr.split_once('/').ok_or_else(bad)?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
    let len: u8 = len.parse().map_err(|_| bad())?;
    if !(8..=30).contains(&len) {
        return Err(Error::Invalid(format!("{cidr}: the prefix length must be between 8 and 30")));
    }
    let mask = u32::MAX << (32 - len);
    Ok((Ipv4Addr::from(u32::from(addr) & mask), len))
}

/// Most entries in an exposure's allow-list.
pub const MAX_ALLOW: usize = 64;

/// Parses a source-address allow-list: CIDRs (`10.0.0.0/8`, `2001:db8::/32`) or single
/// addresses (a /32 or /128). Returns them canonical (host bits cleared).
pub fn parse_allow_list<S: AsRef<str>>(items: &[S]) -> Result<Vec<IpNet>, Error> {
    if items.len() > MAX_ALLOW {
        return Err(Error::Invalid(format!("allow: at most {MAX_ALLOW} entries")));
    }
    items
        .iter()
        .map(|s| {
            let s = s.as_ref().trim();
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                .map(|n| n.trunc())
                .map_err(|_| Error::Invalid(format!("allow: {s:?} is not a CIDR such as 10.0.0.0/8 or 2001:db8::/32")))
        })
        .collect()
}

/// Whether a connection from `peer` passes `allow` (empty: anyone). An IPv4 peer seen on an
/// IPv6 socket (`::ffff:a.b.c.d`) is matched as IPv4.
pub fn admits(allow: &[IpNet], peer: IpAddr) -> bool {
    let peer = peer.to_canonical();
    allow.is_empty() || allow.iter().any(|n| n.contains(&peer))
}

/// The cloud's own address in `cidr`: the first host.
pub fn cloud_host(cidr: &str) -> Result<Ipv4Addr, Error> {
    let (net, _) = parse_cidr(cidr)?;
    Ok(Ipv4Addr::from(u32::from(net) + 1))
}

/// Host addresses a board may get in `cidr`: all but the network, the broadcast and the first
/// host (the cloud's end of the VPN). Computed in u64: a range may end at 255.255.255.255
/// (stored before [`check_vpn_range`] refused such ranges).
fn board_hosts(cidr: &str) -> Result<(u32, u32), Error> {
    let (net, len) = parse_cidr(cidr)?;
    let base = u64::from(u32::from(net));
    let size = 1u64 << (32 - len);
    // len <= 30: size >= 4, so base + 2 <= base + size - 2 <= u32::MAX - 1.
    let addr = |a: u64| u32::try_from(a).map_err(|_| Error::Invalid(format!("{cidr}: no board addresses")));
    Ok((addr(base + 2)?, addr(base + size - 2)?))
}

/// Refuses ranges a VPN cannot use: "this network" (0.0.0.0/8), loopback (127.0.0.0/8),
/// multicast and reserved (224.0.0.0/3, up to the limited broadcast 255.255.255.255). A
/// prefix is at least /8, so a range touches one of them only if it lies inside it.
fn check_vpn_range(net: Ipv4Addr, len: u8) -> Result<(), Error> {
    let first = net.octets()[0];
    if first == 0 || first == 127 || first >= 224 {
        return Err(Error::Invalid(format!(
            "{net}/{len} is not a unicast range a VPN can use (0.0.0.0/8, 127.0.0.0/8 and 224.0.0.0 and above are \
             reserved): use a private range such as 10.10.0.0/24"
        )));
    }
    Ok(())
}

/// Whether `cidr` lies wholly within one of `ranges` (CIDRs; an unparsable range is an error,
/// so a typo in the configuration refuses VPNs rather than admitting any).
pub fn cidr_within_any<S: AsRef<str>>(cidr: &str, ranges: &[S]) -> Result<bool, Error> {
    let (net, len) = parse_cidr(cidr)?;
    for r in ranges {
        let range: ipnet::Ipv4Net = r
            .as_ref()
            .parse()
            .map_err(|_| Error::Invalid(format!("configured VPN range {:?} is not an IPv4 CIDR", r.as_ref())))?;
        if range.contains(&ipnet::Ipv4Net::new(net, len).map_err(|_| Error::Invalid(format!("{cidr}: bad prefix")))?) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Whether two CIDRs share an address.
pub fn cidrs_overlap(a: &str, b: &str) -> Result<bool, Error> {
    let ((na, la), (nb, lb)) = (parse_cidr(a)?, parse_cidr(b)?);
    let mask = u32::MAX << (32 - la.min(lb));
    Ok(u32::from(na) & mask == u32::from(nb) & mask)
}

/// Whether the cloud host routes a VPN's addresses in its own (main) routing table: a cloud
/// address puts the range (L2: on the bridge) or the member host routes (L3) there, and an L3
/// VPN always adds a host route per member (`vpn::Fabric`).
fn routes_on_host(cloud_address: bool, vpn_type: &str) -> bool {
    cloud_address || vpn_type == "l3"
}

/// Two VPNs clash on the cloud host when their ranges overlap, both route on the host, and
/// the host has an address in at least one: then a route of one replaces or shadows the
/// other's, and the cloud's traffic for one VPN's member goes to the other's board.
fn routes_clash(a: &Vpn, b: &Vpn) -> Result<bool, Error> {
    let both_route = routes_on_host(a.cloud_address, &a.vpn_type) && routes_on_host(b.cloud_address, &b.vpn_type);
    Ok(both_route && (a.cloud_address || b.cloud_address) && cidrs_overlap(&a.cidr, &b.cidr)?)
}

impl Db {
    pub async fn create_fleet(
        &self,
        name: &str,
        project: &str,
        description: &str,
        extra: &Value,
    ) -> Result<Fleet, Error> {
        let (uuid, now) = (new_uuid(), now_ms());
        sqlx::query(
            "INSERT INTO fleets (uuid, name, project_uuid, description, extra, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&uuid)
        .bind(name)
        .bind(project)
        .bind(description)
        .bind(extra.to_string())
        .bind(now)
        .bind(now)
        .execute(self.pool())
        .await
        .map_err(|e| unique_or(e, || format!("a fleet named {name:?} already exists in this project")))?;
        self.fleet(&uuid, None).await?.ok_or_else(|| Error::NotFound(format!("fleet {uuid} vanished")))
    }

    pub async fn fleet(&self, ident: &str, project: Option<&str>) -> Result<Option<Fleet>, Error> {
        let row = self.row_by_ident("SELECT * FROM fleets", ident, project).await?;
        row.as_ref().map(fleet_row).transpose()
    }

    pub async fn list_fleets(&self, project: Option<&str>) -> Result<Vec<Fleet>, Error> {
        let rows = sqlx::query("SELECT * FROM fleets WHERE ($1 = '' OR project_uuid = $2) ORDER BY created_at, uuid")
            .bind(project.unwrap_or(""))
            .bind(project.unwrap_or(""))
            .fetch_all(self.pool())
            .await
            .map_err(db_err)?;
        rows.iter().map(fleet_row).collect()
    }

    /// One page of the fleets of `project` (all: `None`).
    pub async fn list_fleets_page(&self, project: Option<&str>, page: &Page) -> Result<Vec<Fleet>, Error> {
        let rows = self.scoped_page("fleets", project, page).await?;
        rows.iter().map(fleet_row).collect()
    }

    /// Writes the fields given, and only those, in one statement.
    pub async fn update_fleet(
        &self,
        uuid: &str,
        name: Option<&str>,
        description: Option<&str>,
        extra: Option<&Value>,
    ) -> Result<(), Error> {
        sqlx::query(
            "UPDATE fleets SET name = COALESCE($1, name), description = COALESCE($2, description), \
             extra = COALESCE($3, extra), updated_at = $4 WHERE uuid = $5",
        )
        .bind(name)
        .bind(description)
        .bind(extra.map(Value::to_string))
        .bind(now_ms())
        .bind(uuid)
        .execute(self.pool())
        .await
        .map_err(|e| {
            unique_or(e, || format!("a fleet named {:?} already exists in this project", name.unwrap_or_default()))
        })?;
        Ok(())
    }

    pub async fn delete_fleet(&self, uuid: &str) -> Result<(), Error> {
        sqlx::query("DELETE FROM fleets WHERE uuid = $1").bind(uuid).execute(self.pool()).await.map_err(db_err)?;
        Ok(())
    }

    pub async fn create_service(
        &self,
        name: &str,
        project: &str,
        port: i64,
        protocol: &str,
        extra: &Value,
    ) -> Result<Service, Error> {
        let (uuid, now) = (new_uuid(), now_ms());
        sqlx::query(
            "INSERT INTO services (uuid, name, project_uuid, port, protocol, extra, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&uuid)
        .bind(name)
        .bind(project)
        .bind(port)
        .bind(protocol)
        .bind(extra.to_string())
        .bind(now)
        .bind(now)
        .execute(self.pool())
        .await
        .map_err(|e| unique_or(e, || format!("a service named {name:?} already exists in this project")))?;
        self.service(&uuid, None).await?.ok_or_else(|| Error::NotFound(format!("service {uuid} vanished")))
    }

    pub async fn service(&self, ident: &str, project: Option<&str>) -> Result<Option<Service>, Error> {
        let row = self.row_by_ident("SELECT * FROM services", ident, project).await?;
        row.as_ref().map(service_row).transpose()
    }

    pub async fn list_services(&self, project: Option<&str>) -> Result<Vec<Service>, Error> {
        let rows = sqlx::query("SELECT * FROM services WHERE ($1 = '' OR project_uuid = $2) ORDER BY created_at, uuid")
            .bind(project.unwrap_or(""))
            .bind(project.unwrap_or(""))
            .fetch_all(self.pool())
            .await
            .map_err(db_err)?;
        rows.iter().map(service_row).collect()
    }

    /// One page of the services of `project` (all: `None`).
    pub async fn list_services_page(&self, project: Option<&str>, page: &Page) -> Result<Vec<Service>, Error> {
        let rows = self.scoped_page("services", project, page).await?;
        rows.iter().map(service_row).collect()
    }

    /// One page of the rows of `table` that `project` owns (all: `None`).
    async fn scoped_page(&self, table: &str, project: Option<&str>, page: &Page) -> Result<Vec<AnyRow>, Error> {
        let mut f = super::page::Filters::default();
        f.eq("project_uuid", project);
        let sql = format!("SELECT * FROM {table}{}", page.clause(&mut f, table, "uuid", ""));
        f.query(sql).fetch_all(self.pool()).await.map_err(db_err)
    }

    /// Writes the fields given, and only those, in one statement (concurrent PATCHes of
    /// different fields both land). The port does not change while the service is exposed:
    /// boards forward to the port they were told at exposure (409).
    pub async fn update_service(&self, uuid: &str, u: ServiceUpdate) -> Result<(), Error> {
        let name = u.name;
        let r = sqlx::query(
            "UPDATE services SET name = COALESCE($1, name), port = COALESCE($2, port), \
             protocol = COALESCE($3, protocol), extra = COALESCE($4, extra), updated_at = $5 WHERE uuid = $6 \
             AND (COALESCE($7, port) = port OR NOT EXISTS (SELECT 1 FROM exposed_services WHERE service_uuid = $8))",
        )
        .bind(&name)
        .bind(u.port)
        .bind(u.protocol)
        .bind(u.extra.map(|e| e.to_string()))
        .bind(now_ms())
        .bind(uuid)
        .bind(u.port)
        .bind(uuid)
        .execute(self.pool())
        .await
        .map_err(|e| {
            unique_or(e, || format!("a service named {:?} already exists in this project", name.unwrap_or_default()))
        })?;
        if r.rows_affected() == 0 {
            // Nothing written: the service is gone (deleted since it was looked up), or the
            // port may not change.
            let exists = sqlx::query("SELECT uuid FROM services WHERE uuid = $1")
                .bind(uuid)
                .fetch_optional(self.pool())
                .await
                .map_err(db_err)?
                .is_some();
            if !exists {
                return Err(Error::NotFound(format!("service {uuid} not found")));
            }
            return Err(Error::Conflict(format!(
                "service {uuid} is exposed: its port cannot change until it is disabled on every board"
            )));
        }
        Ok(())
    }

    pub async fn delete_service(&self, uuid: &str) -> Result<(), Error> {
        sqlx::query("DELETE FROM services WHERE uuid = $1").bind(uuid).execute(self.pool()).await.map_err(db_err)?;
        Ok(())
    }

    /// Exposes `service` of `board` on a free public port in `[min, max]`. The port is drawn at
    /// random among the free ones; a concurrent conductor taking the same port makes the
    /// insert fail on the UNIQUE constraint and we draw again.
    pub async fn allocate_exposure(
        &self,
        board: &str,
        service: &str,
        range: (u16, u16),
        lease: Option<&str>,
        allow: &[IpNet],
    ) -> Result<Exposure, Error> {
        self.allocate_exposure_within(board, service, range, lease, allow, None).await
    }

    /// [`allocate_exposure`](Self::allocate_exposure) within a [`PortQuota`]: refused with
    /// its `refusal` when its project already holds `max` public ports
    /// ([`exposures_held_by`](Self::exposures_held_by)). The count and the insert are one
    /// transaction, and the transactions of one project run one after the other: concurrent
    /// requests cannot all count below the quota and then all insert.
    pub async fn allocate_exposure_within(
        &self,
        board: &str,
        service: &str,
        range: (u16, u16),
        lease: Option<&str>,
        allow: &[IpNet],
        quota: Option<PortQuota<'_>>,
    ) -> Result<Exposure, Error> {
        let allow: Vec<String> = allow.iter().map(|n| n.trunc().to_string()).collect();
        let allow_json = serde_json::to_string(&allow).map_err(|e| Error::Invalid(e.to_string()))?;
        for _ in 0..64 {
            // Dropped without a commit (a refusal, a port taken meanwhile): rolled back.
            let mut tx = self.exposure_tx(quota.as_ref().map(|q| q.project)).await?;
            if let Some(q) = &quota {
                let held = exposures_held(&mut tx, q.project).await?;
                if held >= q.max {
                    return Err((q.refusal)(held));
                }
            }
            let existing =
                sqlx::query("SELECT public_port FROM exposed_services WHERE board_uuid = $1 AND service_uuid = $2")
                    .bind(board)
                    .bind(service)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(db_err)?;
            if let Some(row) = existing {
                let port: i64 = col(&row, "public_port")?;
                return Err(Error::Conflict(format!("service already exposed on public port {port}")));
            }
            let used: Vec<i64> = sqlx::query("SELECT public_port FROM exposed_services ORDER BY public_port")
                .fetch_all(&mut *tx)
                .await
                .map_err(db_err)?
                .iter()
                .map(|r| col(r, "public_port"))
                .collect::<Result<_, _>>()?;
            let free: Vec<i64> =
                (i64::from(range.0)..=i64::from(range.1)).filter(|p| used.binary_search(p).is_err()).collect();
            if free.is_empty() {
                return Err(Error::Unavailable(format!("no free public port in {}-{}", range.0, range.1)));
            }
            let port = free[rand::random_range(0..free.len())];
            let now = now_ms();
            let r = sqlx::query(
                "INSERT INTO exposed_services (board_uuid, service_uuid, public_port, lease_uuid, created_at, allow_from) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(board)
            .bind(service)
            .bind(port)
            .bind(lease.map(str::to_owned))
            .bind(now)
            .bind(&allow_json)
            .execute(&mut *tx)
            .await;
            match r {
                Ok(_) => {
                    tx.commit().await.map_err(db_err)?;
                    let lease = lease.map(str::to_owned);
                    return Ok(Exposure {
                        board: board.into(),
                        service: service.into(),
                        public_port: port,
                        lease,
                        created_at: now,
                        allow,
                    });
                }
                Err(e) if is_unique_violation(&e) => continue,
                Err(e) => return Err(Error::Db(e)),
            }
        }
        Err(Error::Unavailable("could not allocate a public port after 64 attempts".into()))
    }

    /// The transaction of an allocation, serialized with the others of `project`. SQLite:
    /// `BEGIN IMMEDIATE` takes the database's one write lock at once (waiting for the other
    /// writer), so its reads see what the previous allocation committed (a transaction that
    /// read first could not write after another's commit). PostgreSQL (READ COMMITTED): the
    /// project's row, locked until commit (`FOR NO KEY UPDATE` leaves inserts referring to the
    /// project free); each statement after it sees what the previous holder committed.
    async fn exposure_tx(&self, project: Option<&str>) -> Result<sqlx::Transaction<'static, sqlx::Any>, Error> {
        if self.backend() == super::Backend::Sqlite {
            return self.pool().begin_with("BEGIN IMMEDIATE").await.map_err(db_err);
        }
        let mut tx = self.pool().begin().await.map_err(db_err)?;
        if let Some(project) = project {
            sqlx::query("SELECT uuid FROM projects WHERE uuid = $1 FOR NO KEY UPDATE")
                .bind(project)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_err)?;
        }
        Ok(tx)
    }

    pub async fn exposure(&self, board: &str, service: &str) -> Result<Option<Exposure>, Error> {
        let row = sqlx::query("SELECT * FROM exposed_services WHERE board_uuid = $1 AND service_uuid = $2")
            .bind(board)
            .bind(service)
            .fetch_optional(self.pool())
            .await
            .map_err(db_err)?;
        row.as_ref().map(exposure_row).transpose()
    }

    pub async fn exposure_by_port(&self, port: i64) -> Result<Option<Exposure>, Error> {
        let row = sqlx::query("SELECT * FROM exposed_services WHERE public_port = $1")
            .bind(port)
            .fetch_optional(self.pool())
            .await
            .map_err(db_err)?;
        row.as_ref().map(exposure_row).transpose()
    }

    /// Of `listeners` (board, public port), the ports whose exposure is gone or belongs to
    /// another board now: their listeners must close.
    pub async fn stale_listeners(&self, listeners: &[(String, u16)]) -> Result<Vec<u16>, Error> {
        let mut stale = Vec::new();
        for chunk in listeners.chunks(200) {
            let marks: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
            let sql = format!(
                "SELECT public_port, board_uuid FROM exposed_services WHERE public_port IN ({})",
                marks.join(", ")
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for (_, port) in chunk {
                q = q.bind(i64::from(*port));
            }
            let rows = q.fetch_all(self.pool()).await.map_err(db_err)?;
            let mut held = std::collections::HashSet::new();
            for r in &rows {
                held.insert((col::<String>(r, "board_uuid")?, col::<i64>(r, "public_port")?));
            }
            stale.extend(chunk.iter().filter(|(b, p)| !held.contains(&(b.clone(), i64::from(*p)))).map(|(_, p)| *p));
        }
        Ok(stale)
    }

    pub async fn exposures_of_board(&self, board: &str) -> Result<Vec<Exposure>, Error> {
        let rows = sqlx::query("SELECT * FROM exposed_services WHERE board_uuid = $1 ORDER BY public_port")
            .bind(board)
            .fetch_all(self.pool())
            .await
            .map_err(db_err)?;
        rows.iter().map(exposure_row).collect()
    }

    pub async fn exposures_of_lease(&self, lease: &str) -> Result<Vec<Exposure>, Error> {
        let rows = sqlx::query("SELECT * FROM exposed_services WHERE lease_uuid = $1 ORDER BY public_port")
            .bind(lease)
            .fetch_all(self.pool())
            .await
            .map_err(db_err)?;
        rows.iter().map(exposure_row).collect()
    }

    /// Public ports `project` holds: exposures on its boards outside leases, and exposures
    /// under its leases (on boards of any project).
    pub async fn exposures_held_by(&self, project: &str) -> Result<i64, Error> {
        let mut conn = self.pool().acquire().await.map_err(db_err)?;
        exposures_held(&mut conn, project).await
    }

    pub async fn count_exposures(&self) -> Result<i64, Error> {
        let row =
            sqlx::query("SELECT COUNT(*) AS n FROM exposed_services").fetch_one(self.pool()).await.map_err(db_err)?;
        col(&row, "n")
    }

    pub async fn delete_exposure(&self, board: &str, service: &str) -> Result<bool, Error> {
        let r = sqlx::query("DELETE FROM exposed_services WHERE board_uuid = $1 AND service_uuid = $2")
            .bind(board)
            .bind(service)
            .execute(self.pool())
            .await
            .map_err(db_err)?;
        Ok(r.rows_affected() > 0)
    }

    /// Deletes exposure `e` if it is still there as it was read (its port, its lease): a later
    /// exposure of that service on that board, made since, is kept. Deleting by the key alone,
    /// a lease torn down twice at once (the release and the sweep) could remove the exposure
    /// the board's next lease made meanwhile, and tell the board to close it.
    pub async fn delete_exposure_as_read(&self, e: &Exposure) -> Result<bool, Error> {
        let r = sqlx::query(
            "DELETE FROM exposed_services WHERE board_uuid = $1 AND service_uuid = $2 AND public_port = $3 \
             AND COALESCE(lease_uuid, '') = $4",
        )
        .bind(&e.board)
        .bind(&e.service)
        .bind(e.public_port)
        .bind(e.lease.as_deref().unwrap_or(""))
        .execute(self.pool())
        .await
        .map_err(db_err)?;
        Ok(r.rows_affected() > 0)
    }

    /// A VPN without the cloud's address ([`Db::create_vpn_with`]).
    pub async fn create_vpn(&self, name: &str, project: &str, vpn_type: &str, cidr: &str) -> Result<Vpn, Error> {
        self.create_vpn_with(name, project, vpn_type, cidr, false).await
    }

    /// Creates a VPN, with the cloud host's address in it if `cloud_address`. A VPN whose
    /// routes on the cloud host would meet another VPN's (see `routes_clash`), in any project,
    /// is refused with 409 without naming the other; concurrent creations are serialized so
    /// that two clashing ones cannot both pass.
    pub async fn create_vpn_with(
        &self,
        name: &str,
        project: &str,
        vpn_type: &str,
        cidr: &str,
        cloud_address: bool,
    ) -> Result<Vpn, Error> {
        let (net, len) = parse_cidr(cidr)?;
        check_vpn_range(net, len)?;
        let v = Vpn {
            uuid: new_uuid(),
            name: name.into(),
            project: project.into(),
            vpn_type: vpn_type.into(),
            cidr: format!("{net}/{len}"),
            created_at: now_ms(),
            cloud_address,
        };
        let mut tx = self.pool().begin().await.map_err(db_err)?;
        let routes = routes_on_host(cloud_address, vpn_type);
        if routes {
            self.serialize_vpn_routes(&mut tx).await?;
        }
        sqlx::query(
            "INSERT INTO vpns (uuid, name, project_uuid, type, cidr, created_at, cloud_address) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&v.uuid)
        .bind(name)
        .bind(project)
        .bind(vpn_type)
        .bind(&v.cidr)
        .bind(v.created_at)
        .bind(i64::from(cloud_address))
        .execute(&mut *tx)
        .await
        .map_err(|e| unique_or(e, || format!("a VPN named {name:?} already exists in this project")))?;
        if routes {
            check_no_clash(&mut tx, &v).await?;
        }
        tx.commit().await.map_err(db_err)?;
        Ok(v)
    }

    /// Makes concurrent transactions that add routes on the cloud host (a VPN created, a cloud
    /// address taken) run their clash check one after the other. SQLite: the transaction's
    /// first statement must then be its write (which takes the database's one write lock and
    /// waits for the other writer; its reads then see what the other committed). PostgreSQL
    /// (READ COMMITTED, where two transactions would not see each other's new rows): a table
    /// lock that conflicts with itself and with writes to `vpns`, held until commit.
    async fn serialize_vpn_routes(&self, tx: &mut sqlx::Transaction<'_, sqlx::Any>) -> Result<(), Error> {
        if self.backend() == super::Backend::Postgres {
            sqlx::query("LOCK TABLE vpns IN SHARE ROW EXCLUSIVE MODE").execute(&mut **tx).await.map_err(db_err)?;
        }
        Ok(())
    }

    pub async fn vpn(&self, ident: &str, project: Option<&str>) -> Result<Option<Vpn>, Error> {
        let row = self.row_by_ident("SELECT * FROM vpns", ident, project).await?;
        row.as_ref().map(vpn_row).transpose()
    }

    pub async fn list_vpns(&self, project: Option<&str>) -> Result<Vec<Vpn>, Error> {
        let rows = sqlx::query("SELECT * FROM vpns WHERE ($1 = '' OR project_uuid = $2) ORDER BY created_at, uuid")
            .bind(project.unwrap_or(""))
            .bind(project.unwrap_or(""))
            .fetch_all(self.pool())
            .await
            .map_err(db_err)?;
        rows.iter().map(vpn_row).collect()
    }

    /// One page of the VPNs of `project` (all: `None`).
    pub async fn list_vpns_page(&self, project: Option<&str>, page: &Page) -> Result<Vec<Vpn>, Error> {
        let rows = self.scoped_page("vpns", project, page).await?;
        rows.iter().map(vpn_row).collect()
    }

    /// Gives (or takes back) the cloud host's address on the VPN. Giving it is refused with
    /// 409 when the VPN's range would then clash with another's, as at creation.
    pub async fn set_vpn_cloud_address(&self, uuid: &str, on: bool) -> Result<(), Error> {
        let mut tx = self.pool().begin().await.map_err(db_err)?;
        if on {
            self.serialize_vpn_routes(&mut tx).await?;
        }
        sqlx::query("UPDATE vpns SET cloud_address = $1 WHERE uuid = $2")
            .bind(i64::from(on))
            .bind(uuid)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        if on {
            let row = sqlx::query("SELECT * FROM vpns WHERE uuid = $1")
                .bind(uuid)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_err)?;
            if let Some(v) = row.as_ref().map(vpn_row).transpose()? {
                check_no_clash(&mut tx, &v).await?;
            }
        }
        tx.commit().await.map_err(db_err)?;
        Ok(())
    }

    /// Every membership of every VPN (the wstun-agent reconciles its devices with this).
    pub async fn all_vpn_members(&self) -> Result<Vec<VpnMember>, Error> {
        let rows = sqlx::query("SELECT * FROM vpn_members ORDER BY vpn_uuid, board_uuid")
            .fetch_all(self.pool())
            .await
            .map_err(db_err)?;
        rows.iter().map(member_row).collect()
    }

    pub async fn delete_vpn(&self, uuid: &str) -> Result<(), Error> {
        sqlx::query("DELETE FROM vpns WHERE uuid = $1").bind(uuid).execute(self.pool()).await.map_err(db_err)?;
        Ok(())
    }

    /// Adds `board` to `vpn` with `address` (checked against the CIDR) or the lowest free one.
    pub async fn add_vpn_member(
        &self,
        vpn: &Vpn,
        board: &str,
        address: Option<&str>,
        lease: Option<&str>,
    ) -> Result<VpnMember, Error> {
        let (lo, hi) = board_hosts(&vpn.cidr)?;
        let interface = format!("s4t{}", &vpn.uuid.replace('-', "")[..8]);
        if let Some(a) = address {
            let ip: Ipv4Addr = a.parse().map_err(|_| Error::Invalid(format!("{a:?} is not an IPv4 address")))?;
            if !(lo..=hi).contains(&u32::from(ip)) {
                return Err(Error::Invalid(format!(
                    "{ip} is not a board address of {} (from {} to {})",
                    vpn.cidr,
                    Ipv4Addr::from(lo),
                    Ipv4Addr::from(hi)
                )));
            }
        }
        for _ in 0..64 {
            if self.vpn_member(&vpn.uuid, board).await?.is_some() {
                return Err(Error::Conflict(format!("the board is already a member of VPN {}", vpn.name)));
            }
            let ip = match address {
                Some(a) => a.to_owned(),
                None => {
                    let used: Vec<u32> = self
                        .vpn_members(&vpn.uuid)
                        .await?
                        .iter()
                        .filter_map(|m| m.address.parse::<Ipv4Addr>().ok().map(u32::from))
                        .collect();
                    let Some(free) = (lo..=hi).find(|a| !used.contains(a)) else {
                        return Err(Error::Unavailable(format!("VPN {} has no free address left", vpn.name)));
                    };
                    Ipv4Addr::from(free).to_string()
                }
            };
            let r = sqlx::query(
                "INSERT INTO vpn_members (vpn_uuid, board_uuid, address, interface, lease_uuid, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(&vpn.uuid)
            .bind(board)
            .bind(&ip)
            .bind(&interface)
            .bind(lease.map(str::to_owned))
            .bind(now_ms())
            .execute(self.pool())
            .await;
            match r {
                Ok(_) => {
                    let (vpn, board, lease) = (vpn.uuid.clone(), board.to_owned(), lease.map(str::to_owned));
                    return Ok(VpnMember { vpn, board, address: ip, interface, lease });
                }
                Err(e) if is_unique_violation(&e) && address.is_none() => continue,
                Err(e) => return Err(unique_or(e, || format!("address {ip} is taken in VPN {}", vpn.name))),
            }
        }
        Err(Error::Unavailable("could not allocate a VPN address after 64 attempts".into()))
    }

    pub async fn vpn_member(&self, vpn: &str, board: &str) -> Result<Option<VpnMember>, Error> {
        let row = sqlx::query("SELECT * FROM vpn_members WHERE vpn_uuid = $1 AND board_uuid = $2")
            .bind(vpn)
            .bind(board)
            .fetch_optional(self.pool())
            .await
            .map_err(db_err)?;
        row.as_ref().map(member_row).transpose()
    }

    pub async fn vpn_members(&self, vpn: &str) -> Result<Vec<VpnMember>, Error> {
        let rows = sqlx::query("SELECT * FROM vpn_members WHERE vpn_uuid = $1 ORDER BY address")
            .bind(vpn)
            .fetch_all(self.pool())
            .await
            .map_err(db_err)?;
        rows.iter().map(member_row).collect()
    }

    /// One page of the members of `vpn`; the marker is a member's board uuid.
    pub async fn vpn_members_page(&self, vpn: &str, page: &Page) -> Result<Vec<VpnMember>, Error> {
        let mut f = super::page::Filters::default();
        let v = f.arg(vpn);
        f.and(format!("vpn_uuid = {v}"));
        let within = format!("vpn_uuid = {v} AND ");
        let sql = format!("SELECT * FROM vpn_members{}", page.clause(&mut f, "vpn_members", "board_uuid", &within));
        let rows = f.query(sql).fetch_all(self.pool()).await.map_err(db_err)?;
        rows.iter().map(member_row).collect()
    }

    pub async fn vpn_memberships_of_board(&self, board: &str) -> Result<Vec<VpnMember>, Error> {
        let rows = sqlx::query("SELECT * FROM vpn_members WHERE board_uuid = $1 ORDER BY vpn_uuid")
            .bind(board)
            .fetch_all(self.pool())
            .await
            .map_err(db_err)?;
        rows.iter().map(member_row).collect()
    }

    pub async fn vpn_members_of_lease(&self, lease: &str) -> Result<Vec<VpnMember>, Error> {
        let rows = sqlx::query("SELECT * FROM vpn_members WHERE lease_uuid = $1")
            .bind(lease)
            .fetch_all(self.pool())
            .await
            .map_err(db_err)?;
        rows.iter().map(member_row).collect()
    }

    pub async fn remove_vpn_member(&self, vpn: &str, board: &str) -> Result<bool, Error> {
        let r = sqlx::query("DELETE FROM vpn_members WHERE vpn_uuid = $1 AND board_uuid = $2")
            .bind(vpn)
            .bind(board)
            .execute(self.pool())
            .await
            .map_err(db_err)?;
        Ok(r.rows_affected() > 0)
    }

    /// Removes membership `m` if it is still there as it was read (its address, its lease), as
    /// [`Db::delete_exposure_as_read`] does for exposures.
    pub async fn remove_vpn_member_as_read(&self, m: &VpnMember) -> Result<bool, Error> {
        let r = sqlx::query(
            "DELETE FROM vpn_members WHERE vpn_uuid = $1 AND board_uuid = $2 AND address = $3 \
             AND COALESCE(lease_uuid, '') = $4",
        )
        .bind(&m.vpn)
        .bind(&m.board)
        .bind(&m.address)
        .bind(m.lease.as_deref().unwrap_or(""))
        .execute(self.pool())
        .await
        .map_err(db_err)?;
        Ok(r.rows_affected() > 0)
    }
}

/// 409 if `v` (already written in `tx`) clashes with another VPN on the cloud host. The
/// message names neither the other VPN nor its project: only that the range is taken here.
async fn check_no_clash(tx: &mut sqlx::Transaction<'_, sqlx::Any>, v: &Vpn) -> Result<(), Error> {
    let rows = sqlx::query("SELECT * FROM vpns WHERE uuid <> $1 AND (cloud_address <> 0 OR type = 'l3')")
        .bind(&v.uuid)
        .fetch_all(&mut **tx)
        .await
        .map_err(db_err)?;
    for r in &rows {
        if routes_clash(v, &vpn_row(r)?)? {
            return Err(Error::Conflict(format!(
                "{} overlaps a range already in use on this cloud's host (a VPN with the cloud address, or an L3 \
                 VPN, whose routes would meet this one's): choose another range{}",
                v.cidr,
                if v.cloud_address { "" } else { ", or make the VPN L2" }
            )));
        }
    }
    Ok(())
}

/// [`Db::exposures_held_by`] on a connection (or in a transaction).
async fn exposures_held(conn: &mut sqlx::AnyConnection, project: &str) -> Result<i64, Error> {
    let row = sqlx::query(
        "SELECT COUNT(*) AS n FROM exposed_services e JOIN boards b ON b.uuid = e.board_uuid \
         LEFT JOIN leases l ON l.uuid = e.lease_uuid \
         WHERE (l.uuid IS NOT NULL AND l.project_uuid = $1) OR (l.uuid IS NULL AND b.project_uuid = $2)",
    )
    .bind(project)
    .bind(project)
    .fetch_one(&mut *conn)
    .await
    .map_err(db_err)?;
    col(&row, "n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_and_normalise() {
        assert_eq!(parse_cidr("10.1.2.3/24").unwrap(), (Ipv4Addr::new(10, 1, 2, 0), 24));
        for bad in ["10.0.0.0", "10.0.0.0/33", "x/24", "10.0.0.0/31", "::/64"] {
            assert!(matches!(parse_cidr(bad), Err(Error::Invalid(_))), "{bad}");
        }
        let (lo, hi) = board_hosts("10.0.0.0/29").unwrap();
        assert_eq!((Ipv4Addr::from(lo), Ipv4Addr::from(hi)), (Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 0, 0, 6)));
    }

    #[test]
    fn board_hosts_of_the_last_ranges_do_not_overflow() {
        let hosts = |c: &str| board_hosts(c).map(|(lo, hi)| (Ipv4Addr::from(lo), Ipv4Addr::from(hi))).unwrap();
        assert_eq!(hosts("255.255.255.0/24"), (Ipv4Addr::new(255, 255, 255, 2), Ipv4Addr::new(255, 255, 255, 254)));
        assert_eq!(hosts("255.255.255.252/30"), (Ipv4Addr::new(255, 255, 255, 254), Ipv4Addr::new(255, 255, 255, 254)));
        assert_eq!(hosts("255.0.0.0/8"), (Ipv4Addr::new(255, 0, 0, 2), Ipv4Addr::new(255, 255, 255, 254)));
    }

    #[test]
    fn vpn_ranges_are_unicast_and_overlaps_are_found() {
        let check = |c: &str| parse_cidr(c).and_then(|(n, l)| check_vpn_range(n, l));
        for bad in ["255.255.255.0/24", "240.0.0.0/8", "224.0.0.0/8", "127.0.0.0/8", "0.0.0.0/8", "239.1.0.0/16"] {
            assert!(matches!(check(bad), Err(Error::Invalid(_))), "{bad}");
        }
        for good in ["10.0.0.0/8", "192.168.1.0/24", "172.16.0.0/12", "223.255.255.0/24", "1.0.0.0/8"] {
            assert!(check(good).is_ok(), "{good}");
        }
        let overlap = |a: &str, b: &str| cidrs_overlap(a, b).unwrap();
        assert!(overlap("10.0.0.0/24", "10.0.0.0/24"));
        assert!(overlap("10.0.0.0/16", "10.0.200.0/24") && overlap("10.0.200.0/24", "10.0.0.0/16"));
        assert!(!overlap("10.0.0.0/24", "10.0.1.0/24"));
        assert!(!overlap("10.0.0.0/25", "10.0.0.128/25"));
        let vpn = |t: &str, cidr: &str, cloud: bool| Vpn {
            uuid: String::new(),
            name: String::new(),
            project: String::new(),
            vpn_type: t.into(),
            cidr: cidr.into(),
            created_at: 0,
            cloud_address: cloud,
        };
        let clash = |a: &Vpn, b: &Vpn| {
            let (ab, ba) = (routes_clash(a, b).unwrap(), routes_clash(b, a).unwrap());
            assert_eq!(ab, ba, "symmetric");
            ab
        };
        let a = vpn("l2", "10.0.0.0/24", true);
        assert!(clash(&a, &vpn("l2", "10.0.0.0/16", true)));
        assert!(clash(&a, &vpn("l3", "10.0.0.0/24", false)), "L3 member routes shadow the cloud's");
        assert!(!clash(&a, &vpn("l2", "10.0.0.0/24", false)), "an L2 VPN without address routes nothing");
        assert!(!clash(&a, &vpn("l2", "10.0.1.0/24", true)));
        assert!(!clash(&vpn("l3", "10.0.0.0/24", false), &vpn("l3", "10.0.0.0/24", false)), "no cloud address");
    }

    #[test]
    fn allow_lists_parse_and_match() {
        let list = parse_allow_list(&["10.1.2.3/8", "2001:db8::1/32", "127.0.0.1"]).unwrap();
        let text: Vec<String> = list.iter().map(ToString::to_string).collect();
        assert_eq!(text, ["10.0.0.0/8", "2001:db8::/32", "127.0.0.1/32"]);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(admits(&list, ip("10.200.0.1")));
        assert!(admits(&list, ip("::ffff:10.0.0.9")), "IPv4-mapped peers match IPv4 entries");
        assert!(admits(&list, ip("2001:db8:ffff::1")));
        assert!(admits(&list, ip("127.0.0.1")));
        for refused in ["127.0.0.2", "11.0.0.1", "2001:db9::1", "::1"] {
            assert!(!admits(&list, ip(refused)), "{refused}");
        }
        assert!(admits(&[], ip("192.0.2.1")), "an empty list lets anyone in");
        for bad in ["10.0.0.0/33", "10.0.0", "", "any", "::/129", "10.0.0.0/8 junk"] {
            assert!(matches!(parse_allow_list(&[bad]), Err(Error::Invalid(_))), "{bad:?}");
        }
        assert!(parse_allow_list(&vec!["10.0.0.0/8"; MAX_ALLOW + 1]).is_err());
    }
}

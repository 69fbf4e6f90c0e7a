//! The Stack4Things cloud.
//!
//! # Layout
//!
//! - [`config`]: what `iotronic serve` and the per-process subcommands take.
//! - [`db`]: the database (SQLite or PostgreSQL through sqlx); the only module that sees SQL.
//! - [`auth`]: password hashing, bearer tokens, the admin bootstrap.
//! - [`api`]: the REST API v1 (axum). Owns the REST DTOs' HTTP mapping.
//! - [`serve`]: runs every process of the cloud in one (the embedded default).
//! - [`tls`]: the cloud's CA and server certificate; HTTPS/WSS for every listener.
//! - [`vpn`]: the cloud end of VPNs (TAP/TUN per member, a bridge per L2 VPN), in the wstun-agent.

pub mod agent;
pub mod api;
pub mod audit;
pub mod auth;
pub mod bus;
pub mod conductor;
pub mod config;
pub mod db;
mod error;
pub mod listen;
pub mod revocation;
pub mod serve;
pub mod tls;
pub mod vpn;
pub mod wamp_agent;
pub mod wstun_agent;

pub use config::ServeConfig;
pub use error::Error;
pub use serve::serve;

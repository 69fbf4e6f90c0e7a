use std::net::SocketAddr;

/// Errors of the cloud's library code. Binaries wrap them in `anyhow` with context; the REST
/// API maps each variant to one HTTP status in `api::error`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create data directory {path}")]
    DataDir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The TLS set-up: certificates, keys, the cloud's CA.
    #[error("TLS: {context}")]
    Tls {
        context: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("server failed")]
    Serve(#[source] std::io::Error),
    /// A part of `iotronic serve` ended while the others ran (with its error, if it had one).
    #[error("the {process} stopped while the cloud was running")]
    Stopped {
        process: &'static str,
        #[source]
        cause: Option<Box<Error>>,
    },
    #[error("cannot connect to the database {url}")]
    DbConnect {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("database error")]
    Db(#[source] sqlx::Error),
    #[error("database migration failed")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    #[error("message bus error: {0}")]
    Bus(String),
    #[error("RabbitMQ error: {context}")]
    Amqp {
        context: String,
        #[source]
        source: lapin::Error,
    },
    /// The caller sent something we cannot use (400).
    #[error("{0}")]
    Invalid(String),
    /// No valid credentials (401).
    #[error("{0}")]
    Unauthorized(String),
    /// Valid credentials, not enough rights (403).
    #[error("{0}")]
    Forbidden(String),
    /// Absent, or in another project (404).
    #[error("{0}")]
    NotFound(String),
    /// Clashes with existing state (409).
    #[error("{0}")]
    Conflict(String),
    /// The board is booked by another project's lease (409 naming the lease).
    #[error("board {board} is leased by lease {lease} until {expires_at} (ms since the epoch)")]
    LeaseConflict { lease: String, board: String, expires_at: i64 },
    /// The board, its agent or a resource pool cannot serve now (503).
    #[error("{0}")]
    Unavailable(String),
    /// The board answered with an error (502).
    #[error("the board answered with an error: {0}")]
    Board(String),
    /// Too many attempts: wait `retry_after_s` seconds (429 with `Retry-After`).
    #[error("too many attempts: try again in {retry_after_s} s")]
    Throttled { retry_after_s: u64 },
    /// Nothing answered in time (504).
    #[error("{0}")]
    Timeout(String),
}

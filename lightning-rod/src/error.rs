//! The crate's one error type. Every variant names what failed (file, chip, line, bus) so the
//! message alone tells an operator where to look.

use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Where and what, never the offending text: toml's own message quotes the line, which
    /// may hold the registration code (`code = ABCD-1234` unquoted), and it went to the log.
    #[error("{}: {message}", path.display())]
    ConfigSyntax { path: PathBuf, message: String },
    #[error("invalid configuration: {0}")]
    ConfigInvalid(String),
    #[error("{}: {reason}", path.display())]
    LegacySettings { path: PathBuf, reason: String },
    #[error("{} is corrupt: {source}", path.display())]
    StateCorrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("this board is not enrolled: run `lightning-rod enroll --url URL --code CODE` first")]
    NotEnrolled,
    #[error("enrollment refused by the cloud: {0}")]
    EnrollmentRefused(String),
    #[error("the cloud refused this board ({0}); it was revoked or deleted: re-enroll it")]
    Revoked(String),
    /// The router does not offer the authentication method we asked for (an original,
    /// anonymous-only cloud answers a ticket this way).
    #[error("the router does not accept this authentication method ({0})")]
    AuthMethod(String),
    #[error("GPIO {target}: {reason}")]
    Gpio { target: String, reason: String },
    #[error("I2C {target}: {reason}")]
    I2c { target: String, reason: String },
    #[error("{what}: {reason}")]
    Net { what: String, reason: String },
    #[error("WAMP: {0}")]
    Wamp(String),
    #[error("tunnel: {0}")]
    Tunnel(String),
    #[error("{0}")]
    BadArgument(String),
    #[error("{0}")]
    Plugin(String),
}

impl Error {
    pub(crate) fn gpio(target: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        Error::Gpio { target: target.into(), reason: reason.to_string() }
    }
    pub(crate) fn i2c(target: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        Error::I2c { target: target.into(), reason: reason.to_string() }
    }
    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        Error::ConfigInvalid(msg.into())
    }

    /// True for errors that retrying cannot fix: the process should exit with
    /// [`crate::EXIT_CONFIG`] or [`crate::EXIT_REVOKED`] instead of reconnecting.
    pub fn exit_code(&self) -> Option<i32> {
        match self {
            Error::ConfigSyntax { .. }
            | Error::ConfigInvalid(_)
            | Error::LegacySettings { .. }
            | Error::StateCorrupt { .. }
            | Error::NotEnrolled => Some(crate::EXIT_CONFIG),
            Error::Revoked(_) | Error::EnrollmentRefused(_) | Error::AuthMethod(_) => Some(crate::EXIT_REVOKED),
            _ => None,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

//! Hardware access behind two traits, [`GpioBackend`] and [`I2cBus`], each with the
//! validate/setup/teardown lifecycle: `validate` checks the hardware is there (at start, so a
//! misconfigured board fails before it logs in), `setup` prepares it, `teardown` releases every
//! requested line and stops every watch (on exit and before a restart).
//!
//! Backends: [`sim`] (an in-memory board, `--hal sim`), [`cdev`] (Linux GPIO character
//! devices through `gpiocdev`, `/dev/i2c-*` through `i2cdev`) and [`sysfs`] (`/sys/class/gpio`
//! for kernels older than 4.8, with the cdev I2C). Methods are synchronous and
//! short; callers on the async runtime run them with `spawn_blocking`. Every error names the
//! chip, line or bus, and none of them panics.

pub mod cdev;
pub mod sim;
mod smbus;
pub mod sysfs;

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::config::{HalConfig, HalKind};
use crate::error::Result;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    In,
    Out,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Bias {
    PullUp,
    PullDown,
    Disabled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Edge {
    Rising,
    Falling,
    Both,
    None,
}

/// One line as `GpioList` reports it. `value` is `None` when reading it would mean claiming a
/// line nobody asked for (cdev lines this agent has not requested).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineInfo {
    pub name: String,
    pub chip: String,
    pub offset: u32,
    pub direction: Direction,
    pub value: Option<u8>,
}

/// An edge seen on a watched line; published on `board.<uuid>.gpio`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpioEvent {
    pub line: String,
    pub chip: String,
    pub offset: u32,
    /// `rising` or `falling`.
    pub edge: Edge,
    pub value: u8,
    pub timestamp_ns: u64,
}

/// Bounded channel capacity for GPIO events; when full, events are dropped (and counted in a
/// log line), never queued without bound.
pub const GPIO_EVENT_CAPACITY: usize = 256;

pub trait GpioBackend: Send + Sync + 'static {
    fn validate(&self) -> Result<()>;
    fn setup(&self) -> Result<()>;
    /// Releases every line and stops every watch; collects all failures into one error.
    fn teardown(&self) -> Result<()>;
    fn lines(&self) -> Result<Vec<LineInfo>>;
    fn read(&self, line: &str) -> Result<u8>;
    /// Drives the line, making it an output first when it is not one.
    fn write(&self, line: &str, value: u8) -> Result<()>;
    fn set_direction(&self, line: &str, direction: Direction, bias: Option<Bias>) -> Result<()>;
    /// Starts (or with [`Edge::None`] stops) edge detection; events go to `events`.
    fn watch(&self, line: &str, edge: Edge, events: mpsc::Sender<GpioEvent>) -> Result<()>;
}

pub trait I2cBus: Send + Sync + 'static {
    fn validate(&self) -> Result<()>;
    fn setup(&self) -> Result<()>;
    fn teardown(&self) -> Result<()>;
    fn buses(&self) -> Result<Vec<u32>>;
    /// Reads `len` bytes, after writing `register` (repeated start) when given.
    fn read(&self, bus: u32, address: u16, register: Option<u8>, len: usize) -> Result<Vec<u8>>;
    /// Writes `register` (when given) followed by `data`; returns the data bytes written.
    fn write(&self, bus: u32, address: u16, register: Option<u8>, data: &[u8]) -> Result<usize>;
}

/// The board's hardware, as the procedures see it.
#[derive(Clone)]
pub struct Hal {
    pub gpio: Arc<dyn GpioBackend>,
    pub i2c: Arc<dyn I2cBus>,
    /// Largest I2C transfer a procedure may ask for.
    pub max_transfer: usize,
}

impl std::fmt::Debug for Hal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hal").field("max_transfer", &self.max_transfer).finish_non_exhaustive()
    }
}

impl Hal {
    pub fn from_config(cfg: &HalConfig) -> Hal {
        match cfg.backend {
            HalKind::Sim => Hal::sim(cfg.max_transfer),
            HalKind::Cdev => Hal {
                gpio: Arc::new(cdev::CdevGpio::new(cfg.gpio_chips.clone())),
                i2c: Arc::new(cdev::CdevI2c::new(cfg.i2c_buses.clone())),
                max_transfer: cfg.max_transfer,
            },
            HalKind::Sysfs => Hal {
                gpio: Arc::new(sysfs::SysfsGpio::new(cfg.gpio_chips.clone())),
                i2c: Arc::new(cdev::CdevI2c::new(cfg.i2c_buses.clone())),
                max_transfer: cfg.max_transfer,
            },
        }
    }

    pub fn sim(max_transfer: usize) -> Hal {
        Hal { gpio: Arc::new(sim::SimGpio::new()), i2c: Arc::new(sim::SimI2c::new()), max_transfer }
    }

    /// validate then setup, GPIO first.
    pub fn start(&self) -> Result<()> {
        self.gpio.validate()?;
        self.i2c.validate()?;
        self.gpio.setup()?;
        self.i2c.setup()
    }

    /// Tears both down; reports the first failure after trying both.
    pub fn stop(&self) -> Result<()> {
        let g = self.gpio.teardown();
        let i = self.i2c.teardown();
        g.and(i)
    }
}

/// Checks a 7-bit I2C address outside the reserved ranges (0x00-0x02, 0x78-0x7f).
pub fn check_i2c_address(bus: u32, address: u16) -> Result<()> {
    if !(0x03..=0x77).contains(&address) {
        return Err(crate::error::Error::i2c(
            format!("i2c-{bus} address {address:#04x}"),
            "not a 7-bit device address (0x03..=0x77)",
        ));
    }
    Ok(())
}

/// Whether `chip` names a GPIO chip device (`gpiochip0`): a plain name under `/dev`, never a
/// path.
pub fn is_chip_name(chip: &str) -> bool {
    !chip.is_empty() && chip != "." && chip != ".." && !chip.contains(['/', '\0'])
}

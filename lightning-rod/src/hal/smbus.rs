//! SMBus fallback for I2C adapters that cannot do plain I2C transfers (`I2C_RDWR` fails with
//! `EOPNOTSUPP`): SMBus-only host controllers, and the kernel's `i2c-stub` the emulated-board
//! test uses. A register access maps to the SMBus byte-data or I2C-block command, an access
//! without a register to receive/send byte; anything else (more than 32 bytes, several bytes
//! without a register) is refused with an error that says why.

use i2cdev::core::I2CDevice;
use i2cdev::linux::{LinuxI2CDevice, LinuxI2CError};

use crate::error::{Error, Result};

/// The largest SMBus block (`I2C_SMBUS_BLOCK_MAX`).
const BLOCK_MAX: usize = 32;

/// True when a plain I2C transfer failed because the adapter only speaks SMBus.
pub(super) fn unsupported(e: &LinuxI2CError) -> bool {
    matches!(e, LinuxI2CError::Errno(n) if *n == libc::EOPNOTSUPP)
}

fn open(bus: u32, address: u16) -> Result<LinuxI2CDevice> {
    LinuxI2CDevice::new(format!("/dev/i2c-{bus}"), address).map_err(|e| Error::i2c(target(bus, address), e))
}

fn target(bus: u32, address: u16) -> String {
    format!("i2c-{bus} address {address:#04x} (SMBus)")
}

fn refuse(bus: u32, address: u16, what: &str) -> Error {
    Error::i2c(target(bus, address), format!("this adapter only speaks SMBus, which cannot {what}"))
}

pub(super) fn read(bus: u32, address: u16, register: Option<u8>, len: usize) -> Result<Vec<u8>> {
    let mut dev = open(bus, address)?;
    let out = match (register, len) {
        (_, 0) => Ok(Vec::new()),
        (Some(r), 1) => dev.smbus_read_byte_data(r).map(|b| vec![b]),
        (Some(r), n) if n <= BLOCK_MAX => dev.smbus_read_i2c_block_data(r, n as u8),
        (None, 1) => dev.smbus_read_byte().map(|b| vec![b]),
        (Some(_), _) => return Err(refuse(bus, address, "read more than 32 bytes at once")),
        (None, _) => return Err(refuse(bus, address, "read several bytes without a register")),
    };
    let data = out.map_err(|e| Error::i2c(target(bus, address), e))?;
    if data.len() != len {
        return Err(Error::i2c(target(bus, address), format!("short read: {} of {len} bytes", data.len())));
    }
    Ok(data)
}

pub(super) fn write(bus: u32, address: u16, register: Option<u8>, data: &[u8]) -> Result<usize> {
    let mut dev = open(bus, address)?;
    let done = match (register, data) {
        (Some(r), [b]) => dev.smbus_write_byte_data(r, *b),
        (Some(r), d) if !d.is_empty() && d.len() <= BLOCK_MAX => dev.smbus_write_i2c_block_data(r, d),
        (None, [b]) => dev.smbus_write_byte(*b),
        (Some(r), []) => dev.smbus_write_byte(r),
        (Some(_), _) => return Err(refuse(bus, address, "write more than 32 bytes at once")),
        (None, _) => return Err(refuse(bus, address, "write several bytes without a register")),
    };
    done.map_err(|e| Error::i2c(target(bus, address), e))?;
    Ok(data.len())
}

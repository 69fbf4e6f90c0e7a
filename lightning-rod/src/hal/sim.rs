//! The simulated board (`--hal sim`): the fixed interface of SYSTEM.md.
//!
//! GPIO: lines `GPIO0`..`GPIO27` on chip `gpiochip0`, inputs pulled down at start; a write makes
//! the line an output and reads back; every value change on a watched line is an edge event.
//! I2C: bus 1 holds a TMP102-like temperature sensor at 0x48 with byte-addressed registers and
//! auto-increment: 0-1 temperature (25.0 °C, 12-bit left-aligned), 2-3 configuration, 4-5 T_low
//! (75 °C), 6-7 T_high (80 °C); register 0 reads back whatever was last written to it. A write
//! without a register sets the pointer from its first byte, as the real part does.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;

use super::{Bias, Direction, Edge, GpioBackend, GpioEvent, I2cBus, LineInfo, check_i2c_address};
use crate::error::{Error, Result};

pub const CHIP: &str = "gpiochip0";
pub const LINES: u32 = 28;
pub const BUS: u32 = 1;
pub const SENSOR_ADDRESS: u16 = 0x48;

#[derive(Debug, Clone)]
struct SimLine {
    direction: Direction,
    bias: Bias,
    value: u8,
    edge: Edge,
}

#[derive(Default)]
struct GpioState {
    lines: Vec<SimLine>,
    watchers: HashMap<u32, mpsc::Sender<GpioEvent>>,
}

pub struct SimGpio {
    state: Mutex<GpioState>,
}

impl Default for SimGpio {
    fn default() -> Self {
        Self::new()
    }
}

impl SimGpio {
    pub fn new() -> SimGpio {
        let line = SimLine { direction: Direction::In, bias: Bias::PullDown, value: 0, edge: Edge::None };
        SimGpio { state: Mutex::new(GpioState { lines: vec![line; LINES as usize], watchers: HashMap::new() }) }
    }

    fn offset(line: &str) -> Result<u32> {
        line.strip_prefix("GPIO")
            .and_then(|n| n.parse::<u32>().ok())
            .filter(|n| *n < LINES && line == format!("GPIO{n}"))
            .ok_or_else(|| Error::gpio(format!("{CHIP} line {line:?}"), "no such line (GPIO0..GPIO27)"))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GpioState> {
        // A poisoned lock only means another thread panicked mid-update of plain values.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drives an input line from "outside" (a button press in a test).
    pub fn inject(&self, line: &str, value: u8) -> Result<()> {
        let off = Self::offset(line)?;
        let mut st = self.lock();
        if st.lines[off as usize].direction != Direction::In {
            return Err(Error::gpio(format!("{CHIP} line {line}"), "is an output; cannot drive it from outside"));
        }
        set_value(&mut st, off, value);
        Ok(())
    }
}

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

fn set_value(st: &mut GpioState, off: u32, value: u8) {
    let line = &mut st.lines[off as usize];
    let old = line.value;
    line.value = value;
    let edge = match (old, value) {
        (0, 1) => Edge::Rising,
        (1, 0) => Edge::Falling,
        _ => return,
    };
    let wanted = line.edge == Edge::Both || line.edge == edge;
    if let (true, Some(tx)) = (wanted, st.watchers.get(&off)) {
        let ev = GpioEvent {
            line: format!("GPIO{off}"),
            chip: CHIP.into(),
            offset: off,
            edge,
            value,
            timestamp_ns: now_ns(),
        };
        if tx.try_send(ev).is_err() {
            tracing::warn!(line = off, "GPIO event queue full or closed; edge dropped");
        }
    }
}

fn check_value(line: &str, value: u8) -> Result<()> {
    if value > 1 {
        return Err(Error::gpio(format!("{CHIP} line {line}"), format!("value {value} is not 0 or 1")));
    }
    Ok(())
}

impl GpioBackend for SimGpio {
    fn validate(&self) -> Result<()> {
        Ok(())
    }
    fn setup(&self) -> Result<()> {
        Ok(())
    }
    fn teardown(&self) -> Result<()> {
        let mut st = self.lock();
        st.watchers.clear();
        for l in &mut st.lines {
            l.edge = Edge::None;
        }
        Ok(())
    }
    fn lines(&self) -> Result<Vec<LineInfo>> {
        let st = self.lock();
        Ok(st
            .lines
            .iter()
            .enumerate()
            .map(|(i, l)| LineInfo {
                name: format!("GPIO{i}"),
                chip: CHIP.into(),
                offset: i as u32,
                direction: l.direction,
                value: Some(l.value),
            })
            .collect())
    }
    fn read(&self, line: &str) -> Result<u8> {
        let off = Self::offset(line)?;
        Ok(self.lock().lines[off as usize].value)
    }
    fn write(&self, line: &str, value: u8) -> Result<()> {
        let off = Self::offset(line)?;
        check_value(line, value)?;
        let mut st = self.lock();
        st.lines[off as usize].direction = Direction::Out;
        set_value(&mut st, off, value);
        Ok(())
    }
    fn set_direction(&self, line: &str, direction: Direction, bias: Option<Bias>) -> Result<()> {
        let off = Self::offset(line)?;
        let mut st = self.lock();
        let l = &mut st.lines[off as usize];
        l.direction = direction;
        if let Some(b) = bias {
            l.bias = b;
        }
        if direction == Direction::In {
            // An undriven input settles to its bias; a disabled bias keeps the last level.
            let v = match l.bias {
                Bias::PullUp => 1,
                Bias::PullDown => 0,
                Bias::Disabled => l.value,
            };
            set_value(&mut st, off, v);
        }
        Ok(())
    }
    fn watch(&self, line: &str, edge: Edge, events: mpsc::Sender<GpioEvent>) -> Result<()> {
        let off = Self::offset(line)?;
        let mut st = self.lock();
        st.lines[off as usize].edge = edge;
        if edge == Edge::None {
            st.watchers.remove(&off);
        } else {
            st.watchers.insert(off, events);
        }
        Ok(())
    }
}

struct Sensor {
    regs: [u8; 256],
    pointer: u8,
}

pub struct SimI2c {
    sensor: Mutex<Sensor>,
}

impl Default for SimI2c {
    fn default() -> Self {
        Self::new()
    }
}

impl SimI2c {
    pub fn new() -> SimI2c {
        let mut regs = [0u8; 256];
        regs[..8].copy_from_slice(&[0x19, 0x00, 0x60, 0xA0, 0x4B, 0x00, 0x50, 0x00]);
        SimI2c { sensor: Mutex::new(Sensor { regs, pointer: 0 }) }
    }

    fn device(&self, bus: u32, address: u16) -> Result<std::sync::MutexGuard<'_, Sensor>> {
        if bus != BUS {
            return Err(Error::i2c(format!("i2c-{bus}"), "no such bus (the sim has i2c-1)"));
        }
        check_i2c_address(bus, address)?;
        if address != SENSOR_ADDRESS {
            return Err(Error::i2c(format!("i2c-{bus} address {address:#04x}"), "no device answered (NACK)"));
        }
        Ok(self.sensor.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl I2cBus for SimI2c {
    fn validate(&self) -> Result<()> {
        Ok(())
    }
    fn setup(&self) -> Result<()> {
        Ok(())
    }
    fn teardown(&self) -> Result<()> {
        Ok(())
    }
    fn buses(&self) -> Result<Vec<u32>> {
        Ok(vec![BUS])
    }
    fn read(&self, bus: u32, address: u16, register: Option<u8>, len: usize) -> Result<Vec<u8>> {
        let mut s = self.device(bus, address)?;
        if let Some(r) = register {
            s.pointer = r;
        }
        let start = s.pointer;
        let out: Vec<u8> = (0..len).map(|i| s.regs[start.wrapping_add(i as u8) as usize]).collect();
        s.pointer = start.wrapping_add(len as u8);
        Ok(out)
    }
    fn write(&self, bus: u32, address: u16, register: Option<u8>, data: &[u8]) -> Result<usize> {
        let mut s = self.device(bus, address)?;
        let (start, payload) = match register {
            Some(r) => (r, data),
            None => match data.split_first() {
                Some((p, rest)) => (*p, rest),
                None => return Ok(0),
            },
        };
        for (i, b) in payload.iter().enumerate() {
            s.regs[start.wrapping_add(i as u8) as usize] = *b;
        }
        s.pointer = start;
        Ok(data.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpio_writes_read_back_and_watches_see_edges() {
        let g = SimGpio::new();
        assert_eq!(g.lines().unwrap().len(), 28);
        let (tx, mut rx) = mpsc::channel(4);
        g.watch("GPIO4", Edge::Both, tx).unwrap();
        g.write("GPIO4", 1).unwrap();
        assert_eq!(g.read("GPIO4").unwrap(), 1);
        let ev = rx.try_recv().unwrap();
        assert_eq!((ev.line.as_str(), ev.edge, ev.value), ("GPIO4", Edge::Rising, 1));
        g.write("GPIO4", 1).unwrap();
        assert!(rx.try_recv().is_err(), "no edge without a change");
        g.watch("GPIO4", Edge::None, mpsc::channel(1).0).unwrap();
        g.write("GPIO4", 0).unwrap();
        assert!(rx.try_recv().is_err(), "unwatched line still reported");
    }

    #[test]
    fn gpio_errors_name_the_line() {
        let g = SimGpio::new();
        for bad in ["GPIO28", "GPIO", "gpio3", "GPIO03", "X"] {
            let e = g.read(bad).unwrap_err().to_string();
            assert!(e.contains("gpiochip0") && e.contains(bad), "{e}");
        }
        assert!(g.write("GPIO1", 2).unwrap_err().to_string().contains("GPIO1"));
    }

    #[test]
    fn full_event_queue_drops_instead_of_blocking() {
        let g = SimGpio::new();
        let (tx, mut rx) = mpsc::channel(1);
        g.watch("GPIO2", Edge::Both, tx).unwrap();
        for v in [1, 0, 1, 0] {
            g.write("GPIO2", v).unwrap();
        }
        assert!(rx.try_recv().is_ok());
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn sensor_register_zero_reads_back_and_others_look_like_a_tmp102() {
        let i = SimI2c::new();
        assert_eq!(i.read(1, 0x48, Some(0), 2).unwrap(), vec![0x19, 0x00]);
        assert_eq!(i.read(1, 0x48, Some(6), 2).unwrap(), vec![0x50, 0x00]);
        assert_eq!(i.write(1, 0x48, Some(0), &[0x1A, 0x80]).unwrap(), 2);
        assert_eq!(i.read(1, 0x48, Some(0), 2).unwrap(), vec![0x1A, 0x80]);
        // Pointer write then register-less read.
        i.write(1, 0x48, None, &[2]).unwrap();
        assert_eq!(i.read(1, 0x48, None, 2).unwrap(), vec![0x60, 0xA0]);
        assert!(i.read(1, 0x50, None, 1).unwrap_err().to_string().contains("0x50"));
        assert!(i.read(2, 0x48, None, 1).unwrap_err().to_string().contains("i2c-2"));
        assert!(i.read(1, 0x7f, None, 1).unwrap_err().to_string().contains("0x7f"));
    }
}

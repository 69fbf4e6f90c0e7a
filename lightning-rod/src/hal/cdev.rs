//! Real hardware: GPIO through the Linux GPIO character device (uAPI v2, `gpiocdev`) and I2C
//! through `/dev/i2c-N` (`i2cdev`; SMBus-only adapters through [`super::smbus`]).
//!
//! A line is requested the first time a procedure touches it and held until teardown, so its
//! direction and value persist between calls (the kernel resets a released line). Reading a
//! line nobody requested uses `as_is`, which keeps its current direction. A watch moves the
//! held request to edge detection and a thread waits for events in short slices, checking a
//! stop flag between them, so teardown ends it promptly.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use gpiocdev::line::{self as gl, EdgeDetection, EdgeKind, Value};
use gpiocdev::request::{Config as ReqConfig, Request};
use i2cdev::core::{I2CMessage, I2CTransfer};
use i2cdev::linux::{LinuxI2CBus, LinuxI2CMessage};
use tokio::sync::mpsc;

use super::{Bias, Direction, Edge, GpioBackend, GpioEvent, I2cBus, LineInfo, check_i2c_address};
use crate::error::{Error, Result};

const CONSUMER: &str = "lightning-rod";
const WATCH_SLICE: Duration = Duration::from_millis(200);

struct Held {
    request: Arc<Request>,
    name: String,
    watch: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
}

/// GPIO chips under `/dev`, optionally restricted to the configured names.
pub struct CdevGpio {
    allowed: Vec<String>,
    held: Mutex<HashMap<(String, u32), Held>>,
}

impl CdevGpio {
    pub fn new(allowed: Vec<String>) -> CdevGpio {
        CdevGpio { allowed, held: Mutex::new(HashMap::new()) }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<(String, u32), Held>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn chips(&self) -> Result<Vec<PathBuf>> {
        if !self.allowed.is_empty() {
            return Ok(self.allowed.iter().map(|c| Path::new("/dev").join(c)).collect());
        }
        gpiocdev::chip::chips().map_err(|e| Error::gpio("/dev/gpiochip*", e))
    }

    /// Finds a line by name, or by `gpiochipN:OFFSET`.
    fn locate(&self, line: &str) -> Result<(String, u32)> {
        if let Some((chip, off)) = line.split_once(':')
            && let Ok(off) = off.parse::<u32>()
        {
            // Opened as /dev/<chip>: a path ("/etc/shadow", "../proc/…") would probe the
            // board's files (the error says whether one exists and where a link points).
            if !super::is_chip_name(chip) {
                return Err(Error::gpio(format!("line {line:?}"), "not a chip name like gpiochip0"));
            }
            if !self.allowed.is_empty() && !self.allowed.iter().any(|c| c == chip) {
                return Err(Error::gpio(format!("{chip} line {off}"), "chip not in hal.gpio_chips"));
            }
            return Ok((chip.to_owned(), off));
        }
        for path in self.chips()? {
            let chip = gpiocdev::Chip::from_path(&path).map_err(|e| Error::gpio(path.display().to_string(), e))?;
            if let Some(info) = chip.find_line_info(line) {
                return Ok((chip_name(&path), info.offset));
            }
        }
        Err(Error::gpio(format!("line {line:?}"), "no chip has a line with this name"))
    }

    /// The held request for a line, requesting it with `configure` when not yet held.
    fn with_held<T>(
        &self,
        line: &str,
        configure: impl FnOnce(&mut ReqConfig),
        act: impl FnOnce(&Held, u32) -> gpiocdev::Result<T>,
    ) -> Result<T> {
        let (chip, off) = self.locate(line)?;
        let target = format!("{chip} line {off} ({line})");
        let mut held = self.lock();
        let h = match held.entry((chip.clone(), off)) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(slot) => {
                let mut cfg = ReqConfig::default();
                cfg.on_chip(Path::new("/dev").join(&chip)).with_line(off);
                configure(&mut cfg);
                let request = Request::from_config(cfg)
                    .with_consumer(CONSUMER)
                    .request()
                    .map_err(|e| Error::gpio(target.clone(), e))?;
                slot.insert(Held { request: Arc::new(request), name: line.to_owned(), watch: None })
            }
        };
        act(h, off).map_err(|e| Error::gpio(target, e))
    }
}

fn chip_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

fn to_value(v: u8) -> Value {
    if v == 0 { Value::Inactive } else { Value::Active }
}

fn reconfigure(req: &Request, off: u32, f: impl FnOnce(&mut ReqConfig)) -> gpiocdev::Result<()> {
    let mut cfg = req.config();
    cfg.with_line(off);
    f(&mut cfg);
    req.reconfigure(&cfg)
}

fn stop_watch(h: &mut Held) -> std::result::Result<(), String> {
    if let Some((stop, thread)) = h.watch.take() {
        stop.store(true, Ordering::Relaxed);
        thread.join().map_err(|_| format!("watch thread of {} panicked", h.name))?;
    }
    Ok(())
}

impl GpioBackend for CdevGpio {
    fn validate(&self) -> Result<()> {
        for path in self.chips()? {
            gpiocdev::chip::is_chip(&path).map_err(|e| Error::gpio(path.display().to_string(), e))?;
        }
        Ok(())
    }
    fn setup(&self) -> Result<()> {
        Ok(())
    }
    fn teardown(&self) -> Result<()> {
        let mut failures = Vec::new();
        for (_, mut h) in self.lock().drain() {
            if let Err(e) = stop_watch(&mut h) {
                failures.push(e);
            }
        }
        if failures.is_empty() { Ok(()) } else { Err(Error::gpio("teardown", failures.join("; "))) }
    }
    fn lines(&self) -> Result<Vec<LineInfo>> {
        let held = self.lock();
        let mut out = Vec::new();
        for path in self.chips()? {
            let name = chip_name(&path);
            let chip = gpiocdev::Chip::from_path(&path).map_err(|e| Error::gpio(&name, e))?;
            for info in chip.line_info_iter().map_err(|e| Error::gpio(&name, e))? {
                let info = info.map_err(|e| Error::gpio(&name, e))?;
                let value = held
                    .get(&(name.clone(), info.offset))
                    .and_then(|h| h.request.value(info.offset).ok())
                    .map(|v| u8::from(v == Value::Active));
                let direction = if info.direction == gl::Direction::Output { Direction::Out } else { Direction::In };
                let line = if info.name.is_empty() { format!("{name}:{}", info.offset) } else { info.name.clone() };
                out.push(LineInfo { name: line, chip: name.clone(), offset: info.offset, direction, value });
            }
        }
        Ok(out)
    }
    fn read(&self, line: &str) -> Result<u8> {
        self.with_held(
            line,
            |c| {
                c.as_is();
            },
            |h, off| h.request.value(off).map(|v| u8::from(v == Value::Active)),
        )
    }
    fn write(&self, line: &str, value: u8) -> Result<()> {
        if value > 1 {
            return Err(Error::gpio(format!("line {line}"), format!("value {value} is not 0 or 1")));
        }
        self.with_held(
            line,
            |c| {
                c.as_output(to_value(value));
            },
            |h, off| {
                reconfigure(&h.request, off, |c| {
                    c.as_output(to_value(value));
                })
            },
        )
    }
    fn set_direction(&self, line: &str, direction: Direction, bias: Option<Bias>) -> Result<()> {
        let bias = bias.map(|b| match b {
            Bias::PullUp => gl::Bias::PullUp,
            Bias::PullDown => gl::Bias::PullDown,
            Bias::Disabled => gl::Bias::Disabled,
        });
        let apply = move |c: &mut ReqConfig, level: Value| {
            match direction {
                Direction::In => c.as_input(),
                Direction::Out => c.as_output(level),
            };
            if bias.is_some() {
                c.with_bias(bias);
            }
        };
        // Requested as it is, then set: a line made an output keeps the level it has (an
        // output driven high stays high, where the kernel's default would drive it low).
        let as_is = |c: &mut ReqConfig| {
            c.as_is();
        };
        self.with_held(line, as_is, |h, off| {
            let level = h.request.value(off)?;
            reconfigure(&h.request, off, |c| apply(c, level))
        })
    }
    fn watch(&self, line: &str, edge: Edge, events: mpsc::Sender<GpioEvent>) -> Result<()> {
        let detection = match edge {
            Edge::Rising => Some(EdgeDetection::RisingEdge),
            Edge::Falling => Some(EdgeDetection::FallingEdge),
            Edge::Both => Some(EdgeDetection::BothEdges),
            Edge::None => return self.unwatch(line),
        };
        let set = move |c: &mut ReqConfig| {
            c.as_input().with_edge_detection(detection);
        };
        self.with_held(line, set, |h, off| reconfigure(&h.request, off, set))?;
        let (chip, off) = self.locate(line)?;
        let mut held = self.lock();
        let Some(h) = held.get_mut(&(chip.clone(), off)) else { return Ok(()) };
        stop_watch(h).map_err(|e| Error::gpio(line, e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let (req, flag, name) = (h.request.clone(), stop.clone(), line.to_owned());
        let thread = std::thread::Builder::new()
            .name(format!("gpio-watch-{off}"))
            .spawn(move || watch_loop(&req, &flag, &name, &chip, events))
            .map_err(|e| Error::gpio(line, e))?;
        h.watch = Some((stop, thread));
        Ok(())
    }
}

impl CdevGpio {
    /// Stops watching `line` and its edge detection, and changes nothing else: an output the
    /// user drives stays driven (turning it into an input would let a relay or a lock fall).
    /// A line not held has no watch.
    fn unwatch(&self, line: &str) -> Result<()> {
        let (chip, off) = self.locate(line)?;
        let mut held = self.lock();
        let Some(h) = held.get_mut(&(chip, off)) else { return Ok(()) };
        stop_watch(h).map_err(|e| Error::gpio(line, e))?;
        if h.request.config().line_config(off).is_some_and(|c| c.edge_detection.is_some()) {
            reconfigure(&h.request, off, |c| {
                c.with_edge_detection(None);
            })
            .map_err(|e| Error::gpio(line, e))?;
        }
        Ok(())
    }
}

fn watch_loop(req: &Request, stop: &AtomicBool, name: &str, chip: &str, events: mpsc::Sender<GpioEvent>) {
    while !stop.load(Ordering::Relaxed) && !events.is_closed() {
        match req.wait_edge_event(WATCH_SLICE) {
            Ok(false) => continue,
            Ok(true) => match req.read_edge_event() {
                Ok(ev) => {
                    let (edge, value) = match ev.kind {
                        EdgeKind::Rising => (Edge::Rising, 1),
                        EdgeKind::Falling => (Edge::Falling, 0),
                    };
                    let msg = GpioEvent {
                        line: name.to_owned(),
                        chip: chip.to_owned(),
                        offset: ev.offset,
                        edge,
                        value,
                        timestamp_ns: ev.timestamp_ns,
                    };
                    if events.try_send(msg).is_err() {
                        tracing::warn!(line = name, "GPIO event queue full; edge dropped");
                    }
                }
                Err(e) => tracing::warn!(line = name, cause = %e, "reading a GPIO edge event failed"),
            },
            Err(e) => {
                tracing::error!(line = name, cause = %e, "GPIO watch stopped");
                return;
            }
        }
    }
}

/// Where the kernel lists I2C devices, `<bus>-<address as %04x>` each, with a `driver` link
/// when a kernel driver has bound it.
const I2C_SYSFS: &str = "/sys/bus/i2c/devices";

/// `/dev/i2c-N` buses, optionally restricted to the configured numbers.
pub struct CdevI2c {
    allowed: Vec<u32>,
    sysfs: PathBuf,
}

impl CdevI2c {
    pub fn new(allowed: Vec<u32>) -> CdevI2c {
        CdevI2c::with_sysfs(allowed, I2C_SYSFS)
    }

    /// As [`CdevI2c::new`], with the kernel's device list at `sysfs` (tests).
    pub fn with_sysfs(allowed: Vec<u32>, sysfs: impl Into<PathBuf>) -> CdevI2c {
        CdevI2c { allowed, sysfs: sysfs.into() }
    }

    /// Raw `I2C_RDWR` transfers skip the kernel's "address busy" check (`I2C_SLAVE` makes it):
    /// refuse a device a kernel driver owns (PMIC, RTC, HAT EEPROM, ...), whose state a write
    /// behind the driver's back could corrupt.
    fn check_unowned(&self, bus: u32, address: u16) -> Result<()> {
        let driver = self.sysfs.join(format!("{bus}-{address:04x}")).join("driver");
        if std::fs::symlink_metadata(&driver).is_ok() {
            let name = std::fs::read_link(&driver)
                .ok()
                .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_else(|| "a kernel driver".into());
            return Err(Error::i2c(
                format!("i2c-{bus} address {address:#04x}"),
                format!("the device is in use by the kernel driver {name}"),
            ));
        }
        Ok(())
    }

    fn open(&self, bus: u32) -> Result<LinuxI2CBus> {
        if !self.allowed.is_empty() && !self.allowed.contains(&bus) {
            return Err(Error::i2c(format!("i2c-{bus}"), "bus not in hal.i2c_buses"));
        }
        let path = format!("/dev/i2c-{bus}");
        LinuxI2CBus::new(&path).map_err(|e| Error::i2c(path, e))
    }
}

impl I2cBus for CdevI2c {
    fn validate(&self) -> Result<()> {
        for bus in &self.allowed {
            let path = format!("/dev/i2c-{bus}");
            if !Path::new(&path).exists() {
                return Err(Error::i2c(path, "no such device (is the i2c-dev module loaded?)"));
            }
        }
        Ok(())
    }
    fn setup(&self) -> Result<()> {
        Ok(())
    }
    fn teardown(&self) -> Result<()> {
        Ok(())
    }
    fn buses(&self) -> Result<Vec<u32>> {
        if !self.allowed.is_empty() {
            return Ok(self.allowed.clone());
        }
        let dir = std::fs::read_dir("/dev").map_err(|e| Error::i2c("/dev", e))?;
        let mut buses: Vec<u32> =
            dir.flatten().filter_map(|e| e.file_name().to_str()?.strip_prefix("i2c-")?.parse().ok()).collect();
        buses.sort_unstable();
        Ok(buses)
    }
    fn read(&self, bus: u32, address: u16, register: Option<u8>, len: usize) -> Result<Vec<u8>> {
        check_i2c_address(bus, address)?;
        self.check_unowned(bus, address)?;
        let mut dev = self.open(bus)?;
        let mut buf = vec![0u8; len];
        let reg = register.map(|r| [r]);
        let mut msgs = Vec::with_capacity(2);
        if let Some(r) = &reg {
            msgs.push(LinuxI2CMessage::write(r).with_address(address));
        }
        msgs.push(LinuxI2CMessage::read(&mut buf).with_address(address));
        match dev.transfer(&mut msgs) {
            Err(e) if super::smbus::unsupported(&e) => super::smbus::read(bus, address, register, len),
            Err(e) => Err(Error::i2c(format!("i2c-{bus} address {address:#04x}"), e)),
            Ok(_) => Ok(buf),
        }
    }
    fn write(&self, bus: u32, address: u16, register: Option<u8>, data: &[u8]) -> Result<usize> {
        check_i2c_address(bus, address)?;
        self.check_unowned(bus, address)?;
        let mut dev = self.open(bus)?;
        let mut frame = Vec::with_capacity(data.len() + 1);
        frame.extend(register);
        frame.extend_from_slice(data);
        let mut msgs = [LinuxI2CMessage::write(&frame).with_address(address)];
        match dev.transfer(&mut msgs) {
            Err(e) if super::smbus::unsupported(&e) => super::smbus::write(bus, address, register, data),
            Err(e) => Err(Error::i2c(format!("i2c-{bus} address {address:#04x}"), e)),
            Ok(_) => Ok(data.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // This machine (and CI) has no GPIO chip or I2C adapter and no gpio-sim module, so the
    // cdev backend is tested here only for the errors it must give instead of crashing.
    #[test]
    fn missing_hardware_gives_errors_that_name_it() {
        let g = CdevGpio::new(vec!["gpiochip9".into()]);
        let e = g.validate().unwrap_err().to_string();
        assert!(e.contains("gpiochip9"), "{e}");
        let e = g.read("LED").unwrap_err().to_string();
        assert!(e.contains("gpiochip9"), "{e}");
        let e = g.write("gpiochip7:3", 1).unwrap_err().to_string();
        assert!(e.contains("gpiochip7"), "{e}");
        let i = CdevI2c::new(vec![5]);
        assert!(i.validate().unwrap_err().to_string().contains("/dev/i2c-5"));
        assert!(i.read(5, 0x48, Some(0), 2).unwrap_err().to_string().contains("i2c-5"));
        assert!(i.read(6, 0x48, None, 2).unwrap_err().to_string().contains("i2c-6"));
        g.teardown().unwrap();
    }

    /// A chip is a name under /dev, never a path: a caller cannot make the board open, or say
    /// anything about, a file elsewhere (gpiocdev's error told whether it existed and where a
    /// link pointed).
    #[test]
    fn a_chip_named_by_a_path_is_refused_before_anything_is_opened() {
        let g = CdevGpio::new(vec![]);
        for line in ["/etc/passwd:0", "../proc/self/cwd:0", "..:1", ".:1", ":1"] {
            let e = g.read(line).unwrap_err().to_string();
            assert!(e.contains("not a chip name") && !e.contains("character device"), "{line}: {e}");
        }
    }

    /// A device a kernel driver has bound is refused before the bus is even opened; its
    /// neighbours and other buses are not.
    #[test]
    fn devices_owned_by_a_kernel_driver_are_refused() {
        let sysfs = tempfile::tempdir().unwrap();
        let rtc = sysfs.path().join("1-0068");
        std::fs::create_dir_all(&rtc).unwrap();
        std::os::unix::fs::symlink("../../../../bus/i2c/drivers/rtc-ds1307", rtc.join("driver")).unwrap();
        // Listed, no driver bound: free to use.
        std::fs::create_dir_all(sysfs.path().join("1-0048")).unwrap();
        let i = CdevI2c::with_sysfs(vec![], sysfs.path());
        let owned = |e: Error| e.to_string().contains("in use by the kernel driver rtc-ds1307");
        assert!(owned(i.read(1, 0x68, Some(0), 1).unwrap_err()));
        assert!(owned(i.write(1, 0x68, Some(0), &[0]).unwrap_err()));
        // Elsewhere the transfer is attempted (and fails here: this machine has no /dev/i2c-1).
        assert!(!owned(i.read(1, 0x48, Some(0), 1).unwrap_err()));
        assert!(!owned(i.write(2, 0x68, None, &[0]).unwrap_err()));
        assert_eq!(CdevI2c::new(vec![]).sysfs, Path::new("/sys/bus/i2c/devices"));
    }
}

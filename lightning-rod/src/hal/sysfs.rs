//! Legacy sysfs GPIO (`/sys/class/gpio`), for kernels without the GPIO character device:
//! anything before Linux 4.8, such as the Arduino Yún's stock OpenWrt (3.3). `--hal sysfs`
//! pairs it with the `/dev/i2c-N` I2C of [`super::cdev`], which old kernels have.
//!
//! Lines are named by their global number, `gpioN` (as `/sys/class/gpio/gpioN`), or
//! `gpiochipB:OFFSET` where `gpiochipB` is the sysfs chip (named after its base number B, not
//! its `/dev` index). A line is exported the first time a procedure touches it and unexported at
//! teardown, unless it was already exported when the agent found it (then it belongs to someone
//! else and is left as it was). sysfs has no bias control, so a bias other than `disabled` is an
//! error rather than silently ignored. A watch sets `edge` and a thread polls `value` for
//! `POLLPRI` in short slices, checking a stop flag between them, as the cdev watch does.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use tokio::sync::mpsc;

use super::{Bias, Direction, Edge, GpioBackend, GpioEvent, LineInfo};
use crate::error::{Error, Result};

/// Where the kernel puts the sysfs GPIO class.
pub const SYSFS_GPIO: &str = "/sys/class/gpio";
/// How long one poll for an edge may block before the watch thread checks its stop flag.
const WATCH_SLICE_MS: u16 = 200;

/// A GPIO controller as sysfs shows it (`/sys/class/gpio/gpiochipB`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Chip {
    name: String,
    base: u32,
    ngpio: u32,
}

impl Chip {
    fn contains(&self, gpio: u32) -> bool {
        gpio >= self.base && gpio - self.base < self.ngpio
    }
}

struct Exported {
    /// True when this agent exported the line (and so unexports it at teardown).
    by_us: bool,
    watch: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
}

/// GPIO through `/sys/class/gpio`, optionally restricted to the configured chips.
pub struct SysfsGpio {
    root: PathBuf,
    allowed: Vec<String>,
    exported: Mutex<HashMap<u32, Exported>>,
}

impl SysfsGpio {
    pub fn new(allowed: Vec<String>) -> SysfsGpio {
        SysfsGpio::with_root(SYSFS_GPIO, allowed)
    }

    /// A backend on another sysfs tree (tests use a directory of plain files).
    pub fn with_root(root: impl Into<PathBuf>, allowed: Vec<String>) -> SysfsGpio {
        SysfsGpio { root: root.into(), allowed, exported: Mutex::new(HashMap::new()) }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u32, Exported>> {
        self.exported.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn chips(&self) -> Result<Vec<Chip>> {
        let root = self.root.display().to_string();
        let dir = fs::read_dir(&self.root).map_err(|e| Error::gpio(&root, e))?;
        let mut chips = Vec::new();
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with("gpiochip") || (!self.allowed.is_empty() && !self.allowed.contains(&name)) {
                continue;
            }
            let path = entry.path();
            chips.push(Chip { base: read_number(&path.join("base"))?, ngpio: read_number(&path.join("ngpio"))?, name });
        }
        chips.sort_by_key(|c| c.base);
        Ok(chips)
    }

    /// Resolves `gpioN` or `gpiochipB:OFFSET` to the chip and the global number.
    fn locate(&self, line: &str) -> Result<(Chip, u32)> {
        let chips = self.chips()?;
        if let Some((chip, off)) = line.split_once(':') {
            let off: u32 = off.parse().map_err(|_| Error::gpio(format!("line {line:?}"), "offset is not a number"))?;
            let Some(c) = chips.into_iter().find(|c| c.name == chip) else {
                return Err(Error::gpio(
                    format!("line {line:?}"),
                    format!("no sysfs chip {chip} (or not in hal.gpio_chips)"),
                ));
            };
            if off >= c.ngpio {
                return Err(Error::gpio(format!("line {line:?}"), format!("{chip} has {} lines", c.ngpio)));
            }
            let gpio = c.base + off;
            return Ok((c, gpio));
        }
        let gpio = line
            .get(..4)
            .filter(|p| p.eq_ignore_ascii_case("gpio"))
            .and_then(|_| line[4..].parse::<u32>().ok())
            .ok_or_else(|| Error::gpio(format!("line {line:?}"), "sysfs lines are named gpioN or gpiochipB:OFFSET"))?;
        match chips.into_iter().find(|c| c.contains(gpio)) {
            Some(c) => Ok((c, gpio)),
            None => {
                Err(Error::gpio(format!("line {line:?}"), "no sysfs chip has this line (or not in hal.gpio_chips)"))
            }
        }
    }

    fn line_dir(&self, gpio: u32) -> PathBuf {
        self.root.join(format!("gpio{gpio}"))
    }

    /// Exports the line unless it already is; returns its directory.
    fn ensure_exported(&self, line: &str) -> Result<(u32, PathBuf)> {
        let (_, gpio) = self.locate(line)?;
        let dir = self.line_dir(gpio);
        let mut exported = self.lock();
        if exported.contains_key(&gpio) {
            return Ok((gpio, dir));
        }
        let by_us = if dir.is_dir() {
            false
        } else {
            let written = fs::write(self.root.join("export"), gpio.to_string());
            if !dir.is_dir() {
                let why = match written {
                    Err(e) => e.to_string(),
                    Ok(()) => format!("{} did not appear (a driver that names its lines?)", dir.display()),
                };
                return Err(Error::gpio(format!("gpio{gpio} ({line})"), format!("export failed: {why}")));
            }
            true
        };
        exported.insert(gpio, Exported { by_us, watch: None });
        Ok((gpio, dir))
    }

    fn attr(&self, gpio: u32, name: &str) -> Result<String> {
        let path = self.line_dir(gpio).join(name);
        fs::read_to_string(&path).map(|s| s.trim().to_owned()).map_err(|e| Error::gpio(path.display().to_string(), e))
    }

    fn set_attr(&self, gpio: u32, name: &str, value: &str) -> Result<()> {
        let path = self.line_dir(gpio).join(name);
        fs::write(&path, value).map_err(|e| Error::gpio(path.display().to_string(), format!("writing {value:?}: {e}")))
    }

    fn value(&self, gpio: u32) -> Result<u8> {
        parse_value(gpio, &self.attr(gpio, "value")?)
    }
}

fn read_number(path: &Path) -> Result<u32> {
    let text = fs::read_to_string(path).map_err(|e| Error::gpio(path.display().to_string(), e))?;
    text.trim().parse().map_err(|_| Error::gpio(path.display().to_string(), format!("not a number: {:?}", text.trim())))
}

fn parse_value(gpio: u32, text: &str) -> Result<u8> {
    match text.trim() {
        "0" => Ok(0),
        "1" => Ok(1),
        other => Err(Error::gpio(format!("gpio{gpio}"), format!("unexpected value {other:?}"))),
    }
}

fn stop_watch(gpio: u32, e: &mut Exported) -> std::result::Result<(), String> {
    if let Some((stop, thread)) = e.watch.take() {
        stop.store(true, Ordering::Relaxed);
        thread.join().map_err(|_| format!("watch thread of gpio{gpio} panicked"))?;
    }
    Ok(())
}

impl GpioBackend for SysfsGpio {
    fn validate(&self) -> Result<()> {
        if !self.root.join("export").exists() {
            return Err(Error::gpio(
                self.root.display().to_string(),
                "no sysfs GPIO interface (kernel without CONFIG_GPIO_SYSFS? use --hal cdev)",
            ));
        }
        let chips = self.chips()?;
        for want in &self.allowed {
            if !chips.iter().any(|c| &c.name == want) {
                return Err(Error::gpio(self.root.join(want).display().to_string(), "no such sysfs chip"));
            }
        }
        Ok(())
    }
    fn setup(&self) -> Result<()> {
        Ok(())
    }
    fn teardown(&self) -> Result<()> {
        let mut failures = Vec::new();
        for (gpio, mut e) in self.lock().drain() {
            if let Err(why) = stop_watch(gpio, &mut e) {
                failures.push(why);
            }
            if e.by_us
                && let Err(why) = fs::write(self.root.join("unexport"), gpio.to_string())
            {
                failures.push(format!("unexport gpio{gpio}: {why}"));
            }
        }
        if failures.is_empty() { Ok(()) } else { Err(Error::gpio("teardown", failures.join("; "))) }
    }
    fn lines(&self) -> Result<Vec<LineInfo>> {
        let mut out = Vec::new();
        for chip in self.chips()? {
            for off in 0..chip.ngpio {
                let gpio = chip.base + off;
                // Only exported lines have a direction and value to read; exporting every line
                // just to list it would claim lines nobody asked for.
                let (direction, value) = if self.line_dir(gpio).is_dir() {
                    let dir = if self.attr(gpio, "direction")? == "out" { Direction::Out } else { Direction::In };
                    (dir, Some(self.value(gpio)?))
                } else {
                    (Direction::In, None)
                };
                out.push(LineInfo {
                    name: format!("gpio{gpio}"),
                    chip: chip.name.clone(),
                    offset: off,
                    direction,
                    value,
                });
            }
        }
        Ok(out)
    }
    fn read(&self, line: &str) -> Result<u8> {
        let (gpio, _) = self.ensure_exported(line)?;
        self.value(gpio)
    }
    fn write(&self, line: &str, value: u8) -> Result<()> {
        if value > 1 {
            return Err(Error::gpio(format!("line {line}"), format!("value {value} is not 0 or 1")));
        }
        let (gpio, _) = self.ensure_exported(line)?;
        if self.attr(gpio, "direction")? == "out" {
            self.set_attr(gpio, "value", &value.to_string())
        } else {
            // "high"/"low" make it an output already driving the value: no glitch.
            self.set_attr(gpio, "direction", if value == 1 { "high" } else { "low" })
        }
    }
    fn set_direction(&self, line: &str, direction: Direction, bias: Option<Bias>) -> Result<()> {
        if bias.is_some_and(|b| b != Bias::Disabled) {
            return Err(Error::gpio(format!("line {line}"), "sysfs GPIO has no bias control (use --hal cdev)"));
        }
        let (gpio, _) = self.ensure_exported(line)?;
        let want = match direction {
            Direction::In => "in",
            Direction::Out => "out",
        };
        if self.attr(gpio, "direction")? != want {
            self.set_attr(gpio, "direction", want)?;
        }
        Ok(())
    }
    fn watch(&self, line: &str, edge: Edge, events: mpsc::Sender<GpioEvent>) -> Result<()> {
        let (gpio, dir) = self.ensure_exported(line)?;
        let (chip, _) = self.locate(line)?;
        {
            let mut exported = self.lock();
            if let Some(e) = exported.get_mut(&gpio) {
                stop_watch(gpio, e).map_err(|why| Error::gpio(line, why))?;
            }
        }
        if edge == Edge::None {
            return self.set_attr(gpio, "edge", "none");
        }
        if self.attr(gpio, "direction")? != "in" {
            self.set_attr(gpio, "direction", "in")?;
        }
        let kind = match edge {
            Edge::Rising => "rising",
            Edge::Falling => "falling",
            _ => "both",
        };
        self.set_attr(gpio, "edge", kind)?;
        let path = dir.join("value");
        let file = File::open(&path).map_err(|e| Error::gpio(path.display().to_string(), e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let meta = EventMeta { name: format!("gpio{gpio}"), chip: chip.name.clone(), offset: gpio - chip.base };
        let thread = std::thread::Builder::new()
            .name(format!("sysfs-watch-{gpio}"))
            .spawn(move || watch_loop(file, &flag, &meta, &events))
            .map_err(|e| Error::gpio(line, e))?;
        // Another watch of this line may have started while the lock was free: the last one
        // stored wins and the one it displaces is stopped (its thread would publish edges
        // for good, out of reach of `edge: none` and teardown). A line unexported meanwhile
        // stops this one.
        let mut exported = self.lock();
        let mut displaced = Exported { by_us: false, watch: Some((stop, thread)) };
        if let Some(e) = exported.get_mut(&gpio) {
            std::mem::swap(&mut e.watch, &mut displaced.watch);
        }
        stop_watch(gpio, &mut displaced).map_err(|why| Error::gpio(line, why))
    }
}

struct EventMeta {
    name: String,
    chip: String,
    offset: u32,
}

fn read_value_file(file: &mut File) -> std::io::Result<Option<u8>> {
    let mut buf = [0u8; 8];
    file.seek(SeekFrom::Start(0))?;
    let n = file.read(&mut buf)?;
    Ok(match buf[..n].first() {
        Some(b'0') => Some(0),
        Some(b'1') => Some(1),
        _ => None,
    })
}

fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| (t.tv_sec() as u64).saturating_mul(1_000_000_000).saturating_add(t.tv_nsec() as u64))
        .unwrap_or(0)
}

/// Waits for edges: sysfs flags one with POLLPRI|POLLERR on `value`, which must be read
/// (from offset 0) to re-arm. The kernel reports no edge kind, so it is inferred from the
/// value read right after the wake-up.
fn watch_loop(mut file: File, stop: &AtomicBool, meta: &EventMeta, events: &mpsc::Sender<GpioEvent>) {
    if let Err(e) = read_value_file(&mut file) {
        tracing::error!(line = meta.name, cause = %e, "GPIO watch stopped");
        return;
    }
    while !stop.load(Ordering::Relaxed) && !events.is_closed() {
        let ready = {
            let mut fds = [PollFd::new(file.as_fd(), PollFlags::POLLPRI | PollFlags::POLLERR)];
            poll(&mut fds, PollTimeout::from(WATCH_SLICE_MS))
        };
        match ready {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => {}
            Err(e) => {
                tracing::error!(line = meta.name, cause = %e, "GPIO watch stopped");
                return;
            }
        }
        let value = match read_value_file(&mut file) {
            Ok(Some(v)) => v,
            Ok(None) => continue,
            Err(e) => {
                tracing::error!(line = meta.name, cause = %e, "GPIO watch stopped");
                return;
            }
        };
        let msg = GpioEvent {
            line: meta.name.clone(),
            chip: meta.chip.clone(),
            offset: meta.offset,
            edge: if value == 1 { Edge::Rising } else { Edge::Falling },
            value,
            timestamp_ns: monotonic_ns(),
        };
        if events.try_send(msg).is_err() {
            tracing::warn!(line = meta.name, "GPIO event queue full; edge dropped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sysfs tree of plain files: chip `gpiochip496` (base 496, 8 lines) and `gpiochip0`
    /// (base 0, 4 lines), with gpio497 already exported by someone else as an output at 1.
    fn tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        for (name, base, n) in [("gpiochip496", 496, 8), ("gpiochip0", 0, 4)] {
            fs::create_dir(r.join(name)).unwrap();
            fs::write(r.join(name).join("base"), format!("{base}\n")).unwrap();
            fs::write(r.join(name).join("ngpio"), format!("{n}\n")).unwrap();
        }
        fs::write(r.join("export"), "").unwrap();
        fs::write(r.join("unexport"), "").unwrap();
        fs::create_dir(r.join("gpio497")).unwrap();
        fs::write(r.join("gpio497/direction"), "out\n").unwrap();
        fs::write(r.join("gpio497/value"), "1\n").unwrap();
        dir
    }

    #[test]
    fn names_resolve_to_global_numbers_and_chips() {
        let t = tree();
        let g = SysfsGpio::with_root(t.path(), vec![]);
        g.validate().unwrap();
        assert_eq!(g.locate("gpio497").unwrap().1, 497);
        assert_eq!(g.locate("GPIO2").unwrap(), (Chip { name: "gpiochip0".into(), base: 0, ngpio: 4 }, 2));
        assert_eq!(g.locate("gpiochip496:3").unwrap().1, 499);
        for (bad, needle) in [
            ("gpio4", "no sysfs chip"),
            ("gpiochip496:8", "has 8 lines"),
            ("gpiochip9:0", "no sysfs chip gpiochip9"),
            ("led", "gpioN"),
            ("gpio", "gpioN"),
            ("gpiochip0:x", "offset"),
        ] {
            let e = g.locate(bad).unwrap_err().to_string();
            assert!(e.contains(needle), "{bad}: {e}");
        }
        let only = SysfsGpio::with_root(t.path(), vec!["gpiochip0".into()]);
        assert!(only.locate("gpio497").is_err(), "a chip outside hal.gpio_chips must not resolve");
        let e = SysfsGpio::with_root(t.path(), vec!["gpiochip7".into()]).validate().unwrap_err().to_string();
        assert!(e.contains("gpiochip7"), "{e}");
        let e = SysfsGpio::with_root(t.path().join("nope"), vec![]).validate().unwrap_err().to_string();
        assert!(e.contains("CONFIG_GPIO_SYSFS"), "{e}");
    }

    #[test]
    fn lines_report_exported_lines_only_with_values() {
        let t = tree();
        let g = SysfsGpio::with_root(t.path(), vec![]);
        let lines = g.lines().unwrap();
        assert_eq!(lines.len(), 12);
        let l = lines.iter().find(|l| l.name == "gpio497").unwrap();
        assert_eq!((l.chip.as_str(), l.offset, l.direction, l.value), ("gpiochip496", 1, Direction::Out, Some(1)));
        let l = lines.iter().find(|l| l.name == "gpio3").unwrap();
        assert_eq!((l.direction, l.value), (Direction::In, None));
    }

    #[test]
    fn an_adopted_line_is_driven_but_never_unexported() {
        let t = tree();
        let g = SysfsGpio::with_root(t.path(), vec![]);
        assert_eq!(g.read("gpio497").unwrap(), 1);
        g.write("gpio497", 0).unwrap();
        assert_eq!(fs::read_to_string(t.path().join("gpio497/value")).unwrap(), "0");
        // An input becomes an output through "high"/"low" on direction.
        fs::write(t.path().join("gpio497/direction"), "in\n").unwrap();
        g.write("gpio497", 1).unwrap();
        assert_eq!(fs::read_to_string(t.path().join("gpio497/direction")).unwrap(), "high");
        assert!(g.write("gpio497", 2).unwrap_err().to_string().contains("not 0 or 1"));
        let e = g.set_direction("gpio497", Direction::In, Some(Bias::PullUp)).unwrap_err().to_string();
        assert!(e.contains("no bias"), "{e}");
        g.teardown().unwrap();
        assert_eq!(fs::read_to_string(t.path().join("unexport")).unwrap(), "", "not ours to unexport");
    }

    /// Concurrent watches of one line leave one watch thread, which `edge: none` stops: none
    /// runs on unseen. Each watch thread holds a clone of the events sender until it ends
    /// (the sysfs `value` of this tree is a plain file, so they only poll).
    #[test]
    fn concurrent_watches_of_a_line_leave_no_orphan_thread() {
        let t = tree();
        let g = SysfsGpio::with_root(t.path(), vec![]);
        let (tx, _rx) = mpsc::channel(16);
        for _ in 0..10 {
            let start = std::sync::Barrier::new(2);
            std::thread::scope(|s| {
                for _ in 0..2 {
                    s.spawn(|| {
                        start.wait();
                        g.watch("gpio497", Edge::Both, tx.clone()).unwrap();
                    });
                }
            });
            assert_eq!(tx.strong_count(), 2, "ours and one watch thread's");
        }
        g.watch("gpio497", Edge::None, tx.clone()).unwrap();
        assert_eq!(tx.strong_count(), 1, "a watch thread still runs");
    }

    #[test]
    fn a_failed_export_names_the_line() {
        let t = tree();
        let g = SysfsGpio::with_root(t.path(), vec![]);
        // Writing to the plain `export` file works but no gpio498 directory appears.
        let e = g.read("gpio498").unwrap_err().to_string();
        assert!(e.contains("gpio498") && e.contains("did not appear"), "{e}");
        assert_eq!(fs::read_to_string(t.path().join("export")).unwrap(), "498");
        fs::write(t.path().join("gpio1"), "").unwrap();
        fs::remove_file(t.path().join("export")).unwrap();
        fs::create_dir(t.path().join("export")).unwrap();
        let e = g.read("gpio2").unwrap_err().to_string();
        assert!(e.contains("export failed"), "{e}");
        assert!(parse_value(1, "x").unwrap_err().to_string().contains("unexpected value"));
    }
}

//! The host functions a Stack4Things board offers a WebAssembly plugin (module `s4t`, see
//! `lightning-rod/src/plugins/wasm.rs` `ABI`), with safe wrappers. `no_std`, no allocator: a
//! plugin is a `run() -> i32` export (0 is success) that works in buffers on its stack.
//!
//! ```ignore
//! #[unsafe(no_mangle)]
//! pub extern "C" fn run() -> i32 {
//!     s4t_plugin::set_result(b"{\"hello\":\"board\"}");
//!     0
//! }
//! ```
#![no_std]

mod host {
    #[link(wasm_import_module = "s4t")]
    unsafe extern "C" {
        pub fn log(level: i32, ptr: *const u8, len: i32);
        pub fn sleep_ms(ms: i32);
        pub fn params_len() -> i32;
        pub fn params_read(ptr: *mut u8, len: i32) -> i32;
        pub fn set_result(ptr: *const u8, len: i32) -> i32;
        pub fn publish(ptr: *const u8, len: i32) -> i32;
        pub fn gpio_read(ptr: *const u8, len: i32) -> i32;
        pub fn gpio_write(ptr: *const u8, len: i32, value: i32) -> i32;
        pub fn i2c_read(bus: i32, addr: i32, reg: i32, ptr: *mut u8, len: i32) -> i32;
        pub fn last_error(ptr: *mut u8, len: i32) -> i32;
    }
}

/// A host error code (negative): -1 not granted, -2 hardware, -3 bad argument, -4 too large,
/// -5 queue full. [`last_error`] has the text.
pub type Code = i32;

fn check(r: i32) -> Result<i32, Code> {
    if r < 0 { Err(r) } else { Ok(r) }
}

pub fn log_info(text: &str) {
    unsafe { host::log(2, text.as_ptr(), text.len() as i32) }
}

/// Sleeps (and refills the plugin's fuel); the board ends the run here when it is stopped.
pub fn sleep_ms(ms: u32) {
    unsafe { host::sleep_ms(ms.min(i32::MAX as u32) as i32) }
}

/// The call's parameters (JSON) copied into `buf`; `None` if they do not fit.
pub fn params(buf: &mut [u8]) -> Option<&[u8]> {
    let n = unsafe { host::params_len() } as usize;
    if n > buf.len() {
        return None;
    }
    unsafe { host::params_read(buf.as_mut_ptr(), n as i32) };
    Some(&buf[..n])
}

/// The run's result: JSON (or text) returned to the caller through the REST API.
pub fn set_result(bytes: &[u8]) -> Result<(), Code> {
    check(unsafe { host::set_result(bytes.as_ptr(), bytes.len() as i32) }).map(|_| ())
}

/// Telemetry on the board's topic `board.<uuid>.telemetry`.
pub fn publish(bytes: &[u8]) -> Result<(), Code> {
    check(unsafe { host::publish(bytes.as_ptr(), bytes.len() as i32) }).map(|_| ())
}

pub fn gpio_read(line: &str) -> Result<u8, Code> {
    check(unsafe { host::gpio_read(line.as_ptr(), line.len() as i32) }).map(|v| v as u8)
}

pub fn gpio_write(line: &str, value: u8) -> Result<(), Code> {
    check(unsafe { host::gpio_write(line.as_ptr(), line.len() as i32, i32::from(value)) }).map(|_| ())
}

/// Reads `buf.len()` bytes from register `reg` of device `addr` on I2C bus `bus`.
pub fn i2c_read(bus: u32, addr: u16, reg: u8, buf: &mut [u8]) -> Result<usize, Code> {
    let r = unsafe { host::i2c_read(bus as i32, i32::from(addr), i32::from(reg), buf.as_mut_ptr(), buf.len() as i32) };
    check(r).map(|n| n as usize)
}

/// The text of the last host error, in `buf`.
pub fn last_error(buf: &mut [u8]) -> &[u8] {
    let n = unsafe { host::last_error(buf.as_mut_ptr(), buf.len() as i32) };
    &buf[..(n.max(0) as usize).min(buf.len())]
}

/// The unsigned integer after `"key":` in flat JSON such as `{"times": 3}`.
pub fn json_uint(json: &[u8], key: &str) -> Option<u32> {
    let k = key.as_bytes();
    let mut i = 0;
    while i + k.len() + 2 <= json.len() {
        if json[i] == b'"' && json[i + 1..].starts_with(k) && json.get(i + 1 + k.len()) == Some(&b'"') {
            let mut j = i + 2 + k.len();
            while j < json.len() && (json[j] == b' ' || json[j] == b':') {
                j += 1;
            }
            let mut v: u32 = 0;
            let start = j;
            while j < json.len() && json[j].is_ascii_digit() {
                v = v.checked_mul(10)?.checked_add(u32::from(json[j] - b'0'))?;
                j += 1;
            }
            return (j > start).then_some(v);
        }
        i += 1;
    }
    None
}

/// A fixed buffer to build a result in.
pub struct Out<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> Default for Out<N> {
    fn default() -> Self {
        Out { buf: [0; N], len: 0 }
    }
}

impl<const N: usize> Out<N> {
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        let n = b.len().min(N - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&b[..n]);
        self.len += n;
        self
    }

    pub fn str(&mut self, s: &str) -> &mut Self {
        self.bytes(s.as_bytes())
    }

    pub fn uint(&mut self, mut v: u32) -> &mut Self {
        let mut digits = [0u8; 10];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.bytes(&digits[i..])
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

#[cfg(target_arch = "wasm32")]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    core::arch::wasm32::unreachable()
}

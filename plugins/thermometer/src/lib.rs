//! Example plugin: reads the temperature register of a TMP102-style sensor at I2C bus 1,
//! address 0x48 (12 bits, 0.0625 °C per step; the sim HAL's device) and answers
//! `{"celsius":25.0}`. Needs the grant of that device.
#![no_std]

use s4t_plugin::{Out, i2c_read, last_error, set_result};

const BUS: u32 = 1;
const ADDRESS: u16 = 0x48;

#[unsafe(no_mangle)]
pub extern "C" fn run() -> i32 {
    let mut raw = [0u8; 2];
    if i2c_read(BUS, ADDRESS, 0, &mut raw).is_err() {
        let mut e = [0u8; 256];
        let _ = set_result(last_error(&mut e));
        return 1;
    }
    // 12-bit two's complement, left-aligned; in 1/16 °C.
    let steps = i16::from_be_bytes(raw) >> 4;
    let (neg, steps) = (steps < 0, u32::from(steps.unsigned_abs()));
    let (whole, frac) = (steps / 16, steps % 16 * 625); // frac in 1/10000 °C
    let mut out = Out::<64>::default();
    out.str("{\"celsius\":");
    if neg {
        out.str("-");
    }
    out.uint(whole).str(".");
    // Four decimals without trailing zeros (at least one digit).
    let mut digits = [b'0'; 4];
    let mut f = frac;
    for d in digits.iter_mut().rev() {
        *d = b'0' + (f % 10) as u8;
        f /= 10;
    }
    let keep = digits.iter().rposition(|d| *d != b'0').map_or(1, |i| i + 1);
    out.bytes(&digits[..keep]).str("}");
    let _ = set_result(out.as_bytes());
    0
}

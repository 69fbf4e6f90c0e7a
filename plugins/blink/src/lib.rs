//! Example plugin: blinks GPIO17 `times` times (parameters `{"times": n[, "interval_ms": ms]}`)
//! and answers `{"line":"GPIO17","blinks":n}`. Needs the grant of GPIO17; without it the board
//! refuses the line and the call fails with the board's reason.
#![no_std]

use s4t_plugin::{Out, gpio_write, json_uint, last_error, params, set_result, sleep_ms};

const LINE: &str = "GPIO17";

#[unsafe(no_mangle)]
pub extern "C" fn run() -> i32 {
    let mut buf = [0u8; 512];
    let p = params(&mut buf).unwrap_or(b"{}");
    let times = json_uint(p, "times").unwrap_or(1).min(1000);
    let interval = json_uint(p, "interval_ms").unwrap_or(20).min(10_000);
    for _ in 0..times {
        for v in [1, 0] {
            if gpio_write(LINE, v).is_err() {
                let mut e = [0u8; 256];
                let _ = set_result(last_error(&mut e));
                return 1;
            }
            sleep_ms(interval);
        }
    }
    let mut out = Out::<64>::default();
    out.str("{\"line\":\"").str(LINE).str("\",\"blinks\":").uint(times).str("}");
    let _ = set_result(out.as_bytes());
    0
}

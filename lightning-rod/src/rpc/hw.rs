//! `Gpio*` and `I2c*` procedures (docs/protocols.md). HAL calls are synchronous ioctls and run
//! on the blocking pool, never on the runtime's workers.

use std::sync::Arc;

use serde_json::json;

use super::args::{Params, bad};
use super::{Call, Context, Method, Reply, message, ok};
use crate::error::{Error, Result};
use crate::hal::{Bias, Direction, Edge};

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Error::BadArgument(format!("hardware call aborted: {e}")))?
}

pub(super) async fn call(ctx: &Arc<Context>, method: Method, call: &Call) -> Result<Reply> {
    let p = Params::at(&call.args, 0, "parameters", !matches!(method, Method::GpioList | Method::I2cList))?;
    let gpio = ctx.hal.gpio.clone();
    let i2c = ctx.hal.i2c.clone();
    match method {
        Method::GpioList => {
            let lines = blocking(move || gpio.lines()).await?;
            message(json!({ "lines": lines }))
        }
        Method::GpioRead => {
            let line = p.str("line")?.to_owned();
            let l = line.clone();
            let value = blocking(move || gpio.read(&l)).await?;
            message(json!({"name": line, "value": value}))
        }
        Method::GpioWrite => {
            let line = p.str("line")?.to_owned();
            let value = p.int("value", 0..=1)? as u8;
            if let Some(d) = p.choice("direction", &["out", "in"])?
                && d != "out"
            {
                return Err(bad(
                    "parameters.direction: a write makes the line an output; pass \"out\" or omit it".into()
                ));
            }
            let l = line.clone();
            blocking(move || gpio.write(&l, value)).await?;
            message(json!({"name": line, "value": value}))
        }
        Method::GpioDirection => {
            let line = p.str("line")?.to_owned();
            let dir = match p.choice("direction", &["in", "out"])? {
                Some("in") => Direction::In,
                Some(_) => Direction::Out,
                None => return Err(bad("parameters.direction is missing".into())),
            };
            let bias = match p.choice("bias", &["pull-up", "pull-down", "disabled"])? {
                Some("pull-up") => Some(Bias::PullUp),
                Some("pull-down") => Some(Bias::PullDown),
                Some(_) => Some(Bias::Disabled),
                None => None,
            };
            let l = line.clone();
            blocking(move || gpio.set_direction(&l, dir, bias)).await?;
            message(json!({"name": line, "direction": dir}))
        }
        Method::GpioWatch => {
            let line = p.str("line")?.to_owned();
            let edge = match p.choice("edge", &["rising", "falling", "both", "none"])? {
                Some("rising") => Edge::Rising,
                Some("falling") => Edge::Falling,
                Some("both") => Edge::Both,
                Some(_) => Edge::None,
                None => return Err(bad("parameters.edge is missing".into())),
            };
            let (l, tx) = (line.clone(), ctx.gpio_events.clone());
            blocking(move || gpio.watch(&l, edge, tx)).await?;
            message(json!({"name": line, "edge": edge}))
        }
        Method::I2cList => {
            let buses = blocking(move || i2c.buses()).await?;
            message(json!({ "buses": buses }))
        }
        Method::I2cRead => {
            let (bus, address, register) = i2c_target(&p)?;
            let len = p.int("length", 1..=ctx.hal.max_transfer as u64)? as usize;
            let data = blocking(move || i2c.read(bus, address, register, len)).await?;
            message(json!({ "data": data }))
        }
        Method::I2cWrite => {
            let (bus, address, register) = i2c_target(&p)?;
            let data = p.bytes("data", ctx.hal.max_transfer)?;
            let n = blocking(move || i2c.write(bus, address, register, &data)).await?;
            ok(json!({ "written": n }))
        }
        _ => Err(bad(format!("{} is not a hardware procedure", method.name()))),
    }
}

fn i2c_target(p: &Params<'_>) -> Result<(u32, u16, Option<u8>)> {
    let bus = p.int("bus", 0..=1023)? as u32;
    let address = p.int("address", 0x03..=0x77)? as u16;
    let register = p.opt_int("register", 0..=255)?.map(|r| r as u8);
    Ok((bus, address, register))
}

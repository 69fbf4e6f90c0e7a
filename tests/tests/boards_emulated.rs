//! Boards for real: the lightning-rod binaries users flash, cross-built by `cross/build.sh`, run
//! under emulation against the x86 cloud.
//!
//! - the armv7 (Raspberry Pi 2/3), ARMv6 (Pi Zero/1, musl, on qemu's arm1176) and MIPS (Arduino
//!   Yún, big-endian, musl, without the wasm sandbox) agents run under qemu-user, each on a
//!   board behind NAT, enroll, log in and answer GPIO calls (sim HAL): the binaries work, not
//!   just link.
//! - An emulated aarch64 board (qemu-system TCG, a kernel with gpio-sim and i2c-stub built by
//!   `cross/vm/build-kernel.sh`) whose init runs the cross-built agent with the `cdev` HAL and a
//!   second one with the `sysfs` HAL; the test drives lines through the REST API and checks the
//!   simulated chip from inside the VM (and the other way round), and the same for an i2c-stub
//!   register.
//!
//! These tests need the cross-built binaries and the kernel, which the `cross-build` stage of
//! `.ci/run` (`cross/ci.sh`) produces and which that stage then runs this file against; the
//! `test` stage leaves this binary out (`default-filter` of the nextest `ci` profile). Without
//! them a developer's run skips with a message saying what to build; under `CI` it fails.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use s4t_tests::boards::{Console, cross_bin, emulated_command, have, vm_command, vm_initramfs, vm_kernel_dir};
use s4t_tests::rest::Rest;
use s4t_tests::{CLOUD_ADDR, Host, Lab, require, require_root, run, workspace_bin};

const PASSWORD: &str = "boards-admin-password";
/// Emulated agents are slow to start (qemu-user translating a size-optimised binary; the VM
/// runs under TCG on a shared 2-core machine): generous deadlines, never sleeps.
const ONLINE: Duration = Duration::from_secs(180);

/// `(module (memory (export "memory") 1) (func (export "run") (result i32) i32.const 0))`.
const NOP_WASM: &str = "AGFzbQEAAAABBQFgAAF/AwIBAAUDAQABBxACBm1lbW9yeQIAA3J1bgAACgYBBABBAAs=";

/// Starts `iotronic serve` in the lab's cloud namespace and returns an admin REST client.
fn cloud(lab: &mut Lab) -> Rest {
    let cloud = lab.cloud().clone();
    let mut iot = cloud.command(workspace_bin("iotronic").unwrap());
    iot.args(["serve", "--plaintext", "--bind", &CLOUD_ADDR.to_string(), "--data-dir"])
        .arg(lab.dir().join("cloud"))
        .env("IOTRONIC_ADMIN_PASSWORD", PASSWORD);
    lab.spawn("iotronic", iot).unwrap();
    let mut rest = Rest::new(&cloud, SocketAddr::from((CLOUD_ADDR, 8812)));
    rest.wait_ready(Duration::from_secs(60)).unwrap();
    rest.login("admin", PASSWORD).unwrap();
    rest
}

fn board_config(dir: &Path, name: &str) -> std::path::PathBuf {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    let p = d.join("config.toml");
    let cfg = format!(
        "[cloud]\nlegacy_settings = \"{0}/none.json\"\nlegacy_conf = \"{0}/none.conf\"\n[board]\nstate_dir = \"{0}/state\"\n\
         [hal]\nbackend = \"sim\"\n[timers]\nbackoff_initial_ms = 100\nbackoff_max_s = 2\n",
        d.display()
    );
    std::fs::write(&p, cfg).unwrap();
    p
}

/// Enrolls and starts the cross-built agent of `target` under qemu-user on `host`.
fn start_emulated_agent(lab: &mut Lab, rest: &Rest, host: &Host, target: &str, bin: &Path) {
    let name = host.name.clone();
    let code = format!("CODE-{name}");
    rest.create_board(&name, &code).unwrap();
    let cfg = board_config(lab.dir(), &name);
    let mut enroll = emulated_command(host, target, bin).unwrap();
    enroll.args(["enroll", "--url", &format!("ws://{CLOUD_ADDR}:8181/"), "--code", &code, "--config"]).arg(&cfg);
    run(&mut enroll).unwrap_or_else(|e| panic!("{target}: enroll failed: {e:#}"));
    let mut agent = emulated_command(host, target, bin).unwrap();
    agent.args(["run", "--config"]).arg(&cfg).env("RUST_LOG", "info");
    lab.spawn(&format!("lightning-rod-{name}"), agent).unwrap();
}

fn put_gpio(rest: &Rest, board: &str, line: &str, value: u8) -> Value {
    rest.expect(
        200,
        "PUT",
        &format!("/v1/boards/{board}/gpio/{line}"),
        Some(&json!({"value": value, "direction": "out"})),
    )
    .unwrap()
}

fn get_gpio(rest: &Rest, board: &str, line: &str) -> u64 {
    let v = rest.expect(200, "GET", &format!("/v1/boards/{board}/gpio/{line}"), None).unwrap();
    assert_eq!(v["name"], line, "{v}");
    v["value"].as_u64().unwrap_or_else(|| panic!("no value for {line}: {v}"))
}

#[test]
fn arm_and_mips_agents_under_qemu_user_enroll_and_answer_gpio() {
    require_root!();
    let agents = [
        ("armv7", "armv7-unknown-linux-gnueabihf"),
        ("armv6", "arm-unknown-linux-musleabihf"),
        ("mips", "mips-unknown-linux-musl"),
    ];
    let mut bins = Vec::new();
    for (_, target) in agents {
        let bin =
            require!(cross_bin(target), format!("lightning-rod for {target}: run `bash cross/build.sh {target}`"));
        let qemu = s4t_tests::boards::qemu_user(target).unwrap();
        require!(have(&qemu[0]).then_some(()), format!("{} (apt qemu-user-static)", qemu[0]));
        bins.push(bin);
    }
    let mut lab = Lab::new("qemu-user").unwrap();
    let rest = cloud(&mut lab);
    let mut hosts = Vec::new();
    for ((name, target), bin) in agents.iter().zip(&bins) {
        let host = lab.add_board(name).unwrap();
        start_emulated_agent(&mut lab, &rest, &host, target, bin);
        hosts.push(host);
    }
    for (name, _) in agents {
        rest.wait_status(name, "online", ONLINE).unwrap();
    }
    for (i, (name, target)) in agents.iter().enumerate() {
        // A procedure call through the cloud: the reply comes from the emulated binary.
        let ping = rest
            .expect(200, "POST", &format!("/v1/boards/{name}/action"), Some(&json!({"action": "DevicePing"})))
            .unwrap();
        // The agent answers "HOSTNAME @ TIME": the reply came from the board, not the cloud.
        assert!(ping.as_str().is_some_and(|p| p.contains(" @ 20")), "{target}: {ping}");
        // The interface list (rtnetlink, read by the agent itself: musl's getifaddrs hangs under
        // qemu-user on a big-endian guest, cross/README.md) names the board's own address.
        let net = rest
            .expect(200, "POST", &format!("/v1/boards/{name}/action"), Some(&json!({"action": "DeviceNetConfig"})))
            .unwrap();
        let addr = format!("{}/28", hosts[i].addr);
        assert!(net.to_string().contains(&addr), "{target}: {addr} not in {net}");
        // GPIO through the sim HAL: a write reads back, per board.
        let line = format!("GPIO{}", 5 + i);
        put_gpio(&rest, name, &line, 1);
        assert_eq!(get_gpio(&rest, name, &line), 1, "{target}");
        put_gpio(&rest, name, &line, 0);
        assert_eq!(get_gpio(&rest, name, &line), 0, "{target}");
        let lines = rest.expect(200, "GET", &format!("/v1/boards/{name}/gpio"), None).unwrap();
        assert_eq!(lines["lines"].as_array().map(Vec::len), Some(28), "{target}: {lines}");
    }
    // A WebAssembly plugin: the armv7 build has the sandbox (the MIPS build leaves it out and
    // refuses one, naming the `wasm-plugins` feature: cross/README.md).
    let plugin = rest.expect(201, "POST", "/v1/plugins", Some(&json!({"name": "nop", "code": NOP_WASM}))).unwrap();
    let plugin = plugin["uuid"].as_str().unwrap_or_else(|| panic!("no plugin uuid: {plugin}")).to_owned();
    let injected =
        rest.expect(200, "PUT", "/v1/boards/armv7/plugins", Some(&json!({"plugin": plugin}))).unwrap_or_else(|e| {
            panic!("armv7: wasm plugin not injected: {e:#}");
        });
    assert_eq!(injected["status"], "injected", "{injected}");

    // The agents that answered are the foreign binaries, each under qemu in its board's
    // namespace behind NAT.
    for ((host, (_, target)), bin) in hosts.iter().zip(agents).zip(&bins) {
        let qemu = &s4t_tests::boards::qemu_user(target).unwrap()[0];
        let pids = run(std::process::Command::new("ip").args(["netns", "pids", &host.netns])).unwrap();
        let found = pids.split_whitespace().any(|pid| {
            let argv = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let argv: Vec<String> = argv.split(|&b| b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
            argv.first().is_some_and(|a| a.ends_with(qemu.as_str()))
                && argv.iter().any(|a| Path::new(a) == bin.as_path())
                && argv.iter().any(|a| a == "run")
        });
        assert!(found, "{target}: no {qemu} running {} in {}", bin.display(), host.netns);
    }
}

#[test]
fn emulated_aarch64_board_drives_real_gpio_and_i2c() {
    require_root!();
    let target = "aarch64-unknown-linux-gnu";
    let bin = require!(cross_bin(target), format!("lightning-rod for {target}: run `bash cross/build.sh {target}`"));
    let kernel = require!(vm_kernel_dir(), "the emulated board's kernel: run `bash cross/vm/build-kernel.sh`");
    require!(have("qemu-system-aarch64").then_some(()), "qemu-system-aarch64 (apt qemu-system-arm)");

    let mut lab = Lab::new("emulated").unwrap();
    let rest = cloud(&mut lab);
    rest.create_board("emu-cdev", "CODE-CDEV").unwrap();
    rest.create_board("emu-sysfs", "CODE-SYSFS").unwrap();
    // The VM sits behind the board's NAT; qemu's user-mode networking dials out from there.
    let host = lab.add_board("vm").unwrap();
    let initrd = lab.dir().join("initrd.cpio.gz");
    vm_initramfs(&kernel, &bin, &initrd).unwrap();
    let append = format!("s4t.url=ws://{CLOUD_ADDR}:8181/ s4t.cdev=CODE-CDEV s4t.sysfs=CODE-SYSFS");
    let cmd = vm_command(&host, &kernel, &initrd, &append);
    let (proc, stdin) = lab.spawn_with_stdin("vm", cmd).unwrap();
    let mut console = Console::new(proc, stdin);
    console.wait_for("S4T-BOARD-READY", Duration::from_secs(120)).unwrap();
    let ask = |console: &mut Console, request: &str| console.ask(request, Duration::from_secs(30)).unwrap();
    assert_eq!(ask(&mut console, "uname"), "aarch64");
    rest.wait_status("emu-cdev", "online", ONLINE).unwrap();
    rest.wait_status("emu-sysfs", "online", ONLINE).unwrap();

    // cdev: the gpio-sim bank's named lines are listed...
    let lines = rest.expect(200, "GET", "/v1/boards/emu-cdev/gpio", None).unwrap();
    let names: Vec<&str> = lines["lines"].as_array().unwrap().iter().filter_map(|l| l["name"].as_str()).collect();
    assert!(names.contains(&"led") && names.contains(&"button"), "{lines}");
    // ...an output written through the API is what the simulated chip sees...
    put_gpio(&rest, "emu-cdev", "led", 1);
    assert_eq!(ask(&mut console, "val 0 1"), "1");
    put_gpio(&rest, "emu-cdev", "led", 0);
    assert_eq!(ask(&mut console, "val 0 1"), "0");
    // ...and an input the simulator drives is what the API reads.
    assert_eq!(ask(&mut console, "pull 0 0 up"), "ok");
    assert_eq!(get_gpio(&rest, "emu-cdev", "button"), 1);
    assert_eq!(ask(&mut console, "pull 0 0 down"), "ok");
    assert_eq!(get_gpio(&rest, "emu-cdev", "button"), 0);

    // i2c-dev on the SMBus stub at 0x50: a register written through the API reads back inside
    // the VM, and one set inside the VM reads back through the API.
    rest.expect(200, "POST", "/v1/boards/emu-cdev/i2c/0/0x50/write", Some(&json!({"register": 16, "data": [171]})))
        .unwrap();
    // (busybox's i2c tools read every number as hex.)
    assert_eq!(ask(&mut console, "i2cget 0 0x50 0x10"), "0xab");
    assert_eq!(ask(&mut console, "i2cset 0 0x50 0x11 0x5a"), "ok");
    let read = rest
        .expect(200, "POST", "/v1/boards/emu-cdev/i2c/0/80/read", Some(&json!({"register": 17, "length": 1})))
        .unwrap();
    assert_eq!(read["data"], json!([0x5a]), "{read}");
    let block = rest
        .expect(200, "POST", "/v1/boards/emu-cdev/i2c/0/0x50/read", Some(&json!({"register": 16, "length": 2})))
        .unwrap();
    assert_eq!(block["data"], json!([0xab, 0x5a]), "{block}");
    // A device that is not there is an error, not a hang or a crash.
    let (status, missing) =
        rest.call("POST", "/v1/boards/emu-cdev/i2c/0/0x51/read", Some(&json!({"register": 0, "length": 1}))).unwrap();
    assert!(status >= 400, "reading an absent device answered {status}: {missing}");

    // sysfs (the Yún's interface): lines by global number on the second bank.
    let base: u32 = ask(&mut console, "base s4t-sysfs").parse().expect("the sysfs base of bank 1");
    let out = format!("gpio{}", base + 3);
    put_gpio(&rest, "emu-sysfs", &out, 1);
    assert_eq!(ask(&mut console, "val 1 3"), "1");
    put_gpio(&rest, "emu-sysfs", &out, 0);
    assert_eq!(ask(&mut console, "val 1 3"), "0");
    let input = format!("gpio{}", base + 4);
    assert_eq!(ask(&mut console, "pull 1 4 up"), "ok");
    assert_eq!(get_gpio(&rest, "emu-sysfs", &input), 1);
    assert_eq!(ask(&mut console, "pull 1 4 down"), "ok");
    assert_eq!(get_gpio(&rest, "emu-sysfs", &input), 0);
}

//! The real binary: `wstunnel token|server|client`, and the same binary called as `wstun` with
//! the command lines the original Python lightning-rod uses.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(20);
const BIN: &str = env!("CARGO_BIN_EXE_wstunnel");

/// A child process killed on drop, whose stdout lines arrive on a channel.
struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Proc {
    fn start(program: &Path, args: &[&str]) -> Proc {
        Proc::start_with(program, args, &[])
    }

    fn start_with(program: &Path, args: &[&str], env: &[(&str, &Path)]) -> Proc {
        let mut child = Command::new(program)
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        Proc { child, lines: rx }
    }

    fn line(&self, prefix: &str) -> String {
        loop {
            let l = self.lines.recv_timeout(DEADLINE).unwrap_or_else(|_| panic!("no line starting with {prefix:?}"));
            if let Some(rest) = l.strip_prefix(prefix) {
                return rest.to_owned();
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn echo_server() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for mut s in l.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

fn echo_through(port: u16) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(b"ping").unwrap();
    let mut back = [0u8; 4];
    s.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"ping");
}

#[test]
fn token_server_and_client_from_the_command_line() {
    let dir = std::env::temp_dir().join(format!("wstunnel-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret = dir.join("secret");
    std::fs::write(&secret, "cli-secret\n").unwrap();
    let secret = secret.to_str().unwrap();
    let out =
        Command::new(BIN).args(["token", "--secret-file", secret, "--board", "b1", "--port", "0"]).output().unwrap();
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let server = Proc::start(
        Path::new(BIN),
        &["server", "--listen", "127.0.0.1:0", "--public-bind", "127.0.0.1", "--secret-file", secret],
    );
    let addr = server.line("listening on ");
    let echo = echo_server();
    let url = format!("ws://{addr}/");
    let remote = format!("0:{echo}");
    let client = Proc::start(Path::new(BIN), &["client", "--server", &url, "-R", &remote, "--token", &token]);
    let port: u16 = client.line(&format!("exposed {echo} on port ")).parse().unwrap();
    echo_through(port);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Over wss:// with neither --ca-file nor --tls-insecure, the client trusts the system's CA
/// bundle (here `SSL_CERT_FILE`, holding the server's self-signed certificate): the command
/// line of SYSTEM.md works as written against a server with a certificate the system trusts.
#[test]
fn a_wss_client_trusts_the_system_ca_bundle_by_default() {
    let dir = std::env::temp_dir().join(format!("wstunnel-cli-wss-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let (cert, key, secret) = (dir.join("cert.pem"), dir.join("key.pem"), dir.join("secret"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    std::fs::write(&secret, "cli-secret\n").unwrap();
    let path = |p: &Path| p.to_str().unwrap().to_owned();
    let args = ["token", "--secret-file", &path(&secret), "--board", "b1", "--port", "0"];
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let (cert_s, key_s, secret_s) = (path(&cert), path(&key), path(&secret));
    let server = Proc::start(
        Path::new(BIN),
        &[
            "server",
            "--listen",
            "127.0.0.1:0",
            "--public-bind",
            "127.0.0.1",
            "--secret-file",
            &secret_s,
            "--tls-cert",
            &cert_s,
            "--tls-key",
            &key_s,
        ],
    );
    let addr = server.line("listening on ");
    let echo = echo_server();
    let url = format!("wss://{addr}/");
    let remote = format!("0:{echo}");
    let client = Proc::start_with(
        Path::new(BIN),
        &["client", "--server", &url, "-R", &remote, "--token", &token],
        &[("SSL_CERT_FILE", &cert)],
    );
    let port: u16 = client.line(&format!("exposed {echo} on port ")).parse().unwrap();
    echo_through(port);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn called_as_wstun_it_serves_and_speaks_the_wstun_command_line() {
    let dir = std::env::temp_dir().join(format!("wstunnel-wstun-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let wstun = dir.join("wstun");
    let _ = std::fs::remove_file(&wstun);
    std::os::unix::fs::symlink(BIN, &wstun).unwrap();
    let server = Proc::start(&wstun, &["-r", "-s", "0"]);
    let addr = server.line("wstun-compatible server listening on ");
    // wstun clients name their public port.
    let port = common::free_fixed_port();
    let echo = echo_server();
    let spec = format!("-r{port}:{echo}");
    let url = format!("ws://{addr}");
    // Exactly what lightning-rod 0.5.0 spawns: [wstun_bin, -r<pub>:127.0.0.1:<port>, url, -u, uuid].
    let _client = Proc::start(&wstun, &[&spec, &url, "-u", "3f1c9a52-0000-4000-8000-000000000001"]);
    let deadline = std::time::Instant::now() + DEADLINE;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "the wstun listener never came up");
        std::thread::sleep(Duration::from_millis(20));
    }
    echo_through(port);
    // `wstunnel wstun …` is the same command line.
    let out = Command::new(BIN).args(["wstun", "-t", "8080"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("forward mode"));
    let _ = std::fs::remove_dir_all(&dir);
}

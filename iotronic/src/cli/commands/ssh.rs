//! `s4t ssh`, `s4t ssh-proxy` and `s4t ssh-config`: from nothing to a shell on a board.
//!
//! The board's sshd is a service (default `ssh`, port 22, created if missing) exposed on a
//! public port of the cloud (exposed if it is not). We then wait until an SSH server answers
//! through that port (the tunnel is up end to end) and run the system `ssh` against the
//! cloud's host and the public port, or, for `ssh-proxy`, carry stdin/stdout to it.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use super::services::{exposed_on, service_action};
use super::{CallFlags, items, offline_failure, parse_duration};
use crate::cli::Ctx;
use crate::cli::client::{Client, seg};
use crate::cli::error::{Failure, Kind, Result};
use crate::cli::output::{field, safe_line};

/// How long one probe of the public port may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Which service of the board is its sshd.
#[derive(Args, Debug, Clone)]
pub struct Target {
    pub board: String,
    /// The board's service to reach.
    #[arg(long, default_value = "ssh")]
    pub service: String,
    /// sshd's port on the board, when the service has to be created.
    #[arg(long, default_value_t = 22)]
    pub port: u16,
    /// How long to wait for the tunnel to answer, e.g. 30s, 2m.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub wait: u64,
}

#[derive(Args, Debug)]
#[command(after_help = "Examples:
  s4t ssh pi1                         # a shell
  s4t ssh pi1 -l pi -- uname -a       # one command as user pi
  s4t ssh pi1 -i ~/.ssh/lab -o StrictHostKeyChecking=accept-new
  s4t ssh pi1 --print                 # show the ssh command instead of running it
Arguments after -- go to ssh after the destination: ssh options first, then the command.
The host key is remembered under the alias s4t-BOARD-UUID, whatever public port is used.")]
pub struct SshArgs {
    #[command(flatten)]
    target: Target,
    /// Remote user name.
    #[arg(short = 'l', long)]
    user: Option<String>,
    /// Identity (private key) file for ssh.
    #[arg(short = 'i', long)]
    identity: Option<PathBuf>,
    /// An ssh option (repeatable), as ssh -o takes it.
    #[arg(short = 'o', long = "ssh-option", value_name = "OPTION")]
    options: Vec<String>,
    /// Print the ssh command line (with --json: host, port, argv) instead of running it.
    #[arg(long)]
    print: bool,
    /// Passed to ssh after the destination.
    #[arg(last = true, value_name = "SSH_ARGS")]
    args: Vec<String>,
}

#[derive(Args, Debug)]
#[command(after_help = "Examples:
  ssh -o ProxyCommand='s4t ssh-proxy %n' pi@pi1
  scp -o ProxyCommand='s4t ssh-proxy %n' file pi@pi1:/tmp/
  s4t ssh-config >> ~/.ssh/config     # then plain `ssh pi1`, `rsync -a dir pi1:`")]
pub struct SshProxyArgs {
    #[command(flatten)]
    target: Target,
}

#[derive(Args, Debug)]
pub struct SshConfigArgs {
    /// Boards to write entries for (default: every board you can see).
    boards: Vec<String>,
    /// Prefix of the host aliases (e.g. `s4t-` gives `ssh s4t-pi1`).
    #[arg(long, default_value = "")]
    prefix: String,
    /// Remote user name to put in the entries.
    #[arg(short = 'l', long)]
    user: Option<String>,
}

/// Where the board's sshd answers: the cloud's host and the public port.
#[derive(Debug)]
pub struct Endpoint {
    pub board_uuid: String,
    pub board_name: String,
    pub host: String,
    pub port: u16,
}

pub async fn ssh(ctx: &Ctx, a: SshArgs) -> Result<()> {
    let client = ctx.client()?;
    let ep = endpoint(ctx, &client, &a.target, true).await?;
    let mut argv: Vec<String> = vec!["-p".into(), ep.port.to_string()];
    if let Some(u) = &a.user {
        argv.extend(["-l".into(), u.clone()]);
    }
    if let Some(i) = &a.identity {
        argv.extend(["-i".into(), i.display().to_string()]);
    }
    argv.extend(["-o".into(), format!("HostKeyAlias=s4t-{}", ep.board_uuid)]);
    for o in &a.options {
        argv.extend(["-o".into(), o.clone()]);
    }
    argv.push(ep.host.clone());
    argv.extend(a.args.iter().cloned());
    let program = std::env::var("S4T_SSH").unwrap_or_else(|_| "ssh".into());
    if a.print {
        let v = json!({"board": ep.board_name, "board_uuid": ep.board_uuid, "host": ep.host, "port": ep.port,
                       "argv": std::iter::once(program.clone()).chain(argv.iter().cloned()).collect::<Vec<_>>()});
        ctx.out.result(&v, Some(&format!("{}:{}", ep.host, ep.port)), || {
            let line = format!("{program} {}", argv.iter().map(|s| shell_quote(s)).collect::<Vec<_>>().join(" "));
            println!("{}", safe_line(&line));
        });
        return Ok(());
    }
    let err = std::process::Command::new(&program).args(&argv).exec();
    Err(Failure::internal(format!("cannot run {program}: {err}"))
        .with_hint("install the OpenSSH client (openssh-client)"))
}

pub async fn proxy(ctx: &Ctx, a: SshProxyArgs) -> Result<()> {
    let client = ctx.client()?;
    let ep = endpoint(ctx, &client, &a.target, false).await?;
    let stream = TcpStream::connect((ep.host.as_str(), ep.port))
        .await
        .map_err(|e| Failure::new(Kind::Offline, format!("cannot connect to {}:{}: {e}", ep.host, ep.port)))?;
    let _ = stream.set_nodelay(true);
    let (mut from_board, mut to_board) = stream.into_split();
    let up = async {
        let mut stdin = tokio::io::stdin();
        let r = tokio::io::copy(&mut stdin, &mut to_board).await;
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut to_board).await;
        r
    };
    let down = async {
        let mut stdout = tokio::io::stdout();
        let r = tokio::io::copy(&mut from_board, &mut stdout).await;
        let _ = tokio::io::AsyncWriteExt::flush(&mut stdout).await;
        r
    };
    // The session ends when the board side closes; stdin closing only half-closes.
    tokio::pin!(up, down);
    let mut up_done = false;
    loop {
        tokio::select! {
            r = &mut down => {
                return r.map(|_| ()).map_err(|e| Failure::new(Kind::Offline, format!("the tunnel broke: {e}")));
            }
            r = &mut up, if !up_done => {
                up_done = true;
                r.map_err(|e| Failure::internal(format!("reading stdin: {e}")))?;
            }
        }
    }
}

pub async fn config(ctx: &Ctx, a: SshConfigArgs) -> Result<()> {
    let client = ctx.client()?;
    let boards: Vec<String> = if a.boards.is_empty() {
        let v = client.get_all("/v1/boards", "boards").await?;
        items(&v, "boards").iter().map(|b| field(b, "name")).collect()
    } else {
        a.boards.clone()
    };
    let exe = std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_else(|_| "s4t".into());
    let mut text = format!("# Stack4Things boards at {} (written by `s4t ssh-config`)\n", client.base());
    for b in &boards {
        text.push_str(&format!(
            "Host {}{b}\n    ProxyCommand {} ssh-proxy {}\n",
            a.prefix,
            shell_quote(&exe),
            shell_quote(b)
        ));
        if let Some(u) = &a.user {
            text.push_str(&format!("    User {u}\n"));
        }
    }
    ctx.out.result(&json!({"boards": boards, "config": text}), None, || print!("{text}"));
    Ok(())
}

/// Finds or creates the service, exposes it if needed, waits until the tunnel answers.
pub async fn endpoint(ctx: &Ctx, client: &Client, t: &Target, probe_ssh: bool) -> Result<Endpoint> {
    let board = client.get(&format!("/v1/boards/{}", seg(&t.board))).await?;
    let (uuid, name) = (field(&board, "uuid"), field(&board, "name"));
    if field(&board, "status") != "online" {
        let why = Failure::new(Kind::Offline, format!("board {name} is offline"));
        return Err(offline_failure(client, &uuid, why).await);
    }
    ensure_service(client, &t.service, t.port).await?;
    let deadline = Instant::now() + Duration::from_secs(t.wait);
    let quiet_ctx = proxy_safe(ctx, probe_ssh);
    let mut restored = false;
    loop {
        let exposure =
            match exposed_on(client, &uuid).await?.into_iter().find(|e| field(e, "service_name") == t.service) {
                Some(e) => e,
                None => {
                    service_action(&quiet_ctx, client, &uuid, &t.service, "ServiceEnable", &CallFlags::default())
                        .await?
                }
            };
        let host = exposure.get("host").and_then(Value::as_str).map(str::to_owned).unwrap_or_else(|| client.host());
        let port = exposure.get("public_port").and_then(Value::as_u64).and_then(|p| u16::try_from(p).ok()).ok_or_else(
            || Failure::internal(format!("the cloud gave no public port for {} on {name}: {exposure}", t.service)),
        )?;
        let _spin = quiet_ctx.out.progress(format!("waiting for {name}'s {} on {host}:{port}", t.service));
        match wait_answering(&host, port, deadline, probe_ssh).await {
            Ok(()) => return Ok(Endpoint { board_uuid: uuid, board_name: name, host, port }),
            // An exposure from before whose tunnel is gone (e.g. the board restarted): ask the
            // board once to open it again.
            Err(_) if !restored && Instant::now() < deadline => {
                restored = true;
                service_action(&quiet_ctx, client, &uuid, &t.service, "ServiceRestore", &CallFlags::default()).await?;
            }
            Err(why) => {
                return Err(Failure::new(
                    Kind::Timeout,
                    format!("{name}'s {} did not answer on {host}:{port} within {} s: {why}", t.service, t.wait),
                )
                .with_hint(format!(
                    "is sshd running on board {name} (port {})? `s4t service list --board {name}` shows the exposure",
                    t.port
                )));
            }
        }
    }
}

/// `ssh-proxy` talks to ssh over stdout and its stderr is the user's terminal: no spinner.
fn proxy_safe(ctx: &Ctx, interactive: bool) -> Ctx {
    let mut out = ctx.out;
    if !interactive {
        out.progress_tty = false;
    }
    Ctx { global: ctx.global.clone(), out, config_path: ctx.config_path.clone(), config: ctx.config.clone() }
}

/// The service named `name`, created on `port` if it does not exist.
async fn ensure_service(client: &Client, name: &str, port: u16) -> Result<()> {
    let v = client.get("/v1/services").await?;
    if items(&v, "services").iter().any(|s| field(s, "name") == name) {
        return Ok(());
    }
    match client.post("/v1/services", &json!({"name": name, "port": port, "protocol": "TCP"})).await {
        Ok(_) => Ok(()),
        // Created meanwhile by someone else.
        Err(f) if f.kind == Kind::Conflict => Ok(()),
        Err(f) => Err(f),
    }
}

/// Waits until `host:port` accepts a connection and, for ssh, sends an SSH banner (so the
/// tunnel reaches a running sshd, not only the cloud's listener).
async fn wait_answering(host: &str, port: u16, deadline: Instant, ssh: bool) -> std::result::Result<(), String> {
    loop {
        let last = match probe(host, port, ssh).await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            return Err(last);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn probe(host: &str, port: u16, ssh: bool) -> std::result::Result<(), String> {
    let connect = tokio::time::timeout(PROBE_TIMEOUT, TcpStream::connect((host, port)));
    let mut s = connect.await.map_err(|_| "connect timed out".to_string())?.map_err(|e| e.to_string())?;
    if !ssh {
        return Ok(());
    }
    let mut buf = [0u8; 64];
    let mut got = Vec::new();
    while got.len() < 4 {
        match tokio::time::timeout(PROBE_TIMEOUT, s.read(&mut buf)).await {
            Ok(Ok(0)) => return Err("the tunnel closed the connection (no sshd answering on the board?)".into()),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("no SSH banner within 5 s".into()),
        }
    }
    if got.starts_with(b"SSH-") { Ok(()) } else { Err("the service answered, but not with an SSH banner".into()) }
}

/// Quotes a word for a POSIX shell when needed.
fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./=:@%+,".contains(&b)) {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_quoted_for_the_shell() {
        assert_eq!(shell_quote("uname"), "uname");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[tokio::test]
    async fn the_probe_wants_an_ssh_banner() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let (mut a, _) = l.accept().await.unwrap();
            a.write_all(b"SSH-2.0-test\r\n").await.unwrap();
            let (mut b, _) = l.accept().await.unwrap();
            b.write_all(b"HTTP/1.1 400\r\n").await.unwrap();
            let (c, _) = l.accept().await.unwrap();
            drop(c);
        });
        assert_eq!(probe("127.0.0.1", port, true).await, Ok(()));
        assert!(probe("127.0.0.1", port, true).await.unwrap_err().contains("not with an SSH banner"));
        assert!(probe("127.0.0.1", port, true).await.unwrap_err().contains("closed"));
    }
}

//! systemd's service notification protocol (`sd_notify`), for `Type=notify` units: one
//! datagram per message to the socket named by `$NOTIFY_SOCKET` (a path, or `@name` for an
//! abstract socket). Outside systemd (no `$NOTIFY_SOCKET`) every call does nothing.
//!
//! A service calls [`ready`] once it can answer (model loaded, socket bound), [`stopping`]
//! when SIGTERM arrives, and [`spawn_watchdog`] when the unit sets `WatchdogSec=`: a thread
//! sends `WATCHDOG=1` at half the interval systemd asks for (`$WATCHDOG_USEC`) while the
//! service's own liveness check passes, so a hung service is restarted. An HTTP service
//! whose `GET /health` turns 200 once loaded calls [`serve_notifications`] instead, which
//! does both from `/health`.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::Duration;

/// Where notifications go.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    target: Target,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Target {
    Path(PathBuf),
    Abstract(Vec<u8>),
}

impl Notifier {
    /// The notifier `$NOTIFY_SOCKET` names; `None` when it is unset or empty (not started
    /// by systemd as a `Type=notify` service).
    pub fn from_env() -> io::Result<Option<Notifier>> {
        match std::env::var_os("NOTIFY_SOCKET") {
            Some(v) if !v.is_empty() => Self::to(&v.to_string_lossy()).map(Some),
            _ => Ok(None),
        }
    }

    /// A notifier for a socket address as `$NOTIFY_SOCKET` spells it: a path, or `@name`.
    pub fn to(addr: &str) -> io::Result<Notifier> {
        let target = match addr.strip_prefix('@') {
            Some(name) => Target::Abstract(name.as_bytes().to_vec()),
            None if addr.starts_with('/') => Target::Path(PathBuf::from(addr)),
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("NOTIFY_SOCKET `{addr}`: neither an absolute path nor @name"),
                ));
            }
        };
        Ok(Notifier {
            socket: UnixDatagram::unbound()?,
            target,
        })
    }

    /// Sends one message (newline-separated `KEY=value` assignments).
    pub fn send(&self, state: &str) -> io::Result<()> {
        let sent = match &self.target {
            Target::Path(p) => self.socket.send_to(state.as_bytes(), p)?,
            Target::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                self.socket.send_to_addr(state.as_bytes(), &addr)?
            }
        };
        if sent != state.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "notification datagram truncated",
            ));
        }
        Ok(())
    }
}

/// The watchdog interval systemd asks for: `$WATCHDOG_USEC` microseconds, when
/// `$WATCHDOG_PID` is unset or names this process.
pub fn watchdog_interval() -> Option<Duration> {
    parse_watchdog(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

fn parse_watchdog(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    if let Some(pid) = pid.filter(|p| !p.is_empty())
        && pid.trim().parse::<u32>().ok() != Some(me)
    {
        return None;
    }
    let usec: u64 = usec?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Sends `state` to `$NOTIFY_SOCKET` if there is one; a failure is logged, not fatal
/// (systemd then times the start out and says why).
fn notify(state: &str) {
    match Notifier::from_env().and_then(|n| n.map(|n| n.send(state)).transpose()) {
        Ok(_) => {}
        Err(e) => tracing::warn!(state, error = %e, "sd_notify failed"),
    }
}

/// `READY=1` with a status line: the service is up.
pub fn ready(status: &str) {
    notify(&format!("READY=1\nSTATUS={}", one_line(status)));
}

/// `STOPPING=1`: the service is shutting down.
pub fn stopping() {
    notify("STOPPING=1");
}

/// `STATUS=...`: a line `systemctl status` shows.
pub fn status(status: &str) {
    notify(&format!("STATUS={}", one_line(status)));
}

fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// When the unit sets `WatchdogSec=` (and `$NOTIFY_SOCKET` is set): a thread that sends
/// `WATCHDOG=1` every half interval while `alive()` holds, and stops sending when it does
/// not (systemd then restarts the service). `None` without a watchdog.
pub fn spawn_watchdog<F>(alive: F) -> Option<std::thread::JoinHandle<()>>
where
    F: Fn() -> bool + Send + 'static,
{
    let interval = watchdog_interval()?;
    let notifier = match Notifier::from_env() {
        Ok(Some(n)) => n,
        Ok(None) => return None,
        Err(e) => {
            tracing::warn!(error = %e, "sd_notify watchdog: NOTIFY_SOCKET unusable");
            return None;
        }
    };
    std::thread::Builder::new()
        .name("sd-watchdog".into())
        .spawn(move || {
            loop {
                if !alive() {
                    tracing::error!("liveness check failed: watchdog pings stop");
                    return;
                }
                if let Err(e) = notifier.send("WATCHDOG=1") {
                    tracing::warn!(error = %e, "sd_notify WATCHDOG=1 failed");
                }
                std::thread::sleep(interval / 2);
            }
        })
        .ok()
}

/// The HTTP status of `GET path` on `addr` (HTTP/1.0, 2 s timeouts); an unspecified
/// address (`0.0.0.0`, `::`) is reached on loopback. `None` when nothing answers.
pub fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
        });
    }
    let timeout = Duration::from_secs(2);
    let mut stream = TcpStream::connect_timeout(&addr, timeout).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    stream.set_write_timeout(Some(timeout)).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).ok()?;
    // "HTTP/1.x NNN"
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// For an HTTP service bound at `addr` whose `GET /health` is 200 once it can answer (as
/// `jetvlm serve`): under systemd, a thread sends `READY=1` when `/health` first answers 200,
/// and the watchdog pings while `/health` answers at all. Does nothing outside systemd.
pub fn serve_notifications(addr: SocketAddr) {
    if std::env::var_os("NOTIFY_SOCKET").is_none_or(|v| v.is_empty()) {
        return;
    }
    spawn_watchdog(move || http_status(addr, "/health").is_some());
    let spawned = std::thread::Builder::new()
        .name("sd-ready".into())
        .spawn(move || {
            loop {
                match http_status(addr, "/health") {
                    Some(200) => {
                        ready(&format!("serving on http://{addr}"));
                        return;
                    }
                    // Loading (503) or not answering yet: ask again.
                    _ => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "sd_notify: cannot start the readiness thread");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_reach_a_path_socket_and_an_abstract_one() {
        let dir = std::env::temp_dir().join(format!("jetvlm-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let server = UnixDatagram::bind(&path).unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let n = Notifier::to(path.to_str().unwrap()).unwrap();
        n.send("READY=1\nSTATUS=up").unwrap();
        let mut buf = [0u8; 256];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=up");
        std::fs::remove_dir_all(&dir).unwrap();

        use std::os::linux::net::SocketAddrExt;
        let name = format!("jetvlm-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = UnixDatagram::bind_addr(&addr).unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        Notifier::to(&format!("@{name}"))
            .unwrap()
            .send("WATCHDOG=1")
            .unwrap();
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"WATCHDOG=1");
    }

    #[test]
    fn a_relative_socket_path_is_refused() {
        assert!(Notifier::to("run/notify").is_err());
    }

    #[test]
    fn the_watchdog_interval_is_for_this_process_only() {
        assert_eq!(
            parse_watchdog(Some("30000000"), None, 7),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_watchdog(Some("30000000"), Some("7"), 7),
            Some(Duration::from_secs(30))
        );
        assert_eq!(parse_watchdog(Some("30000000"), Some("8"), 7), None);
        assert_eq!(parse_watchdog(Some("0"), None, 7), None);
        assert_eq!(parse_watchdog(Some("soon"), None, 7), None);
        assert_eq!(parse_watchdog(None, None, 7), None);
    }
}

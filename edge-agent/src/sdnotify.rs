//! systemd's service notification protocol (`sd_notify(3)`), spoken directly: one datagram of
//! `KEY=value` lines to the Unix socket named by `NOTIFY_SOCKET`. With `Type=notify` the unit
//! starts once the agent says `READY=1`; with `WatchdogSec=` systemd restarts the agent when
//! `WATCHDOG=1` stops coming. The agent pings only after its queue writer has answered, so a
//! stuck writer (a hung disk, a wedged runtime) is restarted, not just a dead process.
//!
//! Without `NOTIFY_SOCKET` (not under systemd, or `Type=simple`) nothing is sent.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Where to send notifications, read from the environment systemd sets.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    target: Target,
    watchdog: Option<Duration>,
}

#[derive(Debug)]
enum Target {
    Path(std::path::PathBuf),
    #[cfg(target_os = "linux")]
    Abstract(std::os::unix::net::SocketAddr),
}

impl Notifier {
    /// The notifier systemd asked for, if any. A `NOTIFY_SOCKET` that cannot be used is
    /// logged and ignored: the agent's work does not depend on it.
    pub fn from_env() -> Option<Self> {
        let name = std::env::var_os("NOTIFY_SOCKET")?;
        let watchdog = watchdog_interval(
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
            std::process::id(),
        );
        match Self::open(&name, watchdog) {
            Ok(n) => Some(n),
            Err(e) => {
                tracing::warn!(socket = ?name, error = %e, "NOTIFY_SOCKET is set but unusable; not notifying systemd");
                None
            }
        }
    }

    pub(crate) fn open(
        name: &std::ffi::OsStr,
        watchdog: Option<Duration>,
    ) -> std::io::Result<Self> {
        use std::os::unix::ffi::OsStrExt;
        let bytes = name.as_bytes();
        let target = match bytes.first() {
            Some(b'/') => Target::Path(name.into()),
            #[cfg(target_os = "linux")]
            Some(b'@') => {
                use std::os::linux::net::SocketAddrExt;
                Target::Abstract(std::os::unix::net::SocketAddr::from_abstract_name(
                    &bytes[1..],
                )?)
            }
            _ => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "not an absolute path or an abstract socket name",
                ));
            }
        };
        Ok(Self {
            socket: UnixDatagram::unbound()?,
            target,
            watchdog,
        })
    }

    /// How often to ping the watchdog (half of `WatchdogSec=`), if systemd watches this process.
    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Sends `state` (newline-separated `KEY=value` lines). Failures are logged, not returned.
    pub fn notify(&self, state: &str) {
        let sent = match &self.target {
            Target::Path(p) => self.socket.send_to(state.as_bytes(), p),
            #[cfg(target_os = "linux")]
            Target::Abstract(a) => self.socket.send_to_addr(state.as_bytes(), a),
        };
        if let Err(e) = sent {
            tracing::warn!(error = %e, "could not notify systemd");
        }
    }
}

/// Half of `WATCHDOG_USEC`, the interval sd_watchdog_enabled(3) recommends, when the watchdog
/// is meant for `pid` (no `WATCHDOG_PID`, or this one).
fn watchdog_interval(usec: Option<&str>, for_pid: Option<&str>, pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    if let Some(p) = for_pid
        && p.trim().parse::<u32>().ok() != Some(pid)
    {
        return None;
    }
    // At least 1 ms apart: a zero period would make no sense (and the timer refuses it).
    Some(Duration::from_micros((usec / 2).max(1000)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_interval_is_half_and_only_for_this_process() {
        assert_eq!(
            watchdog_interval(Some("60000000"), None, 7),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            watchdog_interval(Some("60000000"), Some("7"), 7),
            Some(Duration::from_secs(30))
        );
        assert_eq!(watchdog_interval(Some("60000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval(Some("0"), None, 7), None);
        assert_eq!(
            watchdog_interval(Some("1"), None, 7),
            Some(Duration::from_millis(1))
        );
        assert_eq!(watchdog_interval(Some("soon"), None, 7), None);
        assert_eq!(watchdog_interval(None, None, 7), None);
    }

    #[test]
    fn sends_to_a_path_socket() {
        let dir = std::env::temp_dir().join(format!("plantlink-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let rx = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::open(path.as_os_str(), None).unwrap();
        n.notify("READY=1\nSTATUS=ok");
        let mut buf = [0u8; 64];
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=ok");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_a_relative_name() {
        let e = Notifier::open(std::ffi::OsStr::new("notify.sock"), None).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
    }
}

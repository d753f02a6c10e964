//! The systemd readiness protocol (`sd_notify`), so that a unit can be `Type=notify` and
//! an upgrade can name the new process as the service's main process.

use std::io;
use std::os::unix::net::UnixDatagram;

/// Tells systemd that this process serves and is the service's main process. Does
/// nothing outside systemd (no `NOTIFY_SOCKET`).
pub fn notify_ready() -> io::Result<()> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(());
    };
    let message = format!("READY=1\nMAINPID={}\n", std::process::id());
    let socket = UnixDatagram::unbound()?;
    let bytes = path.as_encoded_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        socket.send_to_addr(message.as_bytes(), &addr)?;
    } else {
        socket.send_to(message.as_bytes(), &path)?;
    }
    Ok(())
}

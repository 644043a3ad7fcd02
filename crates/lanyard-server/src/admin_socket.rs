//! The admin Unix sockets: the main one (`socket_path`) and the named ones of
//! `[[admin_socket]]`. Each is bound in a directory only the server's user can enter, with the
//! socket itself at 0600, so only that user (or root) can connect; a caller is an admin there.
//! Every connection carries [`AdminConnectInfo`]: the kernel's credentials for the peer and, on
//! a named socket, which one, so that [`crate::caller::Caller`] can name the program behind it.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::{Stream, StreamExt as _, wrappers::UnixListenerStream};
use tonic::transport::server::Connected;

use crate::config::AdminSocketConfig;
use crate::keymanager;
use crate::server::ServerError;

/// Who is at the other end of an admin socket connection, as the kernel and the socket say.
#[derive(Debug, Clone)]
pub struct AdminConnectInfo {
    /// The peer's uid, from `SO_PEERCRED`.
    pub uid: Option<u32>,
    /// The named socket the connection came through; `None` for `socket_path`.
    pub socket: Option<Arc<AdminSocketConfig>>,
}

/// A connection accepted on an admin socket.
#[derive(Debug)]
pub struct AdminStream {
    stream: UnixStream,
    info: AdminConnectInfo,
}

impl Connected for AdminStream {
    type ConnectInfo = AdminConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for AdminStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for AdminStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// The connections accepted on `listener`, each labelled with `socket` (`None` for the main
/// socket) and its peer's uid.
pub fn incoming(
    listener: UnixListener,
    socket: Option<Arc<AdminSocketConfig>>,
) -> impl Stream<Item = io::Result<AdminStream>> {
    UnixListenerStream::new(listener).map(move |accepted| {
        let stream = accepted?;
        let uid = stream.peer_cred().ok().map(|cred| cred.uid());
        Ok(AdminStream {
            stream,
            info: AdminConnectInfo {
                uid,
                socket: socket.clone(),
            },
        })
    })
}

/// Binds an admin socket in a directory only the owner can enter, replacing a stale socket.
pub fn bind(path: &Path) -> Result<UnixListener, ServerError> {
    let bind_error = |error| ServerError::Bind {
        what: path.display().to_string(),
        error,
    };
    if let Some(dir) = path.parent() {
        keymanager::create_private_dir(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(bind_error(e)),
    }
    let listener = UnixListener::bind(path).map_err(bind_error)?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(bind_error)?;
    }
    Ok(listener)
}

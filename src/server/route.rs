//! Data connections find their session by the token it gave its client.

use std::net::SocketAddr;

use tokio::net::TcpStream;
use tracing::warn;

use crate::server::session::{SessionError, Shared};
use crate::wire::codec::read_frame;
use crate::wire::{DataMessage, ProtocolError, WireMessage};

/// Reads a data connection's `DataHello` and hands the stream to the session it names.
/// Unbuffered: the file data that follows the hello belongs to the session's receiver.
pub async fn route_data(shared: &Shared, mut stream: TcpStream, addr: SocketAddr) {
    let hello = tokio::time::timeout(shared.handshake, read_frame(&mut stream)).await;
    let hello = match hello {
        Err(_) => Err(SessionError::NoHello(shared.handshake)),
        Ok(Ok(Some(body))) => DataMessage::decode(body).map_err(SessionError::from),
        Ok(Ok(None)) => Err(ProtocolError::Closed.into()),
        Ok(Err(e)) => Err(e.into()),
    };
    let (token, request) = match hello {
        Ok(DataMessage::DataHello { token, request }) => (token, request),
        Ok(m) => {
            let e = m.unexpected("data-hello");
            return warn!("data connection from {addr} closed: {e}");
        }
        Err(e) => return warn!("data connection from {addr} closed: {e}"),
    };
    let tx = shared.waiting.lock().unwrap().get(&token).cloned();
    match tx {
        Some(tx) => {
            let _ = tx.send((request, stream)).await;
        }
        None => warn!("data connection from {addr} closed: unknown session token"),
    }
}

/// Removes a session's token when the session ends, however it ends.
pub struct Registration<'a> {
    pub shared: &'a Shared,
    pub token: u64,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.shared.waiting.lock().unwrap().remove(&self.token);
    }
}

//! A connection that speaks one kind of message over any byte stream: TCP today, TLS tomorrow.
//!
//! [`Connection`] is the async one (the control path, on the runtime); [`BlockingConnection`]
//! its twin for the data path, whose transfers run on threads of their own with std I/O. Both
//! buffer their writes: call `flush` when the peer must see what was sent.

use std::io::{Read, Write};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufStream};

use crate::core::manifest::Entry;
use crate::wire::codec::{ProtocolError, Writer, frame_len, read_frame_blocking};
use crate::wire::control::ControlMessage;
use crate::wire::data::DataMessage;
use crate::wire::tag;

/// A message type that a connection carries.
pub trait WireMessage: Sized {
    fn encode(&self, out: &mut Vec<u8>);
    fn decode(body: Bytes) -> Result<Self, ProtocolError>;
    fn tag(&self) -> u8;

    fn name(&self) -> &'static str {
        tag::name(self.tag())
    }

    /// An `Unexpected` error for this message in a place that wanted `expected`.
    fn unexpected(&self, expected: &'static str) -> ProtocolError {
        ProtocolError::Unexpected {
            got: self.name(),
            expected,
        }
    }
}

/// Numbers connections, for the trace of what each one carried.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Records one message at `trace` level, target `server_sync::wire`: the conversation of every
/// connection can be followed (and `tests/grammar.rs` checks it against the grammar).
fn trace(conn: u64, dir: &'static str, tag: u8) {
    tracing::trace!(target: "server_sync::wire", conn, dir, tag, "{dir} {}", tag::name(tag));
}

impl WireMessage for ControlMessage {
    fn encode(&self, out: &mut Vec<u8>) {
        ControlMessage::encode(self, out)
    }
    fn tag(&self) -> u8 {
        ControlMessage::tag(self)
    }
    fn decode(body: Bytes) -> Result<Self, ProtocolError> {
        ControlMessage::decode(&body)
    }
}

impl WireMessage for DataMessage {
    fn encode(&self, out: &mut Vec<u8>) {
        DataMessage::encode(self, out)
    }
    fn decode(body: Bytes) -> Result<Self, ProtocolError> {
        DataMessage::decode(body)
    }
    fn tag(&self) -> u8 {
        DataMessage::tag(self)
    }
}

/// The control connection of a session, over any async stream.
pub type ControlConnection<S> = Connection<S, ControlMessage>;

/// Messages of type `M` over an async stream `S`.
pub struct Connection<S, M = ControlMessage> {
    id: u64,
    io: BufStream<S>,
    /// Reused for every frame sent.
    out: Vec<u8>,
    /// What has arrived of the next frames: kept here between calls, so that a `recv`
    /// dropped half-way (in a `select!`) loses nothing.
    incoming: BytesMut,
    _messages: PhantomData<fn() -> M>,
}

impl<S: AsyncRead + AsyncWrite + Unpin, M: WireMessage> Connection<S, M> {
    pub fn new(stream: S) -> Self {
        Connection {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            io: BufStream::new(stream),
            out: Vec::new(),
            incoming: BytesMut::new(),
            _messages: PhantomData,
        }
    }

    pub fn get_ref(&self) -> &S {
        self.io.get_ref()
    }

    /// The stream back; anything read ahead into the buffer is dropped.
    pub fn into_inner(self) -> S {
        self.io.into_inner()
    }

    /// Queues a message; [`Connection::flush`] sends what is queued.
    pub async fn send(&mut self, msg: &M) -> Result<(), ProtocolError> {
        trace(self.id, "send", msg.tag());
        self.out.clear();
        msg.encode(&mut self.out);
        self.io.write_all(&self.out).await?;
        Ok(())
    }

    pub async fn flush(&mut self) -> Result<(), ProtocolError> {
        self.io.flush().await?;
        Ok(())
    }

    /// Sends a message and flushes.
    pub async fn send_now(&mut self, msg: &M) -> Result<(), ProtocolError> {
        self.send(msg).await?;
        self.flush().await
    }

    /// The next message; `Ok(None)` when the peer closed the connection between messages.
    /// Cancel-safe: a call dropped before it returns leaves the bytes read for the next one.
    pub async fn recv(&mut self) -> Result<Option<M>, ProtocolError> {
        loop {
            if let Some(body) = self.next_frame()? {
                let m = M::decode(body)?;
                trace(self.id, "recv", m.tag());
                return Ok(Some(m));
            }
            let n = self
                .io
                .read_buf(&mut self.incoming)
                .await
                .map_err(crate::wire::codec::truncated_or_io)?;
            if n == 0 {
                return match self.incoming.is_empty() {
                    true => Ok(None),
                    false => Err(ProtocolError::Truncated),
                };
            }
        }
    }

    /// The first whole frame's body in `incoming`, if it has arrived.
    fn next_frame(&mut self) -> Result<Option<Bytes>, ProtocolError> {
        let Some(prefix) = self.incoming.first_chunk::<4>() else {
            return Ok(None);
        };
        let len = frame_len(*prefix)?;
        if self.incoming.len() < 4 + len {
            self.incoming.reserve(4 + len - self.incoming.len());
            return Ok(None);
        }
        self.incoming.advance(4);
        Ok(Some(self.incoming.split_to(len).freeze()))
    }

    /// The next message, which is due: the end of the stream is an error, and so is silence
    /// longer than `idle`.
    pub async fn recv_within(&mut self, idle: Duration) -> Result<M, ProtocolError> {
        match tokio::time::timeout(idle, self.recv()).await {
            Err(_) => Err(ProtocolError::Idle),
            Ok(Ok(None)) => Err(ProtocolError::Closed),
            Ok(r) => r.map(|m| m.expect("Some")),
        }
    }

    /// Shuts the sending side down after flushing (TCP FIN, TLS close_notify).
    pub async fn shutdown(&mut self) -> Result<(), ProtocolError> {
        self.io.shutdown().await?;
        Ok(())
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S, ControlMessage> {
    /// Queues a `FileList` frame straight from borrowed entries, sparing the clone of a
    /// whole batch that building a `ControlMessage::FileList` would need.
    pub async fn send_file_list(&mut self, entries: &[Entry]) -> Result<(), ProtocolError> {
        trace(self.id, "send", tag::FILE_LIST);
        self.out.clear();
        let (mut w, start) = Writer::begin_frame(&mut self.out, tag::FILE_LIST);
        w.entries(entries);
        w.end_frame(start);
        self.io.write_all(&self.out).await?;
        Ok(())
    }
}

/// Messages of type `M` over a blocking stream `S` (wrap it in `BufReader` or `BufWriter`).
pub struct BlockingConnection<S, M = DataMessage> {
    id: u64,
    stream: S,
    out: Vec<u8>,
    _messages: PhantomData<fn() -> M>,
}

impl<S, M: WireMessage> BlockingConnection<S, M> {
    pub fn new(stream: S) -> Self {
        BlockingConnection {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            stream,
            out: Vec::new(),
            _messages: PhantomData,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    pub fn into_inner(self) -> S {
        self.stream
    }
}

impl<S: Read, M: WireMessage> BlockingConnection<S, M> {
    /// The next message; `Ok(None)` when the peer closed the connection between messages. A
    /// read timeout set on the socket surfaces as [`ProtocolError::Idle`].
    pub fn recv(&mut self) -> Result<Option<M>, ProtocolError> {
        match read_frame_blocking(&mut self.stream)? {
            None => Ok(None),
            Some(body) => {
                let m = M::decode(body)?;
                trace(self.id, "recv", m.tag());
                Ok(Some(m))
            }
        }
    }
}

impl<S: Write, M: WireMessage> BlockingConnection<S, M> {
    pub fn send(&mut self, msg: &M) -> Result<(), ProtocolError> {
        trace(self.id, "send", msg.tag());
        self.out.clear();
        msg.encode(&mut self.out);
        self.stream.write_all(&self.out)?;
        Ok(())
    }

    pub fn flush(&mut self) -> Result<(), ProtocolError> {
        self.stream.flush()?;
        Ok(())
    }
}

impl<S: Write> BlockingConnection<S, DataMessage> {
    /// Sends a `Chunk` straight from `data`, sparing the copy into a message on the hot path.
    pub fn send_chunk(&mut self, data: &[u8]) -> Result<(), ProtocolError> {
        trace(self.id, "send", tag::CHUNK);
        self.stream
            .write_all(&DataMessage::chunk_header(data.len()))?;
        self.stream.write_all(data)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::hash::HashAlgorithm;
    use crate::core::manifest::{Kind, Meta, RelPath};

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    #[tokio::test]
    async fn async_connection_round_trips_and_reports_ends() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let mut a: ControlConnection<_> = Connection::new(a);
        let mut b: ControlConnection<_> = Connection::new(b);
        let entries = vec![Entry {
            path: p("x"),
            kind: Kind::Dir,
            meta: Meta::default(),
        }];
        a.send(&ControlMessage::Ping).await.unwrap();
        a.send_file_list(&entries).await.unwrap();
        a.send_now(&ControlMessage::FileListEnd).await.unwrap();
        assert_eq!(b.recv().await.unwrap(), Some(ControlMessage::Ping));
        assert_eq!(
            b.recv().await.unwrap(),
            Some(ControlMessage::FileList(entries))
        );
        assert_eq!(
            b.recv_within(Duration::from_secs(5)).await.unwrap(),
            ControlMessage::FileListEnd
        );
        let silent = b.recv_within(Duration::from_millis(20)).await;
        assert!(matches!(silent, Err(ProtocolError::Idle)), "{silent:?}");
        a.shutdown().await.unwrap();
        drop(a);
        assert!(matches!(b.recv().await, Ok(None)));
    }

    #[test]
    fn blocking_data_connection_passes_chunks_without_copying() {
        let mut wire = Vec::new();
        {
            let mut tx: BlockingConnection<_> = BlockingConnection::new(&mut wire);
            tx.send(&DataMessage::FileBegin { path: p("f") }).unwrap();
            tx.send_chunk(b"abc").unwrap();
            tx.send(&DataMessage::Hole { len: 1 << 40 }).unwrap();
            tx.send(&DataMessage::FileEnd {
                hash: Some(HashAlgorithm::Blake3.of(b"abc")),
            })
            .unwrap();
        }
        let mut rx: BlockingConnection<_> = BlockingConnection::new(&wire[..]);
        assert_eq!(
            rx.recv().unwrap(),
            Some(DataMessage::FileBegin { path: p("f") })
        );
        assert_eq!(
            rx.recv().unwrap(),
            Some(DataMessage::Chunk(Bytes::from_static(b"abc")))
        );
        assert_eq!(rx.recv().unwrap(), Some(DataMessage::Hole { len: 1 << 40 }));
        assert!(matches!(
            rx.recv().unwrap(),
            Some(DataMessage::FileEnd { hash: Some(_) })
        ));
        assert_eq!(rx.recv().unwrap(), None);
    }
}

//! Messages of a data connection: which session and request it serves, then the requested
//! files one after the other. See the grammar in [`crate::wire`].

use bytes::Bytes;

use crate::core::hash::ContentHash;
use crate::core::manifest::RelPath;
use crate::wire::WireMessage;
use crate::wire::codec::{MAX_TEXT, ProtocolError, Reader, Writer};
use crate::wire::control::MAGIC;
use crate::wire::tag;

/// File data per `Chunk` frame: memory per transfer stays bounded whatever the file size.
pub const CHUNK_SIZE: usize = 256 << 10;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataMessage {
    /// First on every data connection: the session's token and the request it answers.
    DataHello {
        token: u64,
        request: u32,
    },
    FileBegin {
        path: RelPath,
    },
    /// The next bytes of the file. A slice of the frame it arrived in: never copied.
    Chunk(Bytes),
    /// The next `len` bytes of the file are a hole (zeros the sender's file system does not
    /// store): the receiver leaves them unwritten, so a sparse file stays sparse.
    Hole {
        len: u64,
    },
    /// The end of a file's data; `hash` is the hash of what was sent when the file was
    /// announced unhashed, else `None` (the server checks against the announced hash).
    FileEnd {
        hash: Option<ContentHash>,
    },
    /// The sender could not send the file (it vanished, changed, could not be read).
    FileAbort {
        reason: String,
    },
}

impl DataMessage {
    pub fn tag(&self) -> u8 {
        match self {
            DataMessage::DataHello { .. } => tag::DATA_HELLO,
            DataMessage::FileBegin { .. } => tag::FILE_BEGIN,
            DataMessage::Chunk(_) => tag::CHUNK,
            DataMessage::Hole { .. } => tag::HOLE,
            DataMessage::FileEnd { .. } => tag::FILE_END,
            DataMessage::FileAbort { .. } => tag::FILE_ABORT,
        }
    }

    /// Appends the whole frame (length prefix included) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let (mut w, start) = Writer::begin_frame(out, self.tag());
        match self {
            DataMessage::DataHello { token, request } => {
                w.raw(&MAGIC);
                w.u64(*token);
                w.u32(*request);
            }
            DataMessage::FileBegin { path } => w.str(path.as_str()),
            DataMessage::Chunk(data) => w.bytes(data),
            DataMessage::Hole { len } => w.u64(*len),
            DataMessage::FileEnd { hash } => {
                if let Some(h) = hash {
                    w.hash(h);
                }
            }
            DataMessage::FileAbort { reason } => w.str(reason),
        }
        w.end_frame(start);
    }

    /// The header of a `Chunk` frame carrying `len` bytes, to be followed by the bytes
    /// themselves: how file data is written without first copying it into a message.
    pub fn chunk_header(len: usize) -> [u8; 9] {
        debug_assert!(len <= CHUNK_SIZE);
        let mut head = [0u8; 9];
        head[..4].copy_from_slice(&(len as u32 + 5).to_be_bytes());
        head[4] = tag::CHUNK;
        head[5..].copy_from_slice(&(len as u32).to_be_bytes());
        head
    }

    /// Decodes one frame's body (tag first). A `Chunk` keeps a slice of `body`, no copy.
    pub fn decode(body: Bytes) -> Result<DataMessage, ProtocolError> {
        let (&t, rest) = body.split_first().ok_or(ProtocolError::Empty)?;
        let mut r = Reader { buf: rest };
        let msg = match t {
            tag::DATA_HELLO => {
                r.magic(&MAGIC)?;
                DataMessage::DataHello {
                    token: r.u64()?,
                    request: r.u32()?,
                }
            }
            tag::FILE_BEGIN => DataMessage::FileBegin { path: r.path()? },
            tag::CHUNK => {
                let n = r.bytes()?.len();
                r.finish("chunk")?;
                // Header: tag (1) and length (4).
                return Ok(DataMessage::Chunk(body.slice(5..5 + n)));
            }
            tag::HOLE => DataMessage::Hole { len: r.size()? },
            tag::FILE_END => DataMessage::FileEnd {
                hash: match r.buf.len() {
                    0 => None,
                    _ => Some(r.hash()?),
                },
            },
            tag::FILE_ABORT => DataMessage::FileAbort {
                reason: r.str_max("abort reason", MAX_TEXT)?,
            },
            t if tag::is_control(t) => return Err(ProtocolError::WrongConnection(tag::name(t))),
            t => return Err(ProtocolError::UnknownTag(t)),
        };
        r.finish(msg.name())?;
        Ok(msg)
    }
}

//! Tests of the wire layer's codecs: every message round-trips, hostile frames are refused,
//! peer input is bounded, framing survives truncation and refuses oversized frames.

use bytes::Bytes;

use crate::core::hash::HashAlgorithm;
use crate::core::identity::{ClientId, FileId};
use crate::core::manifest::{Entry, Kind, MAX_PATH_LEN, Meta, RelPath};
use crate::wire::codec::{MAX_FRAME, MAX_TEXT, ProtocolError, read_frame, read_frame_blocking};
use crate::wire::control::{
    Capabilities, ControlMessage, Failure, MAX_FAILURES_NAMED, Summary, VERSION,
};
use crate::wire::data::DataMessage;
use crate::wire::list_file::ListId;
use crate::wire::{BlockingConnection, Connection, ControlConnection};

fn p(s: &str) -> RelPath {
    RelPath::new(s).unwrap()
}

/// The frame's length prefix is right and the body decodes to the same message.
fn round_trip_control(m: ControlMessage) {
    let mut buf = Vec::new();
    m.encode(&mut buf);
    assert_eq!(
        u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize,
        buf.len() - 4
    );
    assert_eq!(ControlMessage::decode(&buf[4..]).unwrap(), m);
}

fn round_trip_data(m: DataMessage) {
    let mut buf = Vec::new();
    m.encode(&mut buf);
    assert_eq!(
        u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize,
        buf.len() - 4
    );
    assert_eq!(
        DataMessage::decode(Bytes::from(buf[4..].to_vec())).unwrap(),
        m
    );
}

#[test]
fn every_message_round_trips() {
    let meta = Meta {
        mode: 0o754,
        mtime_secs: -5,
        mtime_nanos: 999_999_999,
    };
    let entries = vec![
        Entry {
            path: p("d"),
            kind: Kind::Dir,
            meta,
        },
        Entry {
            path: p("d/ü x.txt"),
            kind: Kind::File {
                size: 12,
                hash: HashAlgorithm::Blake3.of(b"hello world\n"),
            },
            meta,
        },
        Entry {
            path: p("l"),
            kind: Kind::Symlink {
                target: "../x".into(),
            },
            meta,
        },
        Entry {
            path: p("u"),
            kind: Kind::Unreadable {
                reason: "permission denied".into(),
            },
            meta,
        },
        Entry {
            path: p("w"),
            kind: Kind::Unhashed { size: 1 << 40 },
            meta,
        },
        Entry {
            path: p("v"),
            kind: Kind::Special {
                what: "FIFO".into(),
            },
            meta,
        },
    ];
    for m in [
        ControlMessage::Hello {
            version: VERSION,
            transfers: 2,
            hashes: vec![HashAlgorithm::Blake3, HashAlgorithm::Md5],
            capabilities: Capabilities(5),
            machine: "m".into(),
            root_chain: vec![FileId { dev: 1, ino: 2 }],
            client: ClientId(7),
            take_over: true,
        },
        ControlMessage::Welcome {
            version: VERSION,
            data_port: 7100,
            token: u64::MAX,
            hash: HashAlgorithm::Md5,
            capabilities: Capabilities::NONE,
        },
        ControlMessage::FileList(entries),
        ControlMessage::FileList(vec![]),
        ControlMessage::FileListEnd,
        ControlMessage::RootMeta(meta),
        ControlMessage::FileRequest {
            id: 3,
            paths: vec![p("a"), p("b/c")],
        },
        ControlMessage::SyncDone(Summary {
            requested: 1,
            received: 2,
            copied: 3,
            renamed: 4,
            deleted: 5,
            bytes: 6,
            failed: vec![Failure::new("a", "blake3 mismatch")],
            failed_total: 7,
        }),
        ControlMessage::Error("nope".into()),
        ControlMessage::HashRequest(vec![p("big"), p("d/big")]),
        ControlMessage::HashAnswer(vec![Entry {
            path: p("big"),
            kind: Kind::File {
                size: 3,
                hash: HashAlgorithm::Md5.of(b"abc"),
            },
            meta,
        }]),
        ControlMessage::Ping,
        ControlMessage::Held(None),
        ControlMessage::Held(Some(ListId([7; 32]))),
        ControlMessage::Since {
            base: ListId([1; 32]),
            result: ListId([2; 32]),
        },
    ] {
        round_trip_control(m);
    }
    for m in [
        DataMessage::DataHello {
            token: 42,
            request: 3,
        },
        DataMessage::FileBegin { path: p("x") },
        DataMessage::Chunk(Bytes::from_static(&[1, 2, 3])),
        DataMessage::Hole { len: 1 << 40 },
        DataMessage::FileEnd { hash: None },
        DataMessage::FileEnd {
            hash: Some(HashAlgorithm::Md5.of(b"x")),
        },
        DataMessage::FileAbort {
            reason: "gone".into(),
        },
    ] {
        round_trip_data(m);
    }
}

fn control_err(body: &[u8]) -> String {
    ControlMessage::decode(body).unwrap_err().to_string()
}

fn data_err(body: &[u8]) -> String {
    DataMessage::decode(Bytes::from(body.to_vec()))
        .unwrap_err()
        .to_string()
}

#[test]
fn hostile_bodies_are_refused() {
    let path_frame = |tag: u8, s: &[u8]| {
        let mut b = vec![tag];
        b.extend_from_slice(&(s.len() as u32).to_be_bytes());
        b.extend_from_slice(s);
        b
    };
    for (body, want) in [
        (vec![], "empty frame"),
        (vec![99], "unknown message tag 99"),
        (
            vec![1, b'X', b'X', b'X', b'X', 0, 0, 0, 2, 0, 1],
            "bad magic",
        ),
        // A forged count must not be believed: 4 billion entries in 5 bytes.
        (vec![3, 0xff, 0xff, 0xff, 0xff, 0], "list count"),
        (vec![4, 0], "malformed filelist-end"),
        (vec![15, 0], "malformed ping"),
        // Data messages have no place on the control connection.
        (vec![8], "data-hello message on the wrong connection"),
        (
            vec![10, 0, 0, 0, 0],
            "chunk message on the wrong connection",
        ),
    ] {
        let err = control_err(&body);
        assert!(err.contains(want), "{body:?}: {err:?} lacks {want:?}");
    }
    for (body, want) in [
        (path_frame(9, b"../etc/passwd"), "'..' component"),
        (path_frame(9, b"/etc/passwd"), "absolute path"),
        (path_frame(9, b"a\0b"), "NUL"),
        (path_frame(9, b""), "empty path"),
        (path_frame(9, &[0xff, 0xfe]), "invalid UTF-8"),
        (vec![9, 0, 0, 0, 9, b'a'], "malformed"),
        (vec![11, 1, 2], "short"),
        (vec![11, 9, 0], "hash algorithm"),
        (vec![10, 0, 0, 0, 5, 1], "short"),
        (vec![16, 0xff, 0, 0, 0, 0, 0, 0, 0], "file size"),
        (
            vec![3, 0, 0, 0, 0],
            "filelist message on the wrong connection",
        ),
    ] {
        let err = data_err(&body);
        assert!(err.contains(want), "{body:?}: {err:?} lacks {want:?}");
    }
}

#[test]
fn peer_input_is_bounded_and_setuid_is_dropped() {
    let entry = |kind| {
        let mut buf = Vec::new();
        ControlMessage::FileList(vec![Entry {
            path: p("x"),
            kind,
            meta: Meta {
                mode: 0o7777,
                ..Meta::default()
            },
        }])
        .encode(&mut buf);
        ControlMessage::decode(&buf[4..])
    };
    let Ok(ControlMessage::FileList(e)) = entry(Kind::Dir) else {
        panic!()
    };
    assert_eq!(e[0].meta.mode, 0o1777);
    let long = "t".repeat(MAX_PATH_LEN + 1);
    for kind in [
        Kind::Symlink { target: long },
        Kind::Unreadable {
            reason: "r".repeat(MAX_TEXT + 1),
        },
        Kind::Unhashed { size: u64::MAX },
        Kind::File {
            size: 1 << 63,
            hash: HashAlgorithm::Blake3.of(b""),
        },
    ] {
        assert!(entry(kind).is_err());
    }
}

#[test]
fn a_hello_of_another_version_is_read_for_its_version_only() {
    let mut body = vec![1];
    body.extend_from_slice(b"SSYN");
    body.extend_from_slice(&1u32.to_be_bytes());
    body.extend_from_slice(&[0, 1]); // a version 1 hello: transfers, nothing else
    match ControlMessage::decode(&body).unwrap() {
        ControlMessage::Hello { version: 1, .. } => {}
        other => panic!("{other:?}"),
    }
    // A welcome of another version is refused by the client with both versions named.
    let mut body = vec![2];
    body.extend_from_slice(&9u32.to_be_bytes());
    assert!(control_err(&body).contains("server speaks protocol version 9"));
}

#[test]
fn summary_names_a_bounded_number_of_failures() {
    let mut s = Summary::default();
    let failed = (0..2000)
        .map(|i| Failure::new(format!("f{i}"), "é".repeat(400)))
        .collect();
    s.set_failures(failed);
    assert_eq!((s.failed.len(), s.failed_total), (MAX_FAILURES_NAMED, 2000));
    assert!(s.failed.iter().all(|f| f.reason.len() <= MAX_TEXT));
    let mut buf = Vec::new();
    ControlMessage::SyncDone(s).encode(&mut buf);
    assert!(buf.len() < MAX_FRAME);
}

#[test]
fn request_with_escaping_path_is_refused() {
    let mut body = vec![5, 0, 0, 0, 0, 0, 0, 0, 2];
    for s in ["ok", "a/../../x"] {
        body.extend_from_slice(&(s.len() as u32).to_be_bytes());
        body.extend_from_slice(s.as_bytes());
    }
    assert!(control_err(&body).contains("'..' component"));
}

#[tokio::test]
async fn framing_handles_truncation_and_size_limit() {
    let mut buf = Vec::new();
    ControlMessage::FileListEnd.encode(&mut buf);
    ControlMessage::Error("x".into()).encode(&mut buf);
    let mut r = &buf[..];
    let mut frames = Vec::new();
    while let Some(f) = read_frame(&mut r).await.unwrap() {
        frames.push(ControlMessage::decode(&f).unwrap());
    }
    assert_eq!(
        frames,
        [
            ControlMessage::FileListEnd,
            ControlMessage::Error("x".into())
        ]
    );

    let cut = &buf[..buf.len() - 1];
    let mut r = &cut[5..];
    assert!(matches!(
        read_frame(&mut r).await,
        Err(ProtocolError::Truncated)
    ));
    let mut r = &buf[..2];
    assert!(matches!(
        read_frame(&mut r).await,
        Err(ProtocolError::Truncated)
    ));

    let big = ((MAX_FRAME + 1) as u32).to_be_bytes();
    let mut r = &big[..];
    assert!(matches!(
        read_frame(&mut r).await,
        Err(ProtocolError::Oversized(n)) if n == MAX_FRAME + 1
    ));
    let empty = 0u32.to_be_bytes();
    assert!(matches!(
        read_frame(&mut &empty[..]).await,
        Err(ProtocolError::Empty)
    ));
}

#[tokio::test]
async fn borrowed_file_list_encodes_like_the_message() {
    let entries = vec![Entry {
        path: p("x"),
        kind: Kind::Dir,
        meta: Meta::default(),
    }];
    let (a, b) = tokio::io::duplex(1 << 16);
    let mut tx: ControlConnection<_> = Connection::new(a);
    tx.send_file_list(&entries).await.unwrap();
    tx.flush().await.unwrap();
    drop(tx);
    let mut raw = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut { b }, &mut raw)
        .await
        .unwrap();
    let mut slow = Vec::new();
    ControlMessage::FileList(entries).encode(&mut slow);
    assert_eq!(raw, slow);
}

#[test]
fn blocking_framing_refuses_truncation_and_oversize() {
    let mut buf = Vec::new();
    {
        let mut c: BlockingConnection<_> = BlockingConnection::new(&mut buf);
        c.send(&DataMessage::FileEnd { hash: None }).unwrap();
        c.send_chunk(b"abc").unwrap();
    }
    let mut slow = Vec::new();
    DataMessage::FileEnd { hash: None }.encode(&mut slow);
    DataMessage::Chunk(Bytes::from_static(b"abc")).encode(&mut slow);
    assert_eq!(buf, slow, "the chunk fast path writes the same frame");
    let mut r = &buf[..3];
    assert!(matches!(
        read_frame_blocking(&mut r),
        Err(ProtocolError::Truncated)
    ));
    let big = ((MAX_FRAME + 1) as u32).to_be_bytes();
    assert!(matches!(
        read_frame_blocking(&mut &big[..]),
        Err(ProtocolError::Oversized(_))
    ));
}

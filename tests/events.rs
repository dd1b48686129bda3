//! Structured events: a sync reports what it did as typed events, which tests (and later
//! metrics and progress) assert on directly instead of reading log lines.

use std::path::Path;

use server_sync::client;
use server_sync::core::manifest::RelPath;
use server_sync::events::{Event, Events, Recorder};
use server_sync::server;

fn p(s: &str) -> RelPath {
    RelPath::new(s).unwrap()
}

/// Runs one client sync of `client_dir` against an in-process server of `server_dir`, both
/// reporting to recorders; returns (server events, client events).
fn sync(client_dir: &Path, server_dir: &Path) -> (Vec<Event>, Vec<Event>) {
    let (on_server, on_client) = (Recorder::new(), Recorder::new());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (control, data) = server::bind("127.0.0.1", 0, 0).await.unwrap();
        let port = control.local_addr().unwrap().port();
        let config = server::Config {
            events: on_server.clone() as Events,
            ..server::Config::new(server_dir)
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = tokio::spawn(server::run(config, control, data, async {
            let _ = stopped.await;
        }));
        let cfg = client::Config {
            events: on_client.clone() as Events,
            ..client::Config::new(client_dir, "127.0.0.1", port)
        };
        client::sync_once(&cfg).await.unwrap();
        stop.send(()).unwrap();
        serving.await.unwrap().unwrap();
    });
    (on_server.events(), on_client.events())
}

#[test]
fn a_sync_reports_what_it_did_as_events() {
    let d = tempfile::tempdir().unwrap();
    let (c, s) = (d.path().join("c"), d.path().join("s"));
    std::fs::create_dir_all(c.join("dir")).unwrap();
    std::fs::create_dir_all(&s).unwrap();
    std::fs::write(c.join("dir/a.txt"), "alpha").unwrap();

    let (server, client) = sync(&c, &s);
    assert!(
        server.contains(&Event::DirCreated { path: p("dir") }),
        "{server:#?}"
    );
    assert!(server.contains(&Event::FileRequested {
        path: p("dir/a.txt")
    }));
    assert!(server.iter().any(|e| matches!(
        e,
        Event::FileReceived { path, bytes: 5, .. } if *path == p("dir/a.txt")
    )));
    assert!(matches!(
        server.last(),
        Some(Event::SessionDone { counts, .. }) if counts.received == 1 && counts.failed == 0
    ));
    assert!(client.contains(&Event::FileSending {
        path: p("dir/a.txt")
    }));
    assert_eq!(client.last(), Some(&Event::SyncDone));

    // A rename on the client is a move on the server, and nothing is sent.
    std::fs::rename(c.join("dir/a.txt"), c.join("b.txt")).unwrap();
    let (server, client) = sync(&c, &s);
    assert!(server.contains(&Event::Moved {
        src: p("dir/a.txt"),
        dst: p("b.txt")
    }));
    assert!(
        !server
            .iter()
            .any(|e| matches!(e, Event::FileRequested { .. })),
        "{server:#?}"
    );
    assert!(
        !client
            .iter()
            .any(|e| matches!(e, Event::FileSending { .. }))
    );
}

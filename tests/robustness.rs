//! Robustness of the process as a whole: a panic in one connection's task (a bug) ends that
//! connection only; the gateway keeps serving, releases what the dead task held, and
//! records the connection as `internal_error`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::*;
use portcullis::proxy::upstream::{BoxFuture, Resolve, ResolveError, StaticResolver};

/// A resolver with a bug: it panics for one name, and resolves the others from a table.
struct PanicsOn {
    name: &'static str,
    inner: StaticResolver,
}

impl Resolve for PanicsOn {
    fn lookup<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Vec<IpAddr>, ResolveError>> {
        assert_ne!(name, self.name, "injected resolver bug for {name}");
        self.inner.lookup(name)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_connection_task_ends_only_that_connection() {
    let up = silent_upstream().await;
    let port = up.addr.port();
    let agent = format!(
        "name = \"coder-1\"\nsources = [\"127.0.0.0/8\"]\nallow = [\"allowed.test:{port}\", \"boom.allowed.test:{port}\"]\nallow_cidrs = [\"127.0.0.1/32:{port}\"]\n"
    );
    let resolver = PanicsOn {
        name: "boom.allowed.test",
        inner: localhost_resolver(&["allowed.test"]),
    };
    // Four connection slots in all: if a panicking task leaked its slot, the fifth panic
    // would already be refused as `overloaded`, and the tunnels below could not open.
    let gw = gateway_with(&[("coder-1", &agent)], &[], resolver, |c, _| {
        c.caps.max_connections = 4;
    })
    .await;

    const PANICS: usize = 10;
    for _ in 0..PANICS {
        let refused = open_tunnel(gw.proxy, "boom.allowed.test", port).await;
        let head = refused.expect_err("a panicking connection gets no tunnel");
        assert!(head.starts_with("no response head"), "{head}");
    }
    let lines = gw.log_lines(PANICS).await;
    assert_eq!(lines.len(), PANICS, "{lines:?}");
    for l in &lines {
        assert_eq!(l["event.reason"], "internal_error", "{l}");
        assert_eq!(l["event.action"], "deny", "{l}");
        assert_eq!(l["agent.name"], "coder-1", "{l}");
        assert_eq!(l["portcullis.mode"], "explicit", "{l}");
    }
    assert_eq!(
        up.seen.connections(),
        0,
        "nothing was dialled for the panicking name"
    );

    // The process is alive and every slot came back: four tunnels at once still open and
    // carry their hello upstream.
    let mut tunnels = Vec::new();
    for _ in 0..4 {
        tunnels.push(
            open_tunnel(gw.proxy, "allowed.test", port)
                .await
                .expect("the gateway still serves after the panics"),
        );
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while up.seen.connections() < 4 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(up.seen.connections(), 4);

    let (code, metrics) = admin_request(gw.admin, "GET", "/metrics", &[], b"").await;
    assert_eq!(code, 200);
    let series = "portcullis_connections_total{agent=\"coder-1\",mode=\"explicit\",verdict=\"deny\",reason=\"internal_error\"}";
    let value = metrics
        .lines()
        .find_map(|l| l.strip_prefix(series))
        .map(|v| v.trim().parse::<f64>().unwrap());
    assert_eq!(value, Some(PANICS as f64), "{metrics}");
    let (code, _) = admin_request(gw.admin, "GET", "/healthz", &[], b"").await;
    assert_eq!(code, 200);
    drop(tunnels);
    gw.stop().await;
}

//! libFuzzer target for the DNS forwarder's untrusted input, both directions:
//! - as a query from an agent: the real `Forwarder::prepare` (parse, identify, limits, one
//!   question, type, name, policy, cache) against a started gateway, over UDP and TCP;
//! - as an upstream's answer: the records it carries through the answer-side filters
//!   (`strip_ech`, `drop_unreachable`) and back onto the wire.
//!
//! Never panics, and checks what the forwarder promises: a reply is a well-formed DNS
//! response to the same id that fits the UDP size the client offered; no ECH config and no
//! special address survives the filters.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode};
use hickory_proto::rr::rdata::svcb::{SvcParamKey, SvcParamValue};
use hickory_proto::rr::{RData, Record};
use portcullis::config::{Config, LogDestination};
use portcullis::dns::filter::{drop_unreachable, strip_ech};
use portcullis::dns::{Forwarder, Step, Transport};
use portcullis::gateway::{self, Running};
use portcullis::policy::address::is_special;
use portcullis::policy::compile;
use portcullis::policy::rules::{RulesSources, SourceFile};
use portcullis::proxy::upstream::StaticResolver;

const AGENT: &str = r#"
name = "fuzz-agent"
sources = ["127.0.0.1/32"]
allow = [".allowed.test", "exact.test", "*.wild.test"]
deny = ["no.allowed.test"]
allow_cidrs = ["10.9.9.0/24:443"]
"#;

/// The agent's address, and one no agent owns.
const AGENT_PEER: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 40000);
const UNKNOWN_PEER: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), 40000);

struct Env {
    // Kept alive: the gateway's tasks run on it.
    _runtime: tokio::runtime::Runtime,
    // Kept alive: its listeners and tasks are the forwarder's context.
    _running: Running,
    dns: std::sync::Arc<portcullis::dns::DnsContext>,
    forwarder: Forwarder,
    _state: PathBuf,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime");
        // One per process (libFuzzer -jobs/-fork run several); tests/fuzz.sh points TMPDIR
        // at a scratch dir it removes.
        let state =
            std::env::temp_dir().join(format!("portcullis-fuzz-dns-{}", std::process::id()));
        let mut config = Config::builtin();
        config.state_dir = state.clone();
        config.listen.explicit = None;
        config.listen.admin = None;
        config.listen.dns = vec!["127.0.0.1:0".parse().expect("addr")];
        // Discard the log: the fuzzer writes millions of refusals.
        config.log.destination = LogDestination::File(PathBuf::from("/dev/null"));
        // TEST-NET-1 (RFC 5737): never answers; the target never waits on it anyway.
        config.resolver.upstreams = vec!["192.0.2.1:53".parse().expect("addr")];
        config.resolver.timeout = Duration::from_millis(100);
        // No rate limit: every input must reach the checks behind it.
        config.dns.queries_per_second = u32::MAX / 4;
        let sources = RulesSources {
            agents: vec![SourceFile {
                path: PathBuf::from("rules/agents/fuzz.toml"),
                text: AGENT.into(),
            }],
            lists: Vec::new(),
        };
        let policy = compile(&sources, &config.default_ports, 1).expect("fuzz policy");
        // The forwarder under test shares the running gateway's state (policy, kill switch,
        // telemetry); its resolver is built inside the runtime.
        let (forwarder, running) = runtime.block_on(async {
            let forwarder = Forwarder::new(&config).expect("forwarder");
            let running = gateway::start(config, policy, Arc::new(StaticResolver::default()))
                .await
                .expect("gateway starts");
            (forwarder, running)
        });
        let dns = running.dns_context().expect("a dns listener is configured");
        Env {
            _runtime: runtime,
            _running: running,
            dns,
            forwarder,
            _state: state,
        }
    })
}

/// The largest UDP reply the forwarder may send for `request` (RFC 1035 §4.2.1, RFC 6891).
fn udp_limit(request: Option<&Message>) -> usize {
    match request.and_then(|m| m.edns.as_ref().map(|_| m.max_payload())) {
        Some(offered) => usize::from(offered.min(1232)),
        None => 512,
    }
}

fn check_reply(data: &[u8], reply: &[u8], transport: Transport) {
    let request = Message::from_vec(data).ok();
    let parsed = Message::from_vec(reply).expect("a reply is a DNS message");
    assert_eq!(parsed.metadata.message_type, MessageType::Response);
    assert_eq!(&reply[..2], &data[..2], "a reply carries the query's id");
    if transport == Transport::Udp {
        assert!(
            reply.len() <= udp_limit(request.as_ref()),
            "UDP reply of {} bytes exceeds the offered size",
            reply.len()
        );
    }
}

fn query_side(data: &[u8]) {
    let env = env();
    let shared = &*env.dns;
    for (peer, transport) in [
        (AGENT_PEER, Transport::Udp),
        (AGENT_PEER, Transport::Tcp),
        (UNKNOWN_PEER, Transport::Udp),
    ] {
        match env.forwarder.prepare(shared, peer, data, transport) {
            Step::Reply(reply) => check_reply(data, &reply, transport),
            Step::Ignore => {
                // Only responses and scraps too short for an id are ignored.
                let is_query = data.len() >= 4 && data[2] & 0x80 == 0;
                assert!(!is_query, "a query was ignored");
            }
            Step::Resolve(_pending) => {
                // Only the agent, only for an allowed name; dropping it frees the slot.
                assert_eq!(peer, AGENT_PEER, "an unknown source reached the upstream");
            }
        }
    }
}

fn answer_side(data: &[u8]) {
    let Ok(upstream) = Message::from_vec(data) else {
        return;
    };
    let mut records: Vec<Record> = upstream
        .answers
        .iter()
        .chain(&upstream.authorities)
        .chain(&upstream.additionals)
        .cloned()
        .collect();
    let before = records.len();
    strip_ech(&mut records);
    let filtered = drop_unreachable(&mut records, may_reach);
    assert_eq!(before - records.len(), filtered.removed);
    for r in &records {
        match &r.data {
            RData::A(a) => assert!(may_reach(IpAddr::V4(a.0)), "special A survived"),
            RData::AAAA(a) => assert!(may_reach(IpAddr::V6(a.0)), "special AAAA survived"),
            RData::HTTPS(h) => check_svcb(&h.0.svc_params),
            RData::SVCB(s) => check_svcb(&s.svc_params),
            _ => {}
        }
    }
    // What the agent would be sent: must encode or fail cleanly.
    let mut reply = Message::response(upstream.metadata.id, OpCode::Query);
    reply.queries = upstream.queries.clone();
    reply.answers = records;
    let _ = reply.to_vec();
}

/// What the agent's rules let it be pointed at: public addresses, and the special ones its
/// `allow_cidrs` (10.9.9.0/24) cover.
fn may_reach(ip: IpAddr) -> bool {
    let covered: ipnet::IpNet = "10.9.9.0/24".parse().expect("net");
    !is_special(ip) || covered.contains(&ip)
}

fn check_svcb(params: &[(SvcParamKey, SvcParamValue)]) {
    for (k, v) in params {
        assert_ne!(*k, SvcParamKey::EchConfigList, "ech survived");
        match v {
            SvcParamValue::Mandatory(m) => {
                assert!(!m.0.is_empty(), "empty mandatory");
                assert!(!m.0.contains(&SvcParamKey::EchConfigList), "mandatory ech");
            }
            SvcParamValue::EchConfigList(_) => panic!("ech value survived"),
            SvcParamValue::Ipv4Hint(h) => {
                assert!(!h.0.is_empty(), "empty ipv4hint");
                assert!(
                    h.0.iter().all(|a| may_reach(IpAddr::V4(a.0))),
                    "special ipv4hint"
                );
            }
            SvcParamValue::Ipv6Hint(h) => {
                assert!(!h.0.is_empty(), "empty ipv6hint");
                assert!(
                    h.0.iter().all(|a| may_reach(IpAddr::V6(a.0))),
                    "special ipv6hint"
                );
            }
            _ => {}
        }
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    query_side(data);
    answer_side(data);
});

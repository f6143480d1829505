//! Decision and compile cost at scale: 100,000 rules over 1,000 agents (issue target: median
//! `evaluate` ≤ 1 µs, compile ≤ 1 s), and the per-address check before every dial
//! (`check_address`, with the IPv6 forms that carry an IPv4 address and `resolve_cidrs`).

use std::hint::black_box;
use std::path::PathBuf;

use criterion::{Criterion, criterion_group, criterion_main};
use portcullis::policy::rules::{RulesSources, SourceFile};
use portcullis::policy::{AddressOrigin, Host, Policy, Target, compile, parse_host};

const AGENTS: usize = 1_000;
const RULES_PER_AGENT: usize = 100;

fn sources() -> RulesSources {
    let mut s = RulesSources::default();
    for i in 0..AGENTS {
        let mut allow = Vec::with_capacity(RULES_PER_AGENT);
        for j in 0..RULES_PER_AGENT {
            allow.push(match j % 5 {
                0..=2 => format!("\"svc{j}.tenant{i}.example.com\""),
                3 => format!("\"*.cdn{j}.tenant{i}.example.net\""),
                _ => format!("\".api{j}.example.org:8443\""),
            });
        }
        let text = format!(
            "name = \"agent-{i}\"\nsources = [\"10.{}.{}.1/32\"]\nallow = [{}]\ndeny = [\"bad.tenant{i}.example.com\"]\n",
            i / 256,
            i % 256,
            allow.join(", ")
        );
        s.agents.push(SourceFile {
            path: PathBuf::from(format!("rules/agents/agent-{i}.toml")),
            text,
        });
    }
    s
}

fn target(host: &str, port: u16) -> Target {
    Target {
        host: parse_host(host).unwrap_or(Host::Ip([0, 0, 0, 0].into())),
        port,
    }
}

fn bench(c: &mut Criterion) {
    let src = sources();
    let policy: Policy = match compile(&src, &[80, 443], 1) {
        Ok(p) => p,
        Err(e) => panic!("bench policy invalid: {e}"),
    };
    let agent = policy.agent_by_name("agent-500");
    let exact_hit = target("svc7.tenant500.example.com", 443);
    let wild_hit = target("a.b.c.cdn8.tenant500.example.net", 443);
    let miss = target("svc7.tenant501.example.com", 443);
    let deep_miss = target("x1.x2.x3.x4.x5.x6.x7.x8.evil.example", 443);

    let mut g = c.benchmark_group("evaluate_100k_rules_1k_agents");
    g.bench_function("exact_hit", |b| {
        b.iter(|| black_box(policy.evaluate(agent, black_box(&exact_hit))))
    });
    g.bench_function("wildcard_hit_depth6", |b| {
        b.iter(|| black_box(policy.evaluate(agent, black_box(&wild_hit))))
    });
    g.bench_function("miss", |b| {
        b.iter(|| black_box(policy.evaluate(agent, black_box(&miss))))
    });
    g.bench_function("deep_miss", |b| {
        b.iter(|| black_box(policy.evaluate(agent, black_box(&deep_miss))))
    });
    g.bench_function("parse_name_and_evaluate", |b| {
        b.iter(|| {
            let t = target(black_box("A.B.C.cdn8.Tenant500.example.net."), 443);
            black_box(policy.evaluate(agent, &t))
        })
    });
    g.bench_function("identify_by_source", |b| {
        b.iter(|| black_box(policy.agent_by_source(black_box([10, 1, 244, 1].into()))))
    });
    g.finish();

    // What every dial checks, per resolved address: an agent with two allow_cidrs and two
    // resolve_cidrs rules (the last one matching), and addresses of each kind.
    let mut s = RulesSources::default();
    s.agents.push(SourceFile {
        path: PathBuf::from("rules/agents/mirror.toml"),
        text: "name = \"mirror\"\nallow = [\"mirror.corp.test\"]\nallow_cidrs = [\"192.0.2.10/32:443\", \"fd00:9::/64\"]\nresolve_cidrs = [\"172.20.0.0/16\", \"10.1.2.0/24\"]\n".into(),
    });
    let small = match compile(&s, &[80, 443], 1) {
        Ok(p) => p,
        Err(e) => panic!("bench policy invalid: {e}"),
    };
    let mirror = small.agent_by_name("mirror");
    let mut g = c.benchmark_group("check_address");
    for (label, ip) in [
        ("public_v4", "104.16.1.35"),
        ("public_v6", "2606:4700::6810:123"),
        ("private_v4_denied", "10.9.9.9"),
        ("mapped_private_denied", "::ffff:10.9.9.9"),
        ("translated_private_denied", "::ffff:0:10.9.9.9"),
        ("nat64_public", "64:ff9b::104.16.1.35"),
        ("nat64_private_denied", "64:ff9b::10.9.9.9"),
        ("isatap_private_denied", "2606:4700:1::5efe:10.9.9.9"),
        ("6to4_denied", "2002:a09:909::1"),
        ("resolve_cidrs_hit", "10.1.2.3"),
    ] {
        let Ok(ip) = ip.parse::<std::net::IpAddr>() else {
            panic!("bench address {ip}");
        };
        g.bench_function(label, |b| {
            b.iter(|| {
                black_box(small.check_address(mirror, black_box(ip), 443, AddressOrigin::Resolved))
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("compile");
    g.sample_size(10);
    g.bench_function("100k_rules_1k_agents", |b| {
        b.iter(|| black_box(compile(&src, &[80, 443], 2)))
    });
    // What a reload does: read 1,000 agent files from disk and compile them (target ≤ 1 s).
    if let Ok(dir) = tempfile::tempdir() {
        let agents = dir.path().join("agents");
        let written = std::fs::create_dir_all(&agents).is_ok()
            && src.agents.iter().all(|f| {
                f.path
                    .file_name()
                    .is_some_and(|n| std::fs::write(agents.join(n), &f.text).is_ok())
            });
        if written {
            g.bench_function("reload_from_disk_100k_rules_1k_files", |b| {
                b.iter(|| black_box(Policy::load(dir.path(), &[80, 443], 3)))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

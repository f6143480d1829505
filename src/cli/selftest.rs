//! `portcullis selftest`: the flags, their defaults, and the exit code. The probing itself
//! lives in `crate::selftest`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::selftest::{self, Options, report};

const EXIT_USAGE: i32 = 2;

#[derive(Debug, Args)]
#[command(after_help = "\
Run it on an agent (VM, container or namespace) behind the gateway. Every probe runs at once,
each bounded by --timeout. Results: `closed` (dropped, unreachable, or denied by the gateway),
`OPEN` (something outside answered), `inconclusive` (e.g. a RST: the portcullis ruleset drops
silently, so a refusal came from the target or another firewall); the gateway checks are `ok`
or `FAILED`.

Exit status:
  0  every escape path closed and the gateway works
  1  at least one escape path OPEN
  2  usage error
  3  no path open, but the gateway does not work (allowed name or gateway DNS FAILED)
  4  no path open, gateway works, some probes inconclusive

Examples:
  portcullis selftest --allowed-name pypi.org                      # transparent mode
  portcullis selftest --allowed-name pypi.org --proxy 10.66.0.1:3128")]
pub struct SelftestArgs {
    /// A name this agent may reach on port 443 (e.g. pypi.org): proves the gateway works.
    #[arg(long, value_name = "NAME")]
    pub allowed_name: String,
    /// The explicit proxy (HOST:PORT). Without it, names are tried transparently (TLS to
    /// port 443, the gateway's interception decides).
    #[arg(long, value_name = "ADDR:PORT")]
    pub proxy: Option<SocketAddr>,
    /// The gateway's resolver, ADDR or ADDR:PORT [default: first nameserver in
    /// /etc/resolv.conf].
    #[arg(long, value_name = "ADDR", value_parser = parse_resolver)]
    pub resolver: Option<SocketAddr>,
    /// A public IPv4 address for direct connections (TCP 443, 80, --ports; UDP 443).
    #[arg(long, value_name = "ADDR", default_value = "1.1.1.1")]
    pub probe_v4: Ipv4Addr,
    /// A public IPv6 address for direct connections (TCP and UDP 443).
    #[arg(long, value_name = "ADDR", default_value = "2606:4700:4700::1111")]
    pub probe_v6: Ipv6Addr,
    /// A public resolver, asked the denied name over UDP and TCP 53.
    #[arg(long, value_name = "ADDR", default_value = "8.8.8.8")]
    pub outside_resolver: IpAddr,
    /// Other TCP ports tried on --probe-v4 (comma-separated).
    #[arg(
        long,
        value_name = "PORTS",
        value_delimiter = ',',
        default_value = "22,25,8080"
    )]
    pub ports: Vec<u16>,
    /// A name this agent must not reach, which public resolvers answer.
    #[arg(long, value_name = "NAME", default_value = "example.com")]
    pub denied_name: String,
    /// DoH resolvers that must be denied (comma-separated).
    #[arg(
        long,
        value_name = "NAMES",
        value_delimiter = ',',
        default_value = "dns.google,cloudflare-dns.com"
    )]
    pub doh_host: Vec<String>,
    /// Per-probe timeout: `2s`, `500ms` or seconds.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_timeout)]
    pub timeout: Duration,
    /// One JSON object per row, then a summary object, instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// `2s`, `1500ms`, `2`, `0.5` (seconds); between 1 ms and 60 s.
pub fn parse_timeout(s: &str) -> Result<Duration, String> {
    let d = if let Some(ms) = s.strip_suffix("ms") {
        ms.trim()
            .parse::<u64>()
            .map(Duration::from_millis)
            .map_err(|e| e.to_string())?
    } else {
        let secs = s.strip_suffix('s').unwrap_or(s).trim();
        let v: f64 = secs
            .parse()
            .map_err(|_| format!("`{s}`: expected 2s, 500ms or 2"))?;
        Duration::try_from_secs_f64(v).map_err(|e| e.to_string())?
    };
    if d < Duration::from_millis(1) || d > Duration::from_secs(60) {
        return Err(format!("`{s}`: between 1ms and 60s"));
    }
    Ok(d)
}

/// `10.66.0.1`, `10.66.0.1:5353`, `fd66::1`, `[fd66::1]:53`.
pub fn parse_resolver(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    s.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, 53))
        .map_err(|_| format!("`{s}`: expected ADDR or ADDR:PORT"))
}

pub fn selftest(args: SelftestArgs) -> i32 {
    let resolver = match args.resolver {
        Some(r) => r,
        None => {
            let conf = PathBuf::from("/etc/resolv.conf");
            match std::fs::read_to_string(&conf)
                .ok()
                .as_deref()
                .and_then(selftest::first_nameserver)
            {
                Some(ip) => SocketAddr::new(ip, 53),
                None => {
                    eprintln!("no nameserver in {}: pass --resolver", conf.display());
                    return EXIT_USAGE;
                }
            }
        }
    };
    let options = Options {
        proxy: args.proxy,
        resolver,
        probe_v4: args.probe_v4,
        probe_v6: args.probe_v6,
        outside_resolver: args.outside_resolver,
        ports: args.ports,
        allowed_name: args.allowed_name,
        denied_name: args.denied_name,
        doh_hosts: args.doh_host,
        timeout: args.timeout,
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start runtime: {e}");
            return EXIT_USAGE;
        }
    };
    let rows = rt.block_on(selftest::run(&options));
    if args.json {
        print!("{}", report::json_lines(&rows));
    } else {
        print!("{}", report::table(&rows));
    }
    report::exit_code(&rows)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn timeouts() {
        assert_eq!(parse_timeout("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(
            parse_timeout("1500ms").unwrap(),
            Duration::from_millis(1500)
        );
        assert_eq!(parse_timeout("0.5").unwrap(), Duration::from_millis(500));
        assert!(parse_timeout("0s").is_err());
        assert!(parse_timeout("61s").is_err());
        assert!(parse_timeout("-1").is_err());
        assert!(parse_timeout("soon").is_err());
    }

    #[test]
    fn resolvers() {
        assert_eq!(
            parse_resolver("10.66.0.1").unwrap(),
            "10.66.0.1:53".parse().unwrap()
        );
        assert_eq!(
            parse_resolver("10.66.0.1:5353").unwrap(),
            "10.66.0.1:5353".parse().unwrap()
        );
        assert_eq!(
            parse_resolver("fd66::1").unwrap(),
            "[fd66::1]:53".parse().unwrap()
        );
        assert!(parse_resolver("gateway").is_err());
    }
}

//! The report: one [`Row`] per attempt, printed as an aligned table (or JSON lines), a
//! summary line, and the exit code the rows imply. Pure.

use std::fmt::Write as _;

use super::verdict::{Finding, Outcome};

/// Every escape path is closed and the gateway works.
pub const EXIT_CLOSED: i32 = 0;
/// At least one escape path is open (whatever else happened).
pub const EXIT_OPEN: i32 = 1;
/// No path is open, but the gateway does not work (the allowed name failed through it, or
/// its resolver did not answer it): "closed" may then only mean "nothing works".
pub const EXIT_GATEWAY_FAILED: i32 = 3;
/// No path is open and the gateway works, but some probe could not decide.
pub const EXIT_INCONCLUSIVE: i32 = 4;

/// Which escape path (or gateway check) a row is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    DirectIp,
    OtherPort,
    Quic,
    Ipv6,
    OutsideDns,
    DnsExfil,
    Doh,
    DeniedName,
    /// Gateway check: the allowed name resolves through the gateway's resolver.
    GatewayDns,
    /// Gateway check: the allowed name is reachable through the gateway.
    AllowedName,
}

impl Path {
    pub fn as_str(self) -> &'static str {
        match self {
            Path::DirectIp => "direct-ip",
            Path::OtherPort => "other-port",
            Path::Quic => "quic",
            Path::Ipv6 => "ipv6",
            Path::OutsideDns => "outside-dns",
            Path::DnsExfil => "dns-exfil",
            Path::Doh => "doh",
            Path::DeniedName => "denied-name",
            Path::GatewayDns => "gateway-dns",
            Path::AllowedName => "allowed-name",
        }
    }

    /// Gateway checks are `ok`/`FAILED`; every other row is an escape path.
    pub fn is_gateway_check(self) -> bool {
        matches!(self, Path::GatewayDns | Path::AllowedName)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub path: Path,
    /// What was sent where, e.g. `tcp 1.1.1.1:443, TLS hello without SNI`.
    pub tried: String,
    pub finding: Finding,
}

/// Counts by outcome.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub open: usize,
    pub closed: usize,
    pub inconclusive: usize,
    pub ok: usize,
    pub failed: usize,
}

pub fn tally(rows: &[Row]) -> Tally {
    let mut t = Tally::default();
    for r in rows {
        match r.finding.outcome {
            Outcome::Open => t.open += 1,
            Outcome::Closed => t.closed += 1,
            Outcome::Inconclusive => t.inconclusive += 1,
            Outcome::Ok => t.ok += 1,
            Outcome::Failed => t.failed += 1,
        }
    }
    t
}

/// Open beats a broken gateway beats inconclusive beats all closed.
pub fn exit_code(rows: &[Row]) -> i32 {
    let t = tally(rows);
    if t.open > 0 {
        EXIT_OPEN
    } else if t.failed > 0 {
        EXIT_GATEWAY_FAILED
    } else if t.inconclusive > 0 {
        EXIT_INCONCLUSIVE
    } else {
        EXIT_CLOSED
    }
}

fn verdict_line(rows: &[Row]) -> &'static str {
    match exit_code(rows) {
        EXIT_OPEN => "ESCAPE PATHS OPEN",
        EXIT_GATEWAY_FAILED => "GATEWAY NOT WORKING",
        EXIT_INCONCLUSIVE => "no path open, some probes inconclusive",
        _ => "all escape paths closed, gateway works",
    }
}

/// The aligned table and the summary line.
pub fn table(rows: &[Row]) -> String {
    let headers = ["PATH", "TRIED", "RESULT", "DETAIL"];
    let width = |col: usize, f: &dyn Fn(&Row) -> usize| {
        rows.iter()
            .map(f)
            .max()
            .unwrap_or(0)
            .max(headers[col].len())
    };
    let w_path = width(0, &|r| r.path.as_str().len());
    let w_tried = width(1, &|r| r.tried.len());
    let w_result = width(2, &|r| r.finding.outcome.as_str().len());
    let mut out = String::new();
    let mut line = |a: &str, b: &str, c: &str, d: &str| {
        let _ = writeln!(
            out,
            "{a:<w_path$}  {b:<w_tried$}  {c:<w_result$}  {d}",
            a = a,
            b = b,
            c = c,
            d = d
        );
    };
    line(headers[0], headers[1], headers[2], headers[3]);
    for r in rows {
        line(
            r.path.as_str(),
            &r.tried,
            r.finding.outcome.as_str(),
            &r.finding.detail,
        );
    }
    out.push('\n');
    out.push_str(&summary(rows));
    out.push('\n');
    out
}

/// `summary: 0 open, 11 closed, 0 inconclusive; gateway checks 2 ok, 0 failed; exit 0 (...)`.
pub fn summary(rows: &[Row]) -> String {
    let t = tally(rows);
    format!(
        "summary: {} open, {} closed, {} inconclusive; gateway checks {} ok, {} failed; exit {} ({})",
        t.open,
        t.closed,
        t.inconclusive,
        t.ok,
        t.failed,
        exit_code(rows),
        verdict_line(rows)
    )
}

/// One JSON object per row, then one summary object: for scripts and CI.
pub fn json_lines(rows: &[Row]) -> String {
    let mut out = String::new();
    for r in rows {
        let v = serde_json::json!({
            "path": r.path.as_str(),
            "tried": r.tried,
            "result": r.finding.outcome.as_str(),
            "detail": r.finding.detail,
        });
        out.push_str(&v.to_string());
        out.push('\n');
    }
    let t = tally(rows);
    let v = serde_json::json!({
        "summary": {
            "open": t.open,
            "closed": t.closed,
            "inconclusive": t.inconclusive,
            "gateway_ok": t.ok,
            "gateway_failed": t.failed,
            "exit": exit_code(rows),
        }
    });
    out.push_str(&v.to_string());
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(path: Path, outcome: Outcome) -> Row {
        Row {
            path,
            tried: format!("tried {}", path.as_str()),
            finding: Finding {
                outcome,
                detail: "because".into(),
            },
        }
    }

    #[test]
    fn exit_codes_rank_open_then_failed_then_inconclusive() {
        let closed = row(Path::DirectIp, Outcome::Closed);
        let ok = row(Path::AllowedName, Outcome::Ok);
        assert_eq!(exit_code(&[closed.clone(), ok.clone()]), EXIT_CLOSED);
        assert_eq!(
            exit_code(&[
                closed.clone(),
                ok.clone(),
                row(Path::Quic, Outcome::Inconclusive)
            ]),
            EXIT_INCONCLUSIVE
        );
        assert_eq!(
            exit_code(&[
                row(Path::Quic, Outcome::Inconclusive),
                row(Path::GatewayDns, Outcome::Failed)
            ]),
            EXIT_GATEWAY_FAILED
        );
        assert_eq!(
            exit_code(&[
                row(Path::Ipv6, Outcome::Open),
                row(Path::GatewayDns, Outcome::Failed),
                closed
            ]),
            EXIT_OPEN
        );
        // Distinct from clap's usage error (2).
        for code in [EXIT_OPEN, EXIT_GATEWAY_FAILED, EXIT_INCONCLUSIVE] {
            assert_ne!(code, 2);
        }
    }

    #[test]
    fn table_is_aligned_with_a_summary() {
        let rows = [
            row(Path::DirectIp, Outcome::Closed),
            row(Path::OutsideDns, Outcome::Open),
            row(Path::AllowedName, Outcome::Ok),
        ];
        let t = table(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "PATH          TRIED               RESULT  DETAIL");
        assert_eq!(
            lines[1],
            "direct-ip     tried direct-ip     closed  because"
        );
        assert_eq!(
            lines[2],
            "outside-dns   tried outside-dns   OPEN    because"
        );
        assert_eq!(
            lines[3],
            "allowed-name  tried allowed-name  ok      because"
        );
        assert_eq!(lines[4], "");
        assert_eq!(
            lines[5],
            "summary: 1 open, 1 closed, 0 inconclusive; gateway checks 1 ok, 0 failed; exit 1 (ESCAPE PATHS OPEN)"
        );
        let j = json_lines(&rows);
        let first: serde_json::Value =
            serde_json::from_str(j.lines().next().unwrap_or("")).unwrap_or_default();
        assert_eq!(first["path"], "direct-ip");
        assert_eq!(first["result"], "closed");
        let last: serde_json::Value =
            serde_json::from_str(j.lines().last().unwrap_or("")).unwrap_or_default();
        assert_eq!(last["summary"]["exit"], 1);
    }
}

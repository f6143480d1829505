//! Extended DNS Errors (RFC 8914) on the forwarder's refusals: the info-code and a short
//! EXTRA-TEXT naming the reason and the asking agent, so a client (dig, a stub that reads
//! EDE, the agent's human) can tell "refused by policy" from a broken resolver.
//!
//! The option rides in the OPT record, so it is only added when the query carried OPT
//! (RFC 6891 §7: no OPT in the query, none in the reply); without it the rcode alone
//! answers and the log says why. hickory-proto has no EDE type: the option is encoded
//! here (code 15: a 2-byte info-code, then UTF-8 text).
//!
//! The text carries only what the asker already knows or may know: the deny reason and
//! its own agent name (never a rule, a list, another agent or an address). Pure: no I/O.

use hickory_proto::rr::rdata::opt::{EdnsCode, EdnsOption};

use crate::policy::Reason;

/// The EDNS option code of Extended DNS Error (RFC 8914 §2).
pub(crate) const OPTION_CODE: u16 = 15;
/// EXTRA-TEXT is cut to this many bytes (on a character boundary): a refusal must stay
/// small enough for a 512-byte UDP reply with its question.
const MAX_TEXT: usize = 160;

/// The RFC 8914 info-codes the forwarder uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InfoCode {
    /// 0: none of the others fits (rate limit, overload, a malformed question).
    Other,
    /// 15: the name (or type, or every address of the answer) is refused by the operator's
    /// policy.
    Blocked,
    /// 18: the client itself may not ask (unknown source, kill switch).
    Prohibited,
}

impl InfoCode {
    pub(crate) fn code(self) -> u16 {
        match self {
            InfoCode::Other => 0,
            InfoCode::Blocked => 15,
            InfoCode::Prohibited => 18,
        }
    }

    /// The info-code for a refusal with `reason`.
    pub(crate) fn for_reason(reason: Reason) -> Self {
        match reason {
            Reason::NotAllowed
            | Reason::DeniedRule
            | Reason::PrivateAddress
            | Reason::IpLiteral => InfoCode::Blocked,
            Reason::UnknownAgent | Reason::KillSwitch | Reason::AuthRequired => {
                InfoCode::Prohibited
            }
            _ => InfoCode::Other,
        }
    }
}

/// The EXTRA-TEXT: `portcullis: <reason> for <agent>`, or `portcullis: <reason>` when the
/// source is no agent.
pub(crate) fn text(reason: Reason, agent: Option<&str>) -> String {
    let mut t = match agent {
        Some(name) => format!("portcullis: {reason} for {name}"),
        None => format!("portcullis: {reason}"),
    };
    if t.len() > MAX_TEXT {
        let mut cut = MAX_TEXT;
        while !t.is_char_boundary(cut) {
            cut -= 1;
        }
        t.truncate(cut);
    }
    t
}

/// The EDE option for a refusal with `reason` of a question from `agent`.
pub(crate) fn option(reason: Reason, agent: Option<&str>) -> EdnsOption {
    let text = text(reason, agent);
    let mut data = Vec::with_capacity(2 + text.len());
    data.extend_from_slice(&InfoCode::for_reason(reason).code().to_be_bytes());
    data.extend_from_slice(text.as_bytes());
    EdnsOption::Unknown(OPTION_CODE, data)
}

/// An EDE option as received: its info-code and EXTRA-TEXT (lossy UTF-8). `None` for any
/// other option, or one too short to hold an info-code.
pub(crate) fn decode(code: EdnsCode, option: &EdnsOption) -> Option<(u16, String)> {
    if u16::from(code) != OPTION_CODE {
        return None;
    }
    let EdnsOption::Unknown(_, data) = option else {
        return None;
    };
    let (info, text) = data.split_first_chunk::<2>()?;
    Some((
        u16::from_be_bytes(*info),
        String::from_utf8_lossy(text).into_owned(),
    ))
}

/// The name RFC 8914 §4 gives an info-code, for messages ("15 Blocked").
pub(crate) fn describe(info: u16) -> String {
    let name = match info {
        0 => "Other",
        3 => "Stale Answer",
        4 => "Forged Answer",
        14 => "Not Ready",
        15 => "Blocked",
        16 => "Censored",
        17 => "Filtered",
        18 => "Prohibited",
        20 => "Not Authoritative",
        21 => "Not Supported",
        22 => "No Reachable Authority",
        23 => "Network Error",
        _ => return info.to_string(),
    };
    format!("{info} {name}")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use hickory_proto::op::{Edns, Message, MessageType, OpCode};

    use super::*;

    #[test]
    fn policy_refusals_are_blocked_and_the_asker_prohibited() {
        assert_eq!(InfoCode::for_reason(Reason::NotAllowed), InfoCode::Blocked);
        assert_eq!(
            InfoCode::for_reason(Reason::PrivateAddress),
            InfoCode::Blocked
        );
        assert_eq!(
            InfoCode::for_reason(Reason::UnknownAgent),
            InfoCode::Prohibited
        );
        assert_eq!(
            InfoCode::for_reason(Reason::KillSwitch),
            InfoCode::Prohibited
        );
        assert_eq!(InfoCode::for_reason(Reason::RateLimited), InfoCode::Other);
        assert_eq!(describe(15), "15 Blocked");
        assert_eq!(describe(999), "999");
    }

    /// On the wire: option code 15, length 2 + text, the info-code big-endian, the text;
    /// and it survives hickory's encoder and decoder inside an OPT record.
    #[test]
    fn the_option_round_trips_through_a_message() {
        let EdnsOption::Unknown(code, data) = option(Reason::NotAllowed, Some("coder-1")) else {
            panic!("not an unknown option");
        };
        assert_eq!(code, 15);
        assert_eq!(&data[..2], &[0, 15]);
        assert_eq!(&data[2..], b"portcullis: not_allowed for coder-1");

        let mut m = Message::new(7, MessageType::Response, OpCode::Query);
        let mut edns = Edns::new();
        edns.options_mut()
            .insert(option(Reason::KillSwitch, Some("coder-1")));
        m.edns = Some(edns);
        let back = Message::from_vec(&m.to_vec().unwrap()).unwrap();
        let edns = back.edns.unwrap();
        let found: Vec<_> = edns
            .options()
            .options
            .iter()
            .filter_map(|(c, o)| decode(*c, o))
            .collect();
        assert_eq!(
            found,
            vec![(18, "portcullis: kill_switch for coder-1".to_owned())]
        );
    }

    /// No agent, no name; a very long agent name is cut on a character boundary.
    #[test]
    fn the_text_names_only_the_asker_and_is_bounded() {
        assert_eq!(
            text(Reason::UnknownAgent, None),
            "portcullis: unknown_agent"
        );
        let long = "é".repeat(200);
        let t = text(Reason::NotAllowed, Some(&long));
        assert!(
            t.len() <= MAX_TEXT && t.len() >= MAX_TEXT - 1,
            "{}",
            t.len()
        );
        assert!(t.starts_with("portcullis: not_allowed for é"));
        assert_eq!(
            decode(EdnsCode::NSID, &EdnsOption::Unknown(3, vec![0, 15])),
            None
        );
        assert_eq!(
            decode(EdnsCode::Unknown(15), &EdnsOption::Unknown(15, vec![0])),
            None
        );
    }
}

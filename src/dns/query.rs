//! One DNS question, start to end: the forwarder's decisions in order, the answer, and its
//! log line and counters.
//!
//! Order (the first that says no answers): parse → identify the agent by source address
//! (unknown → REFUSED) → kill switch (REFUSED) → flood guard (REFUSED `rate_limited`) →
//! opcode QUERY, one question (FORMERR), class IN and an allowed type (REFUSED) →
//! `DomainName::parse` (REFUSED) → `Policy::allows_name` (REFUSED or NXDOMAIN,
//! `dns.refuse_with`) → cache → rate limit (REFUSED `rate_limited`) → upstream (SERVFAIL on
//! failure or deadline) → ECH stripped → rebinding filter.
//!
//! What is limited is what costs or leaks: the rate limit (`dns.queries_per_second`, burst
//! twice that) is spent by upstream lookups and by refusals, never by answers from the cache
//! (real clients resolve per connection and burst). Concurrent questions for the same name
//! and type share one upstream lookup, spent once. The flood guard (ten times the rate,
//! burst twenty times) bounds what one agent's queries, cached or not, take of the
//! forwarder. Refusals past the log's per-agent share are summarised, not dropped
//! (telemetry).
//!
//! Every refusal carries an Extended DNS Error naming its reason when the query carried OPT
//! (`ede`); a policy refusal of the name answers `dns.refuse_with` (NXDOMAIN by default),
//! the others REFUSED, which says nothing about the name. Negative answers from the
//! upstream keep its SOA.
//!
//! Nothing before `allows_name` says yes ever reaches the upstream. Must not hold a lock
//! across an await and must not block: the socket loops call [`Forwarder::prepare`]
//! inline and only [`Forwarder::resolve`] waits (on the upstream, under a deadline).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::{DNSClass, Record, RecordType};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::DnsError;
use super::cache::ResponseCache;
use super::ede;
use super::filter;
use super::limit::{RateLimiter, Sampler};
use super::upstream::{Answer, Upstream};
use crate::config::Config;
use crate::dns::DnsContext as Shared;
use crate::policy::{AgentId, AgentPolicy, DomainName, Policy, Reason, address};
use crate::telemetry::{ConnectionRecord, Mode};

/// Largest UDP reply we offer in our OPT record (DNS Flag Day 2020: avoids fragmentation).
const EDNS_PAYLOAD: u16 = 1232;
/// Plain DNS over UDP (RFC 1035 §4.2.1).
const UDP_PLAIN_MAX: usize = 512;
/// Upstream questions in flight at once; beyond it queries get SERVFAIL (`overloaded`).
const MAX_IN_FLIGHT: usize = 4096;
/// The flood guard's rate, as a multiple of `dns.queries_per_second`.
const FLOOD_FACTOR: u32 = 10;

/// How the query arrived: decides the reply size limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// What to do with one received message.
#[expect(
    clippy::large_enum_variant,
    reason = "one per query, moved once; boxing would add an allocation"
)]
pub enum Step {
    /// Send these bytes back.
    Reply(Vec<u8>),
    /// Send nothing: not a query (a response, or too short to carry an id).
    Ignore,
    /// The answer needs the upstream: finish with [`Forwarder::resolve`].
    Resolve(Pending),
}

/// One upstream lookup, shared by every concurrent question for the same (name, type).
type Lookup = Arc<tokio::sync::OnceCell<Result<Arc<Answer>, String>>>;

/// A question that passed every check and is not in the cache.
pub struct Pending {
    question: Question,
    name: DomainName,
    key: (Box<str>, u16),
    lookup: Lookup,
    /// Held by the question that started the lookup (and paid for it).
    _slot: Option<OwnedSemaphorePermit>,
}

/// What is known about the question being answered.
struct Question {
    request: Message,
    limit: usize,
    peer: SocketAddr,
    policy: Arc<Policy>,
    agent: Option<AgentId>,
    agent_name: Arc<str>,
    /// The question's name as asked (presentation form), for the log.
    asked: Option<String>,
    rtype: Option<RecordType>,
    start: SystemTime,
    started: Instant,
}

/// The forwarder's state shared by every DNS listener: upstream, cache, limits.
pub struct Forwarder {
    upstream: Upstream,
    cache: ResponseCache,
    limiter: RateLimiter,
    flood: RateLimiter,
    /// Upstream lookups in progress, by (name, type).
    lookups: Mutex<HashMap<(Box<str>, u16), Lookup>>,
    sampler: Sampler,
    allowed_types: Vec<u16>,
    refuse_code: ResponseCode,
    in_flight: Arc<Semaphore>,
}

impl Forwarder {
    pub fn new(config: &Config) -> Result<Self, DnsError> {
        let d = &config.dns;
        Ok(Self {
            upstream: Upstream::new(&config.resolver_upstreams, config.resolver_timeout)?,
            cache: ResponseCache::new(d.cache_entries, d.cache_bytes, d.max_ttl),
            limiter: RateLimiter::new(d.queries_per_second),
            flood: RateLimiter::with_burst(d.queries_per_second.saturating_mul(FLOOD_FACTOR), 2),
            lookups: Mutex::default(),
            sampler: Sampler::default(),
            allowed_types: d.allowed_types.clone(),
            refuse_code: if d.refuse_with_nxdomain {
                ResponseCode::NXDomain
            } else {
                ResponseCode::Refused
            },
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        })
    }

    /// Decide on one received message without waiting: a reply, nothing, or a question
    /// for the upstream.
    pub fn prepare(
        &self,
        shared: &Shared,
        peer: SocketAddr,
        packet: &[u8],
        transport: Transport,
    ) -> Step {
        let started = Instant::now();
        let policy = shared.policy.load_full();
        let agent = policy.agent_by_source(peer.ip());
        // The flood guard comes before parsing: what one agent (or every unknown source,
        // together) sends beyond it costs a header copy, so its flood cannot hold up the
        // others' questions behind it on the socket.
        let agent_name = policy.agent_name(agent);
        if !self.flood.admit(&agent_name, started) {
            return shed(shared, &policy, agent_name, peer, packet, started);
        }
        let mut q = Question {
            request: Message::new(0, MessageType::Response, OpCode::Query),
            limit: UDP_PLAIN_MAX,
            peer,
            agent_name,
            policy,
            agent,
            asked: None,
            rtype: None,
            start: SystemTime::now(),
            started,
        };
        let Ok(request) = Message::from_vec(packet) else {
            return self.unparsable(shared, &q, packet);
        };
        if request.metadata.message_type != MessageType::Query {
            // Never answer a response: that is how reflection loops start.
            return Step::Ignore;
        }
        q.limit = match transport {
            Transport::Tcp => usize::from(u16::MAX),
            Transport::Udp if request.edns.is_some() => {
                usize::from(request.max_payload().min(EDNS_PAYLOAD))
            }
            Transport::Udp => UDP_PLAIN_MAX,
        };
        if let [one] = request.queries.as_slice() {
            q.asked = Some(one.name().to_ascii());
            q.rtype = Some(one.query_type());
        }
        q.request = request;
        if agent.is_none() {
            return self.refuse(shared, &q, Reason::UnknownAgent, ResponseCode::Refused);
        }
        if shared.killswitch.is_killed(&q.agent_name) {
            return self.refuse(shared, &q, Reason::KillSwitch, ResponseCode::Refused);
        }
        // Refusals spend the rate limit (whatever is left of it) but keep their reason.
        let refuse = |reason, rcode| {
            let _ = self.limiter.admit(&q.agent_name, started);
            self.refuse(shared, &q, reason, rcode)
        };
        if q.request.metadata.op_code != OpCode::Query {
            return refuse(Reason::Malformed, ResponseCode::NotImp);
        }
        let [query] = q.request.queries.as_slice() else {
            return refuse(Reason::Malformed, ResponseCode::FormErr);
        };
        let rtype = query.query_type();
        if query.query_class() != DNSClass::IN || !self.allowed_types.contains(&u16::from(rtype)) {
            return refuse(Reason::NotAllowed, ResponseCode::Refused);
        }
        let Ok(name) = DomainName::parse(q.asked.as_deref().unwrap_or_default()) else {
            return refuse(Reason::Malformed, ResponseCode::Refused);
        };
        if !q.policy.allows_name(agent, &name) {
            return refuse(Reason::NotAllowed, self.refuse_code);
        }
        if let Some(hit) = self.cache.get(name.as_str(), u16::from(rtype), started) {
            return Step::Reply(self.answer(shared, &q, &name, &hit.answer, hit.age_secs));
        }
        let key: (Box<str>, u16) = (name.as_str().into(), u16::from(rtype));
        let mut lookups = self.lookups.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(lookup) = lookups.get(&key).filter(|l| !l.initialized()).cloned() {
            // Someone already asks the upstream this: wait for that answer, for free.
            drop(lookups);
            return Step::Resolve(Pending {
                question: q,
                name,
                key,
                lookup,
                _slot: None,
            });
        }
        if !self.limiter.admit(&q.agent_name, started) {
            drop(lookups);
            return self.refuse(shared, &q, Reason::RateLimited, ResponseCode::Refused);
        }
        let Ok(slot) = self.in_flight.clone().try_acquire_owned() else {
            drop(lookups);
            return self.refuse(shared, &q, Reason::Overloaded, ResponseCode::ServFail);
        };
        let lookup = Lookup::default();
        lookups.insert(key.clone(), lookup.clone());
        drop(lookups);
        Step::Resolve(Pending {
            question: q,
            name,
            key,
            lookup,
            _slot: Some(slot),
        })
    }

    /// Ask the upstream for a question [`Forwarder::prepare`] let through, and answer it.
    pub async fn resolve(&self, shared: &Shared, pending: Pending) -> Vec<u8> {
        let Pending {
            question,
            name,
            key,
            lookup,
            ..
        } = pending;
        let rtype = question.rtype.unwrap_or(RecordType::A);
        let result = lookup
            .get_or_init(|| async {
                match self.upstream.query(&name, rtype).await {
                    Ok(mut answer) => {
                        filter::cap_records(&mut answer.records);
                        filter::strip_ech(&mut answer.records);
                        Ok(self.cache.insert(
                            name.as_str(),
                            u16::from(rtype),
                            answer,
                            Instant::now(),
                        ))
                    }
                    Err(e) => Err(e.to_string()),
                }
            })
            .await
            .clone();
        {
            // Done: later questions go to the cache (or start a new lookup).
            let mut lookups = self.lookups.lock().unwrap_or_else(|p| p.into_inner());
            if lookups.get(&key).is_some_and(|l| Arc::ptr_eq(l, &lookup)) {
                lookups.remove(&key);
            }
        }
        if shared.killswitch.is_killed(&question.agent_name) {
            // Killed while the upstream answered: the answer is not delivered.
            return match self.refuse(shared, &question, Reason::KillSwitch, ResponseCode::Refused) {
                Step::Reply(bytes) => bytes,
                _ => Vec::new(),
            };
        }
        match result {
            Ok(answer) => self.answer(shared, &question, &name, &answer, 0),
            Err(e) => {
                tracing::debug!(name = name.as_str(), error = %e, "dns upstream failed");
                // The policy said yes; the upstream did not answer. Counted as allowed,
                // logged every time (failures are rare and worth seeing).
                shared
                    .telemetry
                    .metrics
                    .agent(&question.agent_name)
                    .dns_allowed
                    .inc();
                let rcode = ResponseCode::ServFail;
                self.log(
                    shared,
                    &question,
                    Some(&name),
                    Some(Reason::ResolveFailed),
                    rcode,
                );
                encode(
                    &response(&question.request, rcode, Vec::new()),
                    question.limit,
                )
            }
        }
    }

    /// Answer an allowed question from `answer` (cached `age_secs` ago), after the
    /// per-agent rebinding filter.
    fn answer(
        &self,
        shared: &Shared,
        q: &Question,
        name: &DomainName,
        answer: &Answer,
        age_secs: u32,
    ) -> Vec<u8> {
        let mut records: Vec<Record> = answer.records.clone();
        let mut authority: Vec<Record> = answer.authority.clone();
        if age_secs > 0 {
            for r in records.iter_mut().chain(&mut authority) {
                r.ttl = r.ttl.saturating_sub(age_secs);
            }
        }
        let agent = q.agent.and_then(|id| q.policy.agent(id));
        let filtered = filter::drop_unreachable(&mut records, |ip| may_reach(agent, ip));
        let metrics = shared.telemetry.metrics.agent(&q.agent_name);
        let mut refused = None;
        if filtered.removed > 0 {
            if filtered.kept == 0 {
                // Nothing the agent may reach is left: an empty NOERROR, so the client
                // neither retries elsewhere nor learns the private address; the EDE says
                // why.
                records.clear();
                metrics.dns_refused.inc();
                refused = Some(Reason::PrivateAddress);
            } else {
                metrics.dns_allowed.inc();
            }
            let reason = Some(Reason::PrivateAddress);
            self.log(shared, q, Some(name), reason, answer.rcode);
        } else {
            metrics.dns_allowed.inc();
            if self
                .sampler
                .should_log(&q.agent_name, name.as_str(), q.started)
            {
                self.log(shared, q, Some(name), None, answer.rcode);
            }
        }
        let mut reply = response(&q.request, answer.rcode, records);
        reply.authorities = authority;
        if let Some(reason) = refused {
            add_ede(&mut reply, q, reason);
        }
        encode(&reply, q.limit)
    }

    /// Refuse (or FORMERR/NOTIMP/NXDOMAIN/SERVFAIL) without asking anyone: count, log, reply.
    fn refuse(&self, shared: &Shared, q: &Question, reason: Reason, rcode: ResponseCode) -> Step {
        shared
            .telemetry
            .metrics
            .agent(&q.agent_name)
            .dns_refused
            .inc();
        let name = q.asked.as_deref().and_then(|n| DomainName::parse(n).ok());
        self.log(shared, q, name.as_ref(), Some(reason), rcode);
        let mut reply = response(&q.request, rcode, Vec::new());
        add_ede(&mut reply, q, reason);
        Step::Reply(encode(&reply, q.limit))
    }

    /// A message that does not parse: FORMERR when it carries a query header at all.
    fn unparsable(&self, shared: &Shared, q: &Question, packet: &[u8]) -> Step {
        let Some(header) = packet.get(..4) else {
            return Step::Ignore;
        };
        if header[2] & 0x80 != 0 {
            return Step::Ignore; // QR set: a response
        }
        shared
            .telemetry
            .metrics
            .agent(&q.agent_name)
            .dns_refused
            .inc();
        self.log(
            shared,
            q,
            None,
            Some(Reason::Malformed),
            ResponseCode::FormErr,
        );
        let id = u16::from_be_bytes([header[0], header[1]]);
        let reply = Message::error_msg(id, OpCode::Query, ResponseCode::FormErr);
        Step::Reply(reply.to_vec().unwrap_or_default())
    }

    fn log(
        &self,
        shared: &Shared,
        q: &Question,
        name: Option<&DomainName>,
        reason: Option<Reason>,
        rcode: ResponseCode,
    ) {
        let mut rec = ConnectionRecord::begin(
            Mode::Dns,
            q.peer,
            q.agent_name.clone(),
            q.policy.generation(),
        );
        rec.start = q.start;
        rec.duration = q.started.elapsed();
        rec.reason = reason;
        rec.destination_domain = name.map(|n| n.as_str().to_owned());
        rec.dns_question_name = match name {
            Some(n) => Some(n.as_str().to_owned()),
            None => q.asked.clone(),
        };
        rec.dns_question_type = q.rtype.map(<&'static str>::from);
        rec.dns_response_code = Some(rcode_name(rcode));
        shared.telemetry.record(rec);
    }
}

/// A query past the flood guard: REFUSED built from its header alone (the question is not
/// echoed, so careful clients drop it and back off, as after response rate limiting),
/// counted and logged as `rate_limited` (the log's per-agent share summarises a flood).
fn shed(
    shared: &Shared,
    policy: &Policy,
    agent_name: Arc<str>,
    peer: SocketAddr,
    packet: &[u8],
    started: Instant,
) -> Step {
    let Some(header) = packet.get(..12) else {
        return Step::Ignore;
    };
    if header[2] & 0x80 != 0 {
        return Step::Ignore; // a response: never answered
    }
    shared
        .telemetry
        .metrics
        .agent(&agent_name)
        .dns_refused
        .inc();
    let mut rec = ConnectionRecord::begin(Mode::Dns, peer, agent_name, policy.generation());
    rec.duration = started.elapsed();
    rec.reason = Some(Reason::RateLimited);
    rec.dns_response_code = Some(rcode_name(ResponseCode::Refused));
    shared.telemetry.record(rec);
    let mut reply = [0u8; 12];
    reply[..2].copy_from_slice(&header[..2]);
    // QR, the opcode and RD as asked; RA; RCODE 5 (REFUSED); every count 0.
    reply[2] = 0x80 | (header[2] & 0x79);
    reply[3] = 0x80 | 5;
    Step::Reply(reply.to_vec())
}

/// Public addresses, and special ones the agent's `allow_cidrs` (any port: the name may
/// serve on the port the CIDR rule names) or `resolve_cidrs` cover.
fn may_reach(agent: Option<&AgentPolicy>, ip: IpAddr) -> bool {
    match agent {
        Some(a) => a.may_resolve_into(ip),
        None => !address::is_special(ip),
    }
}

fn response(request: &Message, rcode: ResponseCode, answers: Vec<Record>) -> Message {
    let mut m = Message::response(request.metadata.id, request.metadata.op_code);
    m.metadata.recursion_desired = request.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.metadata.response_code = rcode;
    m.queries = request.queries.clone();
    m.answers = answers;
    if request.edns.is_some() {
        // RFC 6891 §6.1.1: a query with OPT gets an OPT back.
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        m.edns = Some(edns);
    }
    m
}

/// The Extended DNS Error for a refusal with `reason`, in the reply's OPT record: only
/// when the query had one (so the reply has one, see [`response`]).
fn add_ede(reply: &mut Message, q: &Question, reason: Reason) {
    if let Some(edns) = reply.edns.as_mut() {
        let agent = q.agent.map(|_| &*q.agent_name);
        edns.options_mut().insert(ede::option(reason, agent));
    }
}

/// The reply's bytes; over `limit` (UDP), the question alone with TC set (RFC 1035 §4.2.1)
/// so the client retries over TCP, and the header alone when even the questions do not fit
/// (a request with many long questions gets FORMERR, which echoes them all). Empty when it
/// cannot be encoded at all.
fn encode(m: &Message, limit: usize) -> Vec<u8> {
    match m.to_vec() {
        Ok(bytes) if bytes.len() <= limit => bytes,
        Ok(_) => {
            let mut truncated = m.truncate();
            match truncated.to_vec() {
                Ok(bytes) if bytes.len() <= limit => bytes,
                _ => {
                    truncated.queries.clear();
                    truncated.to_vec().unwrap_or_default()
                }
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "dns reply could not be encoded");
            Message::error_msg(m.metadata.id, m.metadata.op_code, ResponseCode::ServFail)
                .to_vec()
                .unwrap_or_default()
        }
    }
}

fn rcode_name(rcode: ResponseCode) -> &'static str {
    match rcode {
        ResponseCode::NoError => "NOERROR",
        ResponseCode::FormErr => "FORMERR",
        ResponseCode::ServFail => "SERVFAIL",
        ResponseCode::NXDomain => "NXDOMAIN",
        ResponseCode::NotImp => "NOTIMP",
        ResponseCode::Refused => "REFUSED",
        _ => "OTHER",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;

    use super::*;

    /// Found with the dns_message fuzz target's size invariant: 20 long questions over UDP
    /// got a 1234-byte FORMERR (every question echoed, TC set) for a client that offered 512.
    #[test]
    fn a_udp_reply_never_exceeds_the_limit_even_with_many_questions() {
        let mut request = Message::query();
        request.metadata.id = 0x4242;
        for i in 0..20 {
            let name = Name::from_ascii(format!("{}.x{i}.allowed.test.", "a".repeat(50))).unwrap();
            request.add_query(Query::query(name, RecordType::A));
        }
        let reply = encode(
            &response(&request, ResponseCode::FormErr, Vec::new()),
            UDP_PLAIN_MAX,
        );
        assert!(reply.len() <= UDP_PLAIN_MAX, "{} bytes", reply.len());
        let parsed = Message::from_vec(&reply).unwrap();
        assert_eq!(parsed.metadata.id, 0x4242);
        assert!(parsed.metadata.truncation);
        assert_eq!(parsed.metadata.response_code, ResponseCode::FormErr);
        assert!(parsed.queries.is_empty());

        // One question that fits keeps the question (the client needs it to retry over TCP).
        let mut one = Message::query();
        one.add_query(Query::query(
            Name::from_ascii("big.allowed.test.").unwrap(),
            RecordType::A,
        ));
        let answers = (0..40u8)
            .map(|i| {
                Record::from_rdata(
                    Name::from_ascii("big.allowed.test.").unwrap(),
                    60,
                    hickory_proto::rr::RData::A(hickory_proto::rr::rdata::A::new(93, 184, 217, i)),
                )
            })
            .collect();
        let reply = encode(
            &response(&one, ResponseCode::NoError, answers),
            UDP_PLAIN_MAX,
        );
        let parsed = Message::from_vec(&reply).unwrap();
        assert!(reply.len() <= UDP_PLAIN_MAX);
        assert!(parsed.metadata.truncation);
        assert_eq!(parsed.queries.len(), 1);
    }
}

//! The forwarder's response cache: (normalised name, type) → the upstream's answer, ECH
//! already stripped, honouring the records' TTLs capped at `dns.max_ttl_secs`, at most
//! `dns.cache_entries` pairs and `dns.cache_bytes` bytes (each entry's size estimated from
//! its records: the Vec's slots, allocated or not, plus the wire form of the data; no entry
//! over an eighth of it).
//!
//! Holds answers as the upstream gave them, not per agent: the rebinding filter runs on every
//! answer, cached or not, because `allow_cidrs` differ between agents. Must not hold its
//! lock across an await (it never awaits) and takes `now` from the caller.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::upstream::Answer;

struct Entry {
    rtype: u16,
    stored: Instant,
    expires: Instant,
    answer: Arc<Answer>,
    /// Estimated bytes, counted in `Inner::bytes`.
    size: usize,
}

/// A cached answer and how many whole seconds it has aged (to subtract from its TTLs).
pub struct Hit {
    pub answer: Arc<Answer>,
    pub age_secs: u32,
}

pub struct ResponseCache {
    capacity: usize,
    max_bytes: usize,
    max_ttl: u32,
    /// Name → entries of each type; a name rarely has more than two types cached, and the
    /// lookup by `&str` needs no allocation.
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    by_name: HashMap<Box<str>, Vec<Entry>>,
    len: usize,
    bytes: usize,
}

impl ResponseCache {
    pub fn new(capacity: usize, max_bytes: usize, max_ttl: Duration) -> Self {
        Self {
            capacity,
            max_bytes,
            max_ttl: u32::try_from(max_ttl.as_secs()).unwrap_or(u32::MAX),
            inner: Mutex::new(Inner::default()),
        }
    }

    pub fn get(&self, name: &str, rtype: u16, now: Instant) -> Option<Hit> {
        let inner = self.inner.lock().ok()?;
        let e = inner
            .by_name
            .get(name)?
            .iter()
            .find(|e| e.rtype == rtype && e.expires > now)?;
        let age = now.saturating_duration_since(e.stored).as_secs();
        Some(Hit {
            answer: e.answer.clone(),
            age_secs: u32::try_from(age).unwrap_or(u32::MAX),
        })
    }

    /// Keep `answer` for its TTL (capped); answers with TTL 0 are not kept. TTLs in the
    /// stored records are capped too, so a cached answer never outlives what it says.
    pub fn insert(&self, name: &str, rtype: u16, mut answer: Answer, now: Instant) -> Arc<Answer> {
        answer.ttl = answer.ttl.min(self.max_ttl);
        for r in answer.records.iter_mut().chain(&mut answer.authority) {
            r.ttl = r.ttl.min(self.max_ttl);
        }
        let answer = Arc::new(answer);
        let size = estimate(name, &answer);
        if answer.ttl == 0 || self.capacity == 0 || size > self.max_bytes / 8 {
            return answer;
        }
        let Ok(mut inner) = self.inner.lock() else {
            return answer;
        };
        let inner = &mut *inner;
        if inner.len >= self.capacity || inner.bytes + size > self.max_bytes {
            prune(inner, now);
        }
        while inner.len >= self.capacity || inner.bytes + size > self.max_bytes {
            // Still full of live entries: evict an arbitrary name (HashMap order is
            // randomised per process, so an agent cannot aim this at a victim name).
            let Some(victim) = inner.by_name.keys().next().cloned() else {
                break;
            };
            if let Some(gone) = inner.by_name.remove(&victim) {
                inner.len -= gone.len();
                inner.bytes -= gone.iter().map(|e| e.size).sum::<usize>();
            }
        }
        let entry = Entry {
            rtype,
            stored: now,
            expires: now + Duration::from_secs(u64::from(answer.ttl)),
            answer: answer.clone(),
            size,
        };
        inner.bytes += size;
        let entries = inner.by_name.entry(name.into()).or_default();
        match entries.iter_mut().find(|e| e.rtype == rtype) {
            Some(e) => {
                inner.bytes -= e.size;
                *e = entry;
            }
            None => {
                entries.push(entry);
                inner.len += 1;
            }
        }
        answer
    }

    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.inner.lock().map(|i| i.bytes).unwrap_or(0)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.lock().map(|i| i.len).unwrap_or(0)
    }
}

/// An entry's bytes: the name, the answer and each record's struct, and the wire form of
/// each record (its names and data live on the heap about that size).
fn estimate(name: &str, answer: &Answer) -> usize {
    use hickory_proto::serialize::binary::BinEncodable;
    let slots = (answer.records.capacity() + answer.authority.capacity())
        * std::mem::size_of::<hickory_proto::rr::Record>();
    let heap: usize = answer
        .records
        .iter()
        .chain(&answer.authority)
        .map(|r| r.to_bytes().map_or(512, |b| b.len()))
        .sum();
    name.len() + std::mem::size_of::<Entry>() + std::mem::size_of::<Answer>() + slots + heap
}

fn prune(inner: &mut Inner, now: Instant) {
    let mut removed = 0;
    let mut freed = 0;
    inner.by_name.retain(|_, entries| {
        let before = entries.len();
        entries.retain(|e| {
            let keep = e.expires > now;
            if !keep {
                freed += e.size;
            }
            keep
        });
        removed += before - entries.len();
        !entries.is_empty()
    });
    inner.len -= removed;
    inner.bytes -= freed;
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::net::Ipv4Addr;

    use hickory_proto::op::ResponseCode;
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{Name, RData, Record};

    use super::*;

    fn answer(ttl: u32) -> Answer {
        Answer {
            rcode: ResponseCode::NoError,
            records: vec![Record::from_rdata(
                Name::from_ascii("a.test.").unwrap(),
                ttl,
                RData::A(A(Ipv4Addr::new(203, 0, 113, 1))),
            )],
            authority: Vec::new(),
            ttl,
        }
    }

    #[test]
    fn ttl_is_honoured_and_capped() {
        let c = ResponseCache::new(10, 1 << 20, Duration::from_secs(300));
        let t0 = Instant::now();
        c.insert("a.test", 1, answer(30), t0);
        assert!(c.get("a.test", 1, t0 + Duration::from_secs(29)).is_some());
        assert!(c.get("a.test", 1, t0 + Duration::from_secs(31)).is_none());
        assert!(c.get("a.test", 28, t0).is_none(), "keyed by type too");
        let stored = c.insert("b.test", 1, answer(86_400), t0);
        assert_eq!(stored.records[0].ttl, 300);
        assert!(c.get("b.test", 1, t0 + Duration::from_secs(301)).is_none());
        c.insert("z.test", 1, answer(0), t0);
        assert!(c.get("z.test", 1, t0).is_none(), "TTL 0 is not cached");
    }

    #[test]
    fn capacity_is_a_bound() {
        let c = ResponseCache::new(3, 1 << 20, Duration::from_secs(300));
        let t0 = Instant::now();
        for i in 0..10 {
            c.insert(&format!("n{i}.test"), 1, answer(60), t0);
            assert!(c.len() <= 3);
        }
        assert!(c.get("n9.test", 1, t0).is_some(), "the newest is kept");
    }

    #[test]
    fn bytes_are_a_bound_and_accounted_exactly() {
        let c = ResponseCache::new(10_000, 512 * 1024, Duration::from_secs(300));
        let t0 = Instant::now();
        let big = |n: u8| Answer {
            rcode: ResponseCode::NoError,
            authority: Vec::new(),
            records: (0..32u8)
                .map(|i| {
                    Record::from_rdata(
                        Name::from_ascii(format!("n{n}.big.test.")).unwrap(),
                        60,
                        RData::A(A(Ipv4Addr::new(203, 0, n, i))),
                    )
                })
                .collect(),
            ttl: 60,
        };
        for n in 0..200 {
            c.insert(&format!("n{n}.big.test"), 1, big(n), t0);
            assert!(c.bytes() <= 512 * 1024, "{} bytes", c.bytes());
        }
        assert!(c.len() < 200 && c.len() > 0);
        // Replacing an entry keeps the count exact.
        let before = c.bytes();
        c.insert("n199.big.test", 1, big(199), t0);
        assert_eq!(c.bytes(), before);
        // So does expiring: three entries, all expired when a fourth comes.
        let c = ResponseCache::new(3, 1 << 20, Duration::from_secs(300));
        for n in 0..3 {
            c.insert(&format!("n{n}.big.test"), 1, big(n), t0);
        }
        c.insert("last.test", 1, answer(60), t0 + Duration::from_secs(61));
        assert_eq!(c.len(), 1);
        assert_eq!(c.bytes(), estimate("last.test", &answer(60)));
        // One answer over an eighth of the budget is answered, not kept.
        let c = ResponseCache::new(10, 1024, Duration::from_secs(300));
        c.insert("n1.big.test", 1, big(1), t0);
        assert_eq!(c.len(), 0);
    }
}

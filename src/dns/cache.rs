//! The forwarder's response cache: (normalised name, type) → the upstream's answer, ECH
//! already stripped, honouring the records' TTLs capped at `dns.max_ttl_secs`, at most
//! `dns.cache_entries` pairs.
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
}

/// A cached answer and how many whole seconds it has aged (to subtract from its TTLs).
pub struct Hit {
    pub answer: Arc<Answer>,
    pub age_secs: u32,
}

pub struct ResponseCache {
    capacity: usize,
    max_ttl: u32,
    /// Name → entries of each type; a name rarely has more than two types cached, and the
    /// lookup by `&str` needs no allocation.
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    by_name: HashMap<Box<str>, Vec<Entry>>,
    len: usize,
}

impl ResponseCache {
    pub fn new(capacity: usize, max_ttl: Duration) -> Self {
        Self {
            capacity,
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
        if answer.ttl == 0 || self.capacity == 0 {
            return answer;
        }
        let Ok(mut inner) = self.inner.lock() else {
            return answer;
        };
        let inner = &mut *inner;
        if inner.len >= self.capacity {
            prune(inner, now);
        }
        if inner.len >= self.capacity {
            // Still full of live entries: evict an arbitrary name (HashMap order is
            // randomised per process, so an agent cannot aim this at a victim name).
            if let Some(victim) = inner.by_name.keys().next().cloned()
                && let Some(gone) = inner.by_name.remove(&victim)
            {
                inner.len -= gone.len();
            }
        }
        let entry = Entry {
            rtype,
            stored: now,
            expires: now + Duration::from_secs(u64::from(answer.ttl)),
            answer: answer.clone(),
        };
        let entries = inner.by_name.entry(name.into()).or_default();
        match entries.iter_mut().find(|e| e.rtype == rtype) {
            Some(e) => *e = entry,
            None => {
                entries.push(entry);
                inner.len += 1;
            }
        }
        answer
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.lock().map(|i| i.len).unwrap_or(0)
    }
}

fn prune(inner: &mut Inner, now: Instant) {
    let mut removed = 0;
    inner.by_name.retain(|_, entries| {
        let before = entries.len();
        entries.retain(|e| e.expires > now);
        removed += before - entries.len();
        !entries.is_empty()
    });
    inner.len -= removed;
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
        let c = ResponseCache::new(10, Duration::from_secs(300));
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
        let c = ResponseCache::new(3, Duration::from_secs(300));
        let t0 = Instant::now();
        for i in 0..10 {
            c.insert(&format!("n{i}.test"), 1, answer(60), t0);
            assert!(c.len() <= 3);
        }
        assert!(c.get("n9.test", 1, t0).is_some(), "the newest is kept");
    }
}

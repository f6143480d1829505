//! The hash of the maps the data path looks up on every connection whose keys no agent
//! chooses: names, addresses and usernames from the rules (an agent's request is looked up
//! in them, but only the rules insert), agent names, and the gateway's own tunnel counters.
//!
//! A folded multiply over eight bytes at a time (the core of foldhash and wyhash): the
//! 128-bit product of the state and a constant, its halves XORed, so every bit of the word
//! reaches the low bits a table indexes by and the top bits it tags with. About 30
//! instructions a lookup where SipHash took about 180, seven times per tunnel (callgrind).
//! (A plain multiply, as rustc's FxHash, leaves the low bits blind to a word's high bytes:
//! addresses 10.0.0.x all fell in one bucket; the test below keeps that from coming back.)
//!
//! SipHash's keyed flood resistance matters only where an agent decides what is inserted,
//! so the maps that hold what an agent sends (the resolver's name cache, the per-source
//! connection counts, the DNS forwarder's tables) keep the standard hasher.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A map with [`RuleKeyHash`]: for keys from the rules and the gateway's own counters only.
pub type RuleKeyMap<K, V> = HashMap<K, V, BuildHasherDefault<RuleKeyHash>>;

/// See the module's documentation.
#[derive(Default)]
pub struct RuleKeyHash(u64);

impl Hasher for RuleKeyHash {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            if let Some(head) = word.get_mut(..chunk.len()) {
                head.copy_from_slice(chunk);
            }
            self.add(u64::from_le_bytes(word));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    /// One more fold with another constant: a single word (a tunnel id) would otherwise
    /// come out of one multiply, whose low byte keeps the shape of the id's.
    fn finish(&self) -> u64 {
        fold(self.0, 0x9e_37_79_b9_7f_4a_7c_15)
    }
}

impl RuleKeyHash {
    fn add(&mut self, word: u64) {
        self.0 = fold(self.0 ^ word, 0x51_7c_c1_b7_27_22_0a_95);
    }
}

/// The 128-bit product of `a` and `b`, its halves XORed.
fn fold(a: u64, b: u64) -> u64 {
    let product = u128::from(a) * u128::from(b);
    (product as u64) ^ ((product >> 64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    /// Keys that differ a little hash apart, in the low bits a table indexes by and in the
    /// top seven it tags with: consecutive tunnel ids, names one letter apart (at the start,
    /// the end, past eight bytes), neighbouring IPv4 and IPv6 addresses.
    #[test]
    fn near_keys_spread_over_low_and_high_bits() {
        use std::collections::HashSet;
        use std::net::IpAddr;
        let build = BuildHasherDefault::<RuleKeyHash>::default();
        let spread = |hashes: Vec<u64>| {
            let low: HashSet<u64> = hashes.iter().map(|h| h & 0xff).collect();
            let top: HashSet<u64> = hashes.iter().map(|h| h >> 57).collect();
            (low.len(), top.len())
        };
        let ids = spread((0..256u64).map(|id| build.hash_one(id)).collect());
        let names = |shape: fn(char) -> String| {
            spread(
                (0..=255u8)
                    .map(|c| build.hash_one(shape(char::from(c))))
                    .collect(),
            )
        };
        let v4 = spread(
            (0..=255u8)
                .map(|i| build.hash_one(IpAddr::from([10, 0, 0, i])))
                .collect(),
        );
        let v6 = spread(
            (0..=255u8)
                .map(|i| build.hash_one(IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 0, u16::from(i)])))
                .collect(),
        );
        for (what, (low, top)) in [
            ("ids", ids),
            ("first letter", names(|c| format!("{c}gent"))),
            ("last letter", names(|c| format!("agent-{c}"))),
            ("ninth letter", names(|c| format!("api.test{c}.example"))),
            ("IPv4", v4),
            ("IPv6", v6),
        ] {
            // 256 keys into 256 low values: a random hash fills about 162; into 128 tags: 111.
            assert!(low > 140, "{what}: {low} distinct low bytes of 256");
            assert!(top > 95, "{what}: {top} distinct tags of 128");
        }
        let map: RuleKeyMap<&str, u32> = [("a", 1), ("b", 2)].into_iter().collect();
        assert_eq!(map.get("b"), Some(&2));
        assert_eq!(map.get("c"), None);
    }
}

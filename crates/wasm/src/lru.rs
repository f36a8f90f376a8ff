//! A small map bounded by entry count that drops its least recently used
//! entry when full. Meant for tens to a few thousand entries: eviction scans
//! the map, which is cheap at that size and needs no extra bookkeeping.

use std::collections::HashMap;
use std::hash::Hash;

#[derive(Debug)]
pub(crate) struct Lru<K, V> {
    entries: HashMap<K, (V, u64)>,
    /// Advances on every use; an entry's stamp is the tick of its last use.
    tick: u64,
    capacity: usize,
}

impl<K: Hash + Eq + Clone, V> Lru<K, V> {
    /// A map holding at most `capacity` entries (at least one).
    pub(crate) fn new(capacity: usize) -> Self {
        Self { entries: HashMap::new(), tick: 0, capacity: capacity.max(1) }
    }

    fn next_tick(&mut self) -> u64 {
        self.tick = self.tick.wrapping_add(1);
        self.tick
    }

    /// The value for `key`, which becomes the most recently used.
    pub(crate) fn get(&mut self, key: &K) -> Option<&V> {
        let tick = self.next_tick();
        let (value, used) = self.entries.get_mut(key)?;
        *used = tick;
        Some(value)
    }

    /// Inserts or replaces `key`'s value as the most recently used, dropping
    /// the least recently used entry if the map is over its capacity.
    pub(crate) fn insert(&mut self, key: K, value: V) {
        let tick = self.next_tick();
        self.entries.insert(key, (value, tick));
        while self.entries.len() > self.capacity {
            let Some(oldest) = self.entries.iter().min_by_key(|(_, (_, used))| *used).map(|(k, _)| k.clone()) else {
                break;
            };
            self.entries.remove(&oldest);
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_the_least_recently_used() {
        let mut lru = Lru::new(2);
        lru.insert("a", 1);
        lru.insert("b", 2);
        assert_eq!(lru.get(&"a"), Some(&1));
        lru.insert("c", 3);
        assert_eq!(lru.len(), 2);
        assert_eq!(lru.get(&"b"), None, "b was used least recently");
        assert_eq!(lru.get(&"a"), Some(&1));
        assert_eq!(lru.get(&"c"), Some(&3));
        lru.insert("c", 4);
        assert_eq!((lru.len(), lru.get(&"c")), (2, Some(&4)), "replacing does not evict");
    }

    #[test]
    fn a_zero_capacity_still_keeps_the_newest() {
        let mut lru = Lru::new(0);
        lru.insert(1, "one");
        lru.insert(2, "two");
        assert_eq!((lru.len(), lru.get(&2)), (1, Some(&"two")));
    }
}

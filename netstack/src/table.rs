//! Fixed-capacity storage for the overlay's tables: a slab kept in least-recently-used order
//! ([`Lru`]), an open-addressing hash index over it ([`HashIndex`]), and the two combined into a
//! keyed map ([`FixedMap`]). All memory is allocated once, at construction, from a capacity the
//! configuration gives; nothing grows afterwards. Full is an answer (the caller evicts the
//! oldest entry and counts it), never a panic or a reallocation. Hashing is keyed per process
//! (std's `RandomState`), so peers cannot aim collisions at one bucket.

use crate::Millis;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hash};

const NIL: u32 = u32::MAX;

/// A reference to a slab entry that goes stale when the entry is removed: the generation makes
/// a reused slot unequal to the handle that pointed at its previous tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Handle {
    idx: u32,
    gen: u32,
}

impl Handle {
    pub fn index(self) -> usize {
        self.idx as usize
    }
}

struct Slot<T> {
    item: Option<T>,
    gen: u32,
    prev: u32,
    next: u32,
    used: Millis,
}

/// A slab with an intrusive doubly linked list from most (head) to least (tail) recently used.
pub struct Lru<T> {
    slots: Box<[Slot<T>]>,
    head: u32,
    tail: u32,
    free: u32,
    len: usize,
}

impl<T> Lru<T> {
    pub fn with_capacity(cap: usize) -> Self {
        let cap = cap.min(NIL as usize - 1);
        let slots: Box<[Slot<T>]> = (0..cap)
            .map(|i| Slot {
                item: None,
                gen: 0,
                prev: NIL,
                next: if i + 1 < cap { i as u32 + 1 } else { NIL },
                used: Millis(0),
            })
            .collect();
        Lru {
            slots,
            head: NIL,
            tail: NIL,
            free: if cap > 0 { 0 } else { NIL },
            len: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.slots.len()
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn is_full(&self) -> bool {
        self.free == NIL
    }

    fn handle_of(&self, idx: u32) -> Handle {
        Handle {
            idx,
            gen: self.slots[idx as usize].gen,
        }
    }

    fn live(&self, h: Handle) -> Option<&Slot<T>> {
        self.slots
            .get(h.index())
            .filter(|s| s.gen == h.gen && s.item.is_some())
    }

    pub fn get(&self, h: Handle) -> Option<&T> {
        self.live(h).and_then(|s| s.item.as_ref())
    }

    pub fn get_mut(&mut self, h: Handle) -> Option<&mut T> {
        self.live(h)?;
        self.slots[h.index()].item.as_mut()
    }

    /// Item in slot `idx` regardless of generation (for hash index probes).
    pub fn at(&self, idx: u32) -> Option<&T> {
        self.slots.get(idx as usize).and_then(|s| s.item.as_ref())
    }

    pub fn handle_at(&self, idx: u32) -> Option<Handle> {
        self.at(idx).map(|_| self.handle_of(idx))
    }

    pub fn last_used(&self, h: Handle) -> Option<Millis> {
        self.live(h).map(|s| s.used)
    }

    fn unlink(&mut self, idx: u32) {
        let (prev, next) = {
            let s = &self.slots[idx as usize];
            (s.prev, s.next)
        };
        if prev == NIL {
            self.head = next;
        } else {
            self.slots[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.slots[next as usize].prev = prev;
        }
    }

    fn push_front(&mut self, idx: u32) {
        let old = self.head;
        {
            let s = &mut self.slots[idx as usize];
            s.prev = NIL;
            s.next = old;
        }
        if old == NIL {
            self.tail = idx;
        } else {
            self.slots[old as usize].prev = idx;
        }
        self.head = idx;
    }

    /// Marks the entry used at `now` (moves it to the front).
    pub fn touch(&mut self, h: Handle, now: Millis) {
        if self.live(h).is_none() {
            return;
        }
        self.slots[h.index()].used = now;
        if self.head != h.idx {
            self.unlink(h.idx);
            self.push_front(h.idx);
        }
    }

    /// Stores `item` as the most recent entry; gives it back when the slab is full.
    pub fn insert(&mut self, now: Millis, item: T) -> Result<Handle, T> {
        if self.free == NIL {
            return Err(item);
        }
        let idx = self.free;
        let s = &mut self.slots[idx as usize];
        self.free = s.next;
        s.item = Some(item);
        s.used = now;
        self.push_front(idx);
        self.len += 1;
        Ok(self.handle_of(idx))
    }

    pub fn remove(&mut self, h: Handle) -> Option<T> {
        self.live(h)?;
        self.unlink(h.idx);
        let s = &mut self.slots[h.index()];
        let item = s.item.take();
        s.gen = s.gen.wrapping_add(1);
        s.prev = NIL;
        s.next = self.free;
        self.free = h.idx;
        self.len -= 1;
        item
    }

    /// The least recently used entry.
    pub fn oldest(&self) -> Option<(Handle, Millis)> {
        (self.tail != NIL).then(|| {
            (
                self.handle_of(self.tail),
                self.slots[self.tail as usize].used,
            )
        })
    }

    /// Entries from least to most recently used.
    pub fn iter_oldest_first(&self) -> impl Iterator<Item = (Handle, &T)> + '_ {
        let mut cur = self.tail;
        std::iter::from_fn(move || {
            if cur == NIL {
                return None;
            }
            let idx = cur;
            let s = &self.slots[idx as usize];
            cur = s.prev;
            Some((self.handle_of(idx), s.item.as_ref()?))
        })
    }

    /// Handles of all entries, in slot order (control-plane use: O(capacity)).
    pub fn handles(&self) -> impl Iterator<Item = Handle> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.item.is_some())
            .map(|(i, s)| Handle {
                idx: i as u32,
                gen: s.gen,
            })
    }
}

/// Open addressing with linear probing over slab indices, sized at least twice the slab so the
/// load factor stays at or below one half. Each bucket keeps the low 32 hash bits (to find a
/// key's home bucket again when deleting) and the slot index + 1 (0 = empty).
pub struct HashIndex {
    buckets: Box<[u64]>,
    mask: usize,
}

impl HashIndex {
    pub fn for_capacity(cap: usize) -> Self {
        let n = (cap.max(1) * 2).next_power_of_two();
        HashIndex {
            buckets: vec![0u64; n].into_boxed_slice(),
            mask: n - 1,
        }
    }

    fn home(&self, hash: u32) -> usize {
        hash as usize & self.mask
    }

    /// The slot index whose key satisfies `is_key`, probing from the home of `hash`.
    pub fn find(&self, hash: u64, mut is_key: impl FnMut(u32) -> bool) -> Option<u32> {
        let h32 = hash as u32;
        let mut i = self.home(h32);
        loop {
            let b = self.buckets[i];
            if b == 0 {
                return None;
            }
            let slot = (b as u32).wrapping_sub(1);
            if (b >> 32) as u32 == h32 && is_key(slot) {
                return Some(slot);
            }
            i = (i + 1) & self.mask;
        }
    }

    /// Adds `slot` under `hash`. The caller guarantees the key is not present already and the
    /// slab is no larger than the capacity this index was built for.
    pub fn insert(&mut self, hash: u64, slot: u32) {
        let h32 = hash as u32;
        let mut i = self.home(h32);
        while self.buckets[i] != 0 {
            i = (i + 1) & self.mask;
        }
        self.buckets[i] = (u64::from(h32) << 32) | u64::from(slot + 1);
    }

    /// Removes `slot` (stored under `hash`), shifting later entries of the probe run back so
    /// that lookups never stop early at a hole.
    pub fn remove(&mut self, hash: u64, slot: u32) {
        let h32 = hash as u32;
        let want = (u64::from(h32) << 32) | u64::from(slot + 1);
        let mut i = self.home(h32);
        loop {
            match self.buckets[i] {
                0 => return,
                b if b == want => break,
                _ => i = (i + 1) & self.mask,
            }
        }
        self.buckets[i] = 0;
        let mut hole = i;
        let mut j = (i + 1) & self.mask;
        while self.buckets[j] != 0 {
            let home = self.home((self.buckets[j] >> 32) as u32);
            // Move j into the hole unless j's home lies cyclically in (hole, j].
            let stays = if hole <= j {
                hole < home && home <= j
            } else {
                hole < home || home <= j
            };
            if !stays {
                self.buckets[hole] = self.buckets[j];
                self.buckets[j] = 0;
                hole = j;
            }
            j = (j + 1) & self.mask;
        }
    }
}

/// A keyed hasher shared by the maps of one engine.
#[derive(Clone, Default)]
pub struct Hasher(RandomState);

impl Hasher {
    pub fn hash<K: Hash>(&self, k: &K) -> u64 {
        self.0.hash_one(k)
    }
}

/// What happened to an entry that had to make room.
pub struct Evicted<K, V> {
    pub key: K,
    pub value: V,
    pub last_used: Millis,
}

/// A fixed-capacity map in LRU order. `insert` on a full map evicts the least recently used
/// entry and returns it, so the caller can count and log it.
pub struct FixedMap<K, V> {
    lru: Lru<(K, V)>,
    index: HashIndex,
    hasher: Hasher,
}

impl<K: Hash + Eq, V> FixedMap<K, V> {
    pub fn with_capacity(cap: usize, hasher: Hasher) -> Self {
        FixedMap {
            lru: Lru::with_capacity(cap),
            index: HashIndex::for_capacity(cap),
            hasher,
        }
    }

    pub fn capacity(&self) -> usize {
        self.lru.capacity()
    }
    pub fn len(&self) -> usize {
        self.lru.len()
    }
    pub fn is_empty(&self) -> bool {
        self.lru.is_empty()
    }

    pub fn find(&self, k: &K) -> Option<Handle> {
        let h = self.hasher.hash(k);
        let idx = self
            .index
            .find(h, |slot| self.lru.at(slot).is_some_and(|(kk, _)| kk == k))?;
        self.lru.handle_at(idx)
    }

    pub fn get(&self, k: &K) -> Option<&V> {
        self.find(k).and_then(|h| self.value(h))
    }

    pub fn get_mut(&mut self, k: &K) -> Option<&mut V> {
        let h = self.find(k)?;
        self.value_mut(h)
    }

    pub fn value(&self, h: Handle) -> Option<&V> {
        self.lru.get(h).map(|(_, v)| v)
    }
    pub fn value_mut(&mut self, h: Handle) -> Option<&mut V> {
        self.lru.get_mut(h).map(|(_, v)| v)
    }
    pub fn key(&self, h: Handle) -> Option<&K> {
        self.lru.get(h).map(|(k, _)| k)
    }
    pub fn touch(&mut self, h: Handle, now: Millis) {
        self.lru.touch(h, now)
    }
    pub fn last_used(&self, h: Handle) -> Option<Millis> {
        self.lru.last_used(h)
    }
    pub fn oldest(&self) -> Option<(Handle, Millis)> {
        self.lru.oldest()
    }
    pub fn iter_oldest_first(&self) -> impl Iterator<Item = (Handle, &K, &V)> + '_ {
        self.lru.iter_oldest_first().map(|(h, (k, v))| (h, k, v))
    }
    pub fn handles(&self) -> impl Iterator<Item = Handle> + '_ {
        self.lru.handles()
    }

    /// Inserts a key known to be absent. When full, evicts the least recently used entry
    /// (returned); with capacity 0 the new entry itself comes back as "evicted".
    pub fn insert_new(
        &mut self,
        now: Millis,
        k: K,
        v: V,
    ) -> (Option<Handle>, Option<Evicted<K, V>>) {
        let mut evicted = None;
        if self.lru.is_full() {
            match self.lru.oldest() {
                Some((h, used)) => {
                    if let Some((key, value)) = self.remove(h) {
                        evicted = Some(Evicted {
                            key,
                            value,
                            last_used: used,
                        });
                    }
                }
                None => {
                    return (
                        None,
                        Some(Evicted {
                            key: k,
                            value: v,
                            last_used: now,
                        }),
                    )
                }
            }
        }
        let hash = self.hasher.hash(&k);
        match self.lru.insert(now, (k, v)) {
            Ok(h) => {
                self.index.insert(hash, h.idx);
                (Some(h), evicted)
            }
            // Unreachable after making room; report rather than panic.
            Err((key, value)) => (
                None,
                Some(Evicted {
                    key,
                    value,
                    last_used: now,
                }),
            ),
        }
    }

    /// Inserts only if there is a free slot; gives the pair back otherwise.
    pub fn try_insert_new(&mut self, now: Millis, k: K, v: V) -> Result<Handle, (K, V)> {
        if self.lru.is_full() {
            return Err((k, v));
        }
        let hash = self.hasher.hash(&k);
        let h = self.lru.insert(now, (k, v))?;
        self.index.insert(hash, h.idx);
        Ok(h)
    }

    pub fn is_full(&self) -> bool {
        self.lru.is_full()
    }

    pub fn remove(&mut self, h: Handle) -> Option<(K, V)> {
        let (k, _) = self.lru.get(h)?;
        let hash = self.hasher.hash(k);
        self.index.remove(hash, h.idx);
        self.lru.remove(h)
    }

    pub fn remove_key(&mut self, k: &K) -> Option<V> {
        let h = self.find(k)?;
        self.remove(h).map(|(_, v)| v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_order_and_eviction() {
        let mut m: FixedMap<u32, u32> = FixedMap::with_capacity(3, Hasher::default());
        for k in 0..3 {
            assert!(m.insert_new(Millis(k as u64), k, k * 10).1.is_none());
        }
        let h0 = m.find(&0).unwrap();
        m.touch(h0, Millis(10));
        let (_, ev) = m.insert_new(Millis(11), 3, 30);
        let ev = ev.unwrap();
        assert_eq!((ev.key, ev.value, ev.last_used), (1, 10, Millis(1)));
        assert_eq!(m.get(&0), Some(&0));
        assert_eq!(m.get(&1), None);
        assert_eq!(m.len(), 3);
        let order: Vec<u32> = m.iter_oldest_first().map(|(_, k, _)| *k).collect();
        assert_eq!(order, vec![2, 0, 3]);
    }

    #[test]
    fn stale_handles_do_not_resolve() {
        let mut m: FixedMap<u32, u32> = FixedMap::with_capacity(1, Hasher::default());
        let h = m.insert_new(Millis(0), 1, 1).0.unwrap();
        m.remove(h);
        let h2 = m.insert_new(Millis(0), 2, 2).0.unwrap();
        assert_eq!(h.index(), h2.index());
        assert!(m.value(h).is_none());
        assert_eq!(m.value(h2), Some(&2));
    }

    #[test]
    fn zero_capacity_is_an_answer() {
        let mut m: FixedMap<u32, u32> = FixedMap::with_capacity(0, Hasher::default());
        let (h, ev) = m.insert_new(Millis(0), 1, 1);
        assert!(h.is_none() && ev.is_some());
        assert!(m.try_insert_new(Millis(0), 1, 1).is_err());
    }

    #[test]
    fn random_ops_match_a_reference_model() {
        // Heavy churn with deletions exercises the backward-shift removal of the index.
        let mut m: FixedMap<u32, u32> = FixedMap::with_capacity(64, Hasher::default());
        let mut model = std::collections::HashMap::new();
        let mut x: u32 = 0x9e37_79b9;
        for step in 0..200_000u64 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let k = x % 97;
            if x & 0x100 != 0 {
                if m.get(&k).is_none() && !m.is_full() {
                    m.insert_new(Millis(step), k, step as u32);
                    model.insert(k, step as u32);
                }
            } else if let Some(v) = m.remove_key(&k) {
                assert_eq!(model.remove(&k), Some(v));
            }
            assert_eq!(m.len(), model.len());
            if step % 1000 == 0 {
                for (k, v) in &model {
                    assert_eq!(m.get(k), Some(v));
                }
            }
        }
    }
}

//! The conversion cache (spec overlay-network §3.6) done as a flow table: one entry per
//! 5-tuple a local instance opened towards a service IP, found by its forward key (packets
//! leaving) and by its reverse key (replies arriving), plus the small table that lets later
//! IP fragments follow their first fragment. Fixed capacity, LRU eviction, idle expiry; no
//! port-indexed arrays, so no port value can crash it (unlike upstream, §8 item 2).

use crate::table::{self, FixedMap, Handle, HashIndex, Lru};
use crate::Millis;
use std::hash::{Hash, Hasher};
use std::net::Ipv4Addr;

/// Seen from the local instance: `local`/`local_port` is its namespace address and port,
/// `remote`/`remote_port` the far end. For ICMP echo the identifier is the local port and the
/// remote port is 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowKey {
    pub proto: u8,
    pub local: Ipv4Addr,
    pub local_port: u16,
    pub remote: Ipv4Addr,
    pub remote_port: u16,
}

/// One 104-bit word into the keyed hasher instead of a write per field: every packet that
/// crosses the data plane is looked up by its 5-tuple, and each hasher write has a fixed cost.
impl Hash for FlowKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let w = u128::from(self.proto) << 96
            | u128::from(self.local.to_bits()) << 64
            | u128::from(self.local_port) << 48
            | u128::from(self.remote.to_bits()) << 16
            | u128::from(self.remote_port);
        state.write_u128(w);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    /// `remote` = the service IP the instance dialled.
    pub fwd: FlowKey,
    /// The chosen instance's InstanceIP: replies arrive from it (a Go peer rewrites their
    /// source to it, spec §3.3) and are mapped back to `fwd.remote`.
    pub reply_from: Ipv4Addr,
    pub target: Handle,
    pub target_nsip: Ipv4Addr,
    /// The local instance's InstanceIP, the source on the overlay.
    pub src_instance_ip: Ipv4Addr,
}

impl Flow {
    pub fn rev(&self) -> FlowKey {
        FlowKey {
            remote: self.reply_from,
            ..self.fwd
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlowCounters {
    pub inserted: u64,
    /// Flows dropped to make room while still within their idle timeout.
    pub evicted: u64,
    pub expired: u64,
    /// A new flow took over the reverse key of an older one (same translated 5-tuple).
    pub reverse_collisions: u64,
}

pub struct FlowTable {
    lru: Lru<Flow>,
    fwd: HashIndex,
    rev: HashIndex,
    hasher: table::Hasher,
    pub counters: FlowCounters,
}

impl FlowTable {
    pub fn new(cap: usize, hasher: table::Hasher) -> Self {
        FlowTable {
            lru: Lru::with_capacity(cap),
            fwd: HashIndex::for_capacity(cap),
            rev: HashIndex::for_capacity(cap),
            hasher,
            counters: FlowCounters::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.lru.len()
    }
    pub fn is_empty(&self) -> bool {
        self.lru.is_empty()
    }
    pub fn capacity(&self) -> usize {
        self.lru.capacity()
    }

    pub fn get(&self, h: Handle) -> Option<&Flow> {
        self.lru.get(h)
    }

    fn find_fwd(&self, k: &FlowKey) -> Option<Handle> {
        let hash = self.hasher.hash(k);
        let i = self
            .fwd
            .find(hash, |s| self.lru.at(s).is_some_and(|f| f.fwd == *k))?;
        self.lru.handle_at(i)
    }

    fn find_rev(&self, k: &FlowKey) -> Option<Handle> {
        let hash = self.hasher.hash(k);
        let i = self
            .rev
            .find(hash, |s| self.lru.at(s).is_some_and(|f| f.rev() == *k))?;
        self.lru.handle_at(i)
    }

    /// Live flow for a forward key; an entry idle longer than `idle_ms` is removed instead.
    pub fn lookup_fwd(&mut self, now: Millis, k: &FlowKey, idle_ms: u64) -> Option<Handle> {
        let h = self.find_fwd(k)?;
        self.live(now, h, idle_ms)
    }

    pub fn lookup_rev(&mut self, now: Millis, k: &FlowKey, idle_ms: u64) -> Option<Handle> {
        let h = self.find_rev(k)?;
        self.live(now, h, idle_ms)
    }

    fn live(&mut self, now: Millis, h: Handle, idle_ms: u64) -> Option<Handle> {
        let used = self.lru.last_used(h)?;
        if now.since(used) > idle_ms {
            self.remove(h);
            self.counters.expired += 1;
            return None;
        }
        self.lru.touch(h, now);
        Some(h)
    }

    pub fn remove(&mut self, h: Handle) -> Option<Flow> {
        let f = *self.lru.get(h)?;
        self.fwd.remove(self.hasher.hash(&f.fwd), h.index() as u32);
        self.rev
            .remove(self.hasher.hash(&f.rev()), h.index() as u32);
        self.lru.remove(h)
    }

    /// Installs a new flow (its forward key must be absent). Returns the evicted flow when the
    /// table was full and the oldest one was still live (`idle_ms` says how long a flow of the
    /// evicted one's kind may idle), so the caller can count and log it.
    pub fn insert(
        &mut self,
        now: Millis,
        flow: Flow,
        idle_of: impl Fn(&Flow) -> u64,
    ) -> (Option<Handle>, Option<Flow>) {
        if let Some(old) = self.find_rev(&flow.rev()) {
            self.remove(old);
            self.counters.reverse_collisions += 1;
        }
        let mut evicted = None;
        if self.lru.is_full() {
            let Some((h, used)) = self.lru.oldest() else {
                return (None, None);
            };
            if let Some(f) = self.remove(h) {
                if now.since(used) > idle_of(&f) {
                    self.counters.expired += 1;
                } else {
                    self.counters.evicted += 1;
                    evicted = Some(f);
                }
            }
        }
        let Ok(h) = self.lru.insert(now, flow) else {
            return (None, evicted);
        };
        self.fwd
            .insert(self.hasher.hash(&flow.fwd), h.index() as u32);
        self.rev
            .insert(self.hasher.hash(&flow.rev()), h.index() as u32);
        self.counters.inserted += 1;
        (Some(h), evicted)
    }

    /// Removes up to `budget` flows idle for longer than their timeout, oldest first.
    pub fn expire(&mut self, now: Millis, budget: usize, idle_of: impl Fn(&Flow) -> u64) -> usize {
        let mut n = 0;
        while n < budget {
            let Some((h, used)) = self.lru.oldest() else {
                break;
            };
            let Some(f) = self.lru.get(h) else { break };
            if now.since(used) <= idle_of(f) {
                break;
            }
            self.remove(h);
            self.counters.expired += 1;
            n += 1;
        }
        n
    }
}

/// Identifies the fragments of one datagram (RFC 791: src, dst, protocol, identification),
/// taken before translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FragKey {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub id: u16,
    pub proto: u8,
}

/// One word per key, as for [`FlowKey`].
impl Hash for FragKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let w = u128::from(self.src.to_bits()) << 56
            | u128::from(self.dst.to_bits()) << 24
            | u128::from(self.id) << 8
            | u128::from(self.proto);
        state.write_u128(w);
    }
}

/// What was done to the first fragment, for the others to repeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FragDecision {
    pub new_src: Option<Ipv4Addr>,
    pub new_dst: Option<Ipv4Addr>,
    /// `None`: to the TUN (incoming or hairpin); `Some`: to this peer (peer-table handle).
    pub peer: Option<Handle>,
    pub hairpin: bool,
}

pub struct FragTable {
    map: FixedMap<FragKey, FragDecision>,
    pub evicted: u64,
}

impl FragTable {
    pub fn new(cap: usize, hasher: table::Hasher) -> Self {
        FragTable {
            map: FixedMap::with_capacity(cap, hasher),
            evicted: 0,
        }
    }

    pub fn record(&mut self, now: Millis, k: FragKey, d: FragDecision, ttl_ms: u64) {
        if let Some(v) = self.map.get_mut(&k) {
            *v = d;
            return;
        }
        let (_, ev) = self.map.insert_new(now, k, d);
        if let Some(ev) = ev {
            if now.since(ev.last_used) <= ttl_ms {
                self.evicted += 1;
            }
        }
    }

    pub fn lookup(&mut self, now: Millis, k: &FragKey, ttl_ms: u64) -> Option<FragDecision> {
        let h = self.map.find(k)?;
        let used = self.map.last_used(h)?;
        if now.since(used) > ttl_ms {
            self.map.remove(h);
            return None;
        }
        self.map.touch(h, now);
        self.map.value(h).copied()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

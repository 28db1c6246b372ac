//! Parking for packets whose destination service IP is not in the table yet: a fixed pool of
//! packet-sized slots, a bound per destination, one outstanding table query per destination,
//! and release on answer or timeout. Time is passed in; nothing here sleeps or talks to MQTT.
//! It does not decide what a released packet becomes; the engine re-runs it.

use crate::table::{FixedMap, Hasher};
use crate::Millis;
use std::net::Ipv4Addr;

#[derive(Debug, Clone, Copy)]
struct Pending {
    deadline: Millis,
    parked: u32,
    resolved: bool,
}

#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    key: Option<Ipv4Addr>,
    len: usize,
    seq: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParkRefused {
    /// The destination already has its share of slots parked.
    PerDestinationLimit,
    /// Every slot is in use.
    NoFreeSlot,
    /// The packet is larger than a slot.
    TooBig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parked {
    /// First packet for this destination: the caller sends the table query.
    NewQuery,
    /// A query is already in flight.
    Waiting,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Released {
    pub key: Ipv4Addr,
    pub len: usize,
    /// The query was not answered in time (or not with this destination).
    pub timed_out: bool,
}

pub struct ParkingLot {
    slot_bytes: usize,
    data: Box<[u8]>,
    slots: Box<[Slot]>,
    pending: FixedMap<Ipv4Addr, Pending>,
    per_destination: u32,
    seq: u64,
    /// Some query was resolved since the last scan found nothing.
    ready_hint: bool,
    earliest_deadline: Option<Millis>,
    used: usize,
}

impl ParkingLot {
    pub fn new(slots: usize, slot_bytes: usize, per_destination: usize, hasher: Hasher) -> Self {
        ParkingLot {
            slot_bytes,
            data: vec![0u8; slots * slot_bytes].into_boxed_slice(),
            slots: vec![Slot::default(); slots].into_boxed_slice(),
            pending: FixedMap::with_capacity(slots, hasher),
            per_destination: per_destination.max(1) as u32,
            seq: 0,
            ready_hint: false,
            earliest_deadline: None,
            used: 0,
        }
    }

    pub fn parked(&self) -> usize {
        self.used
    }

    pub fn is_pending(&self, key: Ipv4Addr) -> bool {
        self.pending.get(&key).is_some()
    }

    /// Copies `pkt` into a free slot keyed by its destination `key`.
    pub fn park(
        &mut self,
        now: Millis,
        key: Ipv4Addr,
        pkt: &[u8],
        timeout_ms: u64,
    ) -> Result<Parked, ParkRefused> {
        if pkt.len() > self.slot_bytes {
            return Err(ParkRefused::TooBig);
        }
        let existing = self.pending.find(&key);
        if let Some(p) = existing.and_then(|h| self.pending.value(h)) {
            if p.parked >= self.per_destination {
                return Err(ParkRefused::PerDestinationLimit);
            }
        }
        let Some(i) = self.slots.iter().position(|s| s.key.is_none()) else {
            return Err(ParkRefused::NoFreeSlot);
        };
        let outcome = match existing {
            Some(h) => {
                if let Some(p) = self.pending.value_mut(h) {
                    p.parked += 1;
                }
                Parked::Waiting
            }
            None => {
                let deadline = Millis(now.0.saturating_add(timeout_ms));
                let p = Pending {
                    deadline,
                    parked: 1,
                    resolved: false,
                };
                // Capacity equals the slot count and every pending entry owns a slot, so
                // there is always room here.
                if self.pending.try_insert_new(now, key, p).is_err() {
                    return Err(ParkRefused::NoFreeSlot);
                }
                self.earliest_deadline =
                    Some(self.earliest_deadline.map_or(deadline, |d| d.min(deadline)));
                Parked::NewQuery
            }
        };
        self.seq += 1;
        self.slots[i] = Slot {
            key: Some(key),
            len: pkt.len(),
            seq: self.seq,
        };
        let off = i * self.slot_bytes;
        self.data[off..off + pkt.len()].copy_from_slice(pkt);
        self.used += 1;
        Ok(outcome)
    }

    /// The table now knows `key`: its parked packets may go.
    pub fn resolve(&mut self, key: Ipv4Addr) -> bool {
        match self.pending.get_mut(&key) {
            Some(p) => {
                p.resolved = true;
                self.ready_hint = true;
                true
            }
            None => false,
        }
    }

    /// When the next timeout falls due, for the I/O loop's poll timeout.
    pub fn next_deadline(&self) -> Option<Millis> {
        if self.ready_hint {
            return Some(Millis(0));
        }
        self.earliest_deadline
    }

    /// The oldest parked packet that may leave now (answered or timed out), copied into
    /// `out`. Call until `None`.
    pub fn take_ready(&mut self, now: Millis, out: &mut [u8]) -> Option<Released> {
        if self.used == 0 {
            return None;
        }
        if !self.ready_hint && self.earliest_deadline.map_or(true, |d| now < d) {
            return None;
        }
        let mut best: Option<(usize, u64, bool)> = None;
        for (i, s) in self.slots.iter().enumerate() {
            let Some(key) = s.key else { continue };
            let Some(p) = self.pending.get(&key) else {
                continue;
            };
            let timed_out = now >= p.deadline;
            if (p.resolved || timed_out) && best.map_or(true, |(_, seq, _)| s.seq < seq) {
                best = Some((i, s.seq, timed_out && !p.resolved));
            }
        }
        let Some((i, _, timed_out)) = best else {
            self.ready_hint = false;
            self.earliest_deadline = self
                .pending
                .iter_oldest_first()
                .map(|(_, _, p)| p.deadline)
                .min();
            return None;
        };
        let Slot { key, len, .. } = self.slots[i];
        let key = key?;
        self.slots[i] = Slot::default();
        self.used -= 1;
        let done = match self.pending.get_mut(&key) {
            Some(p) => {
                p.parked = p.parked.saturating_sub(1);
                p.parked == 0
            }
            None => true,
        };
        if done {
            self.pending.remove_key(&key);
        }
        if out.len() < len {
            return Some(Released {
                key,
                len: 0,
                timed_out,
            });
        }
        let off = i * self.slot_bytes;
        out[..len].copy_from_slice(&self.data[off..off + len]);
        Some(Released {
            key,
            len,
            timed_out,
        })
    }
}

//! The translation table (spec overlay-network §3.5) as fixed-capacity maps: instances by
//! namespace IP, service IPs with their candidate instances, jobs (the unit of interest and
//! of table-query replacement) and peer workers. It decides nothing about packets except which
//! candidate a new flow gets; it never talks to the network.

use crate::control::{InstanceRecord, JobName, ServiceIp, SipKind, TableUpdate, MAX_SERVICE_IPS};
use crate::table::{FixedMap, Handle, Hasher};
use crate::Millis;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4};

/// Most instances one service IP can spread over. More are counted and left out.
pub const MAX_CANDIDATES: usize = 32;

#[derive(Debug, Clone)]
pub struct InstanceEntry {
    pub job: Handle,
    pub instance_number: u32,
    pub nsip: Ipv4Addr,
    pub nsip_v6: Option<Ipv6Addr>,
    /// The instance's own InstanceIP; the source its traffic gets on the overlay. Unknown for
    /// a local instance until the first table result for its job arrives (spec §3.2 step 6).
    pub instance_ip: Option<Ipv4Addr>,
    pub service_ips: heapless::Vec<ServiceIp, MAX_SERVICE_IPS>,
    /// The peer worker that hosts it; `None` for instances on this worker.
    pub peer: Option<Handle>,
}

#[derive(Debug, Clone)]
pub struct ServiceEntry {
    pub kind: SipKind,
    pub candidates: heapless::Vec<Handle, MAX_CANDIDATES>,
    /// Round-robin position: advanced once per new flow, not per packet.
    pub next: u32,
}

#[derive(Debug, Clone, Default)]
pub struct JobEntry {
    pub local_instances: u32,
}

#[derive(Debug, Clone, Default)]
pub struct PeerEntry {
    pub instances: u32,
    pub tx_packets: u64,
    pub tx_bytes: u64,
}

/// Counted "table full" events; the engine logs them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirectoryCounters {
    pub instance_evictions: u64,
    pub service_evictions: u64,
    pub job_evictions: u64,
    pub peer_table_full: u64,
    pub candidates_overflow: u64,
    pub instance_table_full: u64,
    pub foreign_local_skipped: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacities {
    pub instances: usize,
    pub services: usize,
    pub jobs: usize,
    pub peers: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirectoryError {
    /// Every instance slot holds a local instance: nothing may be evicted.
    InstanceTableFull,
    PeerTableFull,
    JobTableFull,
    /// The address is not inside this worker's subnet.
    NotLocal,
}

impl std::fmt::Display for DirectoryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DirectoryError::InstanceTableFull => {
                "instance table full of local instances: raise the instance capacity"
            }
            DirectoryError::PeerTableFull => "peer table full: raise the peer capacity",
            DirectoryError::JobTableFull => {
                "job table full of jobs with local instances: raise the job capacity"
            }
            DirectoryError::NotLocal => "address is outside this worker's subnet",
        })
    }
}

impl std::error::Error for DirectoryError {}

/// Result of applying a table query answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    pub added_or_updated: usize,
    pub removed: usize,
    /// The job was not known before: the caller subscribes to its updates.
    pub new_job: bool,
    pub refused: usize,
}

pub struct Directory {
    instances: FixedMap<Ipv4Addr, InstanceEntry>,
    services: FixedMap<Ipv4Addr, ServiceEntry>,
    jobs: FixedMap<JobName, JobEntry>,
    peers: FixedMap<SocketAddrV4, PeerEntry>,
    /// This worker's /26 (spec §2.1); instances inside it are local.
    subnet: Option<Ipv4Addr>,
    pub counters: DirectoryCounters,
}

impl Directory {
    pub fn new(cap: Capacities, hasher: Hasher) -> Self {
        Directory {
            instances: FixedMap::with_capacity(cap.instances, hasher.clone()),
            services: FixedMap::with_capacity(cap.services, hasher.clone()),
            jobs: FixedMap::with_capacity(cap.jobs, hasher.clone()),
            peers: FixedMap::with_capacity(cap.peers, hasher),
            subnet: None,
            counters: DirectoryCounters::default(),
        }
    }

    pub fn set_subnet(&mut self, s: Ipv4Addr) {
        self.subnet = Some(Ipv4Addr::from(u32::from(s) & !63));
    }

    pub fn subnet(&self) -> Option<Ipv4Addr> {
        self.subnet
    }

    pub fn is_in_subnet(&self, ip: Ipv4Addr) -> bool {
        self.subnet
            .is_some_and(|s| u32::from(ip) & !63 == u32::from(s))
    }

    pub fn instance(&self, h: Handle) -> Option<&InstanceEntry> {
        self.instances.value(h)
    }

    pub fn instance_by_nsip(&self, nsip: Ipv4Addr) -> Option<(Handle, &InstanceEntry)> {
        let h = self.instances.find(&nsip)?;
        Some((h, self.instances.value(h)?))
    }

    /// A local instance's handle and InstanceIP (the source its overlay traffic gets).
    pub fn local_source(&self, nsip: Ipv4Addr) -> Option<(Handle, Option<Ipv4Addr>)> {
        let (h, e) = self.instance_by_nsip(nsip)?;
        e.peer.is_none().then_some((h, e.instance_ip))
    }

    pub fn is_local_instance(&self, nsip: Ipv4Addr) -> bool {
        self.instance_by_nsip(nsip)
            .is_some_and(|(_, e)| e.peer.is_none())
    }

    pub fn service(&self, ip: Ipv4Addr) -> Option<Handle> {
        self.services.find(&ip)
    }

    pub fn peer_addr(&self, h: Handle) -> Option<SocketAddrV4> {
        self.peers.key(h).copied()
    }

    pub fn peer_mut(&mut self, h: Handle) -> Option<&mut PeerEntry> {
        self.peers.value_mut(h)
    }

    pub fn job_name(&self, h: Handle) -> Option<&JobName> {
        self.jobs.key(h)
    }

    pub fn counts(&self) -> (usize, usize, usize, usize) {
        (
            self.instances.len(),
            self.services.len(),
            self.jobs.len(),
            self.peers.len(),
        )
    }

    /// Keeps an instance, its job (interest) and a service fresh: a packet used them.
    pub fn touch(&mut self, now: Millis, instance: Handle, service: Option<Handle>) {
        if let Some(job) = self.instances.value(instance).map(|e| e.job) {
            self.jobs.touch(job, now);
        }
        self.instances.touch(instance, now);
        if let Some(s) = service {
            self.services.touch(s, now);
        }
    }

    /// Picks the instance for a new flow to service `s`: round robin over the candidates,
    /// or for "Closest" a local instance when there is one.
    pub fn choose(&mut self, s: Handle) -> Option<Handle> {
        let entry = self.services.value_mut(s)?;
        if entry.candidates.is_empty() {
            return None;
        }
        if entry.kind == SipKind::Closest {
            let instances = &self.instances;
            if let Some(h) = entry
                .candidates
                .iter()
                .copied()
                .find(|h| instances.value(*h).is_some_and(|e| e.peer.is_none()))
            {
                return Some(h);
            }
        }
        let i = entry.next as usize % entry.candidates.len();
        entry.next = entry.next.wrapping_add(1);
        Some(entry.candidates[i])
    }

    /// Any instance of a service, without advancing round robin (for ICMP errors, whose
    /// destination is always an InstanceIP with one instance).
    pub fn first_candidate(&self, s: Handle) -> Option<Handle> {
        self.services
            .value(s)
            .and_then(|e| e.candidates.first().copied())
    }

    fn job_handle(&mut self, now: Millis, job: &JobName) -> Result<(Handle, bool), DirectoryError> {
        if let Some(h) = self.jobs.find(job) {
            return Ok((h, false));
        }
        if self.jobs.is_full() {
            // Evict the least recently used job without local instances, with its entries.
            let victim = self
                .jobs
                .iter_oldest_first()
                .find(|(_, _, j)| j.local_instances == 0)
                .map(|(h, _, _)| h)
                .ok_or(DirectoryError::JobTableFull)?;
            self.remove_job_handle(victim);
            self.counters.job_evictions += 1;
        }
        self.jobs
            .try_insert_new(now, job.clone(), JobEntry::default())
            .map(|h| (h, true))
            .map_err(|_| DirectoryError::JobTableFull)
    }

    fn peer_handle(&mut self, now: Millis, node: SocketAddrV4) -> Result<Handle, DirectoryError> {
        if let Some(h) = self.peers.find(&node) {
            return Ok(h);
        }
        self.peers
            .try_insert_new(now, node, PeerEntry::default())
            .map_err(|_| {
                self.counters.peer_table_full += 1;
                DirectoryError::PeerTableFull
            })
    }

    fn release_peer(&mut self, h: Handle) {
        let gone = match self.peers.value_mut(h) {
            Some(p) => {
                p.instances = p.instances.saturating_sub(1);
                p.instances == 0
            }
            None => false,
        };
        if gone {
            self.peers.remove(h);
        }
    }

    fn link_services(&mut self, now: Millis, h: Handle) {
        let sips = match self.instances.value(h) {
            Some(e) => e.service_ips.clone(),
            None => return,
        };
        for sip in sips {
            let s = match self.services.find(&sip.addr) {
                Some(s) => s,
                None => {
                    let entry = ServiceEntry {
                        kind: sip.kind,
                        candidates: heapless::Vec::new(),
                        next: 0,
                    };
                    let (s, evicted) = self.services.insert_new(now, sip.addr, entry);
                    if evicted.is_some() {
                        // Its instances stay; the next packet to it misses and re-queries.
                        self.counters.service_evictions += 1;
                    }
                    let Some(s) = s else { continue };
                    s
                }
            };
            if let Some(entry) = self.services.value_mut(s) {
                if !entry.candidates.contains(&h) && entry.candidates.push(h).is_err() {
                    self.counters.candidates_overflow += 1;
                }
            }
        }
    }

    fn unlink_services(&mut self, h: Handle, sips: &[ServiceIp]) {
        for sip in sips {
            let Some(s) = self.services.find(&sip.addr) else {
                continue;
            };
            let empty = match self.services.value_mut(s) {
                Some(entry) => {
                    entry.candidates.retain(|c| *c != h);
                    entry.candidates.is_empty()
                }
                None => false,
            };
            if empty {
                self.services.remove(s);
            }
        }
    }

    /// Adds or updates one instance. An existing entry with the same namespace IP keeps its
    /// handle, so flows already pinned to it stay there.
    fn upsert(
        &mut self,
        now: Millis,
        job: Handle,
        rec: &InstanceRecord,
        local: bool,
    ) -> Result<Handle, DirectoryError> {
        let instance_ip = rec.instance_ip();
        if let Some(h) = self.instances.find(&rec.nsip) {
            let peer = if local {
                None
            } else {
                Some(self.peer_handle(now, rec.node)?)
            };
            // Take the new peer reference before dropping the old one: they may be the same.
            if let Some(p) = peer.and_then(|p| self.peers.value_mut(p)) {
                p.instances += 1;
            }
            let Some(old) = self.instances.value(h).cloned() else {
                return Err(DirectoryError::InstanceTableFull);
            };
            self.unlink_services(h, &old.service_ips);
            if let Some(p) = old.peer {
                self.release_peer(p);
            }
            if old.peer.is_none() && old.job != job {
                self.adjust_local_count(old.job, -1);
                self.adjust_local_count(job, 1);
            }
            if let Some(e) = self.instances.value_mut(h) {
                e.job = job;
                e.instance_number = rec.instance_number;
                e.nsip_v6 = rec.nsip_v6;
                e.instance_ip = instance_ip;
                e.service_ips = rec.service_ips.clone();
                e.peer = peer;
            }
            self.instances.touch(h, now);
            self.link_services(now, h);
            return Ok(h);
        }
        if self.instances.is_full() {
            // Local instances are pinned; the oldest remote one makes room.
            let victim = self
                .instances
                .iter_oldest_first()
                .find(|(_, _, e)| e.peer.is_some())
                .map(|(h, _, _)| h);
            let Some(v) = victim else {
                self.counters.instance_table_full += 1;
                return Err(DirectoryError::InstanceTableFull);
            };
            self.remove_instance(v);
            self.counters.instance_evictions += 1;
        }
        let peer = if local {
            None
        } else {
            Some(self.peer_handle(now, rec.node)?)
        };
        let entry = InstanceEntry {
            job,
            instance_number: rec.instance_number,
            nsip: rec.nsip,
            nsip_v6: rec.nsip_v6,
            instance_ip,
            service_ips: rec.service_ips.clone(),
            peer,
        };
        let h = match self.instances.try_insert_new(now, rec.nsip, entry) {
            Ok(h) => h,
            Err(_) => {
                if let Some(p) = peer {
                    if self.peers.value(p).is_some_and(|e| e.instances == 0) {
                        self.peers.remove(p);
                    }
                }
                self.counters.instance_table_full += 1;
                return Err(DirectoryError::InstanceTableFull);
            }
        };
        if let Some(p) = peer.and_then(|p| self.peers.value_mut(p)) {
            p.instances += 1;
        }
        if local {
            self.adjust_local_count(job, 1);
        }
        self.link_services(now, h);
        Ok(h)
    }

    fn adjust_local_count(&mut self, job: Handle, d: i32) {
        if let Some(j) = self.jobs.value_mut(job) {
            j.local_instances = j.local_instances.saturating_add_signed(d);
        }
    }

    pub fn remove_instance(&mut self, h: Handle) -> Option<InstanceEntry> {
        let (_, e) = self.instances.remove(h)?;
        self.unlink_services(h, &e.service_ips);
        if let Some(p) = e.peer {
            self.release_peer(p);
        } else {
            self.adjust_local_count(e.job, -1);
        }
        Some(e)
    }

    /// A container of `job` was deployed here with `nsip` (spec §3.2). Its InstanceIP and
    /// service IPs come with the job's table query result.
    pub fn deploy_local(
        &mut self,
        now: Millis,
        job: &JobName,
        instance_number: u32,
        nsip: Ipv4Addr,
    ) -> Result<(Handle, bool), DirectoryError> {
        if !self.is_in_subnet(nsip) {
            return Err(DirectoryError::NotLocal);
        }
        let (jh, new_job) = self.job_handle(now, job)?;
        let rec = InstanceRecord {
            instance_number,
            nsip,
            nsip_v6: None,
            node: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
            service_ips: heapless::Vec::new(),
        };
        // keep what a table result may already have told us about this instance
        if let Some((h, e)) = self.instance_by_nsip(nsip) {
            if e.peer.is_none() && e.job == jh {
                return Ok((h, new_job));
            }
        }
        self.upsert(now, jh, &rec, true).map(|h| (h, new_job))
    }

    pub fn undeploy_local(&mut self, nsip: Ipv4Addr) -> Option<InstanceEntry> {
        let (h, e) = self.instance_by_nsip(nsip)?;
        if e.peer.is_some() {
            return None;
        }
        self.remove_instance(h)
    }

    /// Applies a table query result: the job's remote instances become exactly the ones
    /// listed (upstream replaces the job's entries, spec §3.7); local ones get their service
    /// IPs. An entry inside our subnet that we did not deploy is skipped: the CSM is stale.
    pub fn apply(&mut self, now: Millis, u: &TableUpdate) -> Result<Applied, DirectoryError> {
        let (jh, new_job) = self.job_handle(now, &u.job)?;
        let mut out = Applied {
            new_job,
            ..Applied::default()
        };
        let stale: Vec<Handle> = self
            .instances
            .handles()
            .filter(|h| {
                self.instances.value(*h).is_some_and(|e| {
                    e.job == jh && e.peer.is_some() && !u.instances.iter().any(|r| r.nsip == e.nsip)
                })
            })
            .collect();
        for h in stale {
            self.remove_instance(h);
            out.removed += 1;
        }
        for rec in &u.instances {
            let local = self.is_in_subnet(rec.nsip);
            if local && !self.is_local_instance(rec.nsip) {
                self.counters.foreign_local_skipped += 1;
                out.refused += 1;
                continue;
            }
            match self.upsert(now, jh, rec, local) {
                Ok(_) => out.added_or_updated += 1,
                Err(_) => out.refused += 1,
            }
        }
        self.jobs.touch(jh, now);
        Ok(out)
    }

    fn remove_job_handle(&mut self, jh: Handle) {
        let mine: Vec<Handle> = self
            .instances
            .handles()
            .filter(|h| self.instances.value(*h).is_some_and(|e| e.job == jh))
            .collect();
        for h in mine {
            self.remove_instance(h);
        }
        self.jobs.remove(jh);
    }

    /// Forgets a job and its remote instances if it has no local instance.
    pub fn forget_job(&mut self, job: &JobName) -> bool {
        match self.jobs.find(job) {
            Some(h) if self.jobs.value(h).is_some_and(|j| j.local_instances == 0) => {
                self.remove_job_handle(h);
                true
            }
            _ => false,
        }
    }

    /// The least recently used job idle since before `cutoff` and without local instances:
    /// its interest has lapsed (spec §3.7). Jobs with local instances are refreshed instead,
    /// as upstream keeps their interest while deployed.
    pub fn lapsed_job(&mut self, now: Millis, cutoff: Millis) -> Option<JobName> {
        for _ in 0..self.jobs.len() {
            let (h, used) = self.jobs.oldest()?;
            if used >= cutoff {
                return None;
            }
            if self.jobs.value(h).is_some_and(|j| j.local_instances > 0) {
                self.jobs.touch(h, now);
                continue;
            }
            let name = self.jobs.key(h)?.clone();
            self.remove_job_handle(h);
            return Some(name);
        }
        None
    }

    /// Every service IP and InstanceIP the directory currently resolves (for tests/status).
    pub fn service_ips(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.services
            .handles()
            .filter_map(|h| self.services.key(h).copied())
    }
}

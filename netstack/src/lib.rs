//! The overlay network of an Oakestra worker: what upstream's NetManager does, as a library the
//! worker links (`auto` mode) or runs alone as `NetManager` (`manual` mode). Wire-compatible
//! with the stock NetManager (spec overlay-network.md).
//!
//! The pure core (no I/O, no clock, no allocation per packet): [`packet`], [`checksum`],
//! [`icmp`], [`table`], [`directory`], [`flows`], [`park`] and the engine [`proxy`]. The wire
//! contract with the cluster service manager: [`control`] (payloads, topics, validation) and
//! [`session`] (the conversation as a state machine). The Linux edge: [`tun`] and
//! [`dataplane`] (the packet loop), [`netlink`], [`nft`] and [`plumbing`] (bridge, veth,
//! addresses, outgoing NAT).
//! [`craft`] builds packets for tests.
//!
//! Where to look for:
//! - a packet leaving an instance: `Proxy::on_packet(.., Source::Tun)` → `outgoing`;
//! - a tunnel datagram: `Proxy::on_packet(.., Source::Peer(_))` → `incoming`;
//! - a table miss: `Proxy::miss` → `park::ParkingLot`, released by `Proxy::poll`;
//! - a table query result: `session::Session::on_message` → `Proxy::apply_table_update`;
//! - a container's veth and address: `plumbing::Plumbing::attach`.

pub mod batch;
pub mod checksum;
pub mod config;
pub mod control;
pub mod craft;
pub mod dataplane;
pub mod directory;
pub mod flows;
pub mod gso;
pub mod icmp;
pub mod netlink;
pub mod nft;
pub mod packet;
pub mod park;
pub mod plumbing;
pub mod proxy;
pub mod session;
pub mod table;
pub mod tun;

#[cfg(test)]
mod proxy_tests;

pub use proxy::{Action, DropReason, Proxy, ProxyConfig, Source};

/// Monotonic time in milliseconds since an origin the caller picks. The core never reads a
/// clock; the I/O edge passes this in, tests make it up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Millis(pub u64);

impl Millis {
    /// Milliseconds from `earlier` to `self` (0 if `earlier` is later).
    pub fn since(self, earlier: Millis) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

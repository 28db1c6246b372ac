//! The overlay network of an Oakestra worker: what upstream's NetManager does, as a library the
//! worker links (`auto` mode) or runs alone as `NetManager` (`manual` mode). Wire-compatible
//! with the stock NetManager (spec overlay-network.md). Only the configuration exists so far;
//! the data plane and its tables land with issue #5.

pub mod config;

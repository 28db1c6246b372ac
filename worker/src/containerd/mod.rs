//! containerd client: gRPC over HTTP/2 on containerd's unix socket, written for this project.
//!
//! Pure cores (`frame`, `hpack`, `huffman`, `conn`, `grpc`, `pb`, `api`) do the protocol work
//! on caller-owned buffers; `client` is the async-io shell that moves bytes. See README.md for
//! the choice of a hand-written HTTP/2 stack and its measured cost, and
//! `spec/containerd-client.md` for the wire facts this implements.

pub mod api;
pub mod client;
pub mod conn;
pub mod frame;
pub mod grpc;
pub mod hpack;
pub mod huffman;
pub mod pb;

pub use api::*;
pub use client::{Client, ContentWriter, Error, EventStream, Ingest, Options, WriteOutcome};
pub use grpc::{Code, Status};

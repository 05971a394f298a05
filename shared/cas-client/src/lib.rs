//! The client side of the CAS, shared by the gateway and the workers.
//!
//! Layout:
//! - [`Shards`] (in `shards.rs`): the shard registry (a JetStream KV watch), rendezvous placement
//!   over the live shards, and typed calls to them: small blobs as bus request/reply, large blobs
//!   on each shard's direct data stream.
//! - [`proto`]: REAPI digest conversions, validated.
//! - [`ApiError`]: the one error type of CAS calls and of the gRPC front; it maps once to
//!   `tonic::Status` and to the bus's `WireError`.

mod error;
pub mod metric_names;
pub mod proto;
mod shards;

pub use error::{ApiError, missing_subject};
pub use shards::{BlobReader, BlobTransport, Placement, ShardRef, Shards, WriteData};

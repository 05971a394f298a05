//! Motorpool's NATS layer.
//!
//! Layout:
//! - [`subjects`]: every subject and JetStream resource name, built in one place
//!   (`mp.v1.<domain>.<noun>.<verb>[.<id>]`, ids last so wildcards work).
//! - [`Bus`]: a connected client with typed publish, request/reply with timeouts, subscriptions
//!   and JetStream KV/stream set-up.
//! - [`serve`]: runs a typed mailbox: a (queue-group) subscription whose requests are handled with
//!   bounded concurrency, malformed frames answered with a clear error.
//! - [`lanes`]: lane work queues on JetStream (one durable consumer per priority lane, a picker
//!   with bounded aging) for jobs that are not REAPI actions.
//! - [`access`]: who may say what: per-service nkey users, their subject permissions, and the
//!   realm file rendered into nats-server's `authorization` block.
//! - [`trace`]: W3C trace context in message headers, so one piece of work is one trace across
//!   the services it passes through.
//! - [`server`]: starts a real `nats-server` (JetStream on) on a free port with a temp store dir;
//!   used by `motorpool up` and by every integration test.

pub mod access;
mod bus;
pub mod lanes;
mod mailbox;
pub mod metric_names;
pub mod server;
pub mod subjects;
pub mod trace;

pub use access::{Credentials, Realm, Role};
pub use bus::{
    Bus, BusError, TypedSubscriber, ensure_crypto_provider, kv_values, through_elections,
};
pub use lanes::{Delivery, LaneQueue, LaneQueueOptions};
pub use mailbox::{MailboxOptions, serve, serve_from};
pub use server::{ClusterMember, NatsCluster, NatsServer, NatsServerOptions};
pub use subjects::Subject;

//! Typed messages for every Motorpool NATS subject, and the one codec that frames them.
//!
//! Layout:
//! - [`codec`]: the wire frame (magic, message kind, schema version) around a bincode 2 body.
//!   Every message on the bus goes through [`codec::encode`] / [`codec::decode`].
//! - [`digest`]: content digests (SHA-256 and BLAKE3) and a streaming hasher for either.
//! - [`cas`]: messages between the gateway and CAS shards: registration/heartbeat, blob batches,
//!   action-cache entries, and the framing of the direct shard data stream.
//! - [`exec`]: remote execution: the operation record, lanes and pools, worker registration,
//!   the scheduler ⇄ worker conversation, alerts.
//! - [`ci`]: CI jobs made from forge events and API calls, and their statuses.
//! - [`fleet`]: fleet images: build jobs and their status, drive states.
//! - [`label`]: the BevSlots auto-labeling pipeline: the job that travels mapping -> prelabel ->
//!   annotate, and each stage's status.
//! - [`error`]: the error a remote handler answers with; its code mirrors gRPC status codes.
//!
//! A message type states its subject's kind id and schema version through [`Message`]. A newer
//! service that receives an older (or newer) message sees [`codec::CodecError::Version`] instead of
//! a garbled value.

pub mod bes;
pub mod bytes;
pub mod cas;
pub mod ci;
pub mod codec;
pub mod digest;
pub mod error;
pub mod exec;
pub mod fleet;
pub mod label;

pub use codec::{CodecError, Message, Request, decode, encode};
pub use digest::{BlobDigest, DigestFunction, Hasher};
pub use error::{ErrorCode, WireError};

/// Milliseconds since the Unix epoch: the unit of every timestamp in a message.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use crate::Message;
    use crate::{cas::*, ci::*, exec::*, fleet::*, label::*};

    #[test]
    fn kinds_are_unique_across_the_workspace() {
        let kinds = [
            ShardInfo::KIND,
            FindMissing::KIND,
            FindMissingReply::KIND,
            BatchWrite::KIND,
            BatchWriteReply::KIND,
            BatchRead::KIND,
            BatchReadReply::KIND,
            ReadChunk::KIND,
            ChunkData::KIND,
            WriteChunk::KIND,
            QueryWrite::KIND,
            WriteStatus::KIND,
            AcGet::KIND,
            AcEntry::KIND,
            AcPut::KIND,
            AcDelete::KIND,
            DataRequest::KIND,
            DataReply::KIND,
            ListBlobs::KIND,
            BlobList::KIND,
            Operation::KIND,
            WorkerInfo::KIND,
            Assign::KIND,
            AssignReply::KIND,
            JobDone::KIND,
            Ack::KIND,
            Cancel::KIND,
            Alert::KIND,
            QueueStats::KIND,
            GetQueueStats::KIND,
            Admit::KIND,
            Admission::KIND,
            LabelJob::KIND,
            StageStatus::KIND,
            ImageBuildJob::KIND,
            BuildStatus::KIND,
            DriveStatus::KIND,
            CiJob::KIND,
            JobStatus::KIND,
            DeliveryRecord::KIND,
            MergeRequestJobs::KIND,
            Workspace::KIND,
        ];
        let mut sorted = kinds.to_vec();
        sorted.sort();
        sorted.dedup();
        assert_eq!(
            sorted.len(),
            kinds.len(),
            "two message types share a kind id"
        );
    }
}

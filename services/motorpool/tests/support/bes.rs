//! Build Event Service clients for the tests and benchmarks: Bazel's events as BES carries
//! them, and a stream of them published with its acknowledgements read back.

use super::{Bearer, Stack};
use bazel_bep::types::build_event_stream as bep;
use googleapis_tonic_google_devtools_build_v1::google::devtools::build::v1 as bes;
use prost_bep::Message as _;

/// Bazel's `build_event_stream.BuildEvent` of a test's summary, wrapped as BES carries it.
pub fn bazel_event(label: &str, status: bep::TestStatus) -> bes::BuildEvent {
    let e = bep::BuildEvent {
        id: Some(bep::BuildEventId {
            id: Some(bep::build_event_id::Id::TestSummary(
                bep::build_event_id::TestSummaryId {
                    label: label.into(),
                    configuration: None,
                },
            )),
        }),
        payload: Some(bep::build_event::Payload::TestSummary(bep::TestSummary {
            overall_status: status as i32,
            ..Default::default()
        })),
        ..Default::default()
    };
    bes::BuildEvent {
        event_time: None,
        event: Some(bes::build_event::Event::BazelEvent(prost_types::Any {
            type_url: "type.googleapis.com/build_event_stream.BuildEvent".into(),
            value: e.encode_to_vec(),
        })),
    }
}

pub fn request(
    inv: &str,
    seq: i64,
    event: bes::BuildEvent,
) -> bes::PublishBuildToolEventStreamRequest {
    bes::PublishBuildToolEventStreamRequest {
        ordered_build_event: Some(bes::OrderedBuildEvent {
            stream_id: Some(bes::StreamId {
                build_id: "b".into(),
                invocation_id: inv.into(),
                component: bes::stream_id::BuildComponent::Tool as i32,
            }),
            sequence_number: seq,
            event: Some(event),
        }),
        ..Default::default()
    }
}

pub type Client = bes::publish_build_event_client::PublishBuildEventClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>,
>;

/// Streams `requests`; the acknowledged sequence numbers and how the stream ended.
pub async fn publish(
    client: &mut Client,
    requests: Vec<bes::PublishBuildToolEventStreamRequest>,
) -> (Vec<i64>, Result<(), tonic::Status>) {
    let mut acks = Vec::new();
    let mut responses = match client
        .publish_build_tool_event_stream(tokio_stream::iter(requests))
        .await
    {
        Ok(r) => r.into_inner(),
        Err(s) => return (acks, Err(s)),
    };
    loop {
        match responses.message().await {
            Ok(Some(a)) => acks.push(a.sequence_number),
            Ok(None) => return (acks, Ok(())),
            Err(s) => return (acks, Err(s)),
        }
    }
}

/// A client of the stack's Build Event Service, calling with `key`.
pub async fn client(stack: &Stack, key: &str) -> Client {
    let channel = tonic::transport::Channel::from_shared(stack.endpoint())
        .unwrap()
        .connect()
        .await
        .unwrap();
    bes::publish_build_event_client::PublishBuildEventClient::with_interceptor(
        channel,
        Bearer::new(key),
    )
}

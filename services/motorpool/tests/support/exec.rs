//! A small REAPI execution client for tests: upload an action, Execute it, follow the stream.

use super::AuthChannel as Channel;
use super::{Stack, proto, sha};
use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use bazel_remote_apis::google::longrunning as lr;
use futures::StreamExt;
use motorpool_messages::BlobDigest;
use prost::Message as _;

pub struct ExecClient {
    pub cas: re::content_addressable_storage_client::ContentAddressableStorageClient<Channel>,
    pub exec: re::execution_client::ExecutionClient<Channel>,
    pub ops: lr::operations_client::OperationsClient<Channel>,
    pub instance: String,
}

/// What to run.
#[derive(Clone, Default)]
pub struct Spec {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub outputs: Vec<String>,
    pub platform: Vec<(String, String)>,
    pub timeout_s: i64,
    pub do_not_cache: bool,
    /// Input files: (name, contents, executable).
    pub inputs: Vec<(String, Vec<u8>, bool)>,
}

impl Spec {
    pub fn sh(script: &str) -> Spec {
        Spec {
            args: vec!["/bin/sh".into(), "-c".into(), script.into()],
            ..Default::default()
        }
    }
}

/// A finished operation.
#[derive(Debug)]
pub struct Finished {
    pub name: String,
    pub response: re::ExecuteResponse,
    /// Stages seen on the stream, in order.
    pub stages: Vec<i32>,
}

impl Finished {
    pub fn result(&self) -> &re::ActionResult {
        self.response
            .result
            .as_ref()
            .unwrap_or_else(|| panic!("no result: {:?}", self.response.status))
    }
    pub fn code(&self) -> i32 {
        self.response.status.as_ref().map_or(0, |s| s.code)
    }
}

impl ExecClient {
    pub async fn connect(stack: &Stack, instance: &str) -> ExecClient {
        Self::connect_as(stack, instance, &stack.keys.admin).await
    }

    /// A client whose calls carry `key`.
    pub async fn connect_as(stack: &Stack, instance: &str, key: &str) -> ExecClient {
        let ch = stack.channel_as(key).await;
        ExecClient {
            cas: re::content_addressable_storage_client::ContentAddressableStorageClient::new(
                ch.clone(),
            ),
            exec: re::execution_client::ExecutionClient::new(ch.clone()),
            ops: lr::operations_client::OperationsClient::new(ch),
            instance: instance.into(),
        }
    }

    async fn put(&mut self, blobs: Vec<Vec<u8>>) {
        let requests = blobs
            .into_iter()
            .map(|data| re::batch_update_blobs_request::Request {
                digest: Some(proto(&sha(&data))),
                data,
                compressor: 0,
            })
            .collect();
        let r = self
            .cas
            .batch_update_blobs(re::BatchUpdateBlobsRequest {
                instance_name: self.instance.clone(),
                requests,
                digest_function: 0,
            })
            .await
            .unwrap()
            .into_inner();
        for x in r.responses {
            let s = x.status.unwrap_or_default();
            assert_eq!(s.code, 0, "upload failed: {}", s.message);
        }
    }

    /// Uploads the action and its inputs; returns the action digest.
    #[allow(deprecated)] // Bazel 4's output_files, as Bazel sends them
    pub async fn upload(&mut self, spec: &Spec) -> BlobDigest {
        let mut blobs = Vec::new();
        let mut root = re::Directory::default();
        let mut inputs = spec.inputs.clone();
        inputs.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, data, x) in inputs {
            root.files.push(re::FileNode {
                name,
                digest: Some(proto(&sha(&data))),
                is_executable: x,
                node_properties: None,
            });
            blobs.push(data);
        }
        let root_bytes = root.encode_to_vec();
        let mut env = spec.env.clone();
        env.sort();
        let mut platform = spec.platform.clone();
        platform.sort();
        let command = re::Command {
            arguments: spec.args.clone(),
            environment_variables: env
                .into_iter()
                .map(|(name, value)| re::command::EnvironmentVariable { name, value })
                .collect(),
            output_files: spec.outputs.clone(),
            platform: Some(re::Platform {
                properties: platform
                    .into_iter()
                    .map(|(name, value)| re::platform::Property { name, value })
                    .collect(),
            }),
            ..Default::default()
        };
        let command_bytes = command.encode_to_vec();
        let action = re::Action {
            command_digest: Some(proto(&sha(&command_bytes))),
            input_root_digest: Some(proto(&sha(&root_bytes))),
            timeout: (spec.timeout_s > 0).then_some(
                bazel_remote_apis::google::protobuf::Duration {
                    seconds: spec.timeout_s,
                    nanos: 0,
                },
            ),
            do_not_cache: spec.do_not_cache,
            ..Default::default()
        };
        let action_bytes = action.encode_to_vec();
        let d = sha(&action_bytes);
        blobs.extend([root_bytes, command_bytes, action_bytes]);
        self.put(blobs).await;
        d
    }

    /// Starts an Execute with request headers; returns the operation stream.
    pub async fn start(
        &mut self,
        action: &BlobDigest,
        headers: &[(&'static str, &str)],
        skip_cache_lookup: bool,
    ) -> Result<tonic::Streaming<lr::Operation>, tonic::Status> {
        let mut req = tonic::Request::new(re::ExecuteRequest {
            instance_name: self.instance.clone(),
            skip_cache_lookup,
            action_digest: Some(proto(action)),
            ..Default::default()
        });
        for (k, v) in headers {
            req.metadata_mut().insert(*k, v.parse().unwrap());
        }
        Ok(self.exec.execute(req).await?.into_inner())
    }

    /// Runs `spec` to completion.
    pub async fn run(&mut self, spec: &Spec, headers: &[(&'static str, &str)]) -> Finished {
        let d = self.upload(spec).await;
        let stream = self.start(&d, headers, false).await.unwrap();
        follow(stream).await.unwrap()
    }
}

/// Reads an operation stream to its end.
pub async fn follow(
    mut stream: tonic::Streaming<lr::Operation>,
) -> Result<Finished, tonic::Status> {
    let mut stages = Vec::new();
    let mut name = String::new();
    while let Some(op) = stream.next().await {
        let op = op?;
        name = op.name.clone();
        if let Some(m) = &op.metadata {
            let meta = re::ExecuteOperationMetadata::decode(m.value.as_slice()).unwrap();
            stages.push(meta.stage);
        }
        if op.done {
            let Some(lr::operation::Result::Response(any)) = op.result else {
                panic!("a done operation carries an ExecuteResponse: {op:?}");
            };
            let response = re::ExecuteResponse::decode(any.value.as_slice()).unwrap();
            return Ok(Finished {
                name,
                response,
                stages,
            });
        }
    }
    Err(tonic::Status::unavailable(format!(
        "the stream of {name} ended before the operation was done"
    )))
}

/// Seconds since the epoch of a timestamp.
pub fn secs(t: &Option<bazel_remote_apis::google::protobuf::Timestamp>) -> f64 {
    t.as_ref()
        .map_or(0.0, |t| t.seconds as f64 + t.nanos as f64 / 1e9)
}

/// Seconds since the epoch now.
pub fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

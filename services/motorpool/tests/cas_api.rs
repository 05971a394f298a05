//! The REAPI surface of `motorpool up`: behaviour, resumable uploads and bad input.

mod support;

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use bazel_remote_apis::google::bytestream as bs;
use motorpool_messages::DigestFunction;
use prost::Message as _;
use support::*;
use tonic::Code;

/// The server still answers after a bad request.
async fn still_serving(c: &mut Clients) {
    let d = sha(b"alive");
    let r = c
        .cas
        .find_missing_blobs(re::FindMissingBlobsRequest {
            blob_digests: vec![proto(&d)],
            ..Default::default()
        })
        .await
        .expect("server still serving");
    assert!(r.into_inner().missing_blob_digests.len() <= 1);
}

fn update(
    instance: &str,
    blobs: &[(&re::Digest, &[u8])],
    function: i32,
) -> re::BatchUpdateBlobsRequest {
    re::BatchUpdateBlobsRequest {
        instance_name: instance.into(),
        requests: blobs
            .iter()
            .map(|(d, data)| re::batch_update_blobs_request::Request {
                digest: Some((*d).clone()),
                data: data.to_vec(),
                compressor: 0,
            })
            .collect(),
        digest_function: function,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capabilities_batches_streams_trees_and_isolation() {
    let stack = Stack::up(&[]);
    let mut c = stack.clients().await;

    let caps = c
        .caps
        .get_capabilities(re::GetCapabilitiesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let cache = caps.cache_capabilities.unwrap();
    assert_eq!(cache.digest_functions, vec![1, 9], "SHA256 and BLAKE3");
    assert!(
        cache
            .action_cache_update_capabilities
            .unwrap()
            .update_enabled
    );
    assert_eq!(cache.max_batch_total_size_bytes, 4 * 1024 * 1024);
    let exec = caps
        .execution_capabilities
        .expect("remote execution is offered");
    assert!(exec.exec_enabled);
    assert_eq!(exec.digest_function, 1, "SHA256, as Bazel 4 expects");
    assert_eq!(exec.digest_functions, vec![1, 9]);

    // Batch round trip under both digest functions.
    for (f, code) in [(DigestFunction::Sha256, 1), (DigestFunction::Blake3, 9)] {
        let blobs: Vec<Vec<u8>> = (0..50).map(|i| bytes(i, 100 + i as usize)).collect();
        let digests: Vec<re::Digest> = blobs.iter().map(|b| proto(&f.digest_of(b))).collect();
        let pairs: Vec<(&re::Digest, &[u8])> = digests
            .iter()
            .zip(blobs.iter().map(Vec::as_slice))
            .collect();
        let r = c
            .cas
            .batch_update_blobs(update("prod", &pairs, code))
            .await
            .unwrap()
            .into_inner();
        assert!(
            r.responses
                .iter()
                .all(|r| r.status.as_ref().unwrap().code == 0)
        );
        let mut probe = digests.clone();
        let absent = proto(&f.digest_of(b"absent"));
        probe.push(absent.clone());
        let missing = c
            .cas
            .find_missing_blobs(re::FindMissingBlobsRequest {
                instance_name: "prod".into(),
                blob_digests: probe,
                digest_function: code,
            })
            .await
            .unwrap()
            .into_inner()
            .missing_blob_digests;
        assert_eq!(missing, vec![absent]);
        let read = c
            .cas
            .batch_read_blobs(re::BatchReadBlobsRequest {
                instance_name: "prod".into(),
                digests: digests.clone(),
                digest_function: code,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        for (resp, blob) in read.responses.iter().zip(&blobs) {
            assert_eq!(&resp.data, blob);
        }
        // Another instance name does not see these blobs.
        let missing = c
            .cas
            .find_missing_blobs(re::FindMissingBlobsRequest {
                instance_name: "grey".into(),
                blob_digests: digests.clone(),
                digest_function: code,
            })
            .await
            .unwrap()
            .into_inner()
            .missing_blob_digests;
        assert_eq!(
            missing.len(),
            digests.len(),
            "instance names isolate caches"
        );
    }

    // ByteStream: a 5 MiB blob, read whole, with an offset, and with a limit.
    let data = bytes(7, 5 * 1024 * 1024 + 3);
    let d = sha(&data);
    assert_eq!(
        bs_write(&mut c, "", &d, &data).await.unwrap(),
        d.size as i64
    );
    let name = read_name("", &d);
    assert_eq!(bs_read(&mut c, &name, 0, 0).await.unwrap(), data);
    assert_eq!(
        bs_read(&mut c, &name, 1_000_000, 0).await.unwrap(),
        &data[1_000_000..]
    );
    assert_eq!(
        bs_read(&mut c, &name, 10, 4096).await.unwrap(),
        &data[10..10 + 4096]
    );
    // Writing it again completes at once.
    assert_eq!(
        bs_write(&mut c, "", &d, &data).await.unwrap(),
        d.size as i64
    );
    // The empty blob is always readable.
    assert!(
        bs_read(&mut c, &read_name("", &sha(b"")), 0, 0)
            .await
            .unwrap()
            .is_empty()
    );

    // GetTree, paged: root -> a, b; a -> c.
    let leaf = re::Directory::default();
    let c_dir = re::Directory {
        files: vec![re::FileNode {
            name: "x".into(),
            digest: Some(proto(&sha(b"x"))),
            ..Default::default()
        }],
        ..Default::default()
    };
    let c_bytes = c_dir.encode_to_vec();
    let a = re::Directory {
        directories: vec![re::DirectoryNode {
            name: "c".into(),
            digest: Some(proto(&sha(&c_bytes))),
        }],
        ..Default::default()
    };
    let a_bytes = a.encode_to_vec();
    let leaf_bytes = leaf.encode_to_vec();
    let b_bytes = re::Directory {
        directories: vec![re::DirectoryNode {
            name: "leaf".into(),
            digest: Some(proto(&sha(&leaf_bytes))),
        }],
        ..Default::default()
    }
    .encode_to_vec();
    let root = re::Directory {
        directories: vec![
            re::DirectoryNode {
                name: "a".into(),
                digest: Some(proto(&sha(&a_bytes))),
            },
            re::DirectoryNode {
                name: "b".into(),
                digest: Some(proto(&sha(&b_bytes))),
            },
        ],
        ..Default::default()
    };
    let root_bytes = root.encode_to_vec();
    let all: Vec<(re::Digest, Vec<u8>)> = [&root_bytes, &a_bytes, &b_bytes, &c_bytes, &leaf_bytes]
        .iter()
        .map(|b| (proto(&sha(b)), b.to_vec()))
        .collect();
    let pairs: Vec<(&re::Digest, &[u8])> = all.iter().map(|(d, b)| (d, b.as_slice())).collect();
    c.cas
        .batch_update_blobs(update("", &pairs, 0))
        .await
        .unwrap();
    let mut token = String::new();
    let mut pages = Vec::new();
    loop {
        use futures::StreamExt;
        let mut s = c
            .cas
            .get_tree(re::GetTreeRequest {
                root_digest: Some(proto(&sha(&root_bytes))),
                page_size: 2,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let page = s.next().await.unwrap().unwrap();
        pages.push(page.directories.len());
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(pages, vec![2, 2, 1], "five directories in pages of two");

    let metrics = stack.http_get("/metrics");
    assert!(
        metrics.contains("motorpool_gateway_requests_total"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_64mib_upload_resumes_at_the_committed_offset() {
    // Messages up to 32 MiB, above the 16 MiB default (tests/bounds.rs shows that one bites).
    let stack = Stack::up_with_env(
        &[],
        &[("MOTORPOOL_GATEWAY_MAX_GRPC_MESSAGE_BYTES", "33554432")],
    );
    let mut c = stack.clients().await;
    let data = bytes(64, 64 * 1024 * 1024);
    let d = sha(&data);
    let name = write_name("", &d, "resume-1");

    // Send the first half, then cut the stream (the client goes away without finish_write).
    let half: Vec<bs::WriteRequest> = write_requests(&name, &data, 0, 16 * 1024)
        .into_iter()
        .take_while(|r| (r.write_offset as usize) < data.len() / 2)
        .collect();
    let (tx, rx) = tokio::sync::mpsc::channel::<bs::WriteRequest>(16);
    let mut bs = c.bs.clone();
    let call = tokio::spawn(async move {
        bs.write(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    for r in half {
        tx.send(r).await.unwrap();
    }
    // Wait until the server has taken the data, then cut.
    let mut committed = 0;
    for _ in 0..200 {
        committed =
            c.bs.query_write_status(bs::QueryWriteStatusRequest {
                resource_name: name.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .committed_size;
        if committed >= (data.len() / 2 - 2 * 1024 * 1024) as i64 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    call.abort();
    drop(tx);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;

    let status =
        c.bs.query_write_status(bs::QueryWriteStatusRequest {
            resource_name: name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!status.complete);
    assert!(
        status.committed_size > 0 && status.committed_size <= (data.len() / 2) as i64,
        "committed {} (saw {committed} before the cut)",
        status.committed_size
    );
    // Not readable yet.
    assert_eq!(
        bs_read(&mut c, &read_name("", &d), 0, 0)
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );

    // Resuming at a wrong offset is refused with a clear message.
    let wrong = write_requests(&name, &data, status.committed_size as usize + 16, 16 * 1024);
    let err = c.bs.write(futures::stream::iter(wrong)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("QueryWriteStatus"),
        "{}",
        err.message()
    );

    // Resume exactly where the server says.
    let rest = write_requests(&name, &data, status.committed_size as usize, 16 * 1024);
    let done =
        c.bs.write(futures::stream::iter(rest))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(done.committed_size, d.size as i64);
    let status =
        c.bs.query_write_status(bs::QueryWriteStatusRequest {
            resource_name: name,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(status.complete);
    assert_eq!(
        sha(&bs_read(&mut c, &read_name("", &d), 0, 0).await.unwrap()),
        d
    );

    // A client that sends large messages (where the operator allows them): a 40 MiB blob in a
    // 24 MiB message and a 16 MiB one.
    // The first is larger than the frames the shard's data stream takes (16 MiB at most); the
    // gateway cuts it into frames rather than passing the shard's refusal on.
    let big = bytes(65, 40 * 1024 * 1024);
    let bd = sha(&big);
    let reqs = write_requests(&write_name("", &bd, "big-1"), &big, 0, 24 * 1024 * 1024);
    assert_eq!(reqs.len(), 2);
    let done = c.bs.write(futures::stream::iter(reqs)).await.unwrap();
    assert_eq!(done.into_inner().committed_size, bd.size as i64);
    assert_eq!(
        sha(&bs_read(&mut c, &read_name("", &bd), 0, 0).await.unwrap()),
        bd
    );

    // On one host the gateway reaches the shard's data stream at its abstract Unix address,
    // never through the TCP/IP stack.
    let metrics = stack.http_get("/metrics");
    let connections = |transport: &str| {
        let key = format!("motorpool_cas_data_connections_total{{transport=\"{transport}\"}}");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(key.as_str()))
            .map(|v| v.trim().to_string())
    };
    assert!(connections("unix").is_some_and(|n| n != "0"), "{metrics}");
    assert_eq!(connections("tcp"), None, "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_status_and_stores_nothing() {
    let stack = Stack::up(&[]);
    let mut c = stack.clients().await;
    let good = b"good data".to_vec();
    let gd = proto(&sha(&good));

    // Wrong digest in a batch: that blob fails with INVALID_ARGUMENT, the others are stored.
    let wrong_hash = proto(&sha(b"good datb"));
    let mut wrong_size = gd.clone();
    wrong_size.size_bytes += 1;
    let r = c
        .cas
        .batch_update_blobs(update(
            "",
            &[(&wrong_hash, &good), (&wrong_size, &good), (&gd, &good)],
            0,
        ))
        .await
        .unwrap()
        .into_inner();
    let codes: Vec<i32> = r
        .responses
        .iter()
        .map(|r| r.status.as_ref().unwrap().code)
        .collect();
    assert_eq!(
        codes,
        vec![
            Code::InvalidArgument as i32,
            Code::InvalidArgument as i32,
            0
        ]
    );
    assert!(
        r.responses[0]
            .status
            .as_ref()
            .unwrap()
            .message
            .contains("hashes to")
    );
    let missing = c
        .cas
        .find_missing_blobs(re::FindMissingBlobsRequest {
            blob_digests: vec![wrong_hash.clone(), gd.clone()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .missing_blob_digests;
    assert_eq!(
        missing,
        vec![wrong_hash.clone()],
        "nothing stored under a wrong digest"
    );

    // Wrong digest over ByteStream: INVALID_ARGUMENT, nothing stored.
    let big = bytes(3, 300_000);
    let mut lie = sha(&big);
    lie.hash[0] ^= 0xff;
    let err = bs_write(&mut c, "", &lie, &big).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("hashes to"), "{}", err.message());
    assert_eq!(
        bs_read(&mut c, &read_name("", &lie), 0, 0)
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    // Wrong size over ByteStream: too much data.
    let mut short = sha(&big);
    short.size -= 10;
    let err = bs_write(&mut c, "", &short, &big).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    still_serving(&mut c).await;

    // Unknown or unsupported digest functions.
    for f in [2, 3, 999] {
        let err = c
            .cas
            .find_missing_blobs(re::FindMissingBlobsRequest {
                blob_digests: vec![gd.clone()],
                digest_function: f,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(
            err.message().contains("digest function"),
            "{}",
            err.message()
        );
    }
    let err = bs_read(&mut c, &format!("blobs/md5/{}/9", gd.hash), 0, 0)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // Malformed digests and resource names, `..` included.
    let err = c
        .cas
        .find_missing_blobs(re::FindMissingBlobsRequest {
            blob_digests: vec![re::Digest {
                hash: "xyz".into(),
                size_bytes: 1,
            }],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    for name in [
        format!("../blobs/{}/9", gd.hash),
        format!("prod/../../etc/blobs/{}/9", gd.hash),
        format!("blobs/{}", gd.hash),
        format!("blobs/{}/-9", gd.hash),
        "blobs".to_string(),
        String::new(),
    ] {
        let err = bs_read(&mut c, &name, 0, 0).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{name}: {err:?}");
    }
    let err =
        c.bs.write(futures::stream::iter(write_requests(
            &format!("../uploads/x/blobs/{}/9", gd.hash),
            &good,
            0,
            4,
        )))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = c
        .cas
        .find_missing_blobs(re::FindMissingBlobsRequest {
            instance_name: "a/../b".into(),
            blob_digests: vec![gd.clone()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    still_serving(&mut c).await;

    // Oversized batches.
    let huge = bytes(5, 3 * 1024 * 1024);
    let hd = proto(&sha(&huge));
    let err = c
        .cas
        .batch_update_blobs(update("", &[(&hd, &huge), (&hd, &huge)], 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("max_batch_total_size_bytes"),
        "{}",
        err.message()
    );
    let big_digest = re::Digest {
        hash: hd.hash.clone(),
        size_bytes: 5 * 1024 * 1024,
    };
    let err = c
        .cas
        .batch_read_blobs(re::BatchReadBlobsRequest {
            digests: vec![big_digest],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // Truncated streams: ended without finish_write, and finished short.
    let data = bytes(9, 200_000);
    let d = sha(&data);
    let mut reqs = write_requests(&write_name("", &d, "t1"), &data, 0, 16 * 1024);
    reqs.truncate(3);
    let err = c.bs.write(futures::stream::iter(reqs)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("finish_write"), "{}", err.message());
    let mut reqs = write_requests(&write_name("", &d, "t2"), &data, 0, 16 * 1024);
    reqs.truncate(3);
    reqs.last_mut().unwrap().finish_write = true;
    let err = c.bs.write(futures::stream::iter(reqs)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("finished after"),
        "{}",
        err.message()
    );
    assert_eq!(
        bs_read(&mut c, &read_name("", &d), 0, 0)
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    // Offsets that do not follow.
    let mut reqs = write_requests(&write_name("", &d, "t3"), &data, 0, 16 * 1024);
    reqs[2].write_offset += 1;
    assert_eq!(
        c.bs.write(futures::stream::iter(reqs))
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    // Reading past the end.
    let err = bs_read(&mut c, &read_name("", &sha(&good)), 100, 0)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    still_serving(&mut c).await;

    // Malformed protobuf on the wire: a raw gRPC frame of garbage. FindMissingBlobs and
    // ByteStream Read and Write are read off the wire by the gateway itself and say what is wrong;
    // the other methods are decoded by tonic, which rejects undecodable messages as INTERNAL.
    let garbage = [0xff, 0xff, 0xff, 0x0f, 0x12];
    let cas = "/build.bazel.remote.execution.v2.ContentAddressableStorage";
    let status = raw_grpc(&stack, &format!("{cas}/FindMissingBlobs"), &garbage).await;
    assert_eq!(status, Code::InvalidArgument as i32);
    let status = raw_grpc(&stack, &format!("{cas}/BatchReadBlobs"), &garbage).await;
    assert_eq!(status, Code::Internal as i32);
    // ByteStream Read is served below the generated code too, and says what is wrong.
    let status = raw_grpc(&stack, "/google.bytestream.ByteStream/Read", &garbage).await;
    assert_eq!(status, Code::InvalidArgument as i32);
    let status = raw_grpc(&stack, "/google.bytestream.ByteStream/Write", &garbage).await;
    assert_eq!(status, Code::InvalidArgument as i32);
    // A digest that is not one inside a well-formed request.
    let mut digest = vec![0x0A, 64];
    digest.extend_from_slice(&[b'g'; 64]);
    let mut req = vec![0x12, digest.len() as u8];
    req.extend_from_slice(&digest);
    let status = raw_grpc(&stack, &format!("{cas}/FindMissingBlobs"), &req).await;
    assert_eq!(status, Code::InvalidArgument as i32);
    still_serving(&mut c).await;
}

/// Sends one raw gRPC message and returns the grpc-status.
async fn raw_grpc(stack: &Stack, path: &str, body: &[u8]) -> i32 {
    use tonic::codec::{Codec, Decoder, Encoder};
    #[derive(Default)]
    struct Raw;
    struct RawEnc;
    struct RawDec;
    impl Encoder for RawEnc {
        type Item = Vec<u8>;
        type Error = tonic::Status;
        fn encode(
            &mut self,
            item: Vec<u8>,
            dst: &mut tonic::codec::EncodeBuf<'_>,
        ) -> Result<(), tonic::Status> {
            use bytes::BufMut;
            dst.put_slice(&item);
            Ok(())
        }
    }
    impl Decoder for RawDec {
        type Item = Vec<u8>;
        type Error = tonic::Status;
        fn decode(
            &mut self,
            src: &mut tonic::codec::DecodeBuf<'_>,
        ) -> Result<Option<Vec<u8>>, tonic::Status> {
            use bytes::Buf;
            let v = src.chunk().to_vec();
            src.advance(v.len());
            Ok(Some(v))
        }
    }
    impl Codec for Raw {
        type Encode = Vec<u8>;
        type Decode = Vec<u8>;
        type Encoder = RawEnc;
        type Decoder = RawDec;
        fn encoder(&mut self) -> RawEnc {
            RawEnc
        }
        fn decoder(&mut self) -> RawDec {
            RawDec
        }
    }
    let mut grpc = tonic::client::Grpc::new(stack.channel().await);
    grpc.ready().await.unwrap();
    let r = grpc
        .unary(
            tonic::Request::new(body.to_vec()),
            path.parse().unwrap(),
            Raw,
        )
        .await;
    match r {
        Ok(_) => 0,
        Err(s) => s.code() as i32,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn action_cache_never_returns_a_result_whose_blobs_are_gone() {
    // A 2 MiB shard: writing 1 MB of other blobs evicts the action's 1.2 MB output, the least
    // recently used thing it holds (it was last asked for just before the result was written;
    // the result counts against the capacity too, in the same order, and stays).
    // One shard, no workers: a replica (and the reindexer restoring it) would keep the output.
    let stack = Stack::up(&["--shard-capacity-bytes", "2097152", "--workers", "0"]);
    stack.wait_for_shard_news(1);
    let mut c = stack.clients().await;
    let out = bytes(1, 1_200_000);
    let stdout = b"compiled ok\n".to_vec();
    let (od, sd) = (proto(&sha(&out)), proto(&sha(&stdout)));
    let action = proto(&sha(b"action-1"));
    let result = re::ActionResult {
        output_files: vec![re::OutputFile {
            path: "out/a.o".into(),
            digest: Some(od.clone()),
            ..Default::default()
        }],
        stdout_digest: Some(sd.clone()),
        exit_code: 0,
        ..Default::default()
    };
    let put = re::UpdateActionResultRequest {
        action_digest: Some(action.clone()),
        action_result: Some(result.clone()),
        ..Default::default()
    };
    // Outputs not uploaded yet: refused.
    let err = c.ac.update_action_result(put.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    c.cas
        .batch_update_blobs(update("", &[(&od, &out), (&sd, &stdout)], 0))
        .await
        .unwrap();
    c.ac.update_action_result(put).await.unwrap();
    let get = re::GetActionResultRequest {
        action_digest: Some(action.clone()),
        inline_stdout: true,
        ..Default::default()
    };
    let got =
        c.ac.get_action_result(get.clone())
            .await
            .unwrap()
            .into_inner();
    assert_eq!(got.output_files, result.output_files);
    assert_eq!(got.stdout_raw, stdout, "stdout inlined on request");
    assert_eq!(
        served_from_memory(&stack),
        1,
        "found complete when written, then answered from the gateway's memory"
    );
    // Another instance has no entry.
    let mut other = get.clone();
    other.instance_name = "grey".into();
    assert_eq!(
        c.ac.get_action_result(other).await.unwrap_err().code(),
        Code::NotFound
    );

    // Fill the shard until the output is evicted.
    for i in 0..10u64 {
        let b = bytes(1000 + i, 100_000);
        let d = proto(&sha(&b));
        c.cas
            .batch_update_blobs(update("", &[(&d, &b)], 0))
            .await
            .unwrap();
    }
    let missing = c
        .cas
        .find_missing_blobs(re::FindMissingBlobsRequest {
            blob_digests: vec![od.clone()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .missing_blob_digests;
    assert_eq!(missing, vec![od], "the output was evicted");
    // The shard announced the eviction before it acknowledged the write that caused it: the
    // gateway forgot the result, and checks it on the shards.
    let err = c.ac.get_action_result(get).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        err.message().contains("no longer in the CAS"),
        "{}",
        err.message()
    );
    assert_eq!(served_from_memory(&stack), 1);
}

/// Action results the gateway served from memory (see `hits` in the gateway).
fn served_from_memory(stack: &Stack) -> u64 {
    stack.metric("motorpool_gateway_remembered_results_served_total") as u64
}

/// The file a shard keeps a large blob in, found by its hash.
fn blob_file(root: &std::path::Path, d: &motorpool_messages::BlobDigest) -> std::path::PathBuf {
    let name = hex::encode(d.hash);
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.file_name().is_some_and(|n| n == name.as_str()) {
                return p;
            }
        }
    }
    panic!("no file for {d} under {}", root.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remembered_result_is_never_served_once_a_blob_it_uses_is_found_corrupt() {
    // One shard and no workers: no replica to fall back on.
    let stack = Stack::up(&["--workers", "0"]);
    stack.wait_for_shard_news(1);
    let mut c = stack.clients().await;
    // Over 1 MiB: the shard keeps it in a file of its own.
    let out = bytes(7, 3 << 20);
    let d = sha(&out);
    bs_write(&mut c, "", &d, &out).await.unwrap();
    let action = proto(&sha(b"link //app:server"));
    c.ac.update_action_result(re::UpdateActionResultRequest {
        action_digest: Some(action.clone()),
        action_result: Some(re::ActionResult {
            output_files: vec![re::OutputFile {
                path: "bin/server".into(),
                digest: Some(proto(&d)),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    let get = re::GetActionResultRequest {
        action_digest: Some(action.clone()),
        ..Default::default()
    };

    // Found complete when it was written: hits are answered from memory.
    let before = served_from_memory(&stack);
    for _ in 0..3 {
        c.ac.get_action_result(get.clone()).await.unwrap();
    }
    assert_eq!(served_from_memory(&stack), before + 3);

    // A disk flips bytes in the output; the next read finds it out and the shard drops it.
    let file = blob_file(&stack.dir.path().join("data/cas-0/blobs"), &d);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        f.write_all_at(b"bit rot", 1 << 20).unwrap();
    }
    let err = bs_read(&mut c, &read_name("", &d), 0, 0).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    // From then on the result is not served, from memory or otherwise.
    let served = served_from_memory(&stack);
    let err = c.ac.get_action_result(get.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(
        err.message().contains("no longer in the CAS"),
        "{}",
        err.message()
    );
    assert_eq!(served_from_memory(&stack), served);

    // Uploaded again, the result is complete again: checked on the shards once, then
    // remembered.
    bs_write(&mut c, "", &d, &out).await.unwrap();
    c.ac.get_action_result(get.clone()).await.unwrap();
    c.ac.get_action_result(get).await.unwrap();
    assert_eq!(served_from_memory(&stack), served + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_blobs_are_read_back_from_the_gateways_memory_exactly_as_stored() {
    let stack = Stack::up(&["--workers", "0"]);
    let mut c = stack.clients().await;
    let from_memory = |s: &Stack| s.metric("motorpool_gateway_bytestream_reads_from_memory_total");
    let small = bytes(3, 10_000);
    let d = sha(&small);
    bs_write(&mut c, "", &d, &small).await.unwrap();
    let before = from_memory(&stack);
    // Whole, from an offset, and a window: each the stored bytes, from memory.
    let name = read_name("", &d);
    assert_eq!(bs_read(&mut c, &name, 0, 0).await.unwrap(), small);
    assert_eq!(
        bs_read(&mut c, &name, 9_000, 0).await.unwrap(),
        small[9_000..]
    );
    assert_eq!(
        bs_read(&mut c, &name, 100, 50).await.unwrap(),
        small[100..150]
    );
    assert_eq!(
        bs_read(&mut c, &name, 9_990, 500).await.unwrap(),
        small[9_990..]
    );
    assert_eq!(from_memory(&stack), before + 4.0);
    // Another instance holds no copy: its read goes to the shards, which have none there.
    let err = bs_read(&mut c, &read_name("grey", &d), 0, 0)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    // Past the end is still refused.
    let err = bs_read(&mut c, &name, 10_001, 0).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(from_memory(&stack), before + 4.0);
}

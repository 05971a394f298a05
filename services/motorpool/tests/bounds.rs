//! What one client may hold of the gateway, on `motorpool up` with small configured bounds:
//! every bound that bites answers with a status that names it, and stalled calls hold nothing
//! for long.

mod support;

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use futures::StreamExt;
use std::time::{Duration, Instant};
use support::*;

/// `Threads` and `VmRSS` (KiB) of a process.
fn threads_and_rss(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("Threads:"), field("VmRSS:"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bound_answers_with_a_clear_status_and_stalled_calls_hold_nothing() {
    let stack = Stack::up_with_env(
        &["--workers", "0"],
        &[
            ("MOTORPOOL_GATEWAY_BOUNDS__MAX_CONNECTIONS", "4"),
            ("MOTORPOOL_GATEWAY_BOUNDS__IDLE_TIMEOUT_MS", "2000"),
        ],
    );
    let mut c = stack.clients().await;

    // The default message limit, 16 MiB: a larger message is refused and nothing is stored.
    let data = bytes(1, 17 << 20);
    let d = sha(&data);
    let reqs = write_requests(&write_name("", &d, "big"), &data, 0, data.len());
    let e = c.bs.write(futures::stream::iter(reqs)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("exceeds the 16777216 bytes"), "{e:?}");
    assert_eq!(c.missing(&[d]).await, 1);

    // 200 uploads that send a first chunk and then nothing, on one connection.
    let gateway = stack.child_pid(&["gateway"]).unwrap();
    let shard = stack.child_pid(&["cas-shard"]).unwrap();
    let (g0, rss0) = threads_and_rss(gateway);
    let (s0, _) = threads_and_rss(shard);
    let started = Instant::now();
    let stalled: Vec<_> = (0..200u64)
        .map(|i| {
            let mut bs = c.bs.clone();
            tokio::spawn(async move {
                let data = bytes(100 + i, 4 << 20);
                let d = sha(&data);
                let first =
                    write_requests(&write_name("", &d, &format!("s{i}")), &data, 0, 64 << 10)
                        .remove(0);
                let reqs = futures::stream::iter([first]).chain(futures::stream::pending());
                bs.write(reqs).await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (g1, rss1) = threads_and_rss(gateway);
    let (s1, _) = threads_and_rss(shard);
    for call in stalled {
        let e = call.await.unwrap().unwrap_err();
        assert_eq!(e.code(), tonic::Code::DeadlineExceeded, "{e:?}");
        assert!(e.message().contains("idle_timeout"), "{e:?}");
    }
    let waited = started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (s2, _) = threads_and_rss(shard);
    assert!(
        waited < Duration::from_secs(15),
        "stalled calls ended after {waited:?}"
    );
    // Threads do not grow with stalled calls: a fixed runtime, no thread per call.
    assert!(g1 <= g0 + 2, "gateway threads {g0} -> {g1}");
    // A shard serves each open data connection on a thread, at most 512 of them; the stalled
    // calls' connections end with the calls.
    assert!(s1 <= s0 + 512, "shard threads {s0} -> {s1}");
    assert!(
        s2 <= s0 + 2,
        "shard threads {s0} -> {s1} -> {s2} after the calls ended"
    );
    // Memory: what 200 first chunks take, not 200 blobs.
    assert!(
        rss1 < rss0 + 200 * 1024,
        "gateway RSS {rss0} KiB -> {rss1} KiB"
    );
    println!(
        "200 stalled uploads: gateway threads {g0} -> {g1}, RSS {rss0} -> {rss1} KiB; shard threads {s0} -> {s1} -> {s2}; all ended after {waited:?}"
    );
    still_works(&mut c).await;

    // Connections: 4 are served (this test holds one); a fifth is told why it is not.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut extra = stack.clients().await;
        still_works(&mut extra).await;
        held.push(extra);
    }
    let mut over = stack.clients().await;
    let e = over
        .caps
        .get_capabilities(re::GetCapabilitiesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("at most 4 connections"), "{e:?}");
    drop(over);
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut again = stack.clients().await;
        let r = again
            .caps
            .get_capabilities(re::GetCapabilitiesRequest::default())
            .await;
        if r.is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a freed place is never given again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = stack.http_get("/metrics");
    assert!(
        metrics.contains("motorpool_gateway_idle_requests_total"),
        "{metrics}"
    );
}

async fn still_works(c: &mut Clients) {
    let data = b"still works".to_vec();
    let d = sha(&data);
    bs_write(c, "", &d, &data).await.unwrap();
    assert_eq!(bs_read(c, &read_name("", &d), 0, 0).await.unwrap(), data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_stack_serves_grpcs_with_keys_and_refuses_plaintext() {
    let stack = Stack::up(&["--workers", "0", "--tls"]);
    let log = stack.log();
    assert!(log.contains(&format!("grpcs://{}", stack.grpc)), "{log}");
    assert!(log.contains(&format!("https://{}", stack.http)), "{log}");
    assert!(log.contains("--tls_certificate="), "{log}");
    // The HTTP port speaks TLS with the same certificate: a client trusting the stack's CA is
    // answered, a plaintext request is not, and a client trusting another CA fails the handshake.
    let ca = stack.tls_ca().unwrap();
    let ready = stack.https_get(&ca, "/readyz").unwrap();
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    assert!(
        stack
            .https_get(&ca, "/metrics")
            .unwrap()
            .contains("motorpool_"),
        "metrics over HTTPS"
    );
    let plain = stack.plain_http_get("/readyz");
    assert!(
        !plain.contains("200 OK"),
        "plaintext HTTP got an answer: {plain}"
    );
    let (other_ca, _, _) = client_ca_and_cert();
    let other = stack.dir.path().join("other-ca.pem");
    std::fs::write(&other, other_ca).unwrap();
    let e = stack.https_get(&other, "/readyz").unwrap_err();
    assert!(
        e.contains("certificate") || e.contains("UnknownIssuer"),
        "{e}"
    );
    // Its NATS speaks only TLS, and its services reach it so (the stack is up).
    let url = stack.nats_url();
    assert!(url.starts_with("tls://"), "{url}");
    let plain = url.replace("tls://", "nats://");
    let refused = motorpool_bus::Bus::connect_service(
        &plain,
        "test-plain",
        Some(&stack.nkey("admin")),
        None,
        Duration::from_secs(2),
    )
    .await;
    assert!(refused.is_err(), "a plaintext NATS client got in");
    let admin = stack.bus_as("admin").await;
    assert!(admin.max_payload() > 0);
    let mut c = Clients::over(stack.tls_channel_as(&stack.keys.ci).await);
    let data = bytes(3, 3 << 20);
    let d = sha(&data);
    bs_write(&mut c, "", &d, &data).await.unwrap();
    assert_eq!(
        bs_read(&mut c, &read_name("", &d), 0, 0).await.unwrap(),
        data
    );
    // A plaintext client gets no answer from the TLS port.
    let plain = tonic::transport::Channel::from_shared(stack.endpoint())
        .unwrap()
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(5))
        .connect()
        .await;
    if let Ok(ch) = plain {
        let mut caps = re::capabilities_client::CapabilitiesClient::new(ch);
        assert!(
            caps.get_capabilities(re::GetCapabilitiesRequest::default())
                .await
                .is_err()
        );
    }
}

/// A client CA and a client certificate it signed, as PEM: (CA, certificate, key).
fn client_ca_and_cert() -> (String, String, String) {
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        KeyUsagePurpose,
    };
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let mut leaf = CertificateParams::new(vec!["ci-runner".to_string()]).unwrap();
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate().unwrap();
    let cert = leaf.signed_by(&key, &Issuer::new(ca, &ca_key)).unwrap();
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_admits_only_clients_with_a_certificate_from_the_client_ca() {
    let certs = tempfile::tempdir().unwrap();
    let (client_ca, cert, key) = client_ca_and_cert();
    let ca_file = certs.path().join("clients-ca.pem");
    std::fs::write(&ca_file, &client_ca).unwrap();
    let stack = Stack::up_with_env(
        &["--workers", "0", "--tls"],
        &[(
            "MOTORPOOL_GATEWAY_TLS__CLIENT_CA_FILE",
            ca_file.to_str().unwrap(),
        )],
    );
    let server_ca = std::fs::read(stack.tls_ca().unwrap()).unwrap();
    let call = |identity: Option<tonic::transport::Identity>| {
        let server_ca = server_ca.clone();
        let endpoint = format!("https://{}", stack.grpc);
        let key = stack.keys.ci.clone();
        async move {
            let mut tls = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(server_ca))
                .domain_name("localhost");
            if let Some(id) = identity {
                tls = tls.identity(id);
            }
            let ch = tonic::transport::Channel::from_shared(endpoint)
                .unwrap()
                .tls_config(tls)
                .unwrap()
                .connect()
                .await
                .map_err(|e| e.to_string())?;
            let ch = tonic::service::interceptor::InterceptedService::new(ch, Bearer::new(&key));
            re::capabilities_client::CapabilitiesClient::new(ch)
                .get_capabilities(re::GetCapabilitiesRequest::default())
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    };
    call(Some(tonic::transport::Identity::from_pem(&cert, &key)))
        .await
        .expect("a client with a certificate from the client CA");
    assert!(call(None).await.is_err(), "a client without a certificate");
    // A certificate from another CA is no better.
    let (_, other_cert, other_key) = client_ca_and_cert();
    assert!(
        call(Some(tonic::transport::Identity::from_pem(
            &other_cert,
            &other_key
        )))
        .await
        .is_err(),
        "a client with a certificate from another CA"
    );
}

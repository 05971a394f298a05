//! TLS for the gateway's two ports, from one [`TlsConfig`]: the gRPC port (tonic's rustls,
//! with client certificates when `client_ca_file` is set) and the HTTP port (actix-web's
//! rustls, the same certificate; no client certificate, so health probes and Prometheus need
//! only the CA).

use anyhow::Context;
use motorpool_config::TlsConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;

fn read(p: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(p).with_context(|| format!("read TLS file {}", p.display()))
}

/// The certificate and key files, or none (plain ports). Half a pair, or a client CA without
/// a certificate, is a configuration error, not a silent plaintext port.
fn pair(tls: &TlsConfig) -> anyhow::Result<Option<(&Path, &Path)>> {
    match (&tls.cert_file, &tls.key_file) {
        (None, None) => {
            anyhow::ensure!(
                tls.client_ca_file.is_none(),
                "tls.client_ca_file needs tls.cert_file and tls.key_file: client certificates \
                 are checked only on a TLS port"
            );
            Ok(None)
        }
        (Some(c), Some(k)) => Ok(Some((c, k))),
        _ => anyhow::bail!("TLS needs both tls.cert_file and tls.key_file"),
    }
}

/// The gRPC port's TLS settings (none: plain gRPC).
pub fn grpc(tls: &TlsConfig) -> anyhow::Result<Option<tonic::transport::ServerTlsConfig>> {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    let Some((cert, key)) = pair(tls)? else {
        return Ok(None);
    };
    let mut config = ServerTlsConfig::new().identity(Identity::from_pem(read(cert)?, read(key)?));
    if let Some(ca) = &tls.client_ca_file {
        config = config.client_ca_root(Certificate::from_pem(read(ca)?));
    }
    Ok(Some(config))
}

/// The HTTP port's TLS settings (none: plain HTTP, also when `tls.http` is off).
pub fn http(tls: &TlsConfig) -> anyhow::Result<Option<rustls::ServerConfig>> {
    let Some((cert, key)) = pair(tls)? else {
        return Ok(None);
    };
    if !tls.http {
        return Ok(None);
    }
    let chain = CertificateDer::pem_slice_iter(&read(cert)?)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parse the certificates in {}", cert.display()))?;
    anyhow::ensure!(!chain.is_empty(), "no certificate in {}", cert.display());
    let key = PrivateKeyDer::from_pem_slice(&read(key)?)
        .with_context(|| format!("parse the private key in {}", key.display()))?;
    rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("the HTTP port's certificate and key")
        .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_a_pair_or_a_lone_client_ca_is_refused_and_nothing_is_plain_by_accident() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let (c, k) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        let both = TlsConfig {
            cert_file: Some(c.clone()),
            key_file: Some(k.clone()),
            ..TlsConfig::default()
        };
        assert!(grpc(&both).unwrap().is_some());
        assert!(
            http(&both).unwrap().is_some(),
            "HTTP follows gRPC by default"
        );
        let plain_http = TlsConfig {
            http: false,
            ..both.clone()
        };
        assert!(http(&plain_http).unwrap().is_none());
        assert!(grpc(&plain_http).unwrap().is_some());

        let half = TlsConfig {
            key_file: None,
            ..both.clone()
        };
        assert!(grpc(&half).is_err() && http(&half).is_err());
        let lone_ca = TlsConfig {
            client_ca_file: Some(c.clone()),
            ..TlsConfig::default()
        };
        let e = grpc(&lone_ca).unwrap_err().to_string();
        assert!(e.contains("client_ca_file"), "{e}");
        // A key file holding a certificate is named, not served.
        let swapped = TlsConfig {
            key_file: Some(c),
            ..both
        };
        let e = format!("{:#}", http(&swapped).unwrap_err());
        assert!(e.contains("private key"), "{e}");
        assert!(grpc(&TlsConfig::default()).unwrap().is_none());
        assert!(http(&TlsConfig::default()).unwrap().is_none());
    }
}

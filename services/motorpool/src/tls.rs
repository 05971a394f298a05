//! `motorpool up --tls`: a private CA, a gateway certificate and a NATS certificate for this
//! machine, made at the first start and kept in `<data dir>/tls/` (the keys readable by root
//! only). Bazel trusts the CA with `--tls_certificate=<data dir>/tls/ca.pem`, the services with
//! `--nats-tls-ca-file`; a deployment brings its own certificates.

use anyhow::Context;
use motorpool_bus::access::write_private;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::path::{Path, PathBuf};

/// The files `motorpool up --tls` uses.
pub struct StackTls {
    /// The CA that signed the gateway's and NATS's certificates (give it to clients).
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// NATS's certificate and key (for `localhost` and 127.0.0.1).
    pub nats_cert: PathBuf,
    pub nats_key: PathBuf,
}

/// The stack's certificates: those made before, or a new CA and a gateway certificate valid for
/// `localhost`, this host's name and `ips`.
pub fn stack_tls(data_dir: &Path, ips: &[std::net::IpAddr]) -> anyhow::Result<StackTls> {
    let dir = data_dir.join("tls");
    let files = StackTls {
        ca: dir.join("ca.pem"),
        cert: dir.join("gateway.pem"),
        key: dir.join("gateway.key"),
        nats_cert: dir.join("nats.pem"),
        nats_key: dir.join("nats.key"),
    };
    if [
        &files.ca,
        &files.cert,
        &files.key,
        &files.nats_cert,
        &files.nats_key,
    ]
    .iter()
    .all(|p| p.exists())
    {
        return Ok(files);
    }
    std::fs::create_dir_all(&dir)?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "Motorpool local CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;
    let mut names = vec!["localhost".to_string()];
    if let Ok(host) = std::fs::read_to_string("/proc/sys/kernel/hostname")
        && !host.trim().is_empty()
    {
        names.push(host.trim().to_string());
    }
    for name in ips
        .iter()
        .map(|ip| ip.to_string())
        .chain(["127.0.0.1".into()])
    {
        if !names.contains(&name) {
            names.push(name);
        }
    }
    let issuer = Issuer::new(ca, &ca_key);
    let leaf = |names: Vec<String>, cn: &str, cert: &Path, key_path: &Path| -> anyhow::Result<()> {
        let mut params = CertificateParams::new(names)?;
        params.distinguished_name.push(DnType::CommonName, cn);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate()?;
        let signed = params.signed_by(&key, &issuer)?;
        write_private(key_path, key.serialize_pem().as_bytes())
            .with_context(|| format!("write {}", key_path.display()))?;
        std::fs::write(cert, signed.pem())?;
        Ok(())
    };
    leaf(names, "Motorpool gateway", &files.cert, &files.key)?;
    leaf(
        vec!["localhost".into(), "127.0.0.1".into()],
        "Motorpool NATS",
        &files.nats_cert,
        &files.nats_key,
    )?;
    write_private(&dir.join("ca.key"), ca_key.serialize_pem().as_bytes())
        .context("write ca.key")?;
    std::fs::write(&files.ca, ca_cert.pem())?;
    Ok(files)
}

/// A TLS client that trusts only the CA in `ca` (PEM): how `up` reaches its own gateway's HTTPS
/// port.
pub fn connector(ca: &Path) -> anyhow::Result<tokio_rustls::TlsConnector> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in
        CertificateDer::pem_file_iter(ca).with_context(|| format!("read {}", ca.display()))?
    {
        roots.add(cert.with_context(|| format!("parse {}", ca.display()))?)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(std::sync::Arc::new(
        config,
    )))
}

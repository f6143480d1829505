//! The inspect CA's name constraints, checked by the clients that matter: `openssl verify`
//! and a rustls (webpki) client. A leaf inside the constraints is accepted; a leaf forged
//! with the CA's own key for a name outside them (what a stolen key could do) is refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use portcullis::policy::DomainName;
use portcullis::proxy::inspect::ca::{self, CertificateAuthority};
use rustls::pki_types::ServerName;
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn make_ca(dir: &Path) -> CertificateAuthority {
    let names = ["inspected.test", "api.github.test"].map(|n| DomainName::parse(n).unwrap());
    ca::init(dir, names, OffsetDateTime::now_utc()).unwrap();
    CertificateAuthority::load(dir).unwrap()
}

/// `openssl verify` of `leaf_pem` (leaf + CA) against the CA; its exit status and output.
fn openssl_verify(dir: &Path, leaf_pem: &str, host: &str) -> (bool, String) {
    let leaf_path = dir.join(format!("{host}.pem"));
    // Only the leaf: the chain's CA copy is the trust anchor, given with -CAfile.
    let leaf_only: String = leaf_pem
        .split_inclusive("-----END CERTIFICATE-----\n")
        .next()
        .unwrap()
        .to_owned();
    std::fs::write(&leaf_path, leaf_only).unwrap();
    let out = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(dir.join(ca::CA_CERT_FILE))
        .args(["-verify_hostname", host])
        .arg(&leaf_path)
        .output()
        .expect("openssl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn openssl_accepts_a_leaf_inside_the_constraints_and_rejects_a_forged_one() {
    let dir = tempfile::tempdir().unwrap();
    let ca = make_ca(dir.path());
    let now = OffsetDateTime::now_utc();
    for host in ["inspected.test", "a.b.inspected.test", "api.github.test"] {
        let leaf = ca.mint(&DomainName::parse(host).unwrap(), now).unwrap();
        let (ok, text) = openssl_verify(dir.path(), &leaf.pem(), host);
        assert!(ok, "{host}: {text}");
    }
    // Forged with the CA key, bypassing the gateway's own check.
    for host in [
        "example.org",
        "github.test",
        "notinspected.test",
        "inspected.test.evil.test",
    ] {
        let forged = ca.mint_unchecked(host, now).unwrap();
        let (ok, text) = openssl_verify(dir.path(), &forged.pem(), host);
        assert!(!ok, "{host} verified: {text}");
        assert!(
            text.contains("name constraint") || text.contains("permitted subtree"),
            "{host}: refused, but not for its name: {text}"
        );
    }
    // An address: every IP is excluded.
    let forged = ca.mint_unchecked("127.0.0.1", now).unwrap();
    let (ok, text) = openssl_verify(dir.path(), &forged.pem(), "127.0.0.1");
    assert!(!ok, "IP leaf verified: {text}");
}

/// A TLS handshake between a rustls client that trusts only the CA and a server presenting
/// `leaf`, over an in-memory pipe. The client's result.
async fn rustls_handshake(
    ca: &CertificateAuthority,
    leaf: ca::Leaf,
    host: &str,
) -> Result<(), String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(leaf.chain, leaf.key)
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert_der().clone()).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let (c, s) = tokio::io::duplex(64 * 1024);
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let server_task = tokio::spawn(async move {
        if let Ok(mut tls) = acceptor.accept(s).await {
            let _ = tls.write_all(b"hello").await;
            let _ = tls.shutdown().await;
        }
    });
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let name = ServerName::try_from(host.to_owned()).unwrap();
    let result = match connector.connect(name, c).await {
        Ok(mut tls) => {
            let mut buf = Vec::new();
            tls.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
            assert_eq!(buf, b"hello");
            Ok(())
        }
        Err(e) => Err(e.to_string()),
    };
    let _ = server_task.await;
    result
}

#[tokio::test]
async fn a_rustls_client_rejects_a_forged_leaf_for_its_name_constraints() {
    let dir = tempfile::tempdir().unwrap();
    let ca = make_ca(dir.path());
    let now = OffsetDateTime::now_utc();
    let ok = ca
        .mint(&DomainName::parse("api.github.test").unwrap(), now)
        .unwrap();
    rustls_handshake(&ca, ok, "api.github.test").await.unwrap();
    for host in ["example.org", "github.test", "xinspected.test"] {
        let forged = ca.mint_unchecked(host, now).unwrap();
        let err = rustls_handshake(&ca, forged, host)
            .await
            .expect_err("forged leaf accepted");
        assert!(
            err.to_lowercase().contains("name constraint") || err.contains("NameConstraint"),
            "{host}: refused, but not for its name: {err}"
        );
    }
}

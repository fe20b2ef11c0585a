//! TLS on both listeners with certificates from a CA made in the test (rcgen): the OpenAI SDK
//! over https, gRPC over TLS, mutual TLS refusing clients without a certificate of the CA, and
//! a rotated certificate served without a restart.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::server::{TestServer, add_version};
use distill_serve::api::grpc::proto::generate::{GenerateRequest, generate_client::GenerateClient};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::CertificateDer;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

const KEY: &str = "sk-tls-test-0123456789";

/// A certificate authority of the test.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        Self {
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    /// A leaf certificate for `names`, as (certificate PEM, key PEM, certificate DER).
    fn leaf(&self, names: &[&str]) -> (String, String, Vec<u8>) {
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem(), cert.der().to_vec())
    }
}

/// The server's files: CA, certificate, key (and the DER of the certificate).
struct ServerFiles {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    der: Vec<u8>,
}

fn write_server_files(dir: &Path, ca: &Ca) -> ServerFiles {
    let (cert_pem, key_pem, der) = ca.leaf(&["localhost", "127.0.0.1"]);
    let files = ServerFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
        der,
    };
    std::fs::write(&files.ca, &ca.pem).unwrap();
    std::fs::write(&files.key, key_pem).unwrap();
    std::fs::write(&files.cert, cert_pem).unwrap();
    files
}

fn start(files: &ServerFiles, extra: &[&str]) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("models");
    add_version(&repo, "tiny", 1, 1);
    let mut args = vec![
        "--tls-cert",
        files.cert.to_str().unwrap(),
        "--tls-key",
        files.key.to_str().unwrap(),
        "--api-key",
        KEY,
    ];
    args.extend(extra);
    TestServer::start_with_repo(dir, repo, &args)
}

fn https(server: &TestServer) -> String {
    server.base.replace("http://", "https://")
}

fn grpc_tls(ca_pem: &str) -> ClientTlsConfig {
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost")
}

async fn grpc_generate(server: &TestServer, tls: ClientTlsConfig) -> Result<(), String> {
    let url = server.grpc.replace("http://", "https://");
    let channel = Channel::from_shared(url)
        .unwrap()
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))?;
    let mut request = tonic::Request::new(GenerateRequest {
        model: "tiny".into(),
        prompt: "The patient".into(),
        max_tokens: Some(3),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {KEY}").parse().unwrap());
    GenerateClient::new(channel)
        .generate(request)
        .await
        .map(|_| ())
        .map_err(|e| format!("{e:?}"))
}

#[tokio::test]
async fn the_openai_sdk_and_grpc_clients_talk_to_both_listeners_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("distill-serve test CA");
    let files = write_server_files(dir.path(), &ca);
    let server = start(&files, &[]);

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/openai_tls.py");
    let out = Command::new("python3")
        .args([script, &https(&server), "tiny", files.ca.to_str().unwrap(), KEY])
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "the SDK over https failed:\n{stdout}\n{stderr}");
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(report["wrong_key"], 401);

    grpc_generate(&server, grpc_tls(&ca.pem)).await.unwrap();
    // Plain text on a TLS port is no request.
    let plain = reqwest::get(server.url("/v2/health/live")).await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success());
}

fn reqwest_client(ca_pem: &str, identity: Option<(&str, &str)>) -> reqwest::Client {
    let mut builder =
        reqwest::Client::builder().add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap());
    if let Some((cert, key)) = identity {
        builder = builder.identity(reqwest::Identity::from_pem(format!("{cert}{key}").as_bytes()).unwrap());
    }
    builder.build().unwrap()
}

#[tokio::test]
async fn mutual_tls_serves_only_clients_with_a_certificate_of_the_client_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, clients, stranger) = (Ca::new("server CA"), Ca::new("client CA"), Ca::new("another CA"));
    let files = write_server_files(dir.path(), &ca);
    let client_ca = dir.path().join("clients.pem");
    std::fs::write(&client_ca, &clients.pem).unwrap();
    let server = start(&files, &["--tls-client-ca", client_ca.to_str().unwrap()]);
    let (cert, key, _) = clients.leaf(&["radiology-client"]);
    let (other_cert, other_key, _) = stranger.leaf(&["intruder"]);
    let live = format!("{}/v2/health/live", https(&server));

    let served = reqwest_client(&ca.pem, Some((&cert, &key)))
        .get(&live)
        .send()
        .await
        .unwrap();
    assert_eq!(served.status(), 200);
    for (who, client) in [
        ("no certificate", reqwest_client(&ca.pem, None)),
        (
            "another CA's certificate",
            reqwest_client(&ca.pem, Some((&other_cert, &other_key))),
        ),
    ] {
        let refused = client.get(&live).send().await;
        assert!(refused.is_err(), "{who}: {refused:?}");
    }

    let identity = Identity::from_pem(&cert, &key);
    grpc_generate(&server, grpc_tls(&ca.pem).identity(identity))
        .await
        .unwrap();
    assert!(grpc_generate(&server, grpc_tls(&ca.pem)).await.is_err());
    let stranger_identity = Identity::from_pem(&other_cert, &other_key);
    assert!(
        grpc_generate(&server, grpc_tls(&ca.pem).identity(stranger_identity))
            .await
            .is_err()
    );
}

/// The certificate a TLS handshake with `addr` presents.
async fn presented_certificate(addr: std::net::SocketAddr, ca_pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test]
async fn a_rotated_certificate_is_served_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("rotating CA");
    let files = write_server_files(dir.path(), &ca);
    let server = start(&files, &[]);
    let http: std::net::SocketAddr = server.base.trim_start_matches("http://").parse().unwrap();
    let grpc: std::net::SocketAddr = server.grpc.trim_start_matches("http://").parse().unwrap();
    assert_eq!(presented_certificate(http, &ca.pem).await, files.der);

    let rotated = write_server_files(dir.path(), &ca);
    assert_ne!(rotated.der, files.der);
    for addr in [http, grpc] {
        let mut seen = Vec::new();
        for _ in 0..100 {
            seen = presented_certificate(addr, &ca.pem).await;
            if seen == rotated.der {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(seen, rotated.der, "{addr} still serves the old certificate");
    }
    grpc_generate(&server, grpc_tls(&ca.pem)).await.unwrap();
}

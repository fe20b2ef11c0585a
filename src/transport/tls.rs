//! TLS with rustls (no OpenSSL): the certificate chain and key from PEM files, re-read when
//! they change (cert-manager rotates them in place), optionally a CA whose client
//! certificates are required (mutual TLS). TLS 1.2 and 1.3 only; ALPN offers HTTP/2 (gRPC
//! needs it) and, on the HTTP port, HTTP/1.1.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio_rustls::TlsAcceptor;

use crate::watch::{Parser, Watched, warn_if_shared};

/// Where the server's certificate, key and (for mutual TLS) client CA are.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// PEM certificate chain, the server's certificate first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificates client certificates must chain to; none: no client certificates.
    pub client_ca: Option<PathBuf>,
}

/// The configurations of both listeners (they differ in ALPN only), built together from the
/// same files.
struct Configs {
    http: Arc<ServerConfig>,
    grpc: Arc<ServerConfig>,
}

/// A listener's TLS configuration, current with its files; cloning shares it.
#[derive(Clone)]
pub struct Tls {
    configs: Watched<Configs>,
    grpc: bool,
}

/// ALPN of the HTTP port: HTTP/2 first, then HTTP/1.1.
const HTTP_ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];
/// ALPN of the gRPC port.
const GRPC_ALPN: &[&[u8]] = &[b"h2"];

impl Tls {
    /// Loads `settings` (an error here stops the server) and watches the files; the HTTP
    /// listener's side (see [`Tls::for_grpc`]).
    pub fn load(settings: &TlsSettings) -> Result<Self> {
        warn_if_shared(&settings.key);
        let mut paths = vec![settings.cert.clone(), settings.key.clone()];
        paths.extend(settings.client_ca.clone());
        let parse: Parser<Configs> = Arc::new(|bytes, _| {
            Ok(Configs {
                http: Arc::new(server_config(bytes, HTTP_ALPN)?),
                grpc: Arc::new(server_config(bytes, GRPC_ALPN)?),
            })
        });
        Ok(Self {
            configs: Watched::load("TLS certificate", paths, parse)?,
            grpc: false,
        })
    }

    /// The same files, for the gRPC listener.
    pub fn for_grpc(&self) -> Self {
        Self {
            configs: self.configs.clone(),
            grpc: true,
        }
    }

    /// An acceptor with the configuration now in force.
    pub fn acceptor(&self) -> TlsAcceptor {
        let configs = self.configs.get();
        TlsAcceptor::from(Arc::clone(if self.grpc { &configs.grpc } else { &configs.http }))
    }
}

/// Builds the configuration from the files' bytes: certificate, key and client CA, each
/// followed by a NUL (as [`Watched`] joins them).
fn server_config(bytes: &[u8], alpn: &[&[u8]]) -> Result<ServerConfig> {
    let parts: Vec<&[u8]> = bytes.split(|b| *b == 0).collect();
    let (cert, key, ca) = match parts.as_slice() {
        [cert, key, []] => (*cert, *key, None),
        [cert, key, ca, []] => (*cert, *key, Some(*ca)),
        _ => bail!("expected a certificate, a key and an optional CA"),
    };
    let chain = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<Vec<_>, _>>()
        .context("reading the certificate")?;
    if chain.is_empty() {
        bail!("the certificate file holds no certificate");
    }
    let key = PrivateKeyDer::from_pem_slice(key).context("reading the private key")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("TLS versions")?;
    let builder = match ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(ca) {
                roots
                    .add(cert.context("reading the client CA")?)
                    .context("adding the client CA")?;
            }
            if roots.is_empty() {
                bail!("the client CA file holds no certificate");
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .context("client certificate verifier")?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .context("the key does not match the certificate")?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

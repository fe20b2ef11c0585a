//! Starting the server: the ONNX Runtime library, the model repository, then the HTTP and gRPC
//! listeners; and stopping it: at Ctrl-C or SIGTERM the server drains (see [`Lifecycle`]),
//! cancels refresh jobs, closes its listeners and returns. A second signal exits at once.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tokio_stream::StreamExt;

use crate::api::{AppState, router};
use crate::audit::Audit;
use crate::auth::Authenticator;
use crate::config::ServerConfig;
use crate::constrain::Terminologies;
use crate::distill::service::Distiller;
use crate::distill::store::Store;
use crate::infer::Infer;
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;
use crate::repository::Repository;
use crate::transport;
use crate::transport::http::{KEEP_ALIVE_INTERVAL, KEEP_ALIVE_TIMEOUT};
use crate::transport::tls::Tls;

/// Runs the server with `config` until a shutdown signal.
pub async fn run(config: ServerConfig) -> Result<()> {
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        model_repository = %config.model_repository.display(),
        "distill-serve starting"
    );
    if let Some(folder) = &config.cuda_libraries {
        crate::engine::gpu::set_cuda_libraries(folder.clone());
    }
    crate::engine::environment(config.ort_library.as_deref())?;
    let metrics = Arc::new(Metrics::new().context("creating metrics")?);
    let root = config.model_repository.clone();
    let defaults = config.model_limits.clone();
    let repo_metrics = Arc::clone(&metrics);
    let repository = tokio::task::spawn_blocking(move || Repository::open(&root, defaults, repo_metrics))
        .await
        .context("loading the model repository")??;
    let specs = config.terminologies.clone();
    let terminologies = tokio::task::spawn_blocking(move || Terminologies::load(&specs))
        .await
        .context("loading terminologies")??;
    for t in terminologies.summaries() {
        tracing::info!(name = %t.name, codes = t.stats.codes, terms = t.stats.terms, "terminology loaded");
    }
    let repository = Arc::new(repository);
    let terminologies = Arc::new(terminologies);
    let store_path = config.store.clone();
    if let Some(parent) = store_path.parent().filter(|p| !p.exists()) {
        // The store holds captured prompts: its folder is its owner's only.
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let store = tokio::task::spawn_blocking(move || Store::open(&store_path))
        .await
        .context("opening the dataset store")?
        .with_context(|| format!("opening {}", config.store.display()))?;
    let audit = match &config.audit_log {
        Some(path) => Audit::open(path)?,
        None => Audit::off(),
    };
    let auth = Authenticator::new(&config.auth, audit.clone())?;
    let distiller = Arc::new(Distiller::new(
        Arc::new(store),
        Arc::clone(&repository),
        Arc::clone(&terminologies),
        Arc::clone(&metrics),
        audit,
        config.jobs.clone(),
    ));
    if let Some(keep) = config.capture_retention {
        distiller.expire_captures(keep);
    }
    let lifecycle = Lifecycle::new();
    let infer = Infer::new(
        Arc::clone(&repository),
        Arc::clone(&terminologies),
        Arc::clone(&metrics),
        Arc::clone(&distiller),
        config.request_timeout,
        Arc::clone(&lifecycle),
        config.log_prompts,
    );
    for name in repository.encoder_names() {
        if let Ok(model) = repository.get_encoder(&name) {
            crate::infer::log_label_coverage(&model, &terminologies);
        }
    }
    let state = AppState {
        repository,
        terminologies,
        distiller: Arc::clone(&distiller),
        metrics,
        lifecycle: Arc::clone(&lifecycle),
        auth: auth.clone(),
        dataset_read: config.dataset_read,
        infer,
    };
    let http = TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("binding {}", config.http_addr))?;
    let grpc = TcpListener::bind(config.grpc_addr)
        .await
        .with_context(|| format!("binding {}", config.grpc_addr))?;
    let (http_addr, grpc_addr) = (http.local_addr()?, grpc.local_addr()?);
    let tls_on = config.tls.is_some();
    let mutual = config.tls.as_ref().is_some_and(|t| t.client_ca.is_some());
    tracing::info!(addr = %http_addr, tls = tls_on, client_certificates = mutual, "HTTP listening");
    tracing::info!(addr = %grpc_addr, tls = tls_on, client_certificates = mutual, "gRPC listening");
    if let Some(path) = &config.ready_file {
        write_ready_file(path, http_addr, grpc_addr)?;
    }
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let http_tls = config.tls.as_ref().map(Tls::load).transpose()?;
    let grpc_tls = http_tls.as_ref().map(Tls::for_grpc);
    let http = transport::accept(http, http_tls, config.connections, "http");
    let grpc = transport::accept(grpc, grpc_tls, config.connections, "grpc");
    let grpc_routes = grpc_routes(state.clone())?;
    let mut grpc_stopped = stopped.clone();
    let grpc_incoming = tokio_stream::wrappers::ReceiverStream::new(grpc).map(Ok::<_, std::io::Error>);
    let grpc_server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(KEEP_ALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEP_ALIVE_TIMEOUT))
        .layer(crate::api::request_id::RequestIdLayer)
        .layer(crate::api::auth::GrpcAuthLayer::new(auth))
        .add_routes(grpc_routes)
        .serve_with_incoming_shutdown(grpc_incoming, async move {
            let _ = grpc_stopped.wait_for(|s| *s).await;
        });
    let mut http_stopped = stopped.clone();
    let http_server = transport::http::serve(http, router(state), async move {
        let _ = http_stopped.wait_for(|s| *s).await;
    });
    tokio::spawn(async move {
        shutdown_signal().await;
        drain(&lifecycle, &distiller, config.shutdown_grace).await;
        let _ = stop.send(true);
    });
    // After the drain, connections that stay open (an idle gRPC channel a client keeps) hold
    // the servers' graceful stops: they get CUT_WAIT to close, then the process exits anyway.
    let mut closing = stopped.clone();
    let servers = async { tokio::join!(http_server, grpc_server) };
    tokio::select! {
        ((), grpc_result) = servers => grpc_result.context("gRPC server")?,
        () = async {
            let _ = closing.wait_for(|s| *s).await;
            tokio::time::sleep(CUT_WAIT).await;
        } => tracing::info!("connections still open after the drain are closed"),
    }
    Ok(())
}

/// Writes the bound addresses to `path` as JSON; beside it first, then renamed, so a reader
/// never sees half a file.
fn write_ready_file(path: &Path, http: SocketAddr, grpc: SocketAddr) -> Result<()> {
    let body = serde_json::json!({"http": http.to_string(), "grpc": grpc.to_string()});
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, body.to_string())
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("writing the ready file {}", path.display()))
}

fn grpc_routes(state: AppState) -> Result<tonic::service::Routes> {
    crate::api::grpc::routes(state).context("building gRPC reflection")
}

/// Drains after the first signal: readiness off and new generations refused at once, the ones
/// in flight given `grace` to end, then cut; refresh jobs cancelled. A second signal exits the
/// process at once.
async fn drain(lifecycle: &Lifecycle, distiller: &Distiller, grace: Duration) {
    lifecycle.start_draining();
    tracing::info!(
        in_flight = lifecycle.in_flight(),
        grace_s = grace.as_secs_f64(),
        "draining: not ready, new requests refused, in-flight requests finishing"
    );
    tokio::spawn(async {
        shutdown_signal().await;
        tracing::warn!("second signal: exiting without draining");
        std::process::exit(1);
    });
    if tokio::time::timeout(grace, lifecycle.drained()).await.is_err() {
        tracing::warn!(
            in_flight = lifecycle.in_flight(),
            "grace period over: cutting the requests still in flight"
        );
        lifecycle.cut();
        let _ = tokio::time::timeout(CUT_WAIT, lifecycle.drained()).await;
    }
    let running = distiller.shutdown(CUT_WAIT).await;
    if running > 0 {
        tracing::warn!(running, "refresh jobs still running at exit");
    }
    tracing::info!("drained");
}

/// How long cut requests and cancelled refresh jobs get to record their end.
const CUT_WAIT: Duration = Duration::from_secs(5);

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}

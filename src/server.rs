//! Starting the server: the ONNX Runtime library, the model repository, then the HTTP listener,
//! until Ctrl-C or SIGTERM.

use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::net::TcpListener;

use crate::api::{AppState, router};
use crate::config::ServerConfig;
use crate::metrics::Metrics;
use crate::repository::Repository;

/// Runs the server with `config` until a shutdown signal.
pub async fn run(config: ServerConfig) -> Result<()> {
    crate::engine::environment(config.ort_library.as_deref())?;
    let metrics = Arc::new(Metrics::new().context("creating metrics")?);
    let root = config.model_repository.clone();
    let defaults = config.model_defaults;
    let repo_metrics = Arc::clone(&metrics);
    let repository = tokio::task::spawn_blocking(move || Repository::open(&root, defaults, repo_metrics))
        .await
        .context("loading the model repository")??;
    let state = AppState {
        repository: Arc::new(repository),
        metrics,
        admin_token: config.admin_token.as_deref().map(Arc::from),
    };
    let listener = TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("binding {}", config.http_addr))?;
    tracing::info!(addr = %listener.local_addr()?, "HTTP listening");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    Ok(())
}

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
    tracing::info!("shutting down");
}

//! Parses the configuration, binds, and serves until SIGTERM or SIGINT.

use std::process::ExitCode;

use clap::Parser;
use sluicegate::config::Config;
use sluicegate::server::{self, AppState};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let config = Config::parse();
    if let Err(message) = config.validate() {
        eprintln!("sluicegate: {message}");
        return ExitCode::from(2);
    }
    // `rediss://` and `https://` upstreams, and the OTLP exporter, take the
    // process's rustls provider.
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    let telemetry = match sluicegate::telemetry::init(
        &config.log,
        config.otlp_endpoint.as_deref(),
        &config.otlp_service_name,
    ) {
        Ok(telemetry) => telemetry,
        Err(err) => {
            eprintln!("sluicegate: --otlp-endpoint: {err}");
            return ExitCode::from(2);
        }
    };
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(workers) = config.worker_threads {
        runtime.worker_threads(workers);
    }
    let runtime = match runtime.enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("sluicegate: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let served = runtime.block_on(serve(config));
    drop(runtime);
    telemetry.shutdown();
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("sluicegate: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let state = AppState::from_config(&config)
        .await?
        .with_metrics(sluicegate::telemetry::install_metrics()?);
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some(sluicegate::tls::server_config(cert, key)?),
        _ => None,
    };
    let listener = tokio::net::TcpListener::bind((config.host.as_str(), config.port))
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}:{}: {e}", config.host, config.port))?;
    let addr = listener.local_addr()?;
    let backend = state.backend.name();
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(%addr, backend, scheme, "listening");
    // The one line on stdout, for scripts and tests that start the binary
    // on port 0: where it listens, once it does.
    {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening {scheme}://{addr}");
        let _ = out.flush();
    }
    server::run(listener, tls, state, shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}

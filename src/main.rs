//! The `prenota` binary: parses flags and hands over to [`prenota::server`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use prenota::config::Config;
use prenota::server::{ServeOptions, Server};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "prenota",
    version,
    about = "High-volume appointment booking for public services"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gRPC booking service with its embedded store.
    Serve(ServeArgs),
    /// Import a capacity file (CSV of sites and schedules) into a running server,
    /// all or nothing.
    Import(ImportArgs),
    /// Write every booking (all states) of a running server as CSV to stdout.
    Export(ExportArgs),
}

#[derive(clap::Args)]
struct ImportArgs {
    /// The capacity file; see README "For authorities" for its columns.
    file: PathBuf,
    /// The server's gRPC URL.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    server: String,
    /// Bearer token sent as the `authorization` header.
    #[arg(long)]
    token: Option<String>,
    /// Validate the whole file on the server and report what would change; apply nothing.
    #[arg(long)]
    dry_run: bool,
}

#[derive(clap::Args)]
struct ExportArgs {
    /// The server's gRPC URL.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    server: String,
    /// Bearer token sent as the `authorization` header.
    #[arg(long)]
    token: Option<String>,
    /// Only this site's bookings.
    #[arg(long, conflicts_with = "region")]
    site: Option<String>,
    /// Only the bookings of this region's sites.
    #[arg(long)]
    region: Option<String>,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Directory of the embedded store (created if missing).
    #[arg(long, default_value = "prenota-data")]
    data_dir: PathBuf,
    /// Address to serve gRPC on. Without tokens only loopback addresses are allowed.
    #[arg(long, default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Seed demo sites (Rome, Amsterdam, New York) with two weeks of slots.
    #[arg(long)]
    demo: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("prenota: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Serve(args) => runtime.block_on(serve(args)),
        Command::Import(args) => runtime.block_on(prenota::cli::import(
            &args.file,
            &args.server,
            args.token.as_deref(),
            args.dry_run,
        )),
        Command::Export(args) => {
            use prenota::proto::export_bookings_request::Scope;
            let scope = match (args.site, args.region) {
                (Some(site), _) => Some(Scope::SiteId(site)),
                (None, Some(region)) => Some(Scope::RegionId(region)),
                (None, None) => None,
            };
            runtime.block_on(prenota::cli::export(
                &args.server,
                args.token.as_deref(),
                scope,
            ))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("prenota: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> Result<(), String> {
    if !args.listen.ip().is_loopback() {
        return Err(format!(
            "refusing to listen on {}: no tokens are configured, so prenota runs in open mode \
             and serves loopback addresses only (127.0.0.1, ::1)",
            args.listen
        ));
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let address = listener.local_addr().map_err(|e| e.to_string())?;
    tracing::warn!("open mode: no tokens configured; serving loopback only");
    let server = Server::open(ServeOptions {
        data_dir: args.data_dir.clone(),
        config: Config::default(),
        demo: args.demo,
    })
    .await
    .map_err(|e| {
        format!(
            "cannot start with data dir {}: {e}",
            args.data_dir.display()
        )
    })?;
    // Tests and scripts wait for this exact line before connecting.
    println!("prenota listening on {address}");
    tracing::info!(%address, data_dir = %args.data_dir.display(), "serving prenota.v1");
    server
        .serve(listener, shutdown_signal())
        .await
        .map_err(|e| e.to_string())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate = match tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::terminate(),
        ) {
            Ok(signal) => signal,
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops the server");
                let _ = interrupt.await;
                return;
            }
        };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
    tracing::info!("shutting down: draining requests, then a final flush");
}

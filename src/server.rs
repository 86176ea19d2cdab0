//! Builds the gRPC server around the engine: prenota's two services, health,
//! reflection (v1 and v1alpha), message limits and graceful shutdown.
//!
//! Two steps so callers can tell "recovered" from "serving": [`Server::open`] recovers
//! the store (and seeds the demo), [`Server::serve`] answers until `shutdown` resolves,
//! then drains in-flight requests and lets the committer make queued writes durable.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::config::Config;
use crate::grpc::auth::{self, Gate};
use crate::grpc::shed::Shed;
use crate::grpc::{BookingApi, CapacityApi};
use crate::proto::booking_service_server::BookingServiceServer;
use crate::proto::capacity_service_server::CapacityServiceServer;
use crate::service::{Engine, ServiceError};
use crate::store::StoreError;

const BOOKING_SERVICE_NAME: &str = "prenota.v1.BookingService";
const CAPACITY_SERVICE_NAME: &str = "prenota.v1.CapacityService";
/// How long shutdown waits for detached request tasks to let go of the engine.
const ENGINE_RELEASE_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum ServeError {
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("the recovery task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub data_dir: PathBuf,
    pub config: Config,
    /// Seed the demo sites (idempotent) after recovery.
    pub demo: bool,
}

pub struct Server {
    engine: Arc<Engine>,
    tokens: Vec<crate::config::Token>,
    tls: Option<crate::config::TlsPem>,
}

impl Server {
    /// Opens the store and rebuilds memory from it; refuses broken invariants.
    pub async fn open(options: ServeOptions) -> Result<Self, ServeError> {
        let ServeOptions {
            data_dir,
            config,
            demo,
        } = options;
        let (tokens, tls) = (config.tokens.clone(), config.tls.clone());
        let engine =
            tokio::task::spawn_blocking(move || Engine::open(&data_dir, &config)).await??;
        let engine = Arc::new(engine);
        if demo {
            crate::demo::seed(&engine).await?;
        }
        Ok(Self {
            engine,
            tokens,
            tls,
        })
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServeError> {
        let Self {
            engine,
            tokens,
            tls,
        } = self;
        let limits = engine.limits().clone();
        let (health, health_service) = tonic_health::server::health_reporter();
        set_health(&health, ServingStatus::Serving).await;
        let health_watch = tokio::spawn(mirror_store_health(engine.store_health(), health.clone()));
        let sweeper = tokio::spawn(sweep_holds(Arc::clone(&engine)));

        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?;

        let in_flight = Arc::new(Semaphore::new(limits.in_flight_requests_max));
        let token_limiter = auth::token_limiter(limits.rate_token_requests_per_s);
        let retention = tokio::spawn(retain_rate_limits(Arc::clone(&engine)));
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = &tls {
            let mut settings =
                ServerTlsConfig::new().identity(Identity::from_pem(&tls.cert, &tls.key));
            if let Some(client_ca) = &tls.client_ca {
                settings = settings.client_ca_root(Certificate::from_pem(client_ca));
            }
            builder = builder.tls_config(settings)?;
        }
        let result = builder
            .max_concurrent_streams(limits.streams_per_connection_max)
            .http2_max_pending_accept_reset_streams(Some(limits.pending_reset_streams_max))
            .timeout(Duration::from_millis(limits.request_timeout_ms))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(InterceptedService::new(
                Shed::new(
                    BookingServiceServer::new(BookingApi::new(Arc::clone(&engine)))
                        .max_decoding_message_size(limits.message_size_bytes_max),
                    Arc::clone(&in_flight),
                ),
                Gate::new(&tokens, auth::Service::Booking, token_limiter.clone()),
            ))
            .add_service(InterceptedService::new(
                Shed::new(
                    CapacityServiceServer::new(CapacityApi::new(Arc::clone(&engine)))
                        .max_decoding_message_size(limits.message_size_bytes_max),
                    in_flight,
                ),
                Gate::new(&tokens, auth::Service::Capacity, token_limiter),
            ))
            // Without TCP_NODELAY, small responses wait on Nagle + delayed ACK (~40 ms).
            .serve_with_incoming_shutdown(
                TcpIncoming::from(listener).with_nodelay(Some(true)),
                shutdown,
            )
            .await;
        set_health(&health, ServingStatus::NotServing).await;
        health_watch.abort();
        for task in [sweeper, retention] {
            task.abort();
            let _ = task.await;
        }
        close(engine).await;
        result.map_err(ServeError::from)
    }
}

async fn set_health(health: &HealthReporter, status: ServingStatus) {
    for service in ["", BOOKING_SERVICE_NAME, CAPACITY_SERVICE_NAME] {
        health.set_service_status(service, status).await;
    }
}

/// A failed store refuses writes for good; health says so until restart.
async fn mirror_store_health(
    mut store_healthy: tokio::sync::watch::Receiver<bool>,
    health: HealthReporter,
) {
    while store_healthy.changed().await.is_ok() {
        if !*store_healthy.borrow() {
            set_health(&health, ServingStatus::NotServing).await;
        }
    }
}

/// Expires holds whose time is up: one bounded batch (one group commit) per tick.
async fn sweep_holds(engine: Arc<Engine>) {
    let mut tick = tokio::time::interval(Duration::from_millis(
        engine.limits().hold_sweep_interval_ms,
    ));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match engine.expire_holds(crate::service::now_unix_ms()).await {
            Ok(0) => {}
            Ok(expired) => tracing::debug!(expired, "holds expired"),
            // A failed store is already reported through health; retry next tick.
            Err(ServiceError::Store(StoreError::Failed)) => {}
            Err(error) => tracing::warn!(%error, "expiring holds failed; retrying next tick"),
        }
    }
}

/// Forgets rate-limited citizens whose quota has refilled, on a timer: a flood of
/// made-up citizen ids costs memory only until the next tick.
async fn retain_rate_limits(engine: Arc<Engine>) {
    let mut tick = tokio::time::interval(Duration::from_millis(
        engine.limits().rate_limiter_retain_interval_ms,
    ));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let engine = Arc::clone(&engine);
        match tokio::task::spawn_blocking(move || engine.retain_rate_limits()).await {
            Ok(tracked) => tracing::debug!(tracked, "citizen rate limiter retained"),
            Err(error) => tracing::warn!(%error, "retaining the citizen rate limiter failed"),
        }
    }
}

/// Waits (bounded) until detached request tasks release the engine, then stops the
/// committer after it has made every queued write durable.
async fn close(mut engine: Arc<Engine>) {
    let deadline = tokio::time::Instant::now() + ENGINE_RELEASE_WAIT;
    loop {
        match Arc::try_unwrap(engine) {
            Ok(mut owned) => {
                tokio::task::block_in_place(|| owned.shutdown());
                tracing::info!("store closed cleanly");
                return;
            }
            Err(shared) if tokio::time::Instant::now() < deadline => {
                engine = shared;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(_) => {
                tracing::warn!(
                    "requests still hold the engine after shutdown; leaving the store to the OS"
                );
                return;
            }
        }
    }
}

//! Builds the gRPC server around the engine: prenota's four services (booking, capacity,
//! open data, site), health, reflection (v1 and v1alpha), message limits and graceful
//! shutdown.
//!
//! [`recover_and_serve`] (the binary) answers from the moment it listens: health says
//! NOT_SERVING and prenota's services RECOVERING until the store is recovered, then
//! SERVING. Tests use two steps instead: [`Server::open`] recovers, [`Server::serve`]
//! serves. Both answer until `shutdown` resolves, then drain in-flight requests and let
//! the committer make queued writes durable. Every request passes the observe layer
//! (RED metrics, request logs); background tasks sweep holds, fan availability out to
//! watchers, step releases and campaigns, run retention, retain rate limiters and
//! refresh the gauges.

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::config::{default_citizen_trust, per_token_share, CitizenTrust, Config};
use crate::grpc::assertion::Assertions;
use crate::grpc::auth::{self, Gate};
use crate::grpc::connections;
use crate::grpc::observe::ObserveLayer;
use crate::grpc::peers::PeerCaps;
use crate::grpc::readiness::Ready;
use crate::grpc::receiving::Receiving;
use crate::grpc::shed::Shed;
use crate::grpc::{BookingApi, CapacityApi, OpenDataApi, SiteApi};
use crate::proto::booking_service_server::BookingServiceServer;
use crate::proto::capacity_service_server::CapacityServiceServer;
use crate::proto::open_data_service_server::OpenDataServiceServer;
use crate::proto::site_service_server::SiteServiceServer;
use crate::service::exports::Exports;
use crate::service::{Clock, Engine, ServiceError};
use crate::store::postgres::Standby;
use crate::store::StoreError;
use crate::telemetry;

const BOOKING_SERVICE_NAME: &str = "prenota.v1.BookingService";
const CAPACITY_SERVICE_NAME: &str = "prenota.v1.CapacityService";
const OPEN_DATA_SERVICE_NAME: &str = "prenota.v1.OpenDataService";
const SITE_SERVICE_NAME: &str = "prenota.v1.SiteService";
/// How long shutdown waits for the connections it closed past its drain to end.
const CLOSED_CONNECTIONS_WAIT: Duration = Duration::from_secs(1);

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
    #[error("starting the assertion verifier thread: {0}")]
    VerifierThread(std::io::Error),
    #[error("the recovery task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    /// PostgreSQL: the store failed (the lease lost, the session gone). Exiting lets a
    /// supervisor start the node again, as a standby.
    #[error(
        "this node can no longer commit (it lost the lease, or its PostgreSQL session): \
         exiting, so that a supervisor starts it again as a standby"
    )]
    NoLongerActive,
    /// The store failed while serving (a full disk, an I/O error): every write was
    /// refused since. The exit status says so, for a supervisor and an operator.
    #[error(
        "the store failed while serving, and every write since was refused: free the disk \
         or mend what the log named, then start again (recovery reads what is on disk)"
    )]
    StoreFailed,
}

#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub data_dir: PathBuf,
    pub config: Config,
    /// Seed the demo sites (idempotent) after recovery.
    pub demo: bool,
    /// The engine's clock: `Clock::system()`, or a manual one in tests.
    pub clock: Clock,
}

pub struct Server {
    engine: Arc<Engine>,
    access: Access,
}

/// Where the engine comes from: already recovered, or recovered while serving health.
enum Start {
    Recovered(Arc<Engine>),
    Recover(Box<ServeOptions>),
}

impl Server {
    /// Opens the store and rebuilds memory from it; refuses broken invariants.
    pub async fn open(options: ServeOptions) -> Result<Self, ServeError> {
        let access = Access::of(&options.config)?;
        let engine = recover(options, Arc::default()).await?;
        Ok(Self { engine, access })
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Serves the recovered engine until `shutdown` resolves.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServeError> {
        run(
            Start::Recovered(self.engine),
            self.access,
            listener,
            shutdown,
            || {},
        )
        .await
    }
}

/// The runtime a server runs on, its worker threads named `thread_name`.
///
/// Built with `--cfg tokio_unstable` (`.cargo/config.toml`), its workers have no LIFO
/// slot: a task woken by a worker then waits behind the tasks already queued instead of
/// running next. When a group commit wakes a batch of bookings, or a read brings a batch
/// of searches, each finished call wakes its connection's task; with the slot, that task
/// ran after each call and wrote each answer in a `writev` of its own; without it, the
/// calls queued before it finish first and one `writev` carries their answers (4.6×
/// fewer in a rush). Measured in BENCHMARKS.md, "One write for the answers ready
/// together": 7–11% less server CPU per request, a lower Book p99 when bookings alone
/// load it; for health checks at the load generator's ceiling a higher p50 and 11% fewer
/// a second. A build without the flag (a `RUSTFLAGS` variable replaces the config's
/// flags) keeps tokio's default; a unit test fails then.
pub fn runtime(thread_name: &str) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all().thread_name(thread_name);
    // A worker going idle gives back what it freed (`allocator::collect_when_idle`).
    builder.on_thread_park(crate::allocator::collect_when_idle);
    #[cfg(tokio_unstable)]
    builder.disable_lifo_slot();
    builder.build()
}

/// Answers on `listener` at once, with health NOT_SERVING and prenota's services
/// UNAVAILABLE / RECOVERING, while the store is recovered; then serves everything and
/// calls `on_serving`. A failed recovery stops the server with its error.
pub async fn recover_and_serve(
    options: ServeOptions,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    on_serving: impl FnOnce(),
) -> Result<(), ServeError> {
    let access = Access::of(&options.config)?;
    run(
        Start::Recover(Box::new(options)),
        access,
        listener,
        shutdown,
        on_serving,
    )
    .await
}

/// What the transport needs before the engine exists.
struct Access {
    tokens: Vec<crate::config::Token>,
    tls: Option<crate::config::TlsPem>,
    limits: crate::config::Limits,
    /// Verifies citizen assertions (PRODUCT.md part A).
    assertions: Assertions,
    /// How open-mode callers name citizens: asserted once issuers are configured.
    open_citizens: CitizenTrust,
    /// Serve gRPC reflection (behind the token gate and the in-flight limit).
    reflection: bool,
    /// OpenDataService answers callers without a token too.
    open_data: bool,
    /// PostgreSQL: a failed store ends serving (`ServeError::NoLongerActive`).
    stop_when_store_fails: bool,
    /// Load balancers whose connections start with a PROXY protocol header.
    proxies: Vec<ipnet::IpNet>,
    /// Health checkers whose checks have a budget apart.
    health_checkers: Vec<ipnet::IpNet>,
}

impl Access {
    fn of(config: &Config) -> Result<Self, ServeError> {
        let lifetime_max_s = config.limits.citizen_assertion_lifetime_seconds_max;
        Ok(Self {
            tokens: config.tokens.clone(),
            tls: config.tls.clone(),
            limits: config.limits.clone(),
            assertions: Assertions::new(
                &config.citizen_issuers,
                lifetime_max_s,
                config.limits.citizen_assertions_remembered_max,
            )
            .map_err(ServeError::VerifierThread)?,
            open_citizens: default_citizen_trust(!config.citizen_issuers.is_empty()),
            reflection: config.serves_reflection(),
            open_data: config.open_data,
            stop_when_store_fails: matches!(config.store, crate::config::StoreBackend::Postgres(_)),
            proxies: config.proxy_protocol_from.clone(),
            health_checkers: config.health_checks_from.clone(),
        })
    }
}

/// Opens the engine (with PostgreSQL, once this node holds the lease; `standby` says
/// it waits meanwhile).
async fn recover(options: ServeOptions, standby: Arc<Standby>) -> Result<Arc<Engine>, ServeError> {
    let ServeOptions {
        data_dir,
        config,
        demo,
        clock,
    } = options;
    let engine = tokio::task::spawn_blocking(move || {
        Engine::open_configured(&data_dir, &config, clock, &standby)
    })
    .await??;
    let engine = Arc::new(engine);
    if demo {
        crate::demo::seed(&engine).await?;
    }
    Ok(engine)
}

/// The background tasks of a serving engine.
struct Tasks(Vec<tokio::task::JoinHandle<()>>);

impl Tasks {
    fn start(
        engine: &Arc<Engine>,
        health: &HealthReporter,
        failed: &Arc<tokio::sync::Notify>,
    ) -> Self {
        Self(vec![
            tokio::spawn(mirror_store_health(
                engine.store_health(),
                health.clone(),
                Arc::clone(failed),
            )),
            tokio::spawn(sweep_holds(Arc::clone(engine))),
            tokio::spawn(retain_rate_limits(Arc::clone(engine))),
            tokio::spawn(retain_records(Arc::clone(engine))),
            tokio::spawn(refresh_gauges(Arc::clone(engine))),
            tokio::spawn(fan_out_availability(Arc::clone(engine))),
            tokio::spawn(advance_releases(Arc::clone(engine))),
            tokio::spawn(match_campaigns(Arc::clone(engine))),
        ])
    }

    async fn stop(self) {
        for task in self.0 {
            task.abort();
            let _ = task.await;
        }
    }
}

/// Serves until `shutdown` (or a failed recovery, or a failed store on PostgreSQL).
/// Long because it is the wiring: the gates, limiters and shutdown signals made at its
/// top are each handed to several of the services and futures below it.
async fn run(
    start: Start,
    access: Access,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    on_serving: impl FnOnce(),
) -> Result<(), ServeError> {
    let Access {
        tokens,
        tls,
        limits,
        assertions,
        open_citizens,
        reflection: serves_reflection,
        open_data,
        stop_when_store_fails,
        proxies,
        health_checkers,
    } = access;
    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, ServingStatus::NotServing).await;
    // Set when shutdown begins: every reply stream ends, so the graceful drain can finish.
    let (closing, closing_seen) = tokio::sync::watch::channel(false);
    // Reachable without a token: only tiny requests, and few Watch streams (their own
    // pool; Check takes no place, and has budgets of its own for what it holds).
    let (receiving, health_receiving) = receiving_budgets(&limits);
    let health_service = Shed::streams_only(
        health_service.max_decoding_message_size(limits.probe_message_size_bytes_max),
        (
            Arc::new(Semaphore::new(limits.health_watches_max)),
            peer_caps(&limits, limits.health_watches_per_peer_max),
        ),
        (limits.probe_message_size_bytes_max, &health_receiving),
    )
    .apart_for_checkers(Arc::new(Semaphore::new(limits.health_watches_max)))
    .ending_streams_on(closing_seen.clone());

    // PostgreSQL: while another node holds the lease the gates say NOT_ACTIVE.
    let standby = Arc::new(Standby::default());
    let (booking_gate, booking_slot) = Ready::pending(&standby);
    let (capacity_gate, capacity_slot) = Ready::pending(&standby);
    let (open_data_gate, open_data_slot) = Ready::pending(&standby);
    let (site_gate, site_slot) = Ready::pending(&standby);
    let in_flight = Arc::new(Semaphore::new(limits.in_flight_requests_max));
    let token_limiter = auth::token_limiter(limits.rate_token_requests_per_s);
    let anonymous = auth::anonymous_limiter(limits.open_data_anonymous_requests_per_s);
    let gate = |service| {
        let limiters = (token_limiter.clone(), Arc::clone(&anonymous));
        Gate::new(&tokens, service, limiters, open_citizens)
    };
    let (reflection_v1, reflection_v1alpha) = match serves_reflection {
        true => {
            let gate = gate(auth::Service::Reflection);
            let size = limits.probe_message_size_bytes_max;
            let v1 = reflection().build_v1()?.max_decoding_message_size(size);
            let v1alpha = reflection()
                .build_v1alpha()?
                .max_decoding_message_size(size);
            // Its own pool: reflection streams never take a booking's place.
            let streams = Arc::new(Semaphore::new(limits.reflection_streams_max));
            (
                Some(gated(
                    v1,
                    (&streams, size, &receiving, None),
                    &gate,
                    &closing_seen,
                )),
                Some(gated(
                    v1alpha,
                    (&streams, size, &receiving, None),
                    &gate,
                    &closing_seen,
                )),
            )
        }
        false => (None, None),
    };
    let giving_up = Arc::clone(&standby);
    let health_at_shutdown = health.clone();
    // PostgreSQL: the health mirror wakes this once the store failed; serving then ends.
    let store_failed = Arc::new(tokio::sync::Notify::new());
    let failed_seen = Arc::clone(&store_failed);
    let no_longer_active = Arc::new(AtomicBool::new(false));
    let ended_by_failure = Arc::clone(&no_longer_active);
    // A failed recovery stops the server; kept alive (unsent) while serving.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let drain_delay = Duration::from_millis(limits.shutdown_drain_delay_ms);
    // Imports count from their headers: their own pool bounds how many places they hold.
    let imports = Arc::new(Exports::new(
        limits.imports_max,
        per_token_share(&tokens, limits.imports_max, limits.imports_per_token_max),
    ));
    let in_flight = (
        &in_flight,
        limits.message_size_bytes_max,
        &receiving,
        Some(&imports),
    );
    let accepting = connections::capped(
        listener,
        connections::Caps {
            max: limits.connections_max,
            per_peer: peer_caps(&limits, limits.connections_per_peer_max),
            proxies,
            health_checkers,
        },
        (
            Duration::from_millis(limits.connection_opening_timeout_ms),
            Duration::from_millis(
                (limits.connection_age_max_ms).saturating_add(limits.connection_age_grace_ms),
            ),
        ),
    );
    let open = accepting.open_connections();
    let serving = transport(tls.as_ref(), &limits)?
        .layer(ObserveLayer {
            request_timeout: Duration::from_millis(limits.request_timeout_ms),
        })
        .add_service(health_service)
        .add_optional_service(reflection_v1)
        .add_optional_service(reflection_v1alpha)
        .add_service(gated(
            booking_gate,
            in_flight,
            &gate(auth::Service::Booking),
            &closing_seen,
        ))
        .add_service(gated(
            capacity_gate,
            in_flight,
            &gate(auth::Service::Capacity),
            &closing_seen,
        ))
        .add_service(gated(
            open_data_gate,
            in_flight,
            &gate(auth::Service::OpenData { public: open_data }),
            &closing_seen,
        ))
        .add_service(gated(
            site_gate,
            in_flight,
            &gate(auth::Service::Site),
            &closing_seen,
        ))
        .serve_with_incoming_shutdown(accepting, async move {
            let signalled = tokio::select! {
                _ = shutdown => true,
                _ = stopped => false,
                _ = failed_seen.notified(), if stop_when_store_fails => {
                    ended_by_failure.store(true, std::sync::atomic::Ordering::Release);
                    false
                }
            };
            // Balancers watching health see it first, then every stream ends.
            set_health(&health_at_shutdown, ServingStatus::NotServing).await;
            if signalled {
                serve_on_while_balancers_move_off(drain_delay).await;
            }
            closing.send_replace(true);
            // A standby stops waiting for the lease.
            giving_up
                .give_up
                .store(true, std::sync::atomic::Ordering::Release);
        });
    let drain_bound = Duration::from_millis(limits.request_timeout_ms);
    let unwritten = Duration::from_millis(limits.reply_write_timeout_ms);
    let stalled = connections::close_stalled_replies(open.clone(), unwritten);
    let serving = drained_within(serving, closing_seen.clone(), (drain_bound, open));
    let serving = async move {
        tokio::select! {
            served = serving => served,
            never = stalled => match never {},
        }
    };
    let services = ServiceSlots {
        booking: booking_slot.as_ref(),
        capacity: capacity_slot.as_ref(),
        open_data: open_data_slot.as_ref(),
        site: site_slot.as_ref(),
    };
    let settings = ServiceSettings {
        message_size_bytes_max: limits.message_size_bytes_max,
        assertions,
    };
    let starting = async {
        let started = start_serving(
            start,
            services,
            (&health, &store_failed),
            &settings,
            stop,
            Arc::clone(&standby),
        )
        .await?;
        end_streams_on(closing_seen, &started.0);
        on_serving();
        Ok::<_, ServeError>(started)
    };
    // `starting` first: an already recovered engine's services are in place (on its first
    // poll) before `serving` accepts a connection, so no request meets RECOVERING.
    let (started, served) = tokio::join!(biased; starting, serving);
    set_health(&health, ServingStatus::NotServing).await;
    // The services hold the engine; `close` waits until it is the last holder.
    drop((booking_slot, capacity_slot, open_data_slot, site_slot));
    let no_longer_active = no_longer_active.load(std::sync::atomic::Ordering::Acquire);
    ended(started, served, no_longer_active, &standby).await
}

/// Once serving ended: stops the background tasks and closes the engine, and tells why
/// it ended (`no_longer_active`: the store failed and this node let the lease go).
async fn ended(
    started: Result<(Arc<Engine>, Tasks, tokio::sync::oneshot::Sender<()>), ServeError>,
    served: Result<(), tonic::transport::Error>,
    no_longer_active: bool,
    standby: &Standby,
) -> Result<(), ServeError> {
    match started {
        Ok((engine, tasks, _stop)) => {
            tasks.stop().await;
            engine.keep_retention_time().await;
            let closed = close(engine).await;
            served.map_err(ServeError::from)?;
            match (no_longer_active, closed) {
                (true, _) | (false, Err(StoreError::NotActive)) => Err(ServeError::NoLongerActive),
                (false, Err(_)) => Err(ServeError::StoreFailed),
                (false, Ok(())) => Ok(()),
            }
        }
        // Shut down while standing by (nothing was opened), or while waiting out the
        // previous holder (closed already, nothing served).
        Err(ServeError::Service(ServiceError::Store(StoreError::Closed)))
            if standby.gave_up.load(std::sync::atomic::Ordering::Acquire) =>
        {
            served.map_err(ServeError::from)
        }
        Err(error) => Err(error),
    }
}

/// Recovers the engine if needed (a failed recovery sends `stop`), opens prenota's
/// services, turns health SERVING and starts the background tasks. `stop` is kept alive
/// (unsent) while serving.
async fn start_serving(
    start: Start,
    services: ServiceSlots<'_>,
    (health, store_failed): (&HealthReporter, &Arc<tokio::sync::Notify>),
    settings: &ServiceSettings,
    stop: tokio::sync::oneshot::Sender<()>,
    standby: Arc<Standby>,
) -> Result<(Arc<Engine>, Tasks, tokio::sync::oneshot::Sender<()>), ServeError> {
    let engine = match start {
        Start::Recovered(engine) => engine,
        Start::Recover(options) => match recover(*options, Arc::clone(&standby)).await {
            Ok(engine) => engine,
            Err(error) => {
                let _ = stop.send(());
                return Err(error);
            }
        },
    };
    if !waited_out_previous_holder(&standby).await {
        // Shut down during the wait: nothing served, no background task started.
        let _ = close(engine).await;
        standby
            .gave_up
            .store(true, std::sync::atomic::Ordering::Release);
        return Err(ServeError::Service(ServiceError::Store(StoreError::Closed)));
    }
    open_services(&engine, services, settings);
    set_health(health, ServingStatus::Serving).await;
    // Started after SERVING: the health mirror turns it back if the store already failed.
    let tasks = Tasks::start(&engine, health, store_failed);
    Ok((engine, tasks, stop))
}

/// PostgreSQL, after taking the lease over from a holder that may still live: health
/// stays NOT_SERVING and the services RECOVERING until that holder surely stopped
/// answering from memory (`LeaseFreshness::previous_left`), or until shutdown begins.
/// Recovery ran meanwhile, so a large store waits no longer than it took. False if
/// shutdown began first.
async fn waited_out_previous_holder(standby: &Standby) -> bool {
    let left = standby.lease.previous_left();
    if left.is_zero() {
        return true;
    }
    tracing::info!(
        wait_ms = u64::try_from(left.as_millis()).unwrap_or(u64::MAX),
        "waiting for the previous lease holder to stop answering before serving"
    );
    while !standby.lease.previous_left().is_zero() {
        if standby.give_up.load(std::sync::atomic::Ordering::Acquire) {
            return false;
        }
        tokio::time::sleep(left.min(Duration::from_millis(50))).await;
    }
    true
}

/// `serving`, which once `closing` turns true waits for its connections to finish what
/// they were doing, for at most `bound` (every request is answered by then, every reply
/// stream was told to end, a watch that stopped reading was cut off): past it, a
/// connection that still lingers (a client ignoring GOAWAY) keeps the rest from exiting
/// no longer: the connections still open are closed (a client that never answers the
/// GOAWAY's ping, even on an idle connection, would hold its task, and with it the
/// engine, so the store could not close cleanly), and their tasks are given
/// `CLOSED_CONNECTIONS_WAIT` to end.
async fn drained_within(
    serving: impl Future<Output = Result<(), tonic::transport::Error>>,
    mut closing: tokio::sync::watch::Receiver<bool>,
    (bound, open): (Duration, connections::OpenConnections),
) -> Result<(), tonic::transport::Error> {
    tokio::pin!(serving);
    tokio::select! {
        served = &mut serving => return served,
        // An error: the sender is gone, so shutdown began.
        _ = closing.wait_for(|closing| *closing) => {}
    }
    if let Ok(served) = tokio::time::timeout(bound, &mut serving).await {
        return served;
    }
    let closed = open.close_all();
    tracing::warn!(
        bound_ms = bound.as_millis() as u64,
        closed,
        "connections still open request_timeout_ms after shutdown began; closing them"
    );
    match tokio::time::timeout(CLOSED_CONNECTIONS_WAIT, serving).await {
        Ok(served) => served,
        Err(_) => Ok(()),
    }
}

/// After SIGTERM, with health NOT_SERVING, keeps serving for `shutdown_drain_delay_ms`:
/// a balancer that watches health takes the node out meanwhile, so no client meets a
/// closed port, then the node stops accepting and drains.
async fn serve_on_while_balancers_move_off(delay: Duration) {
    if delay.is_zero() {
        return;
    }
    tracing::info!(
        delay_ms = delay.as_millis() as u64,
        "stopping: health NOT_SERVING, still serving for shutdown_drain_delay_ms"
    );
    tokio::time::sleep(delay).await;
}

/// Ends the engine's watch streams once `closing` turns true (shutdown began): they
/// never end by themselves, and the graceful drain waits for every stream.
fn end_streams_on(mut closing: tokio::sync::watch::Receiver<bool>, engine: &Arc<Engine>) {
    let engine = Arc::downgrade(engine);
    tokio::spawn(async move {
        // An error: the sender is gone, shutdown is under way or over.
        let _ = closing.wait_for(|closing| *closing).await;
        if let Some(engine) = engine.upgrade() {
            engine.end_streams();
        }
    });
}

/// `service` behind the token gate and a pool of `permits` (one-message calls take
/// one once their message of at most `message_bytes_max` has arrived, received under
/// `receiving`'s budgets; streamed requests from their headers, and one of `streamed`'s
/// places too when given); its reply streams end once `closing` turns true.
fn gated<S>(
    service: S,
    (permits, message_bytes_max, receiving, streamed): Pools<'_>,
    gate: &Gate,
    closing: &tokio::sync::watch::Receiver<bool>,
) -> InterceptedService<Shed<S>, Gate> {
    let shed = Shed::new(service, Arc::clone(permits), (message_bytes_max, receiving))
        .ending_streams_on(closing.clone());
    let shed = match streamed {
        Some(pool) => shed.with_streamed_pool(pool),
        None => shed,
    };
    InterceptedService::new(shed, gate.clone())
}

/// What one-message calls may hold until answered (`grpc::receiving`): the budgets of
/// every service, and health checks' own, of which a peer holds a 32nd unless the
/// per-peer shares are off; a message must arrive within the same deadline in both.
fn receiving_budgets(limits: &crate::config::Limits) -> (Arc<Receiving>, Arc<Receiving>) {
    let within = Duration::from_millis(limits.message_receive_timeout_ms);
    let per_peer = limits.receiving_bytes_per_peer_max;
    let services = Receiving::new(limits.receiving_bytes_max, peer_caps(limits, per_peer));
    let health = limits.health_receiving_bytes_max;
    let health_per_peer = match per_peer {
        0 => 0,
        _ => health / crate::limits::HEALTH_RECEIVING_PEER_SHARES,
    };
    // A listed load balancer's own checks (v2 LOCAL) and a listed health checker's have
    // a budget of their own: others filling this one must not make them think the node
    // is down.
    let health = Receiving::new(health, peer_caps(limits, health_per_peer)).with_checkers_apart();
    (
        Arc::new(services.with_deadline(within)),
        Arc::new(health.with_deadline(within)),
    )
}

/// A per-peer cap (0: none) under `peer_shares_per_ipv6_48_max` (`grpc::peers`).
fn peer_caps(limits: &crate::config::Limits, per_peer_max: usize) -> PeerCaps {
    PeerCaps {
        per_peer_max,
        shares_per_ipv6_48: limits.peer_shares_per_ipv6_48_max,
    }
}

/// Reflection (v1 and v1alpha) of prenota's protos and health.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}

/// The transport: HTTP/2 limits, connection lifetime, request timeout, and TLS when
/// configured.
fn transport(
    tls: Option<&crate::config::TlsPem>,
    limits: &crate::config::Limits,
) -> Result<tonic::transport::Server, ServeError> {
    let ms = Duration::from_millis;
    let builder = tonic::transport::Server::builder()
        .max_concurrent_streams(limits.streams_per_connection_max)
        .http2_max_pending_accept_reset_streams(Some(limits.pending_reset_streams_max))
        // tonic leaves this unlimited: a client could make the server reset streams for
        // ever (RUSTSEC-2024-0003's class); past the limit the connection gets GOAWAY.
        .http2_max_local_error_reset_streams(Some(limits.local_reset_streams_max))
        .http2_keepalive_interval(Some(ms(limits.keepalive_interval_ms)))
        .http2_keepalive_timeout(Some(ms(limits.keepalive_timeout_ms)))
        // GOAWAY at the age; `connections` closes the connection after the grace
        // (tonic's own grace closes it at age + grace without sending any GOAWAY).
        .max_connection_age(ms(limits.connection_age_max_ms))
        .timeout(ms(limits.request_timeout_ms));
    let Some(tls) = tls else {
        return Ok(builder);
    };
    let mut settings = ServerTlsConfig::new()
        .identity(Identity::from_pem(&tls.cert, &tls.key))
        .timeout(ms(limits.tls_handshake_timeout_ms));
    if let Some(client_ca) = &tls.client_ca {
        settings = settings.client_ca_root(Certificate::from_pem(client_ca));
    }
    Ok(builder.tls_config(settings)?)
}

type BookingSlot = std::sync::OnceLock<BookingServiceServer<BookingApi>>;
type CapacitySlot = std::sync::OnceLock<CapacityServiceServer<CapacityApi>>;
type OpenDataSlot = std::sync::OnceLock<OpenDataServiceServer<OpenDataApi>>;
type SiteSlot = std::sync::OnceLock<SiteServiceServer<SiteApi>>;

/// What `gated` wraps a service in: the permits, the largest message, the receiving
/// budgets, and the streamed requests' pool if any.
type Pools<'a> = (
    &'a Arc<Semaphore>,
    usize,
    &'a Arc<Receiving>,
    Option<&'a Arc<Exports>>,
);

/// Where each of prenota's services is put once the engine exists.
struct ServiceSlots<'a> {
    booking: &'a BookingSlot,
    capacity: &'a CapacitySlot,
    open_data: &'a OpenDataSlot,
    site: &'a SiteSlot,
}

/// Puts prenota's services behind their readiness gates: from here on they answer.
/// What prenota's services are built with once the engine exists.
struct ServiceSettings {
    message_size_bytes_max: usize,
    assertions: Assertions,
}

fn open_services(engine: &Arc<Engine>, slots: ServiceSlots<'_>, settings: &ServiceSettings) {
    let booking_api = BookingApi::new(Arc::clone(engine), settings.assertions.clone());
    let _ = slots.booking.set(
        BookingServiceServer::new(booking_api)
            .max_decoding_message_size(settings.message_size_bytes_max),
    );
    let _ = slots.capacity.set(
        CapacityServiceServer::new(CapacityApi::new(Arc::clone(engine)))
            .max_decoding_message_size(settings.message_size_bytes_max),
    );
    let _ = slots.open_data.set(
        OpenDataServiceServer::new(OpenDataApi::new(Arc::clone(engine)))
            .max_decoding_message_size(settings.message_size_bytes_max),
    );
    let _ = slots.site.set(
        SiteServiceServer::new(SiteApi::new(Arc::clone(engine)))
            .max_decoding_message_size(settings.message_size_bytes_max),
    );
}

async fn set_health(health: &HealthReporter, status: ServingStatus) {
    // The gauge first: whoever sees the new health also sees the gauge agree.
    let serving = matches!(status, ServingStatus::Serving);
    metrics::gauge!(telemetry::SERVING).set(if serving { 1.0 } else { 0.0 });
    for service in [
        "",
        BOOKING_SERVICE_NAME,
        CAPACITY_SERVICE_NAME,
        OPEN_DATA_SERVICE_NAME,
        SITE_SERVICE_NAME,
    ] {
        health.set_service_status(service, status).await;
    }
}

/// A failed store refuses writes for good; health says so until restart, and `failed`
/// is woken (on PostgreSQL, serving then ends).
async fn mirror_store_health(
    mut store_healthy: tokio::sync::watch::Receiver<bool>,
    health: HealthReporter,
    failed: Arc<tokio::sync::Notify>,
) {
    let healthy = *store_healthy.borrow_and_update();
    metrics::gauge!(telemetry::STORE_HEALTHY).set(if healthy { 1.0 } else { 0.0 });
    if !healthy {
        set_health(&health, ServingStatus::NotServing).await;
        failed.notify_one();
    }
    while store_healthy.changed().await.is_ok() {
        if !*store_healthy.borrow() {
            metrics::gauge!(telemetry::STORE_HEALTHY).set(0.0);
            set_health(&health, ServingStatus::NotServing).await;
            failed.notify_one();
        }
    }
}

/// Runs an engine `step` every `period_ms`, the first one period after start, like
/// every later one. A failed store is already reported through health; any other error
/// is logged, and the next tick retries.
async fn every_period<T, F>(period_ms: u64, what: &'static str, mut step: impl FnMut() -> F)
where
    F: std::future::Future<Output = Result<T, ServiceError>>,
{
    let period = Duration::from_millis(period_ms);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match step().await {
            Ok(_) | Err(ServiceError::Store(StoreError::Failed)) => {}
            Err(error) => tracing::warn!(%error, "{what} failed; retrying next tick"),
        }
    }
}

/// Expires holds whose time is up: one bounded batch (one group commit) per tick.
async fn sweep_holds(engine: Arc<Engine>) {
    let period_ms = engine.limits().hold_sweep_interval_ms;
    every_period(period_ms, "expiring holds", || sweep_holds_once(&engine)).await
}

/// One step of the hold sweeper: expires the holds due at the engine clock's `now`,
/// counts them, and returns how many; bookings checked in early whose slot has ended
/// leave their citizens' limits. Tests on a manual clock call it directly.
pub async fn sweep_holds_once(engine: &Engine) -> Result<usize, ServiceError> {
    let now_unix_ms = engine.clock().now_unix_ms();
    engine.release_ended_attendances(now_unix_ms);
    let expired = engine.expire_holds(now_unix_ms).await?;
    if expired > 0 {
        metrics::counter!(telemetry::HOLDS_EXPIRED).increment(expired as u64);
        tracing::debug!(expired, "holds expired");
    }
    Ok(expired)
}

/// Sends slot changes to availability watchers every `watch_coalesce_ms`.
async fn fan_out_availability(engine: Arc<Engine>) {
    let mut tick = tokio::time::interval(Duration::from_millis(engine.limits().watch_coalesce_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        engine.fan_out_availability();
    }
}

/// Draws, admits and sells out queued releases every `release_step_interval_ms`.
async fn advance_releases(engine: Arc<Engine>) {
    let period_ms = engine.limits().release_step_interval_ms;
    every_period(period_ms, "release admissions", || {
        advance_releases_once(&engine)
    })
    .await
}

/// One admission step at the engine clock's `now`. Tests on a manual clock call it.
pub async fn advance_releases_once(engine: &Engine) -> Result<usize, ServiceError> {
    let admitted = engine
        .advance_releases(engine.clock().now_unix_ms())
        .await?;
    if admitted > 0 {
        metrics::counter!(telemetry::QUEUE_ADMISSIONS).increment(admitted as u64);
    }
    Ok(admitted)
}

/// Offers free places to campaigns' waiting registrations every
/// `campaign_step_interval_ms`.
async fn match_campaigns(engine: Arc<Engine>) {
    let period_ms = engine.limits().campaign_step_interval_ms;
    every_period(period_ms, "campaign matching", || {
        match_campaigns_once(&engine)
    })
    .await
}

/// One matching step at the engine clock's `now`. Tests on a manual clock call it.
pub async fn match_campaigns_once(engine: &Engine) -> Result<usize, ServiceError> {
    engine.match_campaigns(engine.clock().now_unix_ms()).await
}

/// Runs a retention pass every `retention_interval_ms`, the first one period after start.
async fn retain_records(engine: Arc<Engine>) {
    let period_ms = engine.limits().retention_interval_ms;
    every_period(period_ms, "retention", || retain_once(&engine)).await
}

/// One retention pass at the engine clock's `now`, logged when it deleted anything.
/// Tests on a manual clock call it directly.
pub async fn retain_once(engine: &Engine) -> Result<crate::service::Retained, ServiceError> {
    let started = std::time::Instant::now();
    let retained = engine.retain().await?;
    if !retained.is_empty() {
        tracing::info!(
            request_records = retained.request_records,
            holds = retained.holds,
            bookings = retained.bookings,
            slots = retained.slots,
            audit_entries = retained.audit_entries,
            authority_requests = retained.authority_requests,
            events = retained.events,
            releases = retained.releases,
            tickets = retained.tickets,
            campaigns = retained.campaigns,
            registrations = retained.registrations,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "retention forgot old records"
        );
    }
    Ok(retained)
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
            Ok(tracked) => {
                metrics::gauge!(telemetry::RATE_LIMITER_KEYS, "limiter" => "citizen")
                    .set(tracked as f64);
                tracing::debug!(tracked, "citizen rate limiter retained")
            }
            Err(error) => tracing::warn!(%error, "retaining the citizen rate limiter failed"),
        }
    }
}

/// Refreshes the gauges that are read from memory rather than counted as they happen:
/// per-site slots, capacity, bookings and holds, live holds and the store's size.
async fn refresh_gauges(engine: Arc<Engine>) {
    let mut tick = tokio::time::interval(Duration::from_millis(
        engine.limits().metrics_refresh_interval_ms,
    ));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut warned = false;
    loop {
        tick.tick().await;
        let engine = Arc::clone(&engine);
        let refreshed = tokio::task::spawn_blocking(move || {
            let limit = engine.limits().metrics_site_gauges_max;
            let (sites, totals) = engine.site_totals(limit);
            metrics::gauge!(telemetry::SITES).set(sites as f64);
            telemetry::set_site_gauges(&totals);
            metrics::gauge!(telemetry::HOLDS_LIVE).set(engine.live_hold_count() as f64);
            metrics_process::Collector::default().collect();
            metrics::gauge!(telemetry::REQUEST_RECORDS).set(engine.request_record_count() as f64);
            if let Ok(bytes) = engine.store_disk_bytes() {
                metrics::gauge!(telemetry::STORE_DISK_BYTES).set(bytes as f64);
            }
            sites > limit
        })
        .await;
        match refreshed {
            Ok(true) if !warned => {
                warned = true;
                tracing::warn!(
                    "more sites than limits.metrics_site_gauges_max: only the first have \
                     per-site gauges (prenota_sites counts them all)"
                );
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "refreshing the gauges failed"),
        }
    }
}

/// Waits (bounded) until detached request tasks release the engine, then stops the
/// committer after it has made every queued write durable. An error if the store had
/// failed.
async fn close(mut engine: Arc<Engine>) -> Result<(), StoreError> {
    let deadline = tokio::time::Instant::now() + ENGINE_RELEASE_WAIT;
    loop {
        match Arc::try_unwrap(engine) {
            Ok(mut owned) => {
                let closed = tokio::task::block_in_place(|| owned.shutdown());
                match &closed {
                    Ok(()) => tracing::info!("store closed cleanly"),
                    Err(error) => tracing::error!(%error, "store closed after it failed"),
                }
                return closed;
            }
            Err(shared) if tokio::time::Instant::now() < deadline => {
                engine = shared;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(shared) => {
                tracing::warn!(
                    "requests still hold the engine after shutdown; leaving the store to the OS"
                );
                let healthy = *shared.store_health().borrow();
                return match healthy {
                    true => Ok(()),
                    false => Err(StoreError::Failed),
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_servers_runtime_is_built_without_its_lifo_slot_and_names_its_threads() {
        #[allow(clippy::assertions_on_constants)] // Fixed by the build's flags: checked here.
        {
            assert!(
                cfg!(tokio_unstable),
                "built without --cfg tokio_unstable (.cargo/config.toml, or RUSTFLAGS replacing \
                 it): the server's runtime would keep its LIFO slot"
            );
        }
        let runtime = super::runtime("prenota-test").unwrap();
        let name = runtime.block_on(async {
            let named = tokio::spawn(async { std::thread::current().name().map(String::from) });
            named.await.unwrap()
        });
        assert_eq!(name.as_deref(), Some("prenota-test"));
    }
}

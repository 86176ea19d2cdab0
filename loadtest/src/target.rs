//! The server under load: one already running (`--server`, loopback only), or one this
//! process starts on a temp dir (`--spawn`) with its own runtime and threads.

use std::sync::{Arc, Weak};
use std::thread::JoinHandle;

use prenota::config::Config;
use prenota::server::{ServeOptions, Server};
use prenota::service::{Clock, Engine};
use tokio::sync::oneshot;

pub struct Target {
    pub url: String,
    spawned: Option<Spawned>,
}

/// Renders a spawned server's Prometheus metrics.
type RenderMetrics = Box<dyn Fn() -> String + Send>;

struct Spawned {
    stop: oneshot::Sender<()>,
    thread: JoinHandle<()>,
    data_dir: DataDir,
    /// From the start to listening: the recovery of a given data dir, mostly.
    opened_in_seconds: f64,
    /// The spawned server records metrics like `prenota serve` does (so their cost is
    /// in the measurement); read at the end of a run.
    metrics: RenderMetrics,
    /// Its engine, for scenarios that read its state (the churn soak).
    engine: Weak<Engine>,
}

/// A spawned server's data dir: a temporary one (deleted when dropped, after the
/// server stopped), or one given with `--data-dir` (kept).
pub enum DataDir {
    Temporary(tempfile::TempDir),
    Given(std::path::PathBuf),
}

impl DataDir {
    pub fn path(&self) -> &std::path::Path {
        match self {
            Self::Temporary(dir) => dir.path(),
            Self::Given(path) => path,
        }
    }
}

/// What the server thread hands back once it listens.
type Started = (String, RenderMetrics, Weak<Engine>);

impl Target {
    pub fn connect(url: &str) -> Result<Self, String> {
        let host = url
            .trim_start_matches("http://")
            .rsplit_once(':')
            .map(|(host, _)| host)
            .unwrap_or_default();
        if !matches!(host, "127.0.0.1" | "localhost" | "[::1]") {
            return Err(format!(
                "refusing to load {url}: only loopback servers are targets"
            ));
        }
        Ok(Self {
            url: url.to_string(),
            spawned: None,
        })
    }

    /// Starts a prenota server on 127.0.0.1:0 on `data_dir` (a fresh temp dir when
    /// `None`), its engine reading `clock`.
    pub fn spawn(
        config: Config,
        clock: Clock,
        data_dir: Option<std::path::PathBuf>,
    ) -> Result<Self, String> {
        let data_dir = match data_dir {
            Some(path) => DataDir::Given(path),
            None => DataDir::Temporary(tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?),
        };
        let path = data_dir.path().to_path_buf();
        let started = std::time::Instant::now();
        let (ready, address) = std::sync::mpsc::channel::<Result<Started, String>>();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("prenota-server".into())
            .spawn(move || {
                // Named, so the load generator can tell the server's CPU from its own.
                let runtime = match prenota::server::runtime("prenota-server") {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = ready.send(Err(format!("server runtime: {e}")));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let metrics = match prenota::telemetry::record_only() {
                        Ok(handle) => handle,
                        Err(e) => return drop(ready.send(Err(e))),
                    };
                    let opened = Server::open(ServeOptions {
                        data_dir: path,
                        config,
                        demo: false,
                        clock,
                    })
                    .await;
                    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await;
                    let (server, listener) = match (opened, listener) {
                        (Ok(server), Ok(listener)) => (server, listener),
                        (Err(e), _) => return drop(ready.send(Err(format!("server: {e}")))),
                        (_, Err(e)) => return drop(ready.send(Err(format!("bind: {e}")))),
                    };
                    let engine = Arc::downgrade(server.engine());
                    let url = listener
                        .local_addr()
                        .map(|a| {
                            let render: RenderMetrics = Box::new(move || metrics.render());
                            (format!("http://{a}"), render, engine)
                        })
                        .map_err(|e| e.to_string());
                    let _ = ready.send(url);
                    if let Err(e) = server.serve(listener, async { drop(stopped.await) }).await {
                        eprintln!("prenota-loadtest: the spawned server failed: {e}");
                    }
                });
            })
            .map_err(|e| format!("server thread: {e}"))?;
        let (url, metrics, engine) = address
            .recv()
            .map_err(|_| "the server thread died".to_string())??;
        Ok(Self {
            url,
            spawned: Some(Spawned {
                stop,
                thread,
                data_dir,
                opened_in_seconds: started.elapsed().as_secs_f64(),
                metrics,
                engine,
            }),
        })
    }

    /// A spawned server's data dir.
    pub fn data_dir(&self) -> Option<&std::path::Path> {
        self.spawned.as_ref().map(|spawned| spawned.data_dir.path())
    }

    /// How long a spawned server took to open (0 for one reached at `--server`).
    pub fn opened_in_seconds(&self) -> f64 {
        self.spawned
            .as_ref()
            .map_or(0.0, |spawned| spawned.opened_in_seconds)
    }

    /// A spawned server's engine while it runs.
    pub fn engine(&self) -> Option<Arc<Engine>> {
        self.spawned
            .as_ref()
            .and_then(|spawned| spawned.engine.upgrade())
    }

    /// The spawned server's metrics in the Prometheus text format.
    pub fn server_metrics(&self) -> Option<String> {
        self.spawned.as_ref().map(|spawned| (spawned.metrics)())
    }

    /// Stops a spawned server gracefully (its final flush included).
    pub fn stop(self) {
        drop(self.stop_keeping_data());
    }

    /// Stops a spawned server and hands its data dir over (a temporary one is deleted
    /// when dropped).
    pub fn stop_keeping_data(mut self) -> Option<DataDir> {
        let spawned = self.spawned.take()?;
        let _ = spawned.stop.send(());
        let _ = spawned.thread.join();
        Some(spawned.data_dir)
    }
}

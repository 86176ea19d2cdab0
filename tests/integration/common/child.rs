//! A real `prenota serve` child process on 127.0.0.1:0, for tests that need the
//! binary itself: SIGKILL, metrics, logs, start-up.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

pub struct ChildServer {
    child: Child,
    stdout: BufReader<ChildStdout>,
    /// `http://127.0.0.1:PORT` of the gRPC listener.
    pub url: String,
    /// `http://127.0.0.1:PORT/metrics`.
    pub metrics_url: String,
}

/// How to start the child.
#[derive(Default)]
pub struct ChildOptions {
    /// After `serve --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --data-dir DIR`.
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Where stderr (the logs) goes; inherited when `None`.
    pub stderr: Option<File>,
    /// `RUST_LOG`; `error` when `None`.
    pub rust_log: Option<String>,
}

impl ChildServer {
    /// Starts and waits until it serves.
    pub fn start(data_dir: &Path) -> Self {
        let mut server = Self::start_recovering(data_dir, ChildOptions::default());
        server.wait_serving();
        server
    }

    /// Starts with `PRENOTA_LIMITS_<NAME>=<value>` for each `(NAME, value)`, and waits
    /// until it serves.
    pub fn with_limits(data_dir: &Path, limits: &[(&str, &str)]) -> Self {
        let env = limits
            .iter()
            .map(|(name, value)| (format!("PRENOTA_LIMITS_{name}"), value.to_string()))
            .collect();
        Self::with_env(data_dir, env)
    }

    /// Starts with these environment variables (a shim, limits), and waits until it
    /// serves.
    pub fn with_env(data_dir: &Path, env: Vec<(String, String)>) -> Self {
        let options = ChildOptions {
            env,
            ..ChildOptions::default()
        };
        let mut server = Self::start_recovering(data_dir, options);
        server.wait_serving();
        server
    }

    /// Starts and returns as soon as it answers (health NOT_SERVING while it recovers).
    pub fn start_recovering(data_dir: &Path, options: ChildOptions) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_prenota"));
        command
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
                "--data-dir",
            ])
            .arg(data_dir)
            .args(&options.args)
            .env("RUST_LOG", options.rust_log.as_deref().unwrap_or("error"))
            .envs(options.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped());
        match options.stderr {
            Some(file) => command.stderr(Stdio::from(file)),
            None => command.stderr(Stdio::inherit()),
        };
        let mut child = command.spawn().expect("spawn prenota serve");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut server = Self {
            child,
            stdout,
            url: String::new(),
            metrics_url: String::new(),
        };
        server.metrics_url = server
            .read_line("prenota metrics on ")
            .expect("the metrics line");
        let address = server
            .read_line("prenota recovering on ")
            .expect("the recovering line");
        server.url = format!("http://{address}");
        server
    }

    /// Waits for the line that says recovery is done and everything is served.
    pub fn wait_serving(&mut self) {
        self.read_line("prenota listening on ")
            .expect("the listening line");
    }

    /// Waits for its exit (already signalled).
    pub fn child_wait(&mut self) -> std::process::ExitStatus {
        self.child.wait().expect("wait")
    }

    /// After it exited: whether the rest of its stdout says it served.
    pub fn said_listening(&mut self) -> bool {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut self.stdout, &mut rest);
        rest.lines()
            .any(|line| line.starts_with("prenota listening on "))
    }

    /// The rest of the next stdout line, which must start with `prefix`; `None` at EOF.
    fn read_line(&mut self, prefix: &str) -> Option<String> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line).expect("read stdout") == 0 {
            return None;
        }
        let rest = line
            .trim()
            .strip_prefix(prefix)
            .unwrap_or_else(|| panic!("expected {prefix:?}..., got {line:?}"));
        Some(rest.to_string())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory now, from /proc.
    pub fn rss_bytes(&self) -> u64 {
        self.proc_status("VmRSS:") * 1024 // kB
    }

    /// Threads of the process now, from /proc.
    pub fn threads(&self) -> u64 {
        self.proc_status("Threads:")
    }

    /// Whether the kernel may give the process transparent huge pages (1) or not (0),
    /// from /proc.
    pub fn thp_enabled(&self) -> u64 {
        self.proc_status("THP_enabled:")
    }

    /// The number on the `field` line of /proc/PID/status.
    fn proc_status(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("/proc/PID/status");
        let line = status
            .lines()
            .find(|line| line.starts_with(field))
            .unwrap_or_else(|| panic!("a {field} line"));
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// Waits up to `within` for the process to exit by itself; its exit status.
    pub fn wait_exit(mut self, within: std::time::Duration) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "still running after {within:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// SIGKILL.
    pub fn kill_9(self) {
        // Drop does the killing, so a failing assertion never leaks a server either.
        drop(self);
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn terminate(self) {
        let exit = self.stop();
        assert!(exit.success(), "prenota exited with {exit}");
    }

    /// SIGTERM, then waits for the exit; its status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let status = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill -TERM");
        assert!(status.success());
        self.child.wait().expect("wait")
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.child.kill(); // SIGKILL on Unix
        let _ = self.child.wait();
    }
}

/// `prenota serve` on `data_dir` (with `--config config`, if given) until it exits by
/// itself: its exit success and its stderr. Killed, and the test failed, if it still
/// runs after `within` (a start that should have been refused stood by or served).
pub fn serve_until_exit(
    data_dir: &Path,
    config: Option<&Path>,
    within: std::time::Duration,
) -> (bool, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_prenota"));
    command.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "off",
    ]);
    if let Some(config) = config {
        command.arg("--config").arg(config);
    }
    let mut child = command
        .arg("--data-dir")
        .arg(data_dir)
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + within;
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "prenota kept running on {} after {within:?}",
                data_dir.display()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let output = child.wait_with_output().unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `GET path` over plain HTTP/1.1 on loopback; the response body.
pub fn http_get(url: &str) -> String {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").expect("an http:// url");
    let (host, path) = rest.split_once('/').expect("a path");
    let mut stream = std::net::TcpStream::connect(host).expect("connect");
    write!(
        stream,
        "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}

/// Builds the LD_PRELOAD shim `tests/shim/<name>.c` into `dir` with the system C
/// compiler (`cc`) and returns the library's path.
pub fn build_shim(dir: &Path, name: &str) -> std::path::PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/shim")
        .join(format!("{name}.c"));
    let library = dir.join(format!("{name}.so"));
    let status = Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&library)
        .arg(&source)
        .args(["-ldl", "-lpthread"])
        .status()
        .expect("a C compiler (cc) builds the shim");
    assert!(status.success(), "cc failed on {}", source.display());
    library
}

/// The fdatasync gate shim (`tests/shim/fdatasync_gate.c`), built in `dir`, and the
/// folder whose files control it.
pub fn fdatasync_gate(dir: &Path) -> (PathBuf, PathBuf) {
    let library = build_shim(dir, "fdatasync_gate");
    let control = dir.join("control");
    std::fs::create_dir_all(&control).unwrap();
    (library, control)
}

/// A child server whose fdatasync is controlled through files in `control`.
pub fn start_with_shim(data_dir: &Path, library: &Path, control: &Path) -> ChildServer {
    start_with_shim_and(data_dir, library, control, Vec::new())
}

/// `start_with_shim`, with more environment variables (e.g. limits).
pub fn start_with_shim_and(
    data_dir: &Path,
    library: &Path,
    control: &Path,
    mut env: Vec<(String, String)>,
) -> ChildServer {
    env.push(("LD_PRELOAD".into(), library.display().to_string()));
    env.push((
        "PRENOTA_FSYNC_SHIM_DIR".into(),
        control.display().to_string(),
    ));
    ChildServer::with_env(data_dir, env)
}

/// Waits (bounded) until a commit is inside the held fdatasync.
pub async fn wait_for_held_fdatasync(control: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !control.join("waiting").exists() {
        assert!(
            Instant::now() < deadline,
            "the commit never reached fdatasync"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

//! TLS on a real server: reachable only with TLS, and with a client CA only with a
//! client certificate (mTLS).

use crate::common;

use std::time::Duration;

use common::child::{http_get, ChildOptions, ChildServer};
use common::*;
use prenota::config::{Config, TlsPem};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

struct Pki {
    ca_pem: String,
    server: (String, String),
    client: (String, String),
}

fn pki() -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf = |names: Vec<String>| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    Pki {
        ca_pem: ca.as_ref().pem(),
        server: leaf(vec!["localhost".into(), "127.0.0.1".into()]),
        client: leaf(vec!["frontend.example".into()]),
    }
}

async fn tls_channel(server: &TestServer, pki: &Pki, client_cert: bool) -> Result<Channel, String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca_pem))
        .domain_name("localhost");
    if client_cert {
        tls = tls.identity(Identity::from_pem(&pki.client.0, &pki.client.1));
    }
    Channel::from_shared(format!("https://{}", server.address))
        .unwrap()
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))
}

async fn healthy(channel: Channel) -> Result<(), tonic::Status> {
    HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .map(|_| ())
}

fn config(pki: &Pki, mutual: bool) -> Config {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let (cert, key) = (
        write("cert.pem", &pki.server.0),
        write("key.pem", &pki.server.1),
    );
    let ca = write("ca.pem", &pki.ca_pem);
    Config {
        tls: TlsPem::read(Some(&cert), Some(&key), mutual.then_some(ca.as_path())).unwrap(),
        ..Config::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_server_answers_only_over_tls() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), config(&pki, false)).await;
    let channel = tls_channel(&server, &pki, false)
        .await
        .expect("a TLS connection");
    healthy(channel.clone()).await.expect("health over TLS");
    upsert_site(
        &mut prenota::proto::capacity_service_client::CapacityServiceClient::new(channel),
        "tls-site",
        "r",
        "Etc/UTC",
    )
    .await;
    // The CLI speaks TLS too, given the CA.
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let url = format!("https://{}", server.address);
    let audit = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_prenota"))
            .args(["audit", "--server", &url, "--ca"])
            .arg(&ca)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&audit.stdout);
    assert!(
        audit.status.success(),
        "{}",
        String::from_utf8_lossy(&audit.stderr)
    );
    assert!(stdout.contains("UpsertSite"), "{stdout}");
    let plaintext = async {
        let channel = Channel::from_shared(server.url())
            .unwrap()
            .connect()
            .await
            .ok()?;
        healthy(channel).await.ok()
    };
    assert!(
        tokio::time::timeout(Duration::from_secs(5), plaintext)
            .await
            .ok()
            .flatten()
            .is_none(),
        "plaintext gRPC must not be answered"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_client_ca_only_clients_with_a_certificate_get_in() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), config(&pki, true)).await;
    let with_cert = tls_channel(&server, &pki, true)
        .await
        .expect("mTLS connection");
    healthy(with_cert)
        .await
        .expect("health with a client certificate");
    let without = async {
        let channel = tls_channel(&server, &pki, false).await.ok()?;
        healthy(channel).await.ok()
    };
    assert!(
        tokio::time::timeout(Duration::from_secs(5), without)
            .await
            .ok()
            .flatten()
            .is_none(),
        "a client without a certificate must not be answered"
    );
    // The CLI presents one with --cert and --key.
    let files = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = files.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let ca = write("ca.pem", &pki.ca_pem);
    let (cert, key) = (write("c.pem", &pki.client.0), write("c.key", &pki.client.1));
    let url = format!("https://localhost:{}", server.address.port());
    let export = |identity: Vec<String>| {
        let mut args = vec!["export".to_string(), "--server".into(), url.clone()];
        args.extend(["--ca".to_string(), ca.clone()]);
        args.extend(identity);
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_prenota"))
                .args(args)
                .output()
                .unwrap()
        })
    };
    let with = export(vec!["--cert".into(), cert, "--key".into(), key]);
    let with = with.await.unwrap();
    let stdout = String::from_utf8_lossy(&with.stdout);
    assert!(
        with.status.success(),
        "{:?}",
        String::from_utf8_lossy(&with.stderr)
    );
    assert!(stdout.starts_with("booking_id,"), "{stdout}");
    assert!(!export(Vec::new()).await.unwrap().status.success());
    server.stop().await;
}

/// A socket that connects and never starts its TLS handshake is closed after
/// `tls_handshake_timeout_ms`, and TLS clients still get in meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_socket_is_closed_at_the_handshake_timeout() {
    use tokio::io::AsyncReadExt;
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(&pki, false);
    config.limits.tls_handshake_timeout_ms = 500;
    let server = TestServer::start_with(dir.path(), config).await;
    let mut silent = tokio::net::TcpStream::connect(server.address)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let channel = tls_channel(&server, &pki, false).await.expect("TLS");
    healthy(channel).await.expect("health over TLS");
    let mut buffer = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buffer))
        .await
        .expect("closed within 10 s");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(started.elapsed() >= Duration::from_millis(400));
    server.stop().await;
}

/// A listed load balancer's PROXY protocol header comes before the TLS handshake: the
/// connection is served over TLS and counts for the client the header names, so that
/// client's second connection is refused (`connections_per_peer_max` 1) and another
/// client's is served; the balancer's own (`PROXY UNKNOWN`) counts for it, and its TLS
/// connection without a header is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_balancers_header_comes_before_the_tls_handshake() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(&pki, false);
    config.proxy_protocol_from = vec!["127.0.0.1/32".parse().unwrap()];
    config.limits.connections_per_peer_max = 1;
    let server = TestServer::start_with(dir.path(), config).await;
    let for_client = |client: &str| format!("PROXY TCP4 {client} 127.0.0.1 50000 443\r\n");
    let first = proxied_tls_channel(&server, &pki, &for_client("192.0.2.7")).await;
    let through = healthy(first.clone()).await;
    through.expect("health over TLS, through the balancer");
    let second = proxied_tls_channel(&server, &pki, &for_client("192.0.2.7")).await;
    let refused = healthy(second).await.is_err();
    assert!(refused, "the client's second connection");
    let other = proxied_tls_channel(&server, &pki, &for_client("192.0.2.8")).await;
    healthy(other).await.expect("another client's connection");
    let bare = proxied_tls_channel(&server, &pki, "").await;
    assert!(
        healthy(bare).await.is_err(),
        "no header from a listed balancer"
    );
    let own = proxied_tls_channel(&server, &pki, "PROXY UNKNOWN\r\n").await;
    let answered = healthy(own.clone()).await;
    answered.expect("the balancer's own connection");
    let second_own = proxied_tls_channel(&server, &pki, "PROXY UNKNOWN\r\n").await;
    let refused = healthy(second_own).await.is_err();
    assert!(refused, "the balancer's second connection of its own");
    drop(own); // held until here: its place is the balancer's one
    let still = healthy(first).await;
    still.expect("the first connection still served");
    server.stop().await;
}

/// A TLS channel to `server` whose connection first sends `header` (nothing if empty);
/// connected lazily, so its first call fails if refused.
async fn proxied_tls_channel(server: &TestServer, pki: &Pki, header: &str) -> Channel {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca_pem))
        .domain_name("localhost");
    let address = server.address;
    let header = header.to_string();
    let connector = tower::service_fn(move |_: tonic::transport::Uri| {
        let header = header.clone();
        async move {
            let mut socket = tokio::net::TcpStream::connect(address).await?;
            tokio::io::AsyncWriteExt::write_all(&mut socket, header.as_bytes()).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(socket))
        }
    });
    Channel::from_shared(format!("https://{address}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(15))
        .timeout(Duration::from_secs(15))
        .connect_with_connector_lazy(connector)
}

/// `command`'s output once it exited; killed, and the test failed, if it runs on.
fn exited_within(mut command: std::process::Command, within: Duration) -> std::process::Output {
    use std::process::Stdio;
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > within {
            child.kill().ok();
            panic!("still running after {within:?}: it started with unusable TLS files");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// TLS files the TLS stack cannot use are refused by `config check` and by `serve`
/// alike, naming the file and why (serve said "gRPC transport: transport error", or
/// failed only at the first handshake): no certificate, a certificate for a key, the
/// key of another certificate, a client CA that is not a certificate.
#[test]
fn unusable_tls_files_are_refused_by_config_check_and_serve_naming_them() {
    let (pki, other) = (pki(), pki());
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let cert = write("cert.pem", &pki.server.0);
    let key = write("key.pem", &pki.server.1);
    let not_der = "-----BEGIN CERTIFICATE-----\nAAECAwQFBgc=\n-----END CERTIFICATE-----\n";
    let cases = [
        (
            write("key-as-cert.pem", &pki.server.1),
            key.clone(),
            None,
            "no PEM certificate",
        ),
        (
            cert.clone(),
            write("cert-as-key.pem", &pki.server.0),
            None,
            "not a PEM private key",
        ),
        (
            cert.clone(),
            write("other-key.pem", &other.server.1),
            None,
            "and tls_key",
        ),
        (
            cert.clone(),
            key.clone(),
            Some(write("ca-not-der.pem", not_der)),
            "certificate 1",
        ),
    ];
    for (number, (cert, key, client_ca, why)) in cases.into_iter().enumerate() {
        let client_ca = client_ca.map(|ca| format!("tls_client_ca = {ca:?}\n"));
        let text = format!(
            "[server]\ntls_cert = {cert:?}\ntls_key = {key:?}\n{}",
            client_ca.unwrap_or_default()
        );
        let file = dir.path().join(format!("case-{number}.toml"));
        std::fs::write(&file, text).unwrap();
        let (_, stderr) = config_check(&file, false);
        assert!(stderr.contains(why), "case {number}: {stderr}");
        let mut serve = std::process::Command::new(env!("CARGO_BIN_EXE_prenota"));
        serve
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "off",
            ])
            .arg("--config")
            .arg(&file)
            .arg("--data-dir")
            .arg(dir.path().join("data"));
        let served = exited_within(serve, Duration::from_secs(30));
        let said = String::from_utf8_lossy(&served.stderr);
        assert!(!served.status.success(), "case {number}: {said}");
        assert!(said.contains(why), "case {number}: {said}");
        assert!(!said.contains("transport error"), "case {number}: {said}");
    }
}

/// A certificate that parses but has ended: every client refuses the handshake, and
/// nothing said so until the first one failed. `config check` and `serve` warn, naming
/// the file and when it ended (or ends, within 14 days), and `serve` exports the end as
/// a gauge for alerts.
#[test]
fn a_certificate_past_or_near_its_end_is_warned_of_and_its_end_exported() {
    use chrono::Datelike;
    let dir = tempfile::tempdir().unwrap();
    let soon = chrono::Utc::now().date_naive() + chrono::Days::new(3);
    let ends = [
        ("ended", rcgen::date_time_ymd(2021, 1, 1)),
        (
            "soon",
            rcgen::date_time_ymd(soon.year(), soon.month() as u8, soon.day() as u8),
        ),
    ];
    let mut files = Vec::new();
    for (name, not_after) in ends {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        (params.not_before, params.not_after) = (rcgen::date_time_ymd(2020, 1, 1), not_after);
        let cert = params.self_signed(&key).unwrap();
        let (cert_path, key_path) = (
            dir.path().join(name),
            dir.path().join(format!("{name}.key")),
        );
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        let file = dir.path().join(format!("{name}.toml"));
        let text = format!("[server]\ntls_cert = {cert_path:?}\ntls_key = {key_path:?}\n");
        std::fs::write(&file, text).unwrap();
        files.push(file);
    }
    let (_, said) = config_check(&files[0], true);
    assert!(
        said.contains("certificate 1 (CN=rcgen self signed cert) expired at 2021-01-01T00:00:00Z"),
        "{said}"
    );
    let (_, said) = config_check(&files[1], true);
    assert!(
        said.contains("expires at") && said.contains("days: renew it"),
        "{said}"
    );
    let log_path = dir.path().join("stderr.log");
    let options = ChildOptions {
        args: vec!["--config".into(), files[0].display().to_string()],
        stderr: Some(std::fs::File::create(&log_path).unwrap()),
        rust_log: Some("warn".into()),
        ..ChildOptions::default()
    };
    let mut server = ChildServer::start_recovering(&dir.path().join("data"), options);
    server.wait_serving();
    let metrics = http_get(&server.metrics_url);
    let gauge = "prenota_tls_certificate_expiry_timestamp_seconds 1609459200";
    assert!(metrics.contains(gauge), "{metrics}");
    let logged = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        logged.contains("expired at 2021-01-01T00:00:00Z"),
        "{logged}"
    );
}

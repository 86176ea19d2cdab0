//! The `prenota` binary: parses flags and dispatches: `serve` to [`prenota::server`],
//! the other commands to `cli`, `cli_call` and `dev_assertion`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use prenota::cli::{print_needed, print_out, Target};
use prenota::config::{
    check_listen, check_plaintext_tokens, token_sha256, ConfigFile, ServerSection, TlsPem,
};
use prenota::server::ServeOptions;
use prenota::telemetry::LogFormat;

#[derive(Parser)]
#[command(
    name = "prenota",
    version,
    about = "High-volume appointment booking for public services"
)]
struct Cli {
    /// Log lines on stderr as text or one JSON object per line; RUST_LOG filters them.
    #[arg(
        long,
        global = true,
        value_enum,
        env = "PRENOTA_LOG_FORMAT",
        default_value_t
    )]
    log_format: LogFormat,
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
    /// Write the audit log (every capacity change: who, what, when) as CSV to stdout.
    Audit(ServerArgs),
    /// Write public availability (per site, service and local day; never a person) as
    /// CSV or JSON Lines to stdout.
    OpenData(OpenDataArgs),
    /// Write a consistent backup file: of a running server (--server, admin token), or
    /// of a stopped server's data dir (--data-dir).
    Backup(BackupArgs),
    /// Restore a backup file into a new data dir, checking every invariant first.
    Restore(RestoreArgs),
    /// Copy a stopped server's data dir into an empty PostgreSQL store (checked first,
    /// then one transaction), for `[store] backend = "postgres"`.
    Migrate(MigrateArgs),
    /// Check a configuration file, or hash a token for it.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Print a new backup key (64 hex digits): keep it apart from the backups, in a
    /// file only its owner reads (`prenota backup-key > backup.key; chmod 600 ...`).
    BackupKey,
    /// Print a citizen assertion (a compact JWS) signed with a private key, as an
    /// identity gateway would: for trying asserted citizens, never for production.
    DevAssertion(DevAssertionArgs),
    /// Call any RPC with a JSON request and print the answers as JSON, like grpcurl,
    /// from the protos built into this binary (`prenota call list` names the services).
    Call(CallArgs),
}

#[derive(clap::Args)]
struct MigrateArgs {
    /// The data dir of a stopped server (sled).
    #[arg(long = "from-sled")]
    from_sled: PathBuf,
    /// The PostgreSQL URL (`postgres://user@host/db`; `options=-csearch_path%3DNAME`
    /// for a schema); `PRENOTA_POSTGRES_URL` keeps a password off the command line.
    #[arg(long, env = "PRENOTA_POSTGRES_URL", hide_env_values = true)]
    to: String,
    /// The server's configuration: its `[citizens] hash_key_file`, if it had one (else
    /// the data dir's key file is used) and limits.
    #[arg(long, env = "PRENOTA_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(clap::Args)]
struct CallArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// The request as JSON (default `{}`); `@` reads it from stdin.
    #[arg(short = 'd', long = "data", default_value = "{}")]
    data: String,
    /// A metadata header `name: value` to send (repeatable), e.g. an
    /// `x-citizen-assertion`.
    #[arg(short = 'H', long = "header")]
    headers: Vec<String>,
    /// `package.Service/Method`, e.g. `prenota.v1.BookingService/SearchSlots`; or `list`.
    method: String,
}

#[derive(clap::Args)]
struct DevAssertionArgs {
    /// PKCS#8 PEM private key: Ed25519 (signs EdDSA) or P-256 (signs ES256).
    #[arg(long)]
    key: PathBuf,
    /// The citizen id asserted (`sub`).
    #[arg(long)]
    sub: String,
    /// The issuer's `name` in `[[citizen_issuers]]` (`iss`).
    #[arg(long)]
    iss: String,
    /// The issuer's `audience` (`aud`).
    #[arg(long)]
    aud: String,
    #[arg(long, default_value_t = 600)]
    ttl_seconds: u32,
    #[arg(long)]
    birth_year: Option<i32>,
    /// A priority group; repeat for several.
    #[arg(long = "group")]
    groups: Vec<String>,
    /// A citizen the subject books for too (`dependants`, for BookGroup); repeat.
    #[arg(long = "dependant")]
    dependants: Vec<String>,
}

/// How a client command reaches a running server.
#[derive(clap::Args)]
struct ServerArgs {
    /// The server's gRPC URL.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    server: String,
    /// Bearer token sent as the `authorization` header (audit needs an admin token).
    /// Prefer --token-file or PRENOTA_TOKEN: a command line is visible to every user
    /// of the machine (ps).
    #[arg(long, env = "PRENOTA_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A file holding the bearer token (its first line); wins over PRENOTA_TOKEN (and
    /// --token).
    #[arg(long, value_parser = read_token_file)]
    token_file: Option<String>,
    /// For https:// servers: the PEM CA certificate that signed the server's certificate.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// For servers that require client certificates (`tls_client_ca`): this client's
    /// PEM certificate (with --key and --ca).
    #[arg(long, requires_all = ["key", "ca"])]
    cert: Option<PathBuf>,
    /// The PEM private key of --cert.
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
}

impl ServerArgs {
    fn target(&self) -> Target<'_> {
        Target {
            server: &self.server,
            token: self.token_file.as_deref().or(self.token.as_deref()),
            ca: self.ca.as_deref(),
            identity: self.cert.as_deref().zip(self.key.as_deref()),
        }
    }
}

/// `--token-file`: the token on the file's first line.
fn read_token_file(path: &str) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    let token = text.lines().next().unwrap_or("").trim();
    if token.is_empty() {
        return Err(format!("{path} holds no token on its first line"));
    }
    Ok(token.to_string())
}

#[derive(clap::Args)]
struct ImportArgs {
    /// The capacity file; see README "For authorities" for its columns.
    file: PathBuf,
    #[command(flatten)]
    server: ServerArgs,
    /// Validate the whole file on the server and report what would change; apply nothing.
    #[arg(long)]
    dry_run: bool,
}

#[derive(clap::Args)]
struct ExportArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Only this site's bookings.
    #[arg(long, conflicts_with = "region")]
    site: Option<String>,
    /// Only the bookings of this region's sites.
    #[arg(long)]
    region: Option<String>,
}

#[derive(clap::Args)]
struct OpenDataArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Only this region's sites.
    #[arg(long)]
    region: Option<String>,
    /// Only this service.
    #[arg(long)]
    service: Option<String>,
    /// First local day, YYYY-MM-DD (default: today, UTC).
    #[arg(long)]
    first_day: Option<String>,
    /// Last local day, inclusive (default: 30 days after the first; at most 366 days).
    #[arg(long)]
    last_day: Option<String>,
    #[arg(long, value_enum, default_value = "csv")]
    format: prenota::cli::OpenDataFormat,
}

#[derive(clap::Args)]
struct BackupArgs {
    /// The backup file to create (never overwritten; written as FILE.partial first).
    #[arg(long)]
    to: PathBuf,
    /// Back up this data dir directly; the server using it must be stopped. Without
    /// it, the backup is taken through the running server given by --server.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The server's configuration, for --data-dir: its id scheme, `[citizens]
    /// hash_key_file` (else the data dir's key file is used) and limits. Not read with
    /// --server.
    #[arg(long, env = "PRENOTA_CONFIG")]
    config: Option<PathBuf>,
    /// The backup key file: seals and authenticates a --data-dir backup; with
    /// --server, checks the received file's MAC too.
    #[arg(
        long,
        visible_alias = "backup-key-file",
        env = "PRENOTA_BACKUP_KEY_FILE"
    )]
    backup_key: Option<PathBuf>,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(clap::Args)]
struct RestoreArgs {
    /// The backup file.
    #[arg(long)]
    from: PathBuf,
    /// The data dir to create; it must not exist or be empty.
    #[arg(long)]
    data_dir: PathBuf,
    /// The configuration the restored store will be served with: its id scheme,
    /// `[citizens] hash_key_file` and limits, checked on the restored store.
    #[arg(long, env = "PRENOTA_CONFIG")]
    config: Option<PathBuf>,
    /// The backup key file the backup was made with.
    #[arg(
        long,
        visible_alias = "backup-key-file",
        env = "PRENOTA_BACKUP_KEY_FILE"
    )]
    backup_key: Option<PathBuf>,
    /// Accept a backup made before backups were authenticated (format 1 or 2), which
    /// nothing proves unaltered: only for a file you trust.
    #[arg(long)]
    unauthenticated: bool,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// The configuration file (limits, tokens); see README "Configuration".
    #[arg(long, env = "PRENOTA_CONFIG")]
    config: Option<PathBuf>,
    /// Directory of the embedded store (created if missing). Default: prenota-data.
    #[arg(long, env = "PRENOTA_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Address to serve gRPC on. Without tokens only loopback addresses are allowed.
    /// Default: 127.0.0.1:50051.
    #[arg(long, env = "PRENOTA_LISTEN")]
    listen: Option<SocketAddr>,
    /// Address to serve Prometheus metrics on (GET /metrics), or `off`. Unauthenticated:
    /// keep it on loopback or a private network. Default: 127.0.0.1:9464.
    #[arg(long, env = "PRENOTA_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// Serve a non-loopback address without tokens. Never in production.
    #[arg(long)]
    insecure_no_auth: bool,
    /// Accept tokens without TLS on a non-loopback address: only when TLS ends in front
    /// of prenota on this host or a private link.
    #[arg(long)]
    insecure_plaintext_tokens: bool,
    /// PEM certificate chain: serve TLS only (with --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM CA certificates: require client certificates signed by them (mTLS).
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// The backup key file (`prenota backup-key`): without it the server makes no
    /// backups.
    #[arg(long, env = "PRENOTA_BACKUP_KEY_FILE")]
    backup_key_file: Option<PathBuf>,
    /// Seed demo sites (Rome, Amsterdam, New York) with two weeks of slots.
    #[arg(long)]
    demo: bool,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a configuration file and print the effective values.
    Check { file: PathBuf },
    /// Read a token from stdin and print the sha256 to put in prenota.toml.
    HashToken,
}

/// A `--data` value: the JSON itself, or `@` for stdin.
fn read_request(data: &str) -> Result<String, String> {
    if data != "@" {
        return Ok(data.to_string());
    }
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
        .map_err(|e| format!("reading the request from stdin: {e}"))?;
    Ok(text)
}

/// mimalloc instead of glibc's malloc: see BENCHMARKS.md, "Allocator".
#[global_allocator]
static ALLOCATOR: prenota::allocator::Mimalloc = prenota::allocator::Mimalloc;

fn main() -> ExitCode {
    // Data dirs, store files, keys and backups: for this user only (0700 / 0600).
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let cli = Cli::parse();
    prenota::telemetry::init_logging(cli.log_format);
    if let Err(error) = prenota::allocator::turn_off_transparent_huge_pages() {
        tracing::warn!(%error, "transparent huge pages stay on");
    }
    let runtime = match prenota::server::runtime("prenota-server") {
        Ok(runtime) => runtime,
        Err(error) => {
            prenota::say!("prenota: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Serve(args) => runtime.block_on(serve(args)),
        Command::Audit(args) => runtime.block_on(prenota::cli::audit(&args.target())),
        Command::Call(args) => read_request(&args.data).and_then(|data| {
            runtime.block_on(prenota::cli_call::call(
                &args.server.target(),
                &args.method,
                &data,
                &args.headers,
            ))
        }),
        Command::Backup(args) => backup(&args, &runtime),
        Command::Restore(args) => restore(&args),
        Command::Migrate(args) => migrate(&args),
        Command::BackupKey => print_needed(&prenota::store::backup_key::BackupKey::generate_hex()),
        Command::Config(ConfigCommand::Check { file }) => config_check(&file),
        Command::Config(ConfigCommand::HashToken) => hash_token(),
        Command::DevAssertion(args) => dev_assertion(&args),
        Command::Import(args) => runtime.block_on(prenota::cli::import(
            &args.file,
            &args.server.target(),
            args.dry_run,
        )),
        Command::OpenData(args) => open_data(args, &runtime),
        Command::Export(args) => export(args, &runtime),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            prenota::say!("prenota: {message}");
            ExitCode::FAILURE
        }
    }
}

/// One of `serve`'s status lines on stdout: a reader gone (`serve | head -1`, a log
/// pipe that died) never stops the server, which goes on without them.
fn status_line(text: &str) {
    if let Err(error) = prenota::cli::write_out(text) {
        tracing::warn!(%error, "a status line could not be written");
    }
}

/// `prenota backup`: of a stopped data dir, or from a running server.
fn backup(args: &BackupArgs, runtime: &tokio::runtime::Runtime) -> Result<(), String> {
    match &args.data_dir {
        Some(data_dir) => backup_config(
            &read_config(args.config.as_deref())?,
            args.backup_key.as_deref(),
        )
        .and_then(|config| prenota::cli::backup_data_dir(data_dir, &args.to, &config)),
        // `--config` given on the command line (not by PRENOTA_CONFIG, which must not
        // break a backup through the server) would be ignored: said instead.
        None if args.config.is_some()
            && args.config.as_deref()
                != std::env::var_os("PRENOTA_CONFIG")
                    .as_deref()
                    .map(std::path::Path::new) =>
        {
            Err(
                "--config is read only with --data-dir: a backup through the server (--server) \
                 uses the server's own configuration"
                    .into(),
            )
        }
        None => read_backup_key(args.backup_key.as_deref()).and_then(|key| {
            runtime.block_on(prenota::cli::backup_from_server(
                &args.server.target(),
                &args.to,
                key,
            ))
        }),
    }
}

/// `prenota open-data`.
fn open_data(args: OpenDataArgs, runtime: &tokio::runtime::Runtime) -> Result<(), String> {
    let request = prenota::proto::GetAvailabilitySummaryRequest {
        region_id: args.region,
        service_id: args.service,
        first_day: args.first_day.unwrap_or_default(),
        last_day: args.last_day.unwrap_or_default(),
        page_size: 0,
        page_token: String::new(),
    };
    let target = args.server.target();
    runtime.block_on(prenota::cli::open_data(&target, request, args.format))
}

/// `prenota export`: every booking, a site's or a region's.
fn export(args: ExportArgs, runtime: &tokio::runtime::Runtime) -> Result<(), String> {
    use prenota::proto::export_bookings_request::Scope;
    let scope = match (args.site, args.region) {
        (Some(site), _) => Some(Scope::SiteId(site)),
        (None, Some(region)) => Some(Scope::RegionId(region)),
        (None, None) => None,
    };
    runtime.block_on(prenota::cli::export(&args.server.target(), scope))
}

impl ServeArgs {
    /// The flags (and their `PRENOTA_*` variables) as a `[server]` section to put over
    /// the file's (see `ServerSection::overridden_by`).
    fn flags(&self) -> ServerSection {
        ServerSection {
            data_dir: self.data_dir.clone(),
            listen: self.listen,
            metrics_listen: self.metrics_listen.clone(),
            insecure_no_auth: self.insecure_no_auth,
            insecure_plaintext_tokens: self.insecure_plaintext_tokens,
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            tls_client_ca: self.tls_client_ca.clone(),
            reflection: None, // prenota.toml only
            open_data: false, // prenota.toml only
            backup_key_file: self.backup_key_file.clone(),
            proxy_protocol_from: Vec::new(), // prenota.toml only
            health_checks_from: Vec::new(),  // prenota.toml only
        }
    }
}

fn listing(problems: &[String]) -> String {
    problems.iter().map(|p| format!("\n  {p}")).collect()
}

async fn serve(args: ServeArgs) -> Result<(), String> {
    let file = read_config(args.config.as_deref())?;
    let mut config = checked(&file)?;
    let server = file.server.overridden_by(&args.flags());
    let (data_dir, listen) = (server.data_dir(), server.listen());
    config.tls = TlsPem::read(
        server.tls_cert.as_deref(),
        server.tls_key.as_deref(),
        server.tls_client_ca.as_deref(),
    )?;
    config.backup_key = read_backup_key(server.backup_key_file.as_deref())?;
    config.citizen_hash_key = read_hash_key(file.citizens.hash_key_file.as_deref())?;
    prenota::tls_expiry::warn_of_doubts(&server);
    let tokens_set = !config.tokens.is_empty();
    if let Some(warning) = check_listen(listen, tokens_set, server.insecure_no_auth)? {
        tracing::warn!("{warning}");
    }
    let tls = config.tls.is_some();
    let plaintext = server.insecure_plaintext_tokens;
    if let Some(warning) = check_plaintext_tokens(listen, tokens_set, tls, plaintext)? {
        tracing::warn!("{warning}");
    }
    let metrics_listen = server.metrics_listen()?;
    let open_files = prenota::open_files::raise_to_hard_limit();
    let metrics = metrics_listen.is_some();
    if let Some(warning) =
        prenota::open_files::fit_connections(&mut config.limits, open_files, metrics)?
    {
        tracing::warn!("{warning}");
    }
    prenota::store::refuse_a_file(&data_dir)?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let address = listener.local_addr().map_err(|e| e.to_string())?;
    if let Some(metrics_listen) = metrics_listen {
        let bounds = prenota::metrics_listener::Bounds::of(&config.limits);
        let metrics = prenota::telemetry::serve_metrics(metrics_listen, bounds)?;
        if !metrics.ip().is_loopback() {
            tracing::warn!(%metrics, "metrics are served unauthenticated beyond loopback");
        }
        prenota::tls_expiry::export_end(&server);
        status_line(&format!("prenota metrics on http://{metrics}/metrics"));
    }
    let (tokens, tls) = (config.tokens.len(), config.tls.is_some());
    // Health answers NOT_SERVING (and prenota's services RECOVERING) from here on.
    status_line(&format!("prenota recovering on {address}"));
    tracing::info!(%address, data_dir = %data_dir.display(), "recovering the store");
    let options = ServeOptions {
        data_dir: data_dir.clone(),
        config,
        demo: args.demo,
        clock: prenota::service::Clock::system(),
    };
    prenota::server::recover_and_serve(options, listener, shutdown_signal(), || {
        // Tests and scripts wait for this exact line before sending requests.
        status_line(&format!("prenota listening on {address}"));
        tracing::info!(%address, tokens, tls, "serving prenota.v1");
    })
    .await
    .map_err(|e| match e {
        prenota::server::ServeError::Service(_) => format!("data dir {}: {e}", data_dir.display()),
        other => prenota::cli::with_causes(&other),
    })
}

/// The configuration of a command that opens a stopped data dir (backup, restore,
/// migrate): its limits, id scheme and hash key.
fn offline_config(file: &ConfigFile) -> Result<prenota::config::Config, String> {
    let mut config = checked(file)?;
    config.citizen_hash_key = read_hash_key(file.citizens.hash_key_file.as_deref())?;
    config.offline = true;
    Ok(config)
}

/// `offline_config` with the backup key (the flag's, else the file's `[server]
/// backup_key_file`): backup and restore.
fn backup_config(
    file: &ConfigFile,
    backup_key: Option<&std::path::Path>,
) -> Result<prenota::config::Config, String> {
    let mut config = offline_config(file)?;
    config.backup_key = read_backup_key(backup_key.or(file.server.backup_key_file.as_deref()))?;
    Ok(config)
}

/// `prenota restore`. A configured `hash_key_file` that does not exist (a host being
/// rebuilt from its backup) is not made anew, which could never match: the backup's
/// key is restored into the data dir, and the operator is told where it belongs.
fn restore(args: &RestoreArgs) -> Result<(), String> {
    let mut file = read_config(args.config.as_deref())?;
    let missing = (file.citizens.hash_key_file).take_if(|path| !path.exists());
    let config = backup_config(&file, args.backup_key.as_deref())?;
    prenota::cli::restore(&args.from, &args.data_dir, &config, args.unauthenticated)?;
    if let Some(path) = missing {
        prenota::say!(
            "prenota restore: [citizens] hash_key_file {} does not exist: the backup's key is \
             in {}; move it to {} (mode 0600) before serving",
            path.display(),
            args.data_dir.join("citizen-hash.key").display(),
            path.display()
        );
    }
    Ok(())
}

fn read_backup_key(
    path: Option<&std::path::Path>,
) -> Result<Option<std::sync::Arc<prenota::store::backup_key::BackupKey>>, String> {
    path.map(|path| prenota::store::backup_key::BackupKey::read(path).map(std::sync::Arc::new))
        .transpose()
}

/// `prenota migrate`: with the file's limits and hash key (never its `[store]`).
fn migrate(args: &MigrateArgs) -> Result<(), String> {
    let mut config = offline_config(&read_config(args.config.as_deref())?)?;
    config.store = prenota::config::StoreBackend::Sled;
    prenota::cli::migrate_from_sled(&args.from_sled, &args.to, &config)
}

/// `[citizens] hash_key_file`, read (it must exist once configured).
fn read_hash_key(path: Option<&std::path::Path>) -> Result<Option<[u8; 32]>, String> {
    let Some(path) = path else { return Ok(None) };
    match prenota::store::key_file::read(path) {
        Ok(Some(key)) => Ok(Some(key)),
        Ok(None) => Err(format!(
            "[citizens] hash_key_file {} does not exist: make one with \
             `(umask 077; head -c 32 /dev/urandom > FILE)` (or copy a data dir's \
             citizen-hash.key), the same file on every node",
            path.display()
        )),
        Err(e) => Err(e.to_string()),
    }
}

/// The file (or the defaults), with the `PRENOTA_LIMITS_*` overrides applied.
fn read_config(path: Option<&std::path::Path>) -> Result<ConfigFile, String> {
    let mut file = match path {
        Some(path) => ConfigFile::read(path)?,
        None => ConfigFile::default(),
    };
    file.apply_env(std::env::vars())?;
    Ok(file)
}

/// The runtime configuration, or every problem of the file.
fn checked(file: &ConfigFile) -> Result<prenota::config::Config, String> {
    file.check()
        .map_err(|problems| format!("the configuration is invalid:{}", listing(&problems)))
}

/// `prenota config check FILE`: every problem, or the effective configuration.
fn config_check(path: &std::path::Path) -> Result<(), String> {
    let file = read_config(Some(path))?;
    file.check()
        .map_err(|problems| format!("{} is invalid:{}", path.display(), listing(&problems)))?;
    let mut effective = file.clone();
    effective.server = file.server.with_defaults();
    effective
        .server
        .metrics_listen()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let now = std::time::SystemTime::now();
    let certificates = prenota::tls_expiry::doubts(&effective.server, now);
    for doubt in file.doubts().into_iter().chain(certificates) {
        prenota::say!("warning: {doubt}");
    }
    let stops = serve_would_stop(&file, &effective.server);
    if !stops.is_empty() {
        let path = path.display();
        return Err(format!(
            "prenota serve would stop on {path}:{}",
            listing(&stops)
        ));
    }
    let tokens = !file.tokens.is_empty();
    // It may hold a password.
    if effective.store.postgres_url.is_some() {
        effective.store.postgres_url = Some("(set, not printed)".into());
    }
    let text = toml::to_string_pretty(&effective).map_err(|e| e.to_string())?;
    let open_mode = match tokens {
        true => "",
        false => {
            "# Open mode (no tokens): the *_per_token_max shares do not apply; every caller \
             is one token, so only the totals do.\n\n"
        }
    };
    print_out(&format!(
        "# {} is valid. Effective configuration (defaults filled in):\n\n{open_mode}{text}",
        path.display()
    ))
}

/// What `prenota serve` would refuse in a valid file (`server`: its `[server]` with the
/// defaults): the files it reads at start (TLS, the backup key, the citizen hash key).
/// The listen address's rules only warn: `serve`'s flags (`--insecure-plaintext-tokens`,
/// `--tls-cert`, `--listen`) may settle them.
fn serve_would_stop(file: &ConfigFile, server: &prenota::config::ServerSection) -> Vec<String> {
    let tls = server.tls_cert.is_some();
    let tokens = !file.tokens.is_empty();
    let listen = server.listen();
    let mut stops = Vec::new();
    let checks = [
        check_listen(listen, tokens, server.insecure_no_auth),
        check_plaintext_tokens(listen, tokens, tls, server.insecure_plaintext_tokens),
    ];
    for checked in checks {
        match checked {
            Ok(None) => {}
            Ok(Some(warning)) => prenota::say!("warning: {warning}"),
            Err(refusal) => prenota::say!(
                "warning: prenota serve would stop unless its flags say otherwise: {refusal}"
            ),
        }
    }
    let tls_files = (&server.tls_cert, &server.tls_key, &server.tls_client_ca);
    let files = [
        TlsPem::read(
            tls_files.0.as_deref(),
            tls_files.1.as_deref(),
            tls_files.2.as_deref(),
        )
        .err(),
        read_backup_key(server.backup_key_file.as_deref()).err(),
        read_hash_key(file.citizens.hash_key_file.as_deref()).err(),
        postgres_url_problem(file),
    ];
    stops.extend(files.into_iter().flatten());
    stops
}

/// Why the PostgreSQL backend's URL would not do: it does not parse, or its TLS options
/// (`sslmode`, `sslrootcert`) do not (`serve` would stop before connecting).
fn postgres_url_problem(file: &ConfigFile) -> Option<String> {
    let url = file.store.postgres_url.as_deref()?;
    let target = prenota::store::postgres_tls::target(url);
    target.err().map(|e| format!("[store] postgres_url: {e}"))
}

/// `prenota dev-assertion`: prints a signed citizen assertion.
fn dev_assertion(args: &DevAssertionArgs) -> Result<(), String> {
    let now_unix_s = chrono::Utc::now().timestamp();
    let token = prenota::dev_assertion::sign(&prenota::dev_assertion::AssertionRequest {
        key: &args.key,
        issuer: &args.iss,
        audience: &args.aud,
        subject: &args.sub,
        ttl_seconds: args.ttl_seconds,
        birth_year: args.birth_year,
        groups: &args.groups,
        dependants: &args.dependants,
        now_unix_s,
    })?;
    print_out(&token)
}

/// `prenota config hash-token`: the sha256 of the token read from stdin.
fn hash_token() -> Result<(), String> {
    let mut token = String::new();
    std::io::stdin()
        .read_line(&mut token)
        .map_err(|e| format!("cannot read the token from stdin: {e}"))?;
    let token = token.trim();
    if token.len() < 16 {
        return Err("a token must be at least 16 characters; use a random one".into());
    }
    print_out(&hex::encode(token_sha256(token)))?;
    Ok(())
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

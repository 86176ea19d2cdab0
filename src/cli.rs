//! The client commands: `prenota import` (a capacity file), `prenota export` (bookings
//! as CSV), `prenota audit` (the audit log as CSV) and `prenota open-data` (public
//! availability aggregates as CSV or JSON). They talk to a running server over gRPC.
//! Also `backup` (from a server, or a stopped data dir), `restore` and `migrate` (a sled
//! data dir into PostgreSQL), which work on files.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};
use tonic_types::StatusExt;

use std::sync::Arc;

use crate::capacity_file::{self, csv_field, Parsed};
use crate::config::{Config, Limits};
use crate::proto;
use crate::proto::capacity_service_client::CapacityServiceClient;
use crate::store::backup::Trust;
use crate::store::backup_key::BackupKey;

/// Rows per streamed message: well under the server's message size limit.
const ROWS_PER_MESSAGE: usize = 1_000;

/// Adds the bearer token (if any) to every call.
type Authorize = Box<dyn FnMut(Request<()>) -> Result<Request<()>, Status> + Send>;
type Client = CapacityServiceClient<InterceptedService<Channel, Authorize>>;

/// How the CLI reaches a server: its URL, a bearer token, and for `https://` URLs the
/// CA that signed the server's certificate.
pub struct Target<'a> {
    pub server: &'a str,
    pub token: Option<&'a str>,
    pub ca: Option<&'a Path>,
    /// This client's certificate and key (PEM files), for servers that require one.
    pub identity: Option<(&'a Path, &'a Path)>,
}

async fn connect(target: &Target<'_>) -> Result<Client, String> {
    Ok(
        CapacityServiceClient::new(authorized_channel(target).await?)
            .max_decoding_message_size(Limits::default().message_size_bytes_max),
    )
}

/// A channel to the server that adds the bearer token (if any) to every call.
pub(crate) async fn authorized_channel(
    target: &Target<'_>,
) -> Result<InterceptedService<Channel, Authorize>, String> {
    let server = target.server;
    let mut endpoint = Endpoint::from_shared(server.to_string())
        .map_err(|e| format!("{server} is not a server URL such as http://127.0.0.1:50051: {e}"))?;
    if let Some(tls) = client_tls(target)? {
        endpoint = (endpoint.tls_config(tls)).map_err(|e| format!("TLS: {}", with_causes(&e)))?;
    }
    let token = target.token;
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {server}: {}", with_causes(&e)))?;
    let header = match token {
        Some(token) => Some(
            MetadataValue::try_from(format!("Bearer {token}"))
                .map_err(|_| "the token contains characters a header cannot carry".to_string())?,
        ),
        None => None,
    };
    let authorize: Authorize = Box::new(move |mut request: Request<()>| {
        if let Some(header) = &header {
            request
                .metadata_mut()
                .insert("authorization", header.clone());
        }
        Ok(request)
    });
    Ok(InterceptedService::new(channel, authorize))
}

/// TLS for an `https://` server: its CA from `--ca`, else the machine's CAs, and this
/// client's certificate if given. `--ca`, `--cert` and `--key` are refused with any
/// other scheme (tonic would connect in clear, the token readable on the way).
fn client_tls(target: &Target<'_>) -> Result<Option<tonic::transport::ClientTlsConfig>, String> {
    let https = target.server.starts_with("https://");
    if !https {
        return match target.ca.is_some() || target.identity.is_some() {
            true => Err(format!(
                "--ca, --cert and --key are for https:// servers; {} would be reached in \
                 clear, the token readable on the way",
                target.server
            )),
            false => Ok(None),
        };
    }
    let mut tls = tonic::transport::ClientTlsConfig::new();
    tls = match target.ca {
        Some(ca) => {
            let (pem, _) = crate::config::read_pem_certificates("--ca", ca)?;
            tls.ca_certificate(tonic::transport::Certificate::from_pem(pem))
        }
        None => tls.with_native_roots(),
    };
    if let Some((cert, key)) = target.identity {
        let (cert, key) = crate::config::read_pem_identity(("--cert", cert), ("--key", key))?;
        let identity = tonic::transport::Identity::from_pem(cert, key);
        tls = tls.identity(identity);
    }
    Ok(Some(tls))
}

/// An error and its causes (tonic's transport errors say only "transport error").
pub fn with_causes(error: &dyn std::error::Error) -> String {
    causes_after(&error.to_string(), error)
}

/// `said`, then `error`'s causes.
fn causes_after(said: &str, error: &dyn std::error::Error) -> String {
    let mut text = said.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        let inner_said = inner.to_string();
        if !text.ends_with(&inner_said) {
            text.push_str(&format!(": {inner_said}"));
        }
        cause = inner.source();
    }
    text
}

/// Writes `text` and a newline to stdout: `Ok(false)` once the reader went away
/// (`prenota call … | head`), so a command streaming answers stops there (`println!`
/// would panic).
pub fn write_out(text: &str) -> Result<bool, String> {
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}").and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(format!("stdout: {e}")),
    }
}

/// [`write_out`] for a command's one answer: a reader gone ends it quietly.
pub fn print_out(text: &str) -> Result<(), String> {
    write_out(text).map(drop)
}

/// [`write_out`] for an answer that cannot be had again (a new random key): a reader
/// gone is a failure, so a script does not go on without it.
pub fn print_needed(text: &str) -> Result<(), String> {
    match write_out(text)? {
        true => Ok(()),
        false => Err("stdout closed before the answer was written; nothing kept".into()),
    }
}

/// `NotFound` → `NOT_FOUND`, as gRPC names codes.
fn code_name(code: Code) -> String {
    let mut name = String::new();
    for (index, c) in format!("{code:?}").chars().enumerate() {
        if c.is_uppercase() && index > 0 {
            name.push('_');
        }
        name.push(c.to_ascii_uppercase());
    }
    name
}

/// `explain`, for a command that only reads (export, open data, audit, backup): an
/// unclear answer changed nothing, so it says so instead of an unknown outcome.
pub(crate) fn explain_read(status: &Status) -> String {
    explanation(status, true)
}

/// Explains a refused call in one style for every command: the server's message, its
/// code and reason, and each bad field (of an import: by line and column). An
/// UNAVAILABLE, CANCELLED, DEADLINE_EXCEEDED, UNKNOWN or INTERNAL without a reason did
/// not come from prenota's rules (a broken connection, a reset stream, a timeout, a
/// proxy): its outcome is unknown (or, for a request the server did not fully receive,
/// nothing was applied: sending again is safe either way).
pub(crate) fn explain(status: &Status) -> String {
    explanation(status, false)
}

fn explanation(status: &Status, only_reads: bool) -> String {
    let info = status.get_details_error_info();
    let unclear = [
        Code::Unavailable,
        Code::Cancelled,
        Code::DeadlineExceeded,
        Code::Unknown,
        Code::Internal,
    ];
    if info.is_none() && unclear.contains(&status.code()) {
        let then = match only_reads {
            true => {
                "nothing was changed (it only reads), but what it wrote so far is \
                     incomplete: run it again"
            }
            false => {
                "the outcome is unknown: what was sent may have been applied, in \
                      whole or in part; send it again (the same request or file) to find out"
            }
        };
        return format!(
            "no clear answer from the server ({}): {}; {then}",
            code_name(status.code()),
            causes_after(status.message(), status)
        );
    }
    let reason = info
        .map(|info| format!(", {}", info.reason))
        .unwrap_or_default();
    let mut text = format!(
        "the server refused it ({}{reason}): {}",
        code_name(status.code()),
        status.message()
    );
    if status.code() == Code::Unavailable && reason == ", OVERLOADED" {
        text.push_str(" (nothing was applied: send it again in a moment)");
    }
    if reason == ", STORAGE_FAILED" {
        // Not the server's own advice (a request_id, which these commands do not take).
        text = format!(
            "the server's storage failed ({}{reason}): what was sent may have been \
             applied in part or not at all; the server's log has the details (once the \
             server is restarted, send it again)",
            code_name(status.code())
        );
    }
    if status.code() == Code::InvalidArgument {
        if let Some(bad) = status.get_details_bad_request() {
            let count = bad.field_violations.len();
            let problems = if count == 1 { "problem" } else { "problems" };
            let cut = (bad.field_violations.iter()).any(|v| {
                v.description.contains("not listed") || v.description.contains("are listed")
            });
            let count = match cut {
                true => "more problems than listed".to_string(),
                false => format!("{count} {problems}"),
            };
            text = format!("the server refused it; nothing was applied ({count}):");
            for violation in &bad.field_violations {
                text.push_str(&format!(
                    "\n  {}: {}",
                    describe_field(&violation.field),
                    violation.description
                ));
            }
        }
    }
    text
}

/// `rows[12].time_zone` → `line 12, column time_zone`.
fn describe_field(field: &str) -> String {
    field
        .strip_prefix("rows[")
        .and_then(|rest| rest.split_once("]."))
        .map(|(line, column)| format!("line {line}, column {column}"))
        .unwrap_or_else(|| field.to_string())
}

/// Progress on stderr: in place on a terminal, every 10% otherwise.
struct Progress {
    total: usize,
    shown_tenths: usize,
    terminal: bool,
    /// What is under way ("sending rows").
    doing: &'static str,
}

impl Progress {
    fn new(total: usize, doing: &'static str) -> Self {
        use std::io::IsTerminal;
        Self {
            total,
            shown_tenths: 0,
            terminal: std::io::stderr().is_terminal(),
            doing,
        }
    }

    fn update(&mut self, sent: usize) {
        let (doing, percent) = (self.doing, sent * 100 / self.total.max(1));
        if self.terminal {
            let _ = write!(
                std::io::stderr(),
                "\r{doing}: {sent}/{} ({percent}%)",
                self.total
            );
            if sent == self.total {
                crate::say!();
            }
        } else if percent / 10 > self.shown_tenths || sent == self.total {
            self.shown_tenths = percent / 10;
            crate::say!("{doing}: {sent}/{} ({percent}%)", self.total);
        }
    }
}

/// `prenota import FILE.csv --server URL [--token T] [--dry-run]`.
pub async fn import(file: &Path, target: &Target<'_>, dry_run: bool) -> Result<(), String> {
    let (rows, row_releases) = read_capacity_file(file)?;
    let releases = releases_of(&rows, &row_releases)?;
    check_release_times(&releases)?;
    let mut client = connect(target).await?;
    // Releases before their slots exist (a slot without its release would be open to
    // whoever books first): the rows checked whole first (a dry run: a bad row leaves
    // nothing behind), then the releases' sites (empty), the releases, the import.
    // Every step is idempotent, so the same file can simply be sent again.
    if !dry_run && !releases.is_empty() {
        send_rows(&mut client, rows.clone(), true, "checking rows").await?;
        upsert_release_sites(&mut client, &rows, &row_releases).await?;
    }
    create_releases(&mut client, releases, dry_run).await?;
    let summary = send_rows(&mut client, rows, dry_run, "sending rows").await?;
    let verb = if dry_run { "would import" } else { "imported" };
    let past = match summary.slots_past {
        0 => String::new(),
        n => format!(" ({n} slots had started: left out)"),
    };
    print_out(&format!(
        "{verb} {} rows: {} sites, {} slots created, {} slots updated, total capacity {}{past}{}",
        summary.rows,
        summary.sites_upserted,
        summary.slots_created,
        summary.slots_updated,
        summary.total_capacity,
        if dry_run {
            " (dry run: nothing applied)"
        } else {
            ""
        }
    ))
}

/// Streams `rows` as one ImportCapacity call (progress on stderr as `doing`), and
/// answers its summary or why the server refused the file.
async fn send_rows(
    client: &mut Client,
    rows: Vec<proto::CapacityRow>,
    dry_run: bool,
    doing: &'static str,
) -> Result<proto::ImportCapacityResponse, String> {
    let total = rows.len();
    let (sender, receiver) = tokio::sync::mpsc::channel(4);
    let request_id = format!("import-{}", rand::random::<u64>());
    let feeder = tokio::spawn(async move {
        let mut progress = Progress::new(total, doing);
        let mut sent = 0;
        let mut rows = rows.into_iter().peekable();
        while rows.peek().is_some() {
            let chunk: Vec<_> = rows.by_ref().take(ROWS_PER_MESSAGE).collect();
            sent += chunk.len();
            let message = proto::ImportCapacityRequest {
                rows: chunk,
                dry_run,
                request_id: request_id.clone(),
                rows_total: Some(total as u64),
            };
            if sender.send(message).await.is_err() {
                return; // the call ended early; its status says why
            }
            progress.update(sent);
        }
    });
    let response = client
        .import_capacity(tokio_stream::wrappers::ReceiverStream::new(receiver))
        .await;
    feeder.abort();
    Ok(response
        .map_err(|status| explain(&status).replacen("refused it", "refused the file", 1))?
        .into_inner())
}

/// The rows of capacity file `file` and their releases, or every error found (up to
/// `import_errors_reported_max`) as one message. The limits are the defaults with the
/// `PRENOTA_LIMITS_*` overrides, as a server given the same environment has them.
fn read_capacity_file(
    file: &Path,
) -> Result<(Vec<proto::CapacityRow>, Vec<capacity_file::RowRelease>), String> {
    let mut config = crate::config::ConfigFile::default();
    config.apply_env(std::env::vars())?;
    let limits = config.limits;
    let opened =
        std::fs::File::open(file).map_err(|e| format!("cannot open {}: {e}", file.display()))?;
    let parsed = capacity_file::parse(
        std::io::BufReader::new(opened),
        limits.import_rows_max,
        limits.import_errors_reported_max,
    )
    .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    match parsed {
        Parsed::Rows(rows, releases) => Ok((rows, releases)),
        Parsed::Errors { listed, more } => {
            let mut text = format!(
                "{} is not a valid capacity file; nothing was sent:",
                file.display()
            );
            for error in &listed {
                text.push_str(&format!("\n  {error}"));
            }
            if more > 0 {
                text.push_str(&format!("\n  … and {more} more"));
            }
            Err(text)
        }
    }
}

/// The releases a file's release columns describe: rows sharing a `release_id` make one
/// release over their sites, from the first of their first days to the end of the
/// last of their last days (local midnights), with the same release columns.
fn releases_of(
    rows: &[proto::CapacityRow],
    row_releases: &[capacity_file::RowRelease],
) -> Result<Vec<(u64, proto::Release)>, String> {
    let mut releases: std::collections::BTreeMap<String, (u64, proto::Release)> =
        Default::default();
    for row_release in row_releases {
        let row = &rows[row_release.row];
        let site = row.site.clone().unwrap_or_default();
        let (from, to) = local_days(&site.time_zone, &row.first_day, &row.last_day)
            .map_err(|why| format!("line {}: {why}", row.line))?;
        let wanted = release_from_row(row_release, &row.service_id);
        let (first_line, release) = releases
            .entry(row_release.release_id.clone())
            .or_insert_with(|| (row.line, wanted.clone()));
        let same = (
            &release.service_id,
            &release.release_at,
            &release.queue_opens_at,
        ) == (
            &wanted.service_id,
            &wanted.release_at,
            &wanted.queue_opens_at,
        ) && release.admissions_per_minute == wanted.admissions_per_minute
            && release.reserved_percent == wanted.reserved_percent
            && release.reserve_released_hours_before_start
                == wanted.reserve_released_hours_before_start;
        if !same {
            return Err(format!(
                "line {}: release {} differs from its first row (line {first_line}): its \
                 service and release columns must be the same on every row",
                row.line, row_release.release_id
            ));
        }
        if !release.site_ids.contains(&site.site_id) {
            release.site_ids.push(site.site_id.clone());
        }
        let earlier =
            |a: &Option<prost_types::Timestamp>, b: i64| a.as_ref().is_none_or(|a| b < a.seconds);
        if earlier(&release.from, from) {
            release.from = Some(prost_types::Timestamp {
                seconds: from,
                nanos: 0,
            });
        }
        if release.to.as_ref().is_none_or(|t| to > t.seconds) {
            release.to = Some(prost_types::Timestamp {
                seconds: to,
                nanos: 0,
            });
        }
    }
    Ok(releases.into_values().collect())
}

/// A release's columns as a `proto::Release` (no sites nor range yet).
fn release_from_row(row: &capacity_file::RowRelease, service_id: &str) -> proto::Release {
    let instant = |ms: i64| prost_types::Timestamp {
        seconds: ms.div_euclid(1_000),
        nanos: (ms.rem_euclid(1_000) * 1_000_000) as i32,
    };
    proto::Release {
        release_id: row.release_id.clone(),
        service_id: service_id.to_string(),
        release_at: Some(instant(row.release_at_unix_ms)),
        queue_opens_at: row.queue_opens_at_unix_ms.map(instant),
        admissions_per_minute: row.admissions_per_minute,
        reserved_percent: row.reserved_percent.iter().cloned().collect(),
        reserve_released_hours_before_start: row.reserve_released_hours_before_start,
        ..Default::default()
    }
}

/// The first instant of `first_day` and of the day after `last_day` in `zone`, in
/// seconds since the epoch.
fn local_days(zone: &str, first_day: &str, last_day: &str) -> Result<(i64, i64), String> {
    use chrono::TimeZone;
    let zone: chrono_tz::Tz = zone
        .parse()
        .map_err(|_| format!("{zone:?} is not an IANA time zone"))?;
    let day = |text: &str| {
        chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d")
            .map_err(|_| format!("{text:?} is not a date YYYY-MM-DD"))
    };
    let midnight = |date: chrono::NaiveDate| {
        (0..24)
            .filter_map(|hour| date.and_hms_opt(hour, 0, 0))
            .find_map(|local| zone.from_local_datetime(&local).earliest())
            .map(|at| at.timestamp())
            .ok_or_else(|| format!("{date} has no local midnight"))
    };
    let last = day(last_day)?;
    let next = last.succ_opt().ok_or("the last day is too far")?;
    Ok((midnight(day(first_day)?)?, midnight(next)?))
}

/// Registers (or updates, unchanged) the sites of the rows that have a release, so the
/// releases can name them before the import gives them slots.
async fn upsert_release_sites(
    client: &mut Client,
    rows: &[proto::CapacityRow],
    row_releases: &[capacity_file::RowRelease],
) -> Result<(), String> {
    let mut done = std::collections::BTreeSet::new();
    for row_release in row_releases {
        let row = &rows[row_release.row];
        let site = row.site.clone().unwrap_or_default();
        if !done.insert(site.site_id.clone()) {
            continue;
        }
        client
            .upsert_site(proto::UpsertSiteRequest {
                site: Some(site),
                request_id: String::new(),
            })
            .await
            .map_err(|status| {
                format!(
                    "line {}: the site of release {}: {}; no slot was imported",
                    row.line,
                    row_release.release_id,
                    explain(&status)
                )
            })?;
    }
    Ok(())
}

/// Refuses, before anything is sent, a release whose `release_at` is past (the server
/// would refuse it after the file's sites were registered). The server checks the rest
/// when each is created (overlaps with the releases it has, among them).
fn check_release_times(releases: &[(u64, proto::Release)]) -> Result<(), String> {
    let now = chrono::Utc::now().timestamp();
    for (line, release) in releases {
        let release_at = release.release_at.as_ref().map_or(0, |at| at.seconds);
        if release_at <= now {
            let id = &release.release_id;
            return Err(format!(
                "release {id} (line {line}): release_at must be in the future; nothing was sent"
            ));
        }
    }
    Ok(())
}

/// Creates each release (or, on a dry run, says it would).
async fn create_releases(
    client: &mut Client,
    releases: Vec<(u64, proto::Release)>,
    dry_run: bool,
) -> Result<(), String> {
    for (line, release) in releases {
        let (id, sites) = (release.release_id.clone(), release.site_ids.len());
        if dry_run {
            print_out(&format!(
                "would create release {id} over {sites} sites (line {line})"
            ))?;
            continue;
        }
        client
            .create_release(proto::CreateReleaseRequest {
                release: Some(release),
                request_id: String::new(),
            })
            .await
            .map_err(|status| {
                let said = explain(&status).replacen("; nothing was applied", "", 1);
                format!(
                    "release {id} (line {line}) was not created: {said}\nno slot of the file \
                     was imported (its sites are registered, with the slots they had): mend \
                     the file and send it again"
                )
            })?;
        print_out(&format!("release {id} over {sites} sites: announced"))?;
    }
    Ok(())
}

pub const EXPORT_COLUMNS: [&str; 16] = [
    "booking_id",
    "slot_id",
    "site_id",
    "service_id",
    "start",
    "end",
    "local_start",
    "time_zone",
    "state",
    "created_at",
    "cancelled_at",
    "cancel_reason",
    "reference",
    "series_id",
    "dose",
    "attendance_at",
];

fn rfc3339(timestamp: Option<&prost_types::Timestamp>) -> String {
    timestamp
        .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32))
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

/// `prenota export --server URL [--site S | --region R] [--token T]`: CSV on stdout.
pub async fn export(
    target: &Target<'_>,
    scope: Option<proto::export_bookings_request::Scope>,
) -> Result<(), String> {
    let mut client = connect(target).await?;
    let mut stream = client
        .export_bookings(proto::ExportBookingsRequest { scope })
        .await
        .map_err(|status| explain_read(&status))?
        .into_inner();
    let mut out = RowsOut::new();
    let write_error = |e: std::io::Error| format!("cannot write the export: {e}");
    writeln!(out, "{}", EXPORT_COLUMNS.join(",")).map_err(write_error)?;
    let mut count = 0u64;
    while let Some(message) = stream
        .message()
        .await
        .map_err(|status| explain_read(&status))?
    {
        let Some(b) = message.booking else { continue };
        writeln!(out, "{}", export_row(&b)).map_err(write_error)?;
        count += 1;
    }
    out.finish().map_err(write_error)?;
    crate::say!("exported {count} bookings");
    Ok(())
}

/// Buffered stdout for a command's rows. `finish` writes out what is buffered; dropped
/// without it (the command failed), the buffer is discarded, so a failure before the
/// first 8 KiB leaves no header-only output that reads as a whole, empty one (an
/// outside test). Only exit status 0 says the rows are all there.
struct RowsOut(Option<std::io::BufWriter<std::io::StdoutLock<'static>>>);

impl RowsOut {
    fn new() -> Self {
        Self(Some(std::io::BufWriter::new(std::io::stdout().lock())))
    }

    fn finish(mut self) -> std::io::Result<()> {
        self.0.take().map_or(Ok(()), |mut out| out.flush())
    }
}

impl std::io::Write for RowsOut {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        match self.0.as_mut() {
            Some(out) => out.write(bytes),
            None => Err(std::io::Error::other("written after finish")),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(()) // only `finish` writes out
    }
}

impl Drop for RowsOut {
    fn drop(&mut self) {
        if let Some(out) = self.0.take() {
            drop(out.into_parts()); // not written: the command failed
        }
    }
}

/// One booking as a CSV line (no newline), in `EXPORT_COLUMNS` order.
fn export_row(b: &proto::Booking) -> String {
    let state = match proto::BookingState::try_from(b.state) {
        Ok(proto::BookingState::Confirmed) => "CONFIRMED",
        Ok(proto::BookingState::Cancelled) => "CANCELLED",
        Ok(proto::BookingState::Attended) => "ATTENDED",
        Ok(proto::BookingState::NoShow) => "NO_SHOW",
        _ => "UNSPECIFIED",
    };
    let fields = [
        b.booking_id.clone(),
        b.slot_id.clone(),
        b.site_id.clone(),
        b.service_id.clone(),
        rfc3339(b.start.as_ref()),
        rfc3339(b.end.as_ref()),
        b.local_start.clone(),
        b.time_zone.clone(),
        state.to_string(),
        rfc3339(b.created_at.as_ref()),
        rfc3339(b.cancelled_at.as_ref()),
        b.cancel_reason.clone(),
        b.reference.clone(),
        b.series_id.clone(),
        match b.dose {
            0 => String::new(),
            dose => dose.to_string(),
        },
        rfc3339(b.attendance_at.as_ref()),
    ];
    let line: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
    line.join(",")
}

/// The columns of `prenota open-data`, in order (the JSON objects' keys too).
const OPEN_DATA_COLUMNS: [&str; 13] = [
    "site_id",
    "site_name",
    "region_id",
    "service_id",
    "day",
    "slots",
    "capacity",
    "booked",
    "held",
    "remaining",
    "slots_closed",
    "as_of",
    // Added after the others: appended, so a reader by position is not misled.
    "reserved",
];

/// Whether a column of `prenota open-data` is a count (a number in JSON): all but the
/// names, the day and `as_of`.
fn is_count(column: &str) -> bool {
    let texts = [
        "site_id",
        "site_name",
        "region_id",
        "service_id",
        "day",
        "as_of",
    ];
    !texts.contains(&column)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OpenDataFormat {
    Csv,
    /// One JSON object per line (JSON Lines).
    Json,
}

fn open_data_fields(row: proto::AvailabilityRow) -> [String; 13] {
    [
        row.site_id,
        row.site_name,
        row.region_id,
        row.service_id,
        row.day,
        row.slots.to_string(),
        row.capacity.to_string(),
        row.booked.to_string(),
        row.held.to_string(),
        row.remaining.to_string(),
        row.slots_closed.to_string(),
        rfc3339(row.as_of.as_ref()),
        row.reserved.to_string(),
    ]
}

/// `prenota open-data --server URL [--region R] [--service S] [--first-day D]
/// [--last-day D] [--format csv|json]`: availability per site, service and day on
/// stdout, every page followed; no person in it.
pub async fn open_data(
    target: &Target<'_>,
    mut request: proto::GetAvailabilitySummaryRequest,
    format: OpenDataFormat,
) -> Result<(), String> {
    use crate::proto::open_data_service_client::OpenDataServiceClient;
    let mut client = OpenDataServiceClient::new(authorized_channel(target).await?);
    let mut out = RowsOut::new();
    let write_error = |e: std::io::Error| format!("cannot write the rows: {e}");
    if format == OpenDataFormat::Csv {
        writeln!(out, "{}", OPEN_DATA_COLUMNS.join(",")).map_err(write_error)?;
    }
    let mut count = 0u64;
    loop {
        let page = client
            .get_availability_summary(request.clone())
            .await
            .map_err(|status| explain_read(&status))?
            .into_inner();
        for row in page.rows {
            let fields = open_data_fields(row);
            let line = match format {
                OpenDataFormat::Csv => fields
                    .iter()
                    .map(|f| csv_field(f))
                    .collect::<Vec<_>>()
                    .join(","),
                OpenDataFormat::Json => json_object(&fields),
            };
            writeln!(out, "{line}").map_err(write_error)?;
            count += 1;
        }
        if page.next_page_token.is_empty() {
            break;
        }
        request.page_token = page.next_page_token;
    }
    out.finish().map_err(write_error)?;
    crate::say!("wrote {count} rows");
    Ok(())
}

/// One row as a JSON object; counts are numbers, the rest strings.
fn json_object(fields: &[String; 13]) -> String {
    let object: serde_json::Map<String, serde_json::Value> = OPEN_DATA_COLUMNS
        .iter()
        .zip(fields)
        .map(|(column, value)| {
            let value = match value.parse::<u64>() {
                Ok(number) if is_count(column) => number.into(),
                _ => value.clone().into(),
            };
            (column.to_string(), value)
        })
        .collect();
    serde_json::Value::Object(object).to_string()
}

/// `prenota audit --server URL [--token T]`: the audit log as CSV on stdout.
pub async fn audit(target: &Target<'_>) -> Result<(), String> {
    let mut client = connect(target).await?;
    let mut stream = client
        .export_audit_log(proto::ExportAuditLogRequest {})
        .await
        .map_err(|status| explain_read(&status))?
        .into_inner();
    let mut out = RowsOut::new();
    let write_error = |e: std::io::Error| format!("cannot write the audit log: {e}");
    writeln!(out, "at,actor,action,detail").map_err(write_error)?;
    while let Some(message) = stream
        .message()
        .await
        .map_err(|status| explain_read(&status))?
    {
        let Some(entry) = message.entry else { continue };
        let fields = [
            rfc3339(entry.at.as_ref()),
            entry.actor,
            entry.action,
            entry.detail,
        ];
        let line: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
        writeln!(out, "{}", line.join(",")).map_err(write_error)?;
    }
    out.finish().map_err(write_error)
}

/// Writes a backup file: bytes go to `<to>.partial`, which is synced, verified (checksum,
/// every frame) and only then renamed to `to`. A `to` that exists when it starts is never
/// overwritten (one made while it runs would be: the rename replaces it).
fn write_backup_file(
    to: &Path,
    trust: Trust<'_>,
    write: impl FnOnce(&mut std::fs::File) -> Result<(), String>,
) -> Result<u64, String> {
    if to.exists() {
        return Err(format!(
            "{} exists; choose a new file name (backups are never overwritten)",
            to.display()
        ));
    }
    let partial = PathBuf::from(format!("{}.partial", to.display()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600); // holds the hash key
    let mut file = options.open(&partial).map_err(|e| {
        let hint = match e.kind() {
            std::io::ErrorKind::AlreadyExists => {
                " (a leftover of an interrupted backup may be removed)"
            }
            _ => "",
        };
        format!("cannot create {}: {e}{hint}", partial.display())
    })?;
    let written = write(&mut file)
        .and_then(|()| {
            file.sync_all()
                .map_err(|e| format!("syncing {}: {e}", partial.display()))
        })
        .and_then(|()| crate::service::backup::verify_backup(&partial, trust))
        .and_then(|(_, records)| {
            crate::store::files::rename_durably(&partial, to)
                .map_err(|e| format!("renaming {}: {e}", partial.display()))?;
            Ok(records)
        });
    if written.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    written
}

/// `prenota backup --server URL --to FILE`: a consistent backup of a running server.
/// `prenota backup --server URL --to FILE [--backup-key FILE]`: the file is checked
/// whole (its MAC too when the backup key is given) before it is renamed into place.
pub async fn backup_from_server(
    target: &Target<'_>,
    to: &Path,
    backup_key: Option<Arc<BackupKey>>,
) -> Result<(), String> {
    let started = std::time::Instant::now();
    let mut client = connect(target).await?;
    let mut stream = client
        .export_backup(proto::ExportBackupRequest {})
        .await
        .map_err(|status| explain_read(&status))?
        .into_inner();
    // Chunks are written by a thread as they come (at most 8 wait in memory); the file
    // is synced, checked and renamed once the stream ended well.
    let mut received = 0usize;
    let mut reported = 0usize;
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(8);
    let to_owned = to.to_path_buf();
    let writer = std::thread::spawn(move || {
        let trust = Trust {
            key: backup_key.as_deref(),
            unauthenticated: false,
        };
        write_backup_file(&to_owned, trust, |file| {
            for chunk in rx {
                file.write_all(&chunk)
                    .map_err(|e| format!("writing the backup: {e}"))?;
            }
            Ok(())
        })
    });
    // `Err(None)`: the writer stopped, and says why itself (the file exists, …).
    let streamed = async {
        while let Some(message) = stream.message().await.map_err(|s| Some(explain_read(&s)))? {
            received += message.data.len();
            if received - reported >= 64 << 20 {
                reported = received;
                crate::say!("prenota backup: {} MiB received", received >> 20);
            }
            if tx.send(message.data).is_err() {
                return Err(None);
            }
        }
        Ok(())
    }
    .await;
    drop(tx);
    let written = writer
        .join()
        .map_err(|_| "the backup file writer panicked".to_string())?;
    let records = match streamed {
        Err(Some(refused)) => return Err(refused),
        Err(None) | Ok(()) => written?,
    };
    crate::say!(
        "prenota backup: {} ({records} records, {:.1} MiB) written in {:.1} s",
        to.display(),
        received as f64 / (1 << 20) as f64,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `prenota backup --data-dir DIR --to FILE`: a backup of a stopped server's data dir
/// (opened, and so recovered and checked, first).
pub fn backup_data_dir(data_dir: &Path, to: &Path, config: &Config) -> Result<(), String> {
    let key = config.backup_key.as_deref().ok_or_else(|| {
        "a backup needs the backup key: --backup-key FILE (make one with `prenota backup-key`)"
            .to_string()
    })?;
    let trust = Trust {
        key: Some(key),
        unauthenticated: false,
    };
    let started = std::time::Instant::now();
    holds_a_sled_store(data_dir)?;
    let engine = crate::service::Engine::open(data_dir, config, crate::service::Clock::system())
        .map_err(|e| {
            let said = e.to_string();
            // Only a held lock means a server runs on it; other refusals stand alone.
            let hint = match said.contains("in use by another prenota process") {
                true => {
                    ". Take the backup through the server: prenota backup --server URL \
                         --token ADMIN_TOKEN --to FILE"
                }
                false => "",
            };
            format!("cannot open {}: {said}{hint}", data_dir.display())
        })?;
    let records = write_backup_file(to, trust, |file| {
        let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
        engine.backup(&mut out).map_err(|e| e.to_string())?;
        out.flush().map_err(|e| format!("writing the backup: {e}"))
    })?;
    crate::say!(
        "prenota backup: {} ({records} records) written in {:.1} s",
        to.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// An offline command's data dir holds a sled store: never a new, empty one made (and
/// backed up, or migrated) from a mistyped path or a PostgreSQL node's data dir.
fn holds_a_sled_store(data_dir: &Path) -> Result<(), String> {
    if data_dir.join("sled").join("db").is_file() {
        return Ok(());
    }
    let postgres_node = data_dir
        .join(crate::store::POSTGRES_LOCAL_COPY_DIR)
        .is_dir();
    Err(match postgres_node {
        true => format!(
            "{} is a PostgreSQL node's data dir (its store is in PostgreSQL): back it up with \
             PostgreSQL's own tools, or through the active node with prenota backup --server",
            data_dir.display()
        ),
        false => format!(
            "{} holds no prenota store (no sled/db in it)",
            data_dir.display()
        ),
    })
}

/// `prenota restore --from FILE --data-dir DIR`.
pub fn restore(
    from: &Path,
    data_dir: &Path,
    config: &Config,
    unauthenticated: bool,
) -> Result<(), String> {
    let trust = Trust {
        key: config.backup_key.as_deref(),
        unauthenticated,
    };
    let started = std::time::Instant::now();
    crate::say!(
        "prenota restore: checking {}, then restoring into {}",
        from.display(),
        data_dir.display()
    );
    let summary = crate::service::backup::restore(from, data_dir, config, trust)?;
    crate::say!(
        "prenota restore: {} records restored into {} and recovered with every invariant \
         checked, in {:.1} s",
        summary.records,
        summary.data_dir.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `prenota migrate --from-sled DIR --to URL`: checks the stopped store in `data_dir`
/// (every invariant, as a start would, with `config`'s hash key if it names one), then
/// copies every record into the empty PostgreSQL store at `url`, all or nothing.
pub fn migrate_from_sled(data_dir: &Path, url: &str, config: &Config) -> Result<(), String> {
    let started = std::time::Instant::now();
    holds_a_sled_store(data_dir)?;
    crate::say!("prenota migrate: checking {}", data_dir.display());
    // Kept open (and the data dir locked) through the copy: no server can start on it
    // between the check and the copy.
    let engine = crate::service::Engine::open(data_dir, config, crate::service::Clock::system())
        .map_err(|e| format!("{}: {e}", data_dir.display()))?;
    crate::say!("prenota migrate: copying into PostgreSQL (one transaction)");
    let mut last_said = std::time::Instant::now();
    // The embedded store's own format record stays behind: PostgreSQL has its schema.
    let records = engine.stored_records().filter(|record| {
        !matches!(record, Ok((key, _)) if key.as_slice() == crate::store::records::STORE_FORMAT_KEY)
    });
    let copied = crate::store::postgres::copy_into(records, url, |copied| {
        if last_said.elapsed() >= std::time::Duration::from_secs(1) {
            crate::say!("prenota migrate: {copied} records copied");
            last_said = std::time::Instant::now();
        }
    })
    .map_err(|e| e.to_string())?;
    let key = match config.citizen_hash_key {
        Some(_) => "the [citizens] hash_key_file this check used".to_string(),
        None => format!(
            "a copy (mode 0600) of {}",
            data_dir
                .join(crate::store::key_file::KEY_FILE_NAME)
                .display()
        ),
    };
    crate::say!(
        "prenota migrate: {copied} records copied and committed in {:.1} s. Give every node \
         [store] backend = \"postgres\" with this postgres_url, and [citizens] hash_key_file = \
         {key}",
        started.elapsed().as_secs_f64(),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shed_call_is_explained_as_not_applied_and_worth_sending_again() {
        let shed = Status::from(crate::service::ServiceError::Shed);
        let text = explain(&shed);
        assert!(text.contains("UNAVAILABLE, OVERLOADED"), "{text}");
        assert!(
            text.contains("nothing was applied: send it again"),
            "{text}"
        );
        let refused = Status::from(crate::service::ServiceError::Recovering);
        let other = explain(&refused);
        assert!(
            other.starts_with("the server refused it (UNAVAILABLE, RECOVERING)"),
            "{other}"
        );
        assert!(!other.contains("send it again"), "{other}");
    }

    /// A failed store is no refusal of what was sent (an outside test read an import
    /// answered so as "the server refused the file", with part of it written).
    #[test]
    fn a_failed_store_is_explained_as_such_and_to_send_again_after_a_restart() {
        use crate::store::error::StoreError;
        for error in [StoreError::Failed, StoreError::Io("disk full".into())] {
            let text = explain(&Status::from(crate::service::ServiceError::Store(error)));
            assert!(
                text.starts_with("the server's storage failed (UNAVAILABLE, STORAGE_FAILED)"),
                "{text}"
            );
            assert!(
                text.ends_with("(once the server is restarted, send it again)"),
                "{text}"
            );
            assert!(!text.contains("disk full"), "{text}");
            assert!(!text.contains("request_id"), "{text}");
        }
    }

    /// A timeout, a broken connection or a proxy's answer carries no reason: nobody can
    /// say whether the write was applied (it used to read "the server refused it").
    #[test]
    fn a_status_without_a_reason_is_an_unknown_outcome_not_a_refusal() {
        for status in [
            Status::cancelled("Timeout expired"),
            Status::unavailable("down"),
        ] {
            let text = explain(&status);
            assert!(
                text.starts_with("no clear answer from the server"),
                "{text}"
            );
            assert!(text.contains("outcome is unknown") && text.contains(status.message()));
        }
        let read = explain_read(&Status::unavailable("down"));
        assert!(
            read.starts_with("no clear answer from the server (UNAVAILABLE): down")
                && read.ends_with("what it wrote so far is incomplete: run it again"),
            "{read}"
        );
        let denied = explain(&Status::permission_denied("not yours"));
        assert!(
            denied.starts_with("the server refused it (PERMISSION_DENIED)"),
            "{denied}"
        );
    }
}

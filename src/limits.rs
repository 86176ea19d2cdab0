//! Every limit and tunable of prenota in one struct, with units in the names, its
//! defaults, and the checks they must pass (at compile time for the defaults, at start-up
//! for a file's).
//!
//! A leaf: imports nothing of the crate, so every layer can read the numbers it needs.

use serde::{Deserialize, Serialize};

/// Capacity and taken places are 21 bits each of the slot counter's one 64-bit atomic
/// word (`domain::slot_counter::COUNTER_FIELD_MAX`; `config` asserts they agree).
pub const CAPACITY_PER_SLOT_CEILING: u32 = (1 << 21) - 1;

/// The longest display text (a name, a reason) a stored record may hold: recovery and
/// event reads refuse longer ones as corrupt, so no limit may let a request write one.
pub const STORED_TEXT_LENGTH_MAX: usize = 16_384;

/// The longest display text a limit may let a request write (a site's name, a closure's
/// reason: up to 4 KB of UTF-8), and the longest id: every record stays within
/// `store::records::RECORD_BYTES_MAX` (a registration names up to 36 ids).
pub const WRITTEN_TEXT_LENGTH_MAX: usize = 1_000;
pub const ID_LENGTH_CEILING: usize = 80;

/// Room for a call's headers (hyper takes at most 16 KiB of them) and state beside its
/// largest message: `receiving_bytes_max` and `receiving_bytes_per_peer_max` hold at
/// least that.
pub const RECEIVING_HEADROOM_BYTES: usize = 64 * 1024;

/// A peer holds at most this fraction (1/N) of `health_receiving_bytes_max`.
pub const HEALTH_RECEIVING_PEER_SHARES: usize = 32;

/// The last 1/N of `receiving_bytes_max` (and of `health_receiving_bytes_max`) is kept
/// for the calls of light peers, those holding at most 1/[`RECEIVING_LIGHT_PEER_PARTS`]
/// of their peer's share (by default 512 KiB, about 80 calls whose replies are 1 KiB;
/// health: 16 KiB, two checks): peers holding more fill the rest, so a few hosts each
/// holding its share cannot shed everyone else (it takes 12 of them and 256 more holding
/// 512 KiB each, not 17). A reply that makes its light peer heavy is counted past the
/// rest, not in the reserve; the /64s of an IPv6 /48 count together, scaled to one
/// peer's share (`grpc::peers`). Only with per-peer shares (`receiving_bytes_per_peer_max`),
/// and at most what leaves a peer its whole share (`grpc::receiving`).
pub const RECEIVING_LIGHT_PEERS_RESERVE_PARTS: usize = 4;
pub const RECEIVING_LIGHT_PEER_PARTS: usize = 64;

/// Largest citizen assertion read (a JWS is a few hundred bytes).
pub const ASSERTION_BYTES_MAX: usize = 8 * 1024;
/// Largest citizen assertion remembered once verified (`citizen_assertions_remembered_max`
/// of them), and the most groups and dependants it may name: a larger one is verified at
/// each call, so each remembered one holds at most about 4 KiB in memory (its texts and
/// their allocations: under 300 MiB at the default 65,536).
pub const ASSERTION_REMEMBERED_BYTES_MAX: usize = 2 * 1024;
pub const ASSERTION_REMEMBERED_NAMES_MAX: usize = 32;
/// Future `iat` tolerated in a citizen assertion, for clocks that disagree a little.
pub const ASSERTION_CLOCK_SKEW_S: i64 = 60;
/// How long after its deadline a response stream's end may wait for its client's
/// window before its connection is closed (the only way to end a stream whose client
/// reads nothing): a reader drains one chunk well within it.
pub const STREAM_END_TAKEN_WITHIN: std::time::Duration = std::time::Duration::from_secs(1);

/// Upper bounds on everything a client can make the server hold, scan or write.
/// In `prenota.toml` under `[limits]`; a missing key keeps its default.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Length of site, region and service ids (characters of `[A-Za-z0-9_-]`).
    pub id_length_max: usize,
    /// Length of a client `request_id` (printable ASCII).
    pub request_id_length_max: usize,
    /// Length of a citizen id as the frontend sends it (printable ASCII, hashed at once).
    pub citizen_id_length_max: usize,
    /// Length of a site's display name (characters).
    pub site_name_length_max: usize,
    /// `page_size` used when a request gives none.
    pub page_size_default: u32,
    /// Largest `page_size` accepted.
    pub page_size_max: u32,
    /// Span of a search when the request gives no `to`.
    pub search_range_days_default: u32,
    /// Largest span `to - from` of one search.
    pub search_range_days_max: u32,
    /// Most slots one search visits (sold-out days are skipped without visiting their
    /// slots); past it the page ends early, with a `next_page_token` to go on from. Open
    /// data spends the same budget per (service, day) of a site it summarises.
    pub search_slots_scanned_max: usize,
    /// Largest span `last_day - first_day + 1` of one published schedule.
    pub publish_days_max: u32,
    /// Most slots one `PublishSchedule` may describe.
    pub publish_slots_max: usize,
    /// Latest day a published or imported schedule may reach, in days after today.
    pub schedule_days_ahead_max: u32,
    /// Most slots the sites of one region may hold (memory is per slot).
    pub slots_per_region_max: usize,
    /// Most opening-hours entries in one schedule.
    pub opening_hours_per_schedule_max: usize,
    /// Longest slot.
    pub slot_minutes_max: u32,
    /// Largest capacity of one slot.
    pub capacity_per_slot_max: u32,
    /// Active bookings one citizen may hold per service. Recovery refuses a store that
    /// holds more: lowered, it applies once the citizens' extra bookings have ended.
    pub max_active_per_citizen: u32,
    /// Most client writes folded into one group commit (one flush + fdatasync).
    pub commit_batch_writes_max: usize,
    /// Writes waiting for the committer before new ones are refused as overload.
    pub commit_queue_depth: usize,
    /// Bookings buffered between the store scan and a slow `ExportBookings` reader.
    pub export_channel_depth: usize,
    /// Exports (bookings, audit log, backups) streaming at once, over every token; the
    /// next one is refused with RESOURCE_EXHAUSTED / EXPORTS_IN_PROGRESS.
    pub exports_max: usize,
    /// `ImportCapacity` calls at once (they take their in-flight place from their
    /// headers, and wait for the authority lock one at a time): past it a new one is
    /// shed (UNAVAILABLE / OVERLOADED), so stalled imports hold at most this many places.
    pub imports_max: usize,
    /// Of them, those of one token, so one authority's stalled imports cannot shed
    /// every other region's. Like every `*_per_token_max`, only once tokens are
    /// configured (in open mode every caller is one: `config::per_token_share`).
    pub imports_per_token_max: usize,
    /// Exports one token may have streaming at once.
    pub exports_per_token_max: usize,
    /// Longest an export waits for its client to read before it stops (the stream then
    /// ends with DEADLINE_EXCEEDED / EXPORT_IDLE).
    pub export_idle_timeout_ms: u64,
    /// How long events (`WatchEvents`) are kept after they were written; older ones are
    /// deleted oldest first (the last one always stays) and a resume from before them
    /// answers EVENTS_PRUNED. 0 keeps them for good.
    pub events_retained_hours: u32,
    /// `WatchEvents` streams open at once (gateways); the next one is refused with
    /// RESOURCE_EXHAUSTED / WATCHERS_EXHAUSTED.
    pub event_streams_max: usize,
    /// `WatchEvents` streams one token may have open at once.
    pub event_streams_per_token_max: usize,
    /// Events one `WatchEvents` read takes from the store at once.
    pub events_page_max: usize,
    /// `OpenDataService` requests per second without a token (with `[server] open_data
    /// = true`), all anonymous callers together; beyond it RATE_LIMITED.
    pub open_data_anonymous_requests_per_s: u32,
    /// `WatchAvailability` streams open at once; the next one is refused with
    /// RESOURCE_EXHAUSTED / WATCHERS_EXHAUSTED.
    pub watch_subscribers_max: usize,
    /// Of them, those one token (one frontend) may hold, so one frontend cannot take the
    /// watches the others need; with a single frontend token, raise it to
    /// `watch_subscribers_max`.
    pub watch_subscribers_per_token_max: usize,
    /// How often slot changes go out to `WatchAvailability` streams: within one window a
    /// slot's latest state wins.
    pub watch_coalesce_ms: u64,
    /// Most slots one `WatchAvailability` may watch (its memory is bounded by its slots);
    /// a wider request is refused: narrow the range or pick a site.
    pub watch_slots_max: usize,
    /// Slots the snapshots of one token's new `WatchAvailability` streams may hold per
    /// second (all of them in a burst; each new watch is first sent every slot of its
    /// range), so one frontend opening and closing watches cannot spend the CPU the
    /// bookings need; past it RESOURCE_EXHAUSTED / RATE_LIMITED with the wait. 0: off;
    /// else at least `watch_slots_max`.
    pub watch_snapshot_slots_per_token_per_s: u32,
    /// Releases (`CreateRelease`) the server holds; the next one is refused with
    /// RESOURCE_EXHAUSTED / RELEASES_EXHAUSTED.
    pub releases_max: usize,
    /// Sites one `CreateRelease` may name (more: name their region).
    pub release_sites_max: usize,
    /// Tickets the queues of releases not ended hold together (memory is per ticket,
    /// about 100 bytes; an ended release's stay, uncounted, until retention); the next
    /// new ticket is refused with RESOURCE_EXHAUSTED / QUEUE_FULL.
    pub queue_tickets_max: usize,
    /// Most tickets one admission step admits (one group commit).
    pub queue_admissions_per_step_max: usize,
    /// How often queued releases are drawn, admitted and declared sold out: a waiting
    /// ticket turns SOLD_OUT within this of the last place going.
    pub release_step_interval_ms: u64,
    /// Citizens one `BookGroup` may book for (a household).
    pub group_size_max: usize,
    /// Most dose series (`UpsertSeries`) the server holds.
    pub series_max: usize,
    /// Most doses in one series.
    pub series_doses_max: usize,
    /// Campaigns (`UpsertCampaign`) the server holds; the next new one is refused with
    /// RESOURCE_EXHAUSTED / CAMPAIGNS_EXHAUSTED.
    pub campaigns_max: usize,
    /// Waves one campaign may have.
    pub campaign_waves_max: usize,
    /// Registrations all campaigns hold together (memory is per registration, about
    /// 300 bytes); the next `PreRegister` is refused with REGISTRATIONS_FULL.
    pub registrations_max: usize,
    /// Sites a registration's preferences may name (each is kept in memory and on disk
    /// with the registration, for every registration).
    pub registration_sites_max: usize,
    /// DeclineOffer/WithdrawRegistration requests a registration remembers (stored with
    /// it, for retries after a restart); the oldest go first.
    pub registration_requests_max: usize,
    /// Most offers one matching step makes per campaign (one group commit).
    pub campaign_offers_per_step_max: usize,
    /// Most waiting registrations one matching step looks at per campaign, in rank
    /// order (bounds the step's work under the campaign's lock).
    pub campaign_scan_per_step_max: usize,
    /// How often the matcher runs: a freed place is offered again within about this.
    pub campaign_step_interval_ms: u64,
    /// Check-in opens this long before a slot starts and closes this long after it ends.
    pub check_in_window_hours: u32,
    /// Wrong check-in codes in a row that lock a reference (`SiteService.CheckIn`).
    pub check_in_tries_max: u32,
    /// How long a reference's first lock refuses check-ins, even with the right code;
    /// each further lock lasts twice as long (5 tries, then 15, 30, 60 min...: about 40
    /// tries of 10,000 codes in a 49 h check-in window).
    pub check_in_lock_seconds: u64,
    /// Largest decoded gRPC request: at most 1 GiB, and 64 KiB less than
    /// `receiving_bytes_max` and `receiving_bytes_per_peer_max` (unless 0), which must
    /// hold one.
    pub message_size_bytes_max: usize,
    /// sled's page cache. sled treats it as a soft hint and its resident memory grows to a
    /// multiple of it under heavy writes, so it is set explicitly (sled's default: 1 GiB).
    pub store_cache_bytes: u64,
    /// Period of sled's background flusher. Acknowledgements never wait for it (the
    /// committer flushes and fdatasyncs every batch); it is there because it also cleans
    /// sled's log segments: without it, records deleted by retention are not reclaimed
    /// and the store file grows under churn (BENCHMARKS.md, hold churn).
    pub store_gc_interval_ms: u64,
    /// A hold's lifetime when the request gives none.
    pub hold_ttl_seconds_default: u32,
    /// Longest hold a client may ask for.
    pub hold_ttl_seconds_max: u32,
    /// At most max(1, ⌊capacity × this / 100⌋) places of a slot may be held at once;
    /// beyond it HoldSlot answers HOLD_LIMIT_REACHED (Book still works).
    pub held_share_of_capacity_max_percent: u32,
    /// How often the sweeper returns the places of expired holds. With
    /// `hold_sweep_batch_max`, at most batch × 1000 / interval expiries a second
    /// (default 20,000): many holds expiring at once come back in small, frequent
    /// batches (BENCHMARKS.md, "Many holds expiring at once").
    pub hold_sweep_interval_ms: u64,
    /// How long a finished request is remembered (a retry within it gets the first
    /// outcome; after it, it is a new request), in memory and on disk; 0 keeps for good
    /// (then `records_retained_days` must be 0 too: nothing is ever deleted).
    pub request_records_retained_hours: u32,
    /// How long after a slot ended its bookings, holds and the slot itself are kept
    /// (audit entries: this long after they were written); 0 keeps everything.
    pub records_retained_days: u32,
    /// How often retention runs a pass (in bounded batches, in the background).
    pub retention_interval_ms: u64,
    /// Records one retention step reads, and at most deletes in one group commit.
    pub retention_batch_records: usize,
    /// Longest a `CloseSlots` waits for bookings already admitted to its slots to be
    /// written (a stalled disk holds them up) before it reopens them and answers
    /// UNAVAILABLE / OVERLOADED, so the authority lock is never held without bound.
    pub close_settle_wait_ms: u64,
    /// Most holds one sweep expires (one durable write, sharing its group commit with
    /// the bookings of the moment: the larger, the longer they wait); the rest wait for
    /// the next tick.
    pub hold_sweep_batch_max: usize,
    /// Most rows in one `ImportCapacity` stream.
    pub import_rows_max: usize,
    /// Most slots one import may create or change in total.
    pub import_slots_max: usize,
    /// Most row errors reported for a refused import (the rest are counted).
    pub import_errors_reported_max: usize,
    /// Length of a closure's reason (characters), shown to citizens.
    pub close_reason_length_max: usize,
    /// Booking attempts (Book, HoldSlot, RescheduleBooking, JoinQueue) one citizen may make per
    /// minute, in a burst or spread out; 0 turns the limit off. A retry of a Book, hold
    /// or reschedule (its `request_id`) answered with the first outcome is no new attempt.
    pub rate_citizen_attempts_per_min: u32,
    /// Longest a citizen assertion may be valid: its `exp` at most this after its `iat`.
    pub citizen_assertion_lifetime_seconds_max: u32,
    /// Verified assertions remembered until they expire (one signature check per
    /// assertion, not per call); 0 verifies every call.
    pub citizen_assertions_remembered_max: usize,
    /// Reads of a citizen's bookings, queue ticket and registrations (GetBooking,
    /// ListCitizenBookings, GetBookingByReference, GetQueueTicket, GetRegistration) one
    /// citizen may make per minute, in a burst or spread out; 0 turns the limit off.
    pub rate_citizen_reads_per_min: u32,
    /// Requests one token may make per second (burst the same); 0 turns the limit off.
    pub rate_token_requests_per_s: u32,
    /// How often the per-citizen limiter forgets citizens who are back to a full quota.
    pub rate_limiter_retain_interval_ms: u64,
    /// Requests being served at once, over every connection; beyond it requests are
    /// refused at once with UNAVAILABLE / OVERLOADED (health checks are not counted).
    pub in_flight_requests_max: usize,
    /// HTTP/2 streams one connection may have open at once. A connection keeps h2's
    /// stream tables at their largest (about 1.1 KB a stream, counted in no budget)
    /// until it closes: about 350 KB a connection at 256, 1.4 GB at 4,096 connections.
    pub streams_per_connection_max: u32,
    /// Bytes one-message calls may hold in all until their reply is written (their
    /// headers, their state, their message as it arrives, their reply's message:
    /// `grpc::receiving`); past it a
    /// call is shed (UNAVAILABLE / OVERLOADED), so headers and half-sent messages hold
    /// about this much memory at most (the message is counted as sent: tonic's decoding
    /// copy and the decoded message come on top). Its last quarter is for light peers
    /// ([`RECEIVING_LIGHT_PEERS_RESERVE_PARTS`]).
    pub receiving_bytes_max: usize,
    /// Of them, what the calls of one peer (an IPv4 address, an IPv6 /64) may hold, so
    /// one host cannot take it all (a call holds ~5 KB and its message: the default
    /// lets one frontend have every `in_flight_requests_max` call at once); 0: off.
    pub receiving_bytes_per_peer_max: usize,
    /// Streams a client may reset before being answered, before the connection is
    /// closed (the "rapid reset" attack).
    pub pending_reset_streams_max: usize,
    /// Streams the server may reset for a client's protocol errors on one connection
    /// before it closes the connection with GOAWAY (the "made you reset" attack).
    pub local_reset_streams_max: usize,
    /// Largest decoded health or reflection request: they are tiny, and reachable
    /// without a token.
    pub probe_message_size_bytes_max: usize,
    /// Reflection streams open at once (their own pool: they never take a booking's
    /// place); past it a new one is answered UNAVAILABLE / OVERLOADED.
    pub reflection_streams_max: usize,
    /// Health `Watch` streams open at once (health `Check` is limited only by
    /// `health_receiving_bytes_max`).
    pub health_watches_max: usize,
    /// Bytes health checks may hold until answered (as `receiving_bytes_max` for the
    /// other calls, but a budget of their own: calls that fill one never shed the
    /// other's); a peer holds at most a 32nd of it (about 180 checks at once), unless
    /// `receiving_bytes_per_peer_max` is 0. A listed load balancer's own checks (v2
    /// `LOCAL`) and listed health checkers' (`[server] health_checks_from`) take as
    /// much again, apart, so others filling this never shed them.
    pub health_receiving_bytes_max: usize,
    /// Of them, those one peer (an IPv4 address, an IPv6 /64) may hold: health needs no
    /// token, so one host must not take the pool a load balancer's watches need; 0: off.
    pub health_watches_per_peer_max: usize,
    /// Connections open at once; past it a new connection is closed at accept.
    pub connections_max: usize,
    /// Connections one peer may have open at once (an IPv4 address, or an IPv6 /64: what
    /// one host is usually given), so one machine cannot take every place under
    /// `connections_max`; past it its new connection is closed at accept. Behind a
    /// load balancer, list it in `[server] proxy_protocol_from` so its connections count
    /// for their clients; behind a NAT or a balancer without the PROXY protocol, raise it
    /// or set 0 (off).
    pub connections_per_peer_max: usize,
    /// Connections the metrics port holds at once (it needs no token); past it a new
    /// one is closed at accept. A scraper needs one.
    pub metrics_connections_max: usize,
    /// Of them, those one peer (an IPv4 address, an IPv6 /64; every /64 of one /48
    /// together under `peer_shares_per_ipv6_48_max`) may hold, so one host holding its
    /// share round after round cannot keep the scraper out; 0: off.
    pub metrics_connections_per_peer_max: usize,
    /// A metrics connection is closed this long after it was accepted, whatever it is
    /// doing (a scraper connects again for its next scrape).
    pub metrics_connection_timeout_ms: u64,
    /// How many peers' caps every IPv6 /64 of one /48 may hold together, under each
    /// per-peer cap above (`connections_per_peer_max`, `receiving_bytes_per_peer_max`,
    /// `health_watches_per_peer_max`): a /48 holds 65,536 /64s, and whoever holds one
    /// (a site's usual allocation, cheap from some hosts) would otherwise get a peer's
    /// cap for each. The price: the /48's other /64s (a cloud's other tenants, a mobile
    /// network's subscribers) share what it holds. 0: no cap per /48.
    pub peer_shares_per_ipv6_48_max: usize,
    /// Age at which a connection is asked to go away (GOAWAY; clients reconnect), so no
    /// connection, idle or not, is held for ever.
    pub connection_age_max_ms: u64,
    /// How long a connection past its age may finish its streams before it is closed.
    pub connection_age_grace_ms: u64,
    /// After SIGTERM, how long the server keeps accepting and serving with health
    /// NOT_SERVING before it stops accepting and drains, so balancers that watch health
    /// move clients off first (Kubernetes: a few seconds, inside the pod's
    /// `terminationGracePeriodSeconds`); 0: stop accepting at once.
    pub shutdown_drain_delay_ms: u64,
    /// Interval of HTTP/2 keepalive pings; a peer that does not answer one within
    /// `keepalive_timeout_ms` is disconnected.
    pub keepalive_interval_ms: u64,
    pub keepalive_timeout_ms: u64,
    /// Longest a new connection may stay silent before its first bytes (the HTTP/2
    /// preface or a TLS hello) before it is closed.
    pub connection_opening_timeout_ms: u64,
    /// Longest a TLS handshake may take before the connection is closed.
    pub tls_handshake_timeout_ms: u64,
    /// Longest a call may take to be answered (a shorter `grpc-timeout` wins): past it
    /// the call is answered DEADLINE_EXCEEDED (`grpc::deadline`). Not a stream's length.
    pub request_timeout_ms: u64,
    /// Longest a one-message call's message may take to arrive after its headers (a
    /// stalled one then holds what it reserved no longer: `grpc::receiving`); past it
    /// DEADLINE_EXCEEDED. 10 s takes a 4 MiB message at 3.4 Mbit/s.
    pub message_receive_timeout_ms: u64,
    /// Longest a one-message call's reply may wait to be written (a client that grants
    /// no window or reads nothing: the reply holds its share until then) before its
    /// connection is closed, every call on it with it (`grpc::connections`); 0 never.
    /// Behind a proxy that shares one connection among clients, a proxy buffer smaller
    /// than a reply lets one slow client stall it.
    pub reply_write_timeout_ms: u64,
    /// How often the gauges (per site, live holds, store size) are refreshed.
    pub metrics_refresh_interval_ms: u64,
    /// Sites with their own gauges (in site-id order); bounds the metrics' label set.
    pub metrics_site_gauges_max: usize,
    /// Group commits an online backup may fall behind by while it scans the store; past
    /// it the backup fails (and serving goes on untouched).
    pub backup_changes_buffered_max: usize,
    /// Bytes of those group commits an online backup may buffer; past it the backup
    /// fails the same way.
    pub backup_changes_buffered_bytes_max: usize,
    /// How long start-up waits for the data dir's lock (`DATA_DIR/lock`, held by a
    /// previous process), then for sled's own lock (sled's I/O threads of a just-closed
    /// store may hold it a moment longer), before refusing: each wait up to this long.
    pub data_dir_lock_wait_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        DEFAULT_LIMITS.clone()
    }
}

/// The defaults, as a constant so the checks below run at compile time.
pub const DEFAULT_LIMITS: Limits = Limits {
    id_length_max: 64,
    request_id_length_max: 128,
    citizen_id_length_max: 128,
    site_name_length_max: 200,
    page_size_default: 50,
    page_size_max: 500,
    search_range_days_default: 31,
    search_range_days_max: 366,
    search_slots_scanned_max: 10_000,
    publish_days_max: 366,
    publish_slots_max: 100_000,
    schedule_days_ahead_max: 731,
    slots_per_region_max: 5_000_000,
    opening_hours_per_schedule_max: 64,
    slot_minutes_max: 1_440,
    capacity_per_slot_max: 10_000,
    max_active_per_citizen: 1,
    commit_batch_writes_max: 4_096,
    commit_queue_depth: 65_536,
    export_channel_depth: 256,
    exports_max: 8,
    imports_max: 4,
    imports_per_token_max: 2,
    exports_per_token_max: 2,
    export_idle_timeout_ms: 30_000,
    events_retained_hours: 168,
    event_streams_max: 64,
    event_streams_per_token_max: 8,
    events_page_max: 512,
    open_data_anonymous_requests_per_s: 20,
    watch_subscribers_max: 10_000,
    watch_subscribers_per_token_max: 5_000,
    watch_coalesce_ms: 200,
    watch_slots_max: 5_000,
    watch_snapshot_slots_per_token_per_s: 50_000,
    releases_max: 1_000,
    release_sites_max: 1_000,
    queue_tickets_max: 5_000_000,
    queue_admissions_per_step_max: 2_000,
    release_step_interval_ms: 200,
    group_size_max: 6,
    series_max: 1_000,
    series_doses_max: 6,
    campaigns_max: 100,
    campaign_waves_max: 64,
    registrations_max: 2_000_000,
    registration_sites_max: 20,
    registration_requests_max: 16,
    campaign_offers_per_step_max: 2_000,
    campaign_scan_per_step_max: 1_000_000,
    campaign_step_interval_ms: 200,
    check_in_window_hours: 24,
    check_in_tries_max: 5,
    check_in_lock_seconds: 900,
    message_size_bytes_max: 4 * 1024 * 1024,
    hold_ttl_seconds_default: 300,
    hold_ttl_seconds_max: 600,
    held_share_of_capacity_max_percent: 50,
    hold_sweep_interval_ms: 25,
    request_records_retained_hours: 72,
    records_retained_days: 400,
    retention_interval_ms: 3_600_000,
    retention_batch_records: 1_000,
    close_settle_wait_ms: 10_000,
    hold_sweep_batch_max: 500,
    import_rows_max: 200_000,
    import_slots_max: 2_000_000,
    import_errors_reported_max: 100,
    close_reason_length_max: 200,
    rate_citizen_attempts_per_min: 120,
    rate_citizen_reads_per_min: 60,
    citizen_assertion_lifetime_seconds_max: 900,
    citizen_assertions_remembered_max: 65_536,
    rate_token_requests_per_s: 0,
    rate_limiter_retain_interval_ms: 10_000,
    in_flight_requests_max: 4_096,
    streams_per_connection_max: 256,
    receiving_bytes_max: 512 * 1024 * 1024,
    receiving_bytes_per_peer_max: 32 * 1024 * 1024,
    pending_reset_streams_max: 64,
    local_reset_streams_max: 128,
    probe_message_size_bytes_max: 16 * 1024,
    reflection_streams_max: 16,
    health_watches_max: 64,
    health_receiving_bytes_max: 32 * 1024 * 1024,
    health_watches_per_peer_max: 8,
    connections_max: 4_096,
    connections_per_peer_max: 256,
    metrics_connections_max: 16,
    metrics_connections_per_peer_max: 4,
    metrics_connection_timeout_ms: 10_000,
    peer_shares_per_ipv6_48_max: 8,
    connection_age_max_ms: 30 * 60 * 1_000,
    connection_age_grace_ms: 5 * 60 * 1_000,
    shutdown_drain_delay_ms: 0,
    keepalive_interval_ms: 60_000,
    keepalive_timeout_ms: 20_000,
    tls_handshake_timeout_ms: 10_000,
    connection_opening_timeout_ms: 10_000,
    request_timeout_ms: 30_000,
    message_receive_timeout_ms: 10_000,
    reply_write_timeout_ms: 30_000,
    metrics_refresh_interval_ms: 5_000,
    metrics_site_gauges_max: 10_000,
    backup_changes_buffered_max: 65_536,
    backup_changes_buffered_bytes_max: 256 * 1024 * 1024,
    data_dir_lock_wait_ms: 5_000,
    store_cache_bytes: 1024 * 1024 * 1024,
    store_gc_interval_ms: 500,
};

const _: () = {
    let l = &DEFAULT_LIMITS;
    assert!(l.page_size_default >= 1 && l.page_size_default <= l.page_size_max);
    assert!(l.search_range_days_default <= l.search_range_days_max);
    assert!(l.search_slots_scanned_max as u64 > l.page_size_max as u64);
    assert!(l.max_active_per_citizen >= 1);
    assert!(
        l.health_receiving_bytes_max / HEALTH_RECEIVING_PEER_SHARES
            >= l.probe_message_size_bytes_max + RECEIVING_HEADROOM_BYTES
    );
    assert!(l.receiving_bytes_per_peer_max >= l.message_size_bytes_max + RECEIVING_HEADROOM_BYTES);
    assert!(l.receiving_bytes_max >= l.receiving_bytes_per_peer_max);
    assert!(l.commit_batch_writes_max >= 1 && l.commit_batch_writes_max <= l.commit_queue_depth);
    // Capacity and taken places are 21 bits each of the slot counter's word.
    assert!(l.capacity_per_slot_max <= CAPACITY_PER_SLOT_CEILING);
    assert!(
        l.hold_ttl_seconds_default >= 1 && l.hold_ttl_seconds_default <= l.hold_ttl_seconds_max
    );
    assert!(l.hold_sweep_batch_max >= 1 && l.import_errors_reported_max >= 1);
    assert!(l.slot_minutes_max <= 24 * 60);
    assert!(l.export_channel_depth >= 1);
    assert!(l.exports_max >= 1 && l.exports_per_token_max >= 1);
    assert!(l.imports_max >= 1 && l.imports_per_token_max >= 1);
    assert!(l.export_idle_timeout_ms >= 100);
    assert!(l.event_streams_max >= 1 && l.events_page_max >= 1);
    assert!(l.event_streams_per_token_max >= 1);
    assert!(l.close_reason_length_max <= WRITTEN_TEXT_LENGTH_MAX);
    assert!(l.site_name_length_max <= WRITTEN_TEXT_LENGTH_MAX);
    assert!(l.id_length_max <= ID_LENGTH_CEILING);
    assert!(l.watch_subscribers_max >= 1 && l.watch_slots_max >= 1);
    assert!(l.watch_coalesce_ms >= 10);
    assert!(l.releases_max >= 1 && l.queue_tickets_max >= 1 && l.release_sites_max >= 1);
    assert!(l.queue_admissions_per_step_max >= 1);
    assert!(l.group_size_max >= 1 && l.group_size_max <= 64);
    assert!(l.series_max >= 1 && l.series_doses_max >= 1 && l.series_doses_max <= 32);
    assert!(l.campaigns_max >= 1 && l.campaign_waves_max >= 1 && l.registrations_max >= 1);
    assert!(l.registration_sites_max >= 1);
    assert!(l.registration_requests_max >= 1 && l.registration_requests_max <= 64);
    assert!(l.campaign_offers_per_step_max >= 1 && l.campaign_scan_per_step_max >= 1);
    assert!(l.campaign_step_interval_ms >= 10 && l.campaign_step_interval_ms <= 1_000);
    assert!(l.check_in_tries_max >= 1 && l.check_in_tries_max <= 100);
    assert!(l.check_in_window_hours <= 24 * 366);
    assert!(l.release_step_interval_ms >= 10 && l.release_step_interval_ms <= 1_000);
    assert!(l.metrics_refresh_interval_ms >= 100 && l.backup_changes_buffered_max >= 1);
    assert!(l.retention_interval_ms >= 100 && l.retention_batch_records >= 1);
    assert!(l.store_gc_interval_ms >= 10);
    assert!(l.local_reset_streams_max >= 1 && l.connections_max >= 1);
    assert!(l.probe_message_size_bytes_max >= 1024 && l.connection_age_max_ms >= 1_000);
};

impl Limits {
    /// The checks of the defaults above, for limits read from a file: every problem.
    /// One flat list of checks, one per limit: long, but read at a glance.
    pub fn problems(&self) -> Vec<String> {
        let l = self;
        let mut problems = Vec::new();
        let mut need = |ok: bool, what: &str| {
            if !ok {
                problems.push(format!("limits: {what}"));
            }
        };
        need(
            (1..=ID_LENGTH_CEILING).contains(&l.id_length_max),
            "id_length_max must be between 1 and 80 (records stay within 6 KiB)",
        );
        need(
            (1..=WRITTEN_TEXT_LENGTH_MAX).contains(&l.site_name_length_max),
            "site_name_length_max must be between 1 and 1000 (records stay within 6 KiB)",
        );
        need(
            l.request_id_length_max >= 1 && l.citizen_id_length_max >= 1,
            "request_id_length_max and citizen_id_length_max must be at least 1",
        );
        need(
            l.page_size_default >= 1 && l.page_size_default <= l.page_size_max,
            "page_size_default must be between 1 and page_size_max",
        );
        need(
            l.search_range_days_default >= 1
                && l.search_range_days_default <= l.search_range_days_max,
            "search_range_days_default must be between 1 and search_range_days_max",
        );
        need(
            l.search_slots_scanned_max as u64 > u64::from(l.page_size_max),
            "search_slots_scanned_max must be above page_size_max",
        );
        need(
            l.publish_days_max >= 1,
            "publish_days_max must be at least 1",
        );
        need(
            l.schedule_days_ahead_max >= 1 && l.slots_per_region_max >= 1,
            "schedule_days_ahead_max and slots_per_region_max must be at least 1",
        );
        need(
            l.publish_slots_max >= 1,
            "publish_slots_max must be at least 1",
        );
        need(
            l.slot_minutes_max >= 1 && l.slot_minutes_max <= 24 * 60,
            "slot_minutes_max must be between 1 and 1440",
        );
        need(
            l.capacity_per_slot_max >= 1 && l.capacity_per_slot_max <= CAPACITY_PER_SLOT_CEILING,
            "capacity_per_slot_max must be between 1 and 2097151 (21 bits)",
        );
        need(
            l.max_active_per_citizen >= 1,
            "max_active_per_citizen must be at least 1",
        );
        need(
            l.commit_batch_writes_max >= 1 && l.commit_batch_writes_max <= l.commit_queue_depth,
            "commit_batch_writes_max must be between 1 and commit_queue_depth",
        );
        need(
            l.export_channel_depth >= 1,
            "export_channel_depth must be at least 1",
        );
        need(
            l.exports_max >= 1
                && l.exports_per_token_max >= 1
                && l.imports_max >= 1
                && l.imports_per_token_max >= 1,
            "exports_max, exports_per_token_max, imports_max and imports_per_token_max must \
             be at least 1",
        );
        need(
            l.export_idle_timeout_ms >= 100,
            "export_idle_timeout_ms must be at least 100",
        );
        need(
            l.event_streams_max >= 1
                && l.event_streams_per_token_max >= 1
                && l.events_page_max >= 1,
            "event_streams_max, event_streams_per_token_max and events_page_max must be at \
             least 1",
        );
        need(
            l.watch_subscribers_max >= 1
                && l.watch_subscribers_per_token_max >= 1
                && l.watch_slots_max >= 1,
            "watch_subscribers_max, watch_subscribers_per_token_max and watch_slots_max must be \
             at least 1",
        );
        need(
            l.watch_snapshot_slots_per_token_per_s == 0
                || l.watch_snapshot_slots_per_token_per_s as usize >= l.watch_slots_max,
            "watch_snapshot_slots_per_token_per_s must be 0 (off) or at least watch_slots_max",
        );
        need(
            l.watch_coalesce_ms >= 10,
            "watch_coalesce_ms must be at least 10",
        );
        need(
            l.releases_max >= 1
                && l.release_sites_max >= 1
                && l.queue_tickets_max >= 1
                && l.queue_admissions_per_step_max >= 1,
            "releases_max, release_sites_max, queue_tickets_max and \
             queue_admissions_per_step_max must be at least 1",
        );
        need(
            (1..=64).contains(&l.group_size_max),
            "group_size_max must be between 1 and 64",
        );
        need(
            l.campaigns_max >= 1
                && l.campaign_waves_max >= 1
                && l.registrations_max >= 1
                && l.campaign_offers_per_step_max >= 1
                && l.campaign_scan_per_step_max >= 1,
            "campaigns_max, campaign_waves_max, registrations_max, \
             campaign_offers_per_step_max and campaign_scan_per_step_max must be at least 1",
        );
        need(
            (1..=20).contains(&l.registration_sites_max),
            "registration_sites_max must be between 1 and 20 (kept in the registration's record)",
        );
        need(
            (1..=64).contains(&l.registration_requests_max),
            "registration_requests_max must be between 1 and 64 (kept in the registration's record)",
        );
        need(
            l.campaign_step_interval_ms >= 10 && l.campaign_step_interval_ms <= 1_000,
            "campaign_step_interval_ms must be between 10 and 1000 (a freed place is offered \
             within it)",
        );
        need(
            l.series_max >= 1 && (1..=32).contains(&l.series_doses_max),
            "series_max must be at least 1 and series_doses_max between 1 and 32",
        );
        need(
            l.check_in_window_hours <= 24 * 366
                && (l.records_retained_days == 0
                    || u64::from(l.check_in_window_hours)
                        < u64::from(l.records_retained_days) * 24),
            "check_in_window_hours must be at most a year and less than records_retained_days \
             (retention deletes the bookings of older slots)",
        );
        need(
            (1..=100).contains(&l.check_in_tries_max),
            "check_in_tries_max must be between 1 and 100 (of 10,000 codes)",
        );
        need(
            l.release_step_interval_ms >= 10 && l.release_step_interval_ms <= 1_000,
            "release_step_interval_ms must be between 10 and 1000 (a sold-out queue is told \
             within it)",
        );
        need(
            l.metrics_refresh_interval_ms >= 100,
            "metrics_refresh_interval_ms must be at least 100",
        );
        need(
            l.backup_changes_buffered_bytes_max >= 1024 * 1024,
            "backup_changes_buffered_bytes_max must be at least 1048576",
        );
        need(
            (64 * 1024..=1 << 30).contains(&l.message_size_bytes_max),
            "message_size_bytes_max must be between 65536 and 1073741824",
        );
        need(
            l.hold_ttl_seconds_default >= 1 && l.hold_ttl_seconds_default <= l.hold_ttl_seconds_max,
            "hold_ttl_seconds_default must be between 1 and hold_ttl_seconds_max",
        );
        need(
            l.records_retained_days == 0
                || (l.request_records_retained_hours != 0
                    && u64::from(l.records_retained_days) * 24
                        >= u64::from(l.request_records_retained_hours)),
            "records_retained_days must cover request_records_retained_hours (a retried \
             request must find its record); request_records_retained_hours = 0 (kept for \
             good) needs records_retained_days = 0: else set it to at most \
             records_retained_days × 24",
        );
        need(
            l.store_gc_interval_ms >= 10,
            "store_gc_interval_ms must be at least 10",
        );
        need(
            l.retention_interval_ms >= 100 && l.retention_batch_records >= 1,
            "retention_interval_ms must be at least 100 and retention_batch_records at least 1",
        );
        need(
            l.held_share_of_capacity_max_percent >= 1
                && l.held_share_of_capacity_max_percent <= 100,
            "held_share_of_capacity_max_percent must be between 1 and 100",
        );
        need(
            l.citizen_assertion_lifetime_seconds_max >= 1,
            "citizen_assertion_lifetime_seconds_max must be at least 1",
        );
        need(
            l.close_settle_wait_ms >= 10,
            "close_settle_wait_ms must be at least 10",
        );
        need(
            l.hold_sweep_batch_max >= 1 && l.import_errors_reported_max >= 1,
            "hold_sweep_batch_max and import_errors_reported_max must be at least 1",
        );
        need(
            l.import_rows_max >= 1 && l.import_slots_max >= 1,
            "import_rows_max and import_slots_max must be at least 1",
        );
        need(
            (1..=WRITTEN_TEXT_LENGTH_MAX).contains(&l.close_reason_length_max),
            "close_reason_length_max must be between 1 and 1000 (records stay within 6 KiB)",
        );
        need(
            l.rate_limiter_retain_interval_ms >= 100,
            "rate_limiter_retain_interval_ms must be at least 100",
        );
        need(
            l.local_reset_streams_max >= 1 && l.connections_max >= 1,
            "local_reset_streams_max and connections_max must be at least 1",
        );
        need(
            (1..=1_024).contains(&l.metrics_connections_max)
                && l.metrics_connection_timeout_ms >= 100,
            "metrics_connections_max must be 1 to 1024, metrics_connection_timeout_ms at least 100",
        );
        need(
            l.reflection_streams_max >= 1 && l.health_watches_max >= 1,
            "reflection_streams_max and health_watches_max must be at least 1",
        );
        need(
            l.probe_message_size_bytes_max >= 1024,
            "probe_message_size_bytes_max must be at least 1024",
        );
        need(
            l.connection_age_max_ms >= 1_000
                && l.keepalive_interval_ms >= 1_000
                && l.keepalive_timeout_ms >= 1_000
                && l.tls_handshake_timeout_ms >= 100
                && l.connection_opening_timeout_ms >= 100,
            "connection_age_max_ms, keepalive_interval_ms and keepalive_timeout_ms must be at \
             least 1000, tls_handshake_timeout_ms and connection_opening_timeout_ms at least 100",
        );
        need(
            l.in_flight_requests_max >= 1 && l.streams_per_connection_max >= 1,
            "in_flight_requests_max and streams_per_connection_max must be at least 1",
        );
        need(
            l.request_timeout_ms >= 100
                && (100..=l.request_timeout_ms).contains(&l.message_receive_timeout_ms),
            "request_timeout_ms must be at least 100, message_receive_timeout_ms between 100 \
             and request_timeout_ms",
        );
        need(
            l.reply_write_timeout_ms == 0 || (100..=3_600_000).contains(&l.reply_write_timeout_ms),
            "reply_write_timeout_ms must be 0 (never) or 100 to 3600000 (an hour)",
        );
        // A call of the largest message (and the largest header list) must fit.
        let largest_call = l
            .message_size_bytes_max
            .saturating_add(RECEIVING_HEADROOM_BYTES);
        need(
            l.receiving_bytes_max >= largest_call
                && (l.receiving_bytes_per_peer_max == 0
                    || l.receiving_bytes_per_peer_max >= largest_call),
            "receiving_bytes_max and receiving_bytes_per_peer_max (unless 0) must be at least \
             message_size_bytes_max + 65536",
        );
        let largest_probe = l
            .probe_message_size_bytes_max
            .saturating_add(RECEIVING_HEADROOM_BYTES);
        need(
            l.health_receiving_bytes_max / HEALTH_RECEIVING_PEER_SHARES >= largest_probe,
            "health_receiving_bytes_max must be at least 32 × (probe_message_size_bytes_max + \
             65536)",
        );
        Self::edge_problems(l, &mut need);
        problems
    }

    /// The upper bounds (and the floors below which a protection is silently off):
    /// past them a value panics (a semaphore, sled's cache, a buffer reserved whole) or
    /// defeats what its key is for (a timeout of a day). One flat list again: long, but
    /// read at a glance.
    fn edge_problems(l: &Limits, need: &mut impl FnMut(bool, &str)) {
        need(
            (1..=4 * 1024 * 1024).contains(&l.backup_changes_buffered_max),
            "backup_changes_buffered_max must be between 1 and 4194304 (reserved whole by \
             each backup)",
        );
        need(
            (10..=1_000).contains(&l.hold_sweep_interval_ms),
            "hold_sweep_interval_ms must be between 10 and 1000 (an expired hold's place comes \
             back within it)",
        );
        need(
            (1..=86_400).contains(&l.check_in_lock_seconds),
            "check_in_lock_seconds must be between 1 and 86400 (0 would never lock a \
             reference against guessed codes)",
        );
        need(
            (1..=1_024).contains(&l.pending_reset_streams_max),
            "pending_reset_streams_max must be between 1 and 1024 (0 ends a connection at its \
             first cancelled call; more lets rapid resets through)",
        );
        need(
            l.store_cache_bytes >= 1024 * 1024,
            "store_cache_bytes must be at least 1048576",
        );
        need(
            (7..=1_000).contains(&l.opening_hours_per_schedule_max),
            "opening_hours_per_schedule_max must be between 7 (one interval a weekday) and 1000",
        );
        need(
            l.open_data_anonymous_requests_per_s >= 1,
            "open_data_anonymous_requests_per_s must be at least 1",
        );
        need(
            l.search_range_days_max <= 3_660,
            "search_range_days_max must be at most 3660 (ten years)",
        );
        let counts = [
            l.in_flight_requests_max,
            l.reflection_streams_max,
            l.health_watches_max,
            l.commit_queue_depth,
            l.export_channel_depth,
            l.connections_max,
        ];
        need(
            counts.iter().all(|&count| count as u64 <= 1 << 32),
            "in_flight_requests_max, reflection_streams_max, health_watches_max, \
             commit_queue_depth, export_channel_depth and connections_max must be at most \
             4294967296",
        );
        let timeouts = [
            l.request_timeout_ms,
            l.export_idle_timeout_ms,
            l.metrics_connection_timeout_ms,
            l.connection_opening_timeout_ms,
            l.tls_handshake_timeout_ms,
            l.keepalive_timeout_ms,
            l.close_settle_wait_ms,
            l.rate_limiter_retain_interval_ms,
            l.watch_coalesce_ms,
            l.store_gc_interval_ms,
            l.keepalive_interval_ms,
            l.data_dir_lock_wait_ms,
            l.metrics_refresh_interval_ms,
        ];
        need(
            timeouts.iter().all(|&ms| ms <= 3_600_000),
            "request_timeout_ms, export_idle_timeout_ms, metrics_connection_timeout_ms, \
             connection_opening_timeout_ms, tls_handshake_timeout_ms, keepalive_timeout_ms, \
             close_settle_wait_ms, rate_limiter_retain_interval_ms, watch_coalesce_ms, \
             store_gc_interval_ms, keepalive_interval_ms, data_dir_lock_wait_ms and \
             metrics_refresh_interval_ms must be at most 3600000 (an hour)",
        );
        need(
            l.shutdown_drain_delay_ms <= 300_000,
            "shutdown_drain_delay_ms must be at most 300000 (five minutes)",
        );
        need(
            l.retention_interval_ms <= 86_400_000
                && l.connection_age_max_ms <= 86_400_000
                && l.connection_age_grace_ms >= 1_000,
            "retention_interval_ms and connection_age_max_ms must be at most 86400000 (a day), \
             connection_age_grace_ms at least 1000",
        );
        need(
            l.citizen_assertion_lifetime_seconds_max <= 86_400,
            "citizen_assertion_lifetime_seconds_max must be at most 86400 (a day)",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ids and texts a request may write are capped so every record stays within
    /// `store::records::RECORD_BYTES_MAX` (no sled blob file, which sled never syncs).
    #[test]
    fn limits_that_would_let_a_record_pass_6_kib_are_refused() {
        let limits = Limits {
            id_length_max: ID_LENGTH_CEILING + 1,
            site_name_length_max: WRITTEN_TEXT_LENGTH_MAX + 1,
            close_reason_length_max: WRITTEN_TEXT_LENGTH_MAX + 1,
            registration_requests_max: 65,
            registration_sites_max: 21,
            ..Limits::default()
        };
        let problems = limits.problems();
        for name in [
            "id_length_max",
            "site_name_length_max",
            "close_reason_length_max",
            "registration_requests_max",
            "registration_sites_max",
        ] {
            assert!(
                problems.iter().any(|p| p.contains(name)),
                "{name} not refused: {problems:?}"
            );
        }
        assert!(Limits::default().problems().is_empty());
    }

    /// Values `config check` accepted that panicked (a semaphore past tokio's permits,
    /// sled's cache under 256 bytes, a backup's buffer reserved whole) or silently
    /// switched a protection off.
    #[test]
    fn limits_at_the_edges_are_refused() {
        type Edge = (&'static str, fn(&mut Limits));
        let edges: [Edge; 15] = [
            ("backup_changes_buffered_max", |l| {
                l.backup_changes_buffered_max = 100_000_000
            }),
            ("hold_sweep_interval_ms", |l| {
                l.hold_sweep_interval_ms = 3_600_000
            }),
            ("check_in_lock_seconds", |l| l.check_in_lock_seconds = 0),
            ("pending_reset_streams_max", |l| {
                l.pending_reset_streams_max = 0
            }),
            ("store_cache_bytes", |l| l.store_cache_bytes = 255),
            ("opening_hours_per_schedule_max", |l| {
                l.opening_hours_per_schedule_max = 0
            }),
            ("open_data_anonymous_requests_per_s", |l| {
                l.open_data_anonymous_requests_per_s = 0
            }),
            ("search_range_days_max", |l| {
                l.search_range_days_max = 100_000_000
            }),
            ("commit_queue_depth", |l| l.commit_queue_depth = 1 << 62),
            ("export_idle_timeout_ms", |l| {
                l.export_idle_timeout_ms = u64::MAX / 2
            }),
            ("connection_age_grace_ms", |l| l.connection_age_grace_ms = 0),
            ("reply_write_timeout_ms", |l| l.reply_write_timeout_ms = 99),
            ("shutdown_drain_delay_ms", |l| {
                l.shutdown_drain_delay_ms = 300_001
            }),
            ("citizen_assertion_lifetime_seconds_max", |l| {
                l.citizen_assertion_lifetime_seconds_max = u32::MAX
            }),
            ("request_records_retained_hours", |l| {
                l.request_records_retained_hours = 0
            }),
        ];
        for (name, set) in edges {
            let mut limits = Limits::default();
            set(&mut limits);
            let problems = limits.problems();
            assert!(
                problems.iter().any(|p| p.contains(name)),
                "{name} not refused: {problems:?}"
            );
        }
        let kept_for_good = Limits {
            request_records_retained_hours: 0,
            records_retained_days: 0,
            ..Limits::default()
        };
        assert!(kept_for_good.problems().is_empty());
    }
}

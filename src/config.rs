//! Every limit and tunable of prenota in one place, with units in the names.
//!
//! Must not import tonic or sled: each layer reads the numbers it needs from here.

/// Upper bounds on everything a client can make the server hold, scan or write.
#[derive(Clone, Debug, PartialEq, Eq)]
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
    /// Largest span `last_day - first_day + 1` of one published schedule.
    pub publish_days_max: u32,
    /// Most slots one `PublishSchedule` may describe.
    pub publish_slots_max: usize,
    /// Most opening-hours entries in one schedule.
    pub opening_hours_per_schedule_max: usize,
    /// Longest slot.
    pub slot_minutes_max: u32,
    /// Largest capacity of one slot.
    pub capacity_per_slot_max: u32,
    /// Active bookings one citizen may hold per service.
    pub max_active_per_citizen: u32,
    /// Most client writes folded into one group commit (one flush + fdatasync).
    pub commit_batch_writes_max: usize,
    /// Writes waiting for the committer before new ones are refused as overload.
    pub commit_queue_depth: usize,
    /// Bookings buffered between the store scan and a slow `ExportBookings` reader.
    pub export_channel_depth: usize,
    /// Largest decoded gRPC request.
    pub message_size_bytes_max: usize,
    /// sled's page cache. sled treats it as a soft hint and its resident memory grows to a
    /// multiple of it under heavy writes, so it is set explicitly (sled's default: 1 GiB).
    pub store_cache_bytes: u64,
    /// A hold's lifetime when the request gives none.
    pub hold_ttl_seconds_default: u32,
    /// Longest hold a client may ask for.
    pub hold_ttl_seconds_max: u32,
    /// How often the sweeper returns the places of expired holds.
    pub hold_sweep_interval_ms: u64,
    /// Most holds one sweep expires (one group commit); the rest wait for the next tick.
    pub hold_sweep_batch_max: usize,
    /// Most rows in one `ImportCapacity` stream.
    pub import_rows_max: usize,
    /// Most slots one import may create or change in total.
    pub import_slots_max: usize,
    /// Most row errors reported for a refused import (the rest are counted).
    pub import_errors_reported_max: usize,
    /// Length of a closure's reason (characters), shown to citizens.
    pub close_reason_length_max: usize,
    /// How long start-up waits for the data dir's lock (a previous process, or sled's
    /// I/O threads of a just-closed store, may still hold it) before refusing.
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
    publish_days_max: 366,
    publish_slots_max: 100_000,
    opening_hours_per_schedule_max: 64,
    slot_minutes_max: 1_440,
    capacity_per_slot_max: 10_000,
    max_active_per_citizen: 1,
    commit_batch_writes_max: 4_096,
    commit_queue_depth: 65_536,
    export_channel_depth: 256,
    message_size_bytes_max: 4 * 1024 * 1024,
    hold_ttl_seconds_default: 300,
    hold_ttl_seconds_max: 1_800,
    hold_sweep_interval_ms: 250,
    hold_sweep_batch_max: 4_096,
    import_rows_max: 200_000,
    import_slots_max: 2_000_000,
    import_errors_reported_max: 100,
    close_reason_length_max: 200,
    data_dir_lock_wait_ms: 5_000,
    store_cache_bytes: 1024 * 1024 * 1024,
};

const _: () = {
    let l = &DEFAULT_LIMITS;
    assert!(l.page_size_default >= 1 && l.page_size_default <= l.page_size_max);
    assert!(l.search_range_days_default <= l.search_range_days_max);
    assert!(l.max_active_per_citizen >= 1);
    assert!(l.commit_batch_writes_max >= 1 && l.commit_batch_writes_max <= l.commit_queue_depth);
    // Capacity, taken and pending share one 64-bit atomic word, 21 bits each.
    assert!(l.capacity_per_slot_max <= crate::domain::slot_counter::COUNTER_FIELD_MAX);
    assert!(
        l.hold_ttl_seconds_default >= 1 && l.hold_ttl_seconds_default <= l.hold_ttl_seconds_max
    );
    assert!(l.hold_sweep_batch_max >= 1 && l.import_errors_reported_max >= 1);
    assert!(l.slot_minutes_max <= 24 * 60);
    assert!(l.export_channel_depth >= 1);
};

/// Server configuration. Tokens, rate limits and TLS arrive with the admission-control work.
#[derive(Clone, Debug, Default)]
pub struct Config {
    pub limits: Limits,
    /// Key of the citizen-id HMAC. `None`: generated once and kept in the data dir.
    pub citizen_hash_key: Option<[u8; 32]>,
}

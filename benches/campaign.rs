//! A campaign's statistics (`GetCampaignStats`) with a million registrations: read from
//! the registrations' tally, kept as each registration changes, not by visiting every
//! registration under the campaign's lock. Run: `cargo bench --bench campaign`.
//! Numbers: BENCHMARKS.md.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use prenota::domain::campaign::{
    Campaign, Preferences, Registration, RegistrationState, Registrations, Wave,
};
use prenota::domain::ids::{BookingId, CampaignId, CitizenKey, RegionId, ServiceId, WaveId};

const REGISTRATIONS: u32 = 1_000_000;

fn campaign() -> Campaign {
    let wave = |name: &str, opens_at_unix_ms, birth_year_max| Wave {
        wave_id: WaveId::parse("wave_id", name, 64).unwrap(),
        opens_at_unix_ms,
        birth_year_min: None,
        birth_year_max,
        priority_groups: vec!["health-workers".into()],
    };
    Campaign {
        campaign_id: CampaignId::parse("campaign_id", "flu", 64).unwrap(),
        service_id: ServiceId::parse("service_id", "vax", 64).unwrap(),
        region_id: RegionId::parse("region_id", "lazio", 64).unwrap(),
        offer_ttl_seconds: 3_600,
        offers_declined_max: 3,
        last_minute_hours: 24,
        waves: vec![
            wave("over-70", 0, Some(1956)),
            wave("everyone", i64::MAX, None),
        ],
        seed: [7; 32],
        created_at_unix_ms: 0,
    }
}

fn registration(campaign: &Campaign, n: u32) -> Registration {
    let mut citizen = [0u8; 16];
    citizen[..4].copy_from_slice(&n.to_be_bytes());
    Registration {
        registration_id: BookingId(u128::from(n)),
        campaign_id: campaign.campaign_id.clone(),
        citizen: CitizenKey(citizen),
        birth_year: Some(1930 + (n % 80) as i32),
        groups: Vec::new(),
        preferences: Preferences::default(),
        registered_at_unix_ms: 0,
        arrival: u64::from(n),
        declines: 0,
        state: match n % 10 {
            0 => RegistrationState::Booked {
                booking_id: BookingId(u128::from(n)),
            },
            1 => RegistrationState::Exhausted,
            _ => RegistrationState::Active,
        },
        requests: Vec::new(),
    }
}

fn stats(c: &mut Criterion) {
    let campaign = campaign();
    let mut registrations = Registrations::default();
    for n in 0..REGISTRATIONS {
        registrations.settle(&campaign, registration(&campaign, n));
    }
    c.bench_function("campaign_stats_1m_registrations", |b| {
        b.iter(|| black_box(registrations.counts(&campaign, black_box(1_000))))
    });
}

criterion_group!(benches, stats);
criterion_main!(benches);

//! A campaign's statistics (`GetCampaignStats`) with a million registrations: read from
//! the registrations' tally, kept as each registration changes, not by visiting every
//! registration under the campaign's lock; and one matching step's pick when most of
//! the waiting registrations prefer a site with no free place. Run: `cargo bench
//! --bench campaign`. Numbers: BENCHMARKS.md.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use prenota::domain::campaign::{
    pick, Campaign, FreeSlot, Preferences, Registration, RegistrationState, Registrations, Wave,
};
use prenota::domain::ids::{
    BookingId, CampaignId, CitizenKey, RegionId, ServiceId, SiteId, SlotKey, WaveId,
};

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
        ends_at_unix_ms: None,
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

/// `pick` over 10,000 free one-place slots (40 a day at site `b`): 20,000 waiting
/// registrations who will only go to site `a` (full), then 2,000 who take any site. A
/// step offers the 2,000; the question is what the 20,000 cost it.
fn pick_past_unfit(c: &mut Criterion) {
    let campaign = campaign();
    let site = |name: &str| SiteId::parse("site_id", name, 64).unwrap();
    let first = 1_893_488_400; // 2030-01-01T09:00:00Z
    let free: Vec<FreeSlot> = (0..10_000i64)
        .map(|i| {
            let start = first + (i / 40) * 86_400 + (i % 40) * 600;
            FreeSlot {
                key: SlotKey {
                    site_id: site("b"),
                    service_id: campaign.service_id.clone(),
                    start_unix_s: start,
                },
                local: chrono::DateTime::from_timestamp(start, 0)
                    .unwrap()
                    .naive_utc(),
                free: 1,
            }
        })
        .collect();
    let waiting: Vec<Registration> = (0..22_000u32)
        .map(|n| {
            let mut registration = registration(&campaign, n);
            if n < 20_000 {
                registration.preferences.site_ids = vec![site("a")];
            }
            registration
        })
        .collect();
    c.bench_function("campaign_pick_2000_offers_past_20000_unfit", |b| {
        b.iter(|| {
            let mut free = free.clone();
            let picked = pick(waiting.iter(), &mut free, 2_000);
            assert_eq!(black_box(picked).len(), 2_000);
        })
    });
}

criterion_group!(benches, stats);
criterion_group! {
    name = picks;
    config = Criterion::default().sample_size(10);
    targets = pick_past_unfit
}
criterion_main!(benches, picks);

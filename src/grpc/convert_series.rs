//! Dose series: proto ↔ domain, every field checked at once.

use crate::config::Limits;
use crate::domain::citizen_id::CitizenIds;
use crate::domain::error::{AllValid, DomainError, FieldViolation};
use crate::domain::ids::{ChannelId, SeriesId, ServiceId};
use crate::domain::series::{Dose, Series};
use crate::grpc::auth::Caller;
use crate::grpc::convert::{request_key, slot_key};
use crate::proto;
use crate::service::SeriesCommand;

fn series_id(field: &str, value: &str, limits: &Limits) -> Result<SeriesId, FieldViolation> {
    SeriesId::parse(field, value, limits.id_length_max)
}

/// A series as an authority sends it (its rules are checked by `Series::check`).
pub fn series_from_proto(
    request: proto::UpsertSeriesRequest,
    limits: &Limits,
) -> Result<Series, DomainError> {
    let series = request
        .series
        .ok_or_else(|| DomainError::invalid("series", "is required"))?;
    let doses = || -> Result<Vec<Dose>, Vec<FieldViolation>> {
        let mut violations = Vec::new();
        let mut doses = Vec::with_capacity(series.doses.len());
        for (index, dose) in series.doses.iter().enumerate() {
            let field = format!("series.doses[{index}].service_id");
            match ServiceId::parse(&field, &dose.service_id, limits.id_length_max) {
                Ok(service_id) => doses.push(Dose {
                    service_id,
                    min_days_after_previous: dose.min_days_after_previous,
                    max_days_after_previous: dose.max_days_after_previous,
                    same_site: dose.same_site,
                }),
                Err(violation) => violations.push(violation),
            }
        }
        match violations.is_empty() {
            true => Ok(doses),
            false => Err(violations),
        }
    };
    let (series_id, doses) = (
        series_id("series.series_id", &series.series_id, limits),
        doses(),
    )
        .all_valid()?;
    Ok(Series { series_id, doses })
}

pub fn series_to_proto(series: &Series) -> proto::Series {
    proto::Series {
        series_id: series.series_id.to_string(),
        doses: series
            .doses
            .iter()
            .map(|dose| proto::SeriesDose {
                service_id: dose.service_id.to_string(),
                min_days_after_previous: dose.min_days_after_previous,
                max_days_after_previous: dose.max_days_after_previous,
                same_site: dose.same_site,
            })
            .collect(),
    }
}

pub fn book_series_from_proto(
    request: proto::BookSeriesRequest,
    (limits, ids): (&Limits, &CitizenIds),
    caller: &Caller,
    channel: ChannelId,
) -> Result<SeriesCommand, DomainError> {
    let slots = || -> Result<Vec<_>, Vec<FieldViolation>> {
        let count = request.slot_ids.len();
        if count == 0 || count > limits.series_doses_max {
            return Err(vec![FieldViolation::new(
                "slot_ids",
                format!(
                    "must name 1 to {} slots, one per dose",
                    limits.series_doses_max
                ),
            )]);
        }
        let (mut slots, mut violations) = (Vec::with_capacity(count), Vec::new());
        for (index, slot) in request.slot_ids.iter().enumerate() {
            match slot_key(&format!("slot_ids[{index}]"), slot, limits) {
                Ok(slot) => slots.push(slot),
                Err(violation) => violations.push(violation),
            }
        }
        match violations.is_empty() {
            true => Ok(slots),
            false => Err(violations),
        }
    };
    let (series_id, citizen_id, slots, request) = (
        series_id("series_id", &request.series_id, limits),
        ids.canonical(&request.citizen_id),
        slots(),
        request_key(&request.request_id, limits, &caller.actor()),
    )
        .all_valid()?;
    Ok(SeriesCommand {
        series_id,
        citizen_id,
        slots,
        request,
        channel,
    })
}

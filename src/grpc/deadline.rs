//! A call's deadline, kept by prenota's outermost layer (`observe`) so that a call past
//! it is answered `DEADLINE_EXCEEDED`, as gRPC asks, and counted so.
//!
//! tonic's own timeout layer (`Server::timeout`, set to `request_timeout_ms`, and the
//! client's `grpc-timeout`) wraps the application's layers and answers `CANCELLED`
//! "Timeout expired". It makes its timer after `observe` saw the call and polls
//! `observe` first, and both read `grpc-timeout` alike: the deadline taken here is
//! never later than tonic's, so this one answers (tonic's is a backstop; were it ever
//! first, the call would be answered and counted `CANCELLED`, nothing else).
//!
//! Two deadlines: the answer's (the response headers), the shorter of the client's
//! `grpc-timeout` and `request_timeout_ms`; and a response stream's end, the client's
//! `grpc-timeout` alone (a watch or an export may rightly outlive `request_timeout_ms`;
//! tonic bounded neither by the client's deadline once the headers were sent). A call
//! whose deadline passed before it began (nanoseconds) is not run.

use std::time::Duration;

use tokio::time::Instant;
use tonic::codegen::http::HeaderMap;
use tonic::Status;

/// The longest deadline kept: beyond it a deadline is no deadline (and `Instant`
/// arithmetic cannot overflow).
const DEADLINE_MAX: Duration = Duration::from_secs(100 * 365 * 24 * 3_600);

/// When a call must be answered, and when its response stream must end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadlines {
    pub answer_by: Instant,
    pub stream_by: Option<Instant>,
}

/// The deadlines of a call with `headers` that arrived `now`.
pub fn of_call(headers: &HeaderMap, request_timeout: Duration, now: Instant) -> Deadlines {
    let asked = grpc_timeout(headers).map(|asked| asked.min(DEADLINE_MAX));
    let answer_within = asked.map_or(request_timeout, |asked| asked.min(request_timeout));
    Deadlines {
        answer_by: now + answer_within.min(DEADLINE_MAX),
        stream_by: asked.map(|asked| now + asked),
    }
}

/// The client's `grpc-timeout`, read as gRPC over HTTP/2 defines it (at most 8 digits
/// and a unit: `H`, `M`, `S`, `m`, `u`, `n`) and exactly as tonic's timeout layer reads
/// it (which also takes a leading `+`), so no header makes tonic's deadline the
/// earlier. A malformed one is ignored, as tonic ignores it.
pub fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let text = headers.get("grpc-timeout")?.to_str().ok()?;
    let split = text.len().checked_sub(1)?;
    let (digits, unit) = text.split_at(split);
    if digits.len() > 8 {
        return None;
    }
    let value: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(value * 3_600),
        "M" => Duration::from_secs(value * 60),
        "S" => Duration::from_secs(value),
        "m" => Duration::from_millis(value),
        "u" => Duration::from_micros(value),
        "n" => Duration::from_nanos(value),
        _ => return None,
    })
}

/// The answer of a call whose deadline passed before its answer was ready.
pub fn passed_before_answer() -> Status {
    Status::deadline_exceeded(
        "the call's deadline (its grpc-timeout, or request_timeout_ms) passed before its \
         answer: a change it asked for may or may not have been made (one begun is \
         finished); a call that records its request_id answers its outcome when sent \
         again with it",
    )
}

/// The end of a response stream whose deadline passed before the stream ended.
pub fn passed_before_end() -> Status {
    Status::deadline_exceeded(
        "the call's deadline (its grpc-timeout) passed before the stream's end",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(timeout: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("grpc-timeout", timeout.parse().unwrap());
        headers
    }

    #[test]
    fn grpc_timeouts_are_read_in_every_unit_and_malformed_ones_ignored() {
        let read = |text: &str| grpc_timeout(&headers(text));
        assert_eq!(read("2H"), Some(Duration::from_secs(7_200)));
        assert_eq!(read("3M"), Some(Duration::from_secs(180)));
        assert_eq!(read("4S"), Some(Duration::from_secs(4)));
        assert_eq!(read("300m"), Some(Duration::from_millis(300)));
        assert_eq!(read("99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(read("0n"), Some(Duration::ZERO));
        assert_eq!(
            read("+5S"),
            Some(Duration::from_secs(5)),
            "as tonic reads it"
        );
        for malformed in [
            "",
            "S",
            "5",
            "5s",
            "-5S",
            "123456789S",
            "5 S",
            "5SS",
            "1.5S",
        ] {
            assert_eq!(read(malformed), None, "{malformed:?}");
        }
        assert_eq!(grpc_timeout(&HeaderMap::new()), None);
    }

    #[test]
    fn the_answer_waits_for_the_shorter_deadline_and_a_stream_only_for_the_clients() {
        let now = Instant::now();
        let server = Duration::from_secs(30);
        let none = of_call(&HeaderMap::new(), server, now);
        assert_eq!((none.answer_by, none.stream_by), (now + server, None));
        let short = of_call(&headers("300m"), server, now);
        let within = now + Duration::from_millis(300);
        assert_eq!((short.answer_by, short.stream_by), (within, Some(within)));
        let long = of_call(&headers("2H"), server, now);
        let stream_by = Some(now + Duration::from_secs(7_200));
        assert_eq!((long.answer_by, long.stream_by), (now + server, stream_by));
        let longest = of_call(&headers("99999999H"), server, now);
        assert_eq!(longest.stream_by, Some(now + DEADLINE_MAX));
    }
}

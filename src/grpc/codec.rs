//! The protobuf codec of prenota's services: prost's, except that a request that is not
//! valid protobuf is the caller's mistake (`INVALID_ARGUMENT`, a BadRequest violation of
//! the whole message, field ""), not a server failure (prost's `INTERNAL`, which also
//! logs a warning per request: a flood of junk would flood the log). The generated
//! clients share the codec: a reply they cannot decode stays prost's `INTERNAL` (the
//! outcome is unknown, not refused).
//!
//! The same goes for a request tonic cannot read because of how it is framed (no
//! message, a message or its prefix cut short, a compressed flag with no
//! `grpc-encoding`, a flag that is neither 0 nor 1): tonic answers `INTERNAL`, as gRPC's
//! own servers do, which a client could cause at will to page whoever watches the
//! server's failures and write a warning per request. `grpc::observe` restates those
//! answers with [`clients_framing_mistake`].

use prost::Message;
use tonic::codec::{BufferSettings, Codec as TonicCodec, DecodeBuf, Decoder as TonicDecoder};
use tonic::{Code, Status};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

/// Named in `build.rs` (`codec_path`) for every generated service and client.
#[derive(Debug, Clone, Default)]
pub struct Codec<T, U>(ProstCodec<T, U>);

impl<T, U> TonicCodec for Codec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = Decoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        Decoder(self.0.decoder())
    }
}

#[derive(Debug)]
pub struct Decoder<U>(ProstDecoder<U>);

impl<U: Message + Default> TonicDecoder for Decoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        match decodes_a_request::<U>() {
            true => self.0.decode(buf).map_err(|status| malformed(&status)),
            false => self.0.decode(buf),
        }
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

/// Whether `U` is a request (what a server decodes): buf's STANDARD lint, which the
/// protos pass, names every request message `…Request` and every reply `…Response`.
fn decodes_a_request<U>() -> bool {
    std::any::type_name::<U>().ends_with("Request")
}

/// The answer to a message prost could not decode (`status`: prost's).
fn malformed(status: &Status) -> Status {
    let why = format!("not valid protobuf: {}", status.message());
    Status::with_error_details(
        Code::InvalidArgument,
        format!("invalid request: the message is {why}"),
        ErrorDetails::with_bad_request(vec![FieldViolation::new("", why)]),
    )
}

/// The start of tonic's message for each request it cannot read as framed, and what it
/// means. The gRPC compression doc asks `INTERNAL` for a compressed flag with no
/// `grpc-encoding`; prenota counts a client's mistake as the client's, as it does a
/// message that is not protobuf. Pinned by
/// `hardening::a_badly_framed_request_is_the_clients_mistake_not_a_server_failure`.
const TONIC_FRAMING_ERRORS: [(&str, &str); 4] = [
    (
        "Missing request message",
        "the call ended before its message",
    ),
    (
        "Unexpected EOF decoding stream",
        "the call ended inside its message",
    ),
    (
        "protocol error: received message with compressed-flag but no grpc-encoding",
        "a message flagged compressed came without grpc-encoding",
    ),
    (
        "protocol error: received message with invalid compression flag",
        "a message's compressed flag is neither 0 nor 1",
    ),
];

/// What a client is answered instead of tonic's `INTERNAL` (`message`: tonic's) when
/// that was tonic's answer to a request it could not read as framed: INVALID_ARGUMENT
/// (a BadRequest violation of the whole message, field ""), or CANCELLED for a stream
/// the client broke (an h2 error while the request was read). `None`: anything else,
/// the server's own failures included, stays as it is.
pub fn clients_framing_mistake(message: &str) -> Option<Status> {
    if message.starts_with("h2 protocol error") {
        let broke = format!("the client broke the request's stream: {message}");
        return Some(Status::cancelled(broke));
    }
    let (_, why) = TONIC_FRAMING_ERRORS
        .iter()
        .find(|(tonic, _)| message.starts_with(tonic))?;
    Some(Status::with_error_details(
        Code::InvalidArgument,
        format!("invalid request: {why}"),
        ErrorDetails::with_bad_request(vec![FieldViolation::new("", *why)]),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto;

    #[test]
    fn only_what_a_server_decodes_is_the_callers_mistake() {
        assert!(decodes_a_request::<proto::BookRequest>());
        assert!(decodes_a_request::<proto::ImportCapacityRequest>());
        assert!(!decodes_a_request::<proto::BookResponse>());
        assert!(!decodes_a_request::<proto::ExportBookingsResponse>());
        assert!(!decodes_a_request::<proto::Event>());
    }

    #[test]
    fn only_tonics_framing_errors_are_restated_as_the_clients() {
        let restated = clients_framing_mistake("Missing request message.").unwrap();
        assert_eq!(restated.code(), Code::InvalidArgument);
        assert_eq!(
            restated.message(),
            "invalid request: the call ended before its message"
        );
        let broken = clients_framing_mistake("h2 protocol error: stream reset").unwrap();
        assert_eq!(broken.code(), Code::Cancelled);
        assert!(clients_framing_mistake("the store failed").is_none());
        assert!(clients_framing_mistake("").is_none());
    }
}

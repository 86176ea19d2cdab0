//! The protobuf codec of prenota's services: prost's, except that a request that is not
//! valid protobuf is the caller's mistake (`INVALID_ARGUMENT`, a BadRequest violation of
//! the whole message, field ""), not a server failure (prost's `INTERNAL`, which also
//! logs a warning per request: a flood of junk would flood the log). The generated
//! clients share the codec: a reply they cannot decode stays prost's `INTERNAL` (the
//! outcome is unknown, not refused).

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
}

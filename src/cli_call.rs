//! `prenota call`: any RPC of the server with a JSON request and JSON answers, like
//! grpcurl, from the protos compiled into this binary (no reflection needed): for
//! scripts, and for a machine without grpcurl. The JSON is protobuf's canonical JSON
//! mapping (field names as in the proto or in lowerCamelCase; answers in
//! lowerCamelCase, pretty-printed, one object per message of a stream).

use std::str::FromStr;

use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor, MethodDescriptor};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::metadata::{MetadataKey, MetadataValue};
use tonic::{Request, Status};

use crate::cli::{authorized_channel, explain, Target};

/// Every service the server offers: prenota's and health.
fn pool() -> Result<DescriptorPool, String> {
    let mut pool = DescriptorPool::new();
    for set in [
        crate::proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
    ] {
        pool.decode_file_descriptor_set(set)
            .map_err(|e| format!("the compiled protos do not load: {e}"))?;
    }
    Ok(pool)
}

/// `package.Service/Method` (or `package.Service.Method`, as grpcurl also takes).
fn method(pool: &DescriptorPool, name: &str) -> Result<MethodDescriptor, String> {
    let (service, method) = name
        .rsplit_once('/')
        .or_else(|| name.rsplit_once('.'))
        .ok_or_else(|| format!("{name} is not a method such as prenota.v1.BookingService/Book"))?;
    let service = pool
        .get_service_by_name(service)
        .ok_or_else(|| format!("no service {service} (`prenota call list` names them)"))?;
    let found = service.methods().find(|m| m.name() == method);
    found.ok_or_else(|| format!("{} has no method {method}", service.full_name()))
}

/// Encodes requests and decodes answers of one method's dynamic types.
#[derive(Clone)]
struct DynamicCodec(MessageDescriptor);

impl Codec for DynamicCodec {
    type Encode = DynamicMessage;
    type Decode = DynamicMessage;
    type Encoder = Self;
    type Decoder = Self;

    fn encoder(&mut self) -> Self::Encoder {
        self.clone()
    }

    fn decoder(&mut self) -> Self::Decoder {
        self.clone()
    }
}

impl Encoder for DynamicCodec {
    type Item = DynamicMessage;
    type Error = Status;

    fn encode(&mut self, item: DynamicMessage, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(buf)
            .map_err(|e| Status::internal(format!("cannot encode the request: {e}")))
    }
}

impl Decoder for DynamicCodec {
    type Item = DynamicMessage;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<DynamicMessage>, Status> {
        DynamicMessage::decode(self.0.clone(), buf)
            .map(Some)
            .map_err(|e| Status::internal(format!("cannot decode the answer: {e}")))
    }
}

/// Prints `message` as JSON; false once the reader went away.
fn print(message: &DynamicMessage) -> Result<bool, String> {
    let text = serde_json::to_string_pretty(message).map_err(|e| e.to_string())?;
    crate::cli::write_out(&text)
}

/// `method`'s request from its JSON (empty: `{}`): one object, nothing after it (a
/// second object would otherwise be dropped unsent).
fn request_message(method: &MethodDescriptor, json: &str) -> Result<DynamicMessage, String> {
    let json = match json.trim().is_empty() {
        true => "{}",
        false => json,
    };
    let mut deserializer = serde_json::Deserializer::from_str(json);
    let not_a =
        |e: serde_json::Error| format!("the request is not a {}: {e}", method.input().full_name());
    let message = DynamicMessage::deserialize(method.input(), &mut deserializer).map_err(not_a)?;
    deserializer.end().map_err(not_a)?;
    Ok(message)
}

/// Calls `method_name` with the JSON `request` (empty: `{}`) and `headers`; prints each
/// answer. `list` prints the services instead.
pub async fn call(
    target: &Target<'_>,
    method_name: &str,
    request: &str,
    headers: &[String],
) -> Result<(), String> {
    let pool = pool()?;
    if method_name == "list" {
        for service in pool.services() {
            if !crate::cli::write_out(service.full_name())? {
                break;
            }
        }
        return Ok(());
    }
    let method = method(&pool, method_name)?;
    if method.is_client_streaming() {
        return Err(format!(
            "{} streams its requests: use the matching prenota command (import)",
            method.full_name()
        ));
    }
    let mut request = Request::new(request_message(&method, request)?);
    for header in headers {
        let (key, value) = header
            .split_once(':')
            // Only the start: a header without its colon may hold a token.
            .ok_or_else(|| {
                let name = header.split_whitespace().next().unwrap_or("");
                format!("header {name:?}… is not `name: value`")
            })?;
        let key = MetadataKey::from_str(key.trim()).map_err(|e| format!("{key}: {e}"))?;
        // Not the value itself: it may be a token or an assertion.
        let value = MetadataValue::try_from(value.trim())
            .map_err(|e| format!("header {}: its value cannot be sent: {e}", key.as_str()))?;
        request.metadata_mut().insert(key, value);
    }
    let path = format!("/{}/{}", method.parent_service().full_name(), method.name());
    let path =
        tonic::codegen::http::uri::PathAndQuery::from_str(&path).map_err(|e| e.to_string())?;
    let mut grpc = tonic::client::Grpc::new(authorized_channel(target).await?);
    grpc.ready()
        .await
        .map_err(|e| format!("the connection failed: {e}"))?;
    let codec = DynamicCodec(method.output());
    if method.is_server_streaming() {
        let mut stream = grpc
            .server_streaming(request, path, codec)
            .await
            .map_err(|status| explain(&status))?
            .into_inner();
        while let Some(message) = stream.message().await.map_err(|s| explain(&s))? {
            if !print(&message)? {
                return Ok(()); // the reader went away: the stream (and its place) ends
            }
        }
        return Ok(());
    }
    let answer = grpc
        .unary(request, path, codec)
        .await
        .map_err(|status| explain(&status))?;
    print(answer.get_ref()).map(drop)
}

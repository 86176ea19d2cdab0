//! Compiles `proto/` with the pure-Rust `protox` (no system `protoc`), generates the
//! tonic/prost code, and writes the descriptor set that server reflection serves.

use std::path::PathBuf;

const PROTO_FILES: &[&str] = &[
    "proto/prenota/v1/resources.proto",
    "proto/prenota/v1/booking_service.proto",
    "proto/prenota/v1/capacity_service.proto",
    "proto/prenota/v1/open_data_service.proto",
    "proto/prenota/v1/site_service.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let file_descriptors = protox::compile(PROTO_FILES, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").ok_or("OUT_DIR not set")?);
    let descriptor_path = out_dir.join("prenota_descriptor.bin");
    std::fs::write(
        &descriptor_path,
        prost::Message::encode_to_vec(&file_descriptors),
    )?;
    tonic_prost_build::configure()
        // Requests that are not protobuf answer INVALID_ARGUMENT (`grpc::codec`).
        .codec_path("crate::grpc::codec::Codec")
        .file_descriptor_set_path(&descriptor_path)
        .compile_fds(file_descriptors)?;
    Ok(())
}

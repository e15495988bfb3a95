//! Compiles the public contract in proto/ with protox (pure Rust, so no system
//! `protoc` is needed) and writes the encoded descriptor set that server reflection
//! serves.

use std::{env, fs, path::PathBuf};

use prost::Message;

const PROTO_ROOT: &str = "proto";
const PROTO_FILES: &[&str] = &[
    "tlserve/v1/inputs.proto",
    "tlserve/v1/embedder.proto",
    "tlserve/v1/heads.proto",
    "tlserve/v1/trainer.proto",
    "tlserve/v1/predictor.proto",
    "tlserve/v1/models.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={PROTO_ROOT}");
    let descriptors = protox::compile(PROTO_FILES, [PROTO_ROOT])?;

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("tlserve_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}

//! Compiles the public contract in proto/ with protox (pure Rust, so no system
//! `protoc` is needed) and writes the encoded descriptor set that server reflection
//! serves; lists the web console's files (assets/console/, and proto/ for the
//! page to parse) for the binary to embed.

use std::{
    env, fs,
    path::{Path, PathBuf},
};

use prost::Message;

const PROTO_ROOT: &str = "proto";
const CONSOLE_ROOT: &str = "assets/console";
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

    println!("cargo:rerun-if-changed={CONSOLE_ROOT}");
    write_console_assets(&out_dir.join("console_assets.rs"))?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}

/// Writes `CONSOLE_ASSETS: &[(path, bytes)]`: every file under assets/console/
/// by its path there, and every .proto file under `proto/<path>`.
fn write_console_assets(out: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let mut entries = Vec::new();
    collect_files(&root.join(CONSOLE_ROOT), "", &mut entries)?;
    collect_files(&root.join(PROTO_ROOT), "proto/", &mut entries)?;
    entries.sort();
    let mut code = String::from("pub static CONSOLE_ASSETS: &[(&str, &[u8])] = &[\n");
    for (path, file) in entries {
        // Relative to the manifest at compile time, not an absolute path: a
        // target folder shared by two checkouts keeps this file from the
        // first, and absolute paths would then point into it.
        let relative = file
            .strip_prefix(&root)?
            .to_string_lossy()
            .replace('\\', "/");
        code.push_str(&format!(
            "    ({path:?}, include_bytes!(concat!(env!(\"CARGO_MANIFEST_DIR\"), {:?}))),\n",
            format!("/{relative}")
        ));
    }
    code.push_str("];\n");
    fs::write(out, code)?;
    Ok(())
}

fn collect_files(
    dir: &Path,
    prefix: &str,
    entries: &mut Vec<(String, PathBuf)>,
) -> Result<(), Box<dyn std::error::Error>> {
    if !dir.is_dir() {
        return Ok(());
    }
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if path.is_dir() {
            collect_files(&path, &format!("{prefix}{name}/"), entries)?;
        } else if !name.starts_with('.') {
            entries.push((format!("{prefix}{name}"), path));
        }
    }
    Ok(())
}

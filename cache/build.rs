//! Compiles proto/block.proto with a vendored protoc, unless PROTOC names another one.
//! PROTOC is only passed to prost-build, never set globally: raft-proto's build rejects a
//! protoc whose major version is not 3.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/block.proto");
    let mut cfg = prost_build::Config::new();
    let protoc = match std::env::var_os("PROTOC") {
        Some(p) => std::path::PathBuf::from(p),
        None => protoc_bin_vendored::protoc_bin_path()?,
    };
    cfg.protoc_executable(protoc);
    // Block payloads stay `Bytes`: slicing a block into messages copies nothing.
    cfg.bytes(["."]);
    tonic_prost_build::configure().compile_with_config(cfg, &["proto/block.proto"], &["proto"])?;
    Ok(())
}

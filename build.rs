//! Generates Rust types from `proto/`: the ONNX IR subset (prost) and the gRPC services
//! (tonic). protox parses the files in pure Rust, so no `protoc` binary is needed; the file
//! descriptor set is also written out for gRPC server reflection.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let onnx = protox::compile(["onnx.proto"], ["proto"])?;
    let mut config = prost_build::Config::new();
    // Initializer payloads can be gigabytes: keep them as `Bytes` so they are not copied.
    config.bytes([".onnx.TensorProto.raw_data"]);
    config.compile_fds(onnx)?;

    let services = protox::compile(["grpc_service.proto", "generate.proto"], ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("services_descriptor.bin"), services.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .compile_fds(services)?;
    Ok(())
}

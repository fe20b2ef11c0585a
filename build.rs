//! Generates the Rust types of `proto/onnx.proto` with prost; protox parses the file in pure
//! Rust so no `protoc` binary is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["onnx.proto"], ["proto"])?;
    let mut config = prost_build::Config::new();
    // Initializer payloads can be gigabytes: keep them as `Bytes` so they are not copied.
    config.bytes([".onnx.TensorProto.raw_data"]);
    config.compile_fds(fds)?;
    Ok(())
}

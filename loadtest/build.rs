//! Generates the gRPC client of `distill_serve.v1.Generate` from the server's own proto file
//! (protox parses it in pure Rust: no `protoc` needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../proto/generate.proto");
    let files = protox::compile(["generate.proto"], ["../proto"])?;
    tonic_prost_build::configure().build_server(false).compile_fds(files)?;
    Ok(())
}

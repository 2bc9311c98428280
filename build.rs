//! Generates the gRPC code and the descriptor set for reflection with protox,
//! so no `protoc` is needed on any machine.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    // authd's own contract; its descriptors are what reflection serves.
    compile(
        &["proto/auth/v1/auth.proto", "proto/auth/v1/admin.proto"],
        Some(out_dir.join("authd_descriptor.bin")),
    )?;
    // The example service the client layer protects in examples/ and tests; kept out of
    // authd's reflection.
    compile(&["proto/example/v1/greeter.proto"], None)?;
    // Envoy's Check, which authd also serves: descriptors only (the types come from the
    // envoy-types crate), so reflection can describe it.
    println!("cargo:rerun-if-changed=proto/vendor");
    let envoy = protox::compile(
        ["envoy/service/auth/v3/external_auth.proto"],
        ["proto/vendor"],
    )?;
    std::fs::write(
        out_dir.join("envoy_descriptor.bin"),
        prost::Message::encode_to_vec(&envoy),
    )?;
    Ok(())
}

fn compile(
    protos: &[&str],
    descriptor_out: Option<PathBuf>,
) -> Result<(), Box<dyn std::error::Error>> {
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    if let Some(path) = descriptor_out {
        std::fs::write(path, prost::Message::encode_to_vec(&fds))?;
    }
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}

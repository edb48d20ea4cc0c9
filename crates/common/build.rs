//! Generates the wire types and gRPC stubs from `api/*.proto` — the only
//! source of wire types in the workspace.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // PROTOC comes from .cargo/config.toml (scripts/protoc, the vendored binary);
    // fail early with a clear message if it cannot be found.
    protoc_bin_vendored::protoc_bin_path()?;
    // Read at run time: a build script compiled for another checkout of the
    // same sources (a shared target dir) must still find this one's api/.
    let api = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../api");
    let protos =
        ["protocol.proto", "logic.proto", "conn.proto", "queue.proto"].map(|p| api.join(p));
    for p in &protos {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    tonic_prost_build::configure()
        .bytes(".")
        .compile_protos(&protos, &[api])?;
    Ok(())
}

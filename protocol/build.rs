fn main() {
    println!("cargo:rerun-if-changed=proto/migrate.proto");
    prost_build::compile_protos(&["proto/migrate.proto"], &["proto/"]).expect(
        "compiling proto/migrate.proto needs protoc (Debian: protobuf-compiler; deploy/install.sh installs it)",
    );
}

//! Link the guest as a static, position-dependent ELF laid out by `linker.ld`
//! (the target's linker is rust-lld, so these are `ld.lld` arguments).

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    println!("cargo:rerun-if-changed=linker.ld");
    println!("cargo:rustc-link-arg-bins=-T{dir}/linker.ld");
    for arg in [
        "-static",
        "--no-pie",
        "--build-id=none",
        "-zmax-page-size=0x1000",
        "-znoexecstack",
    ] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
}

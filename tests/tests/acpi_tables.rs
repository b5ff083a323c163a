//! The ACPI tables the VM gets disassemble cleanly with iasl, and the MADT
//! lists one local APIC per vCPU.

use std::process::Command;
use std::time::Duration;

use vmm_tests::vm::VmBuilder;
use vmm_tests::{require_kvm, test_guest};

fn iasl_disassemble(table: &std::path::Path) -> String {
    let out = Command::new("iasl")
        .arg("-d")
        .arg(table)
        .output()
        .unwrap_or_else(|e| panic!("cannot run iasl (apt-get install acpica-tools): {e}"));
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "iasl -d {} failed:\n{log}",
        table.display()
    );
    let dsl = table.with_extension("dsl");
    std::fs::read_to_string(&dsl).unwrap_or_else(|e| panic!("no {}: {e}\n{log}", dsl.display()))
}

#[test]
fn tables_disassemble_without_errors() {
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut vm = VmBuilder::new(test_guest())
        .cpus(4)
        .memory("1G")
        .arg("--dump-acpi")
        .arg(dir.path().to_str().expect("utf-8"))
        .spawn();
    vm.expect_line("testguest: poweroff", Duration::from_secs(60));
    assert_eq!(vm.wait_exit(Duration::from_secs(60)).code(), Some(0));
    // The guest checks the tables it was given (checksums, the CPUs in the
    // MADT) and says FAIL, then still powers off.
    vm.assert_no_guest_failure();

    // The RSDP is not a table with a standard header, and this iasl cannot
    // disassemble it on its own: check its signature and both checksums.
    let rsdp = std::fs::read(dir.path().join("RSDP.dat")).expect("RSDP.dat");
    assert_eq!(rsdp.len(), 36);
    assert_eq!(&rsdp[..8], b"RSD PTR ");
    let sum = |bytes: &[u8]| bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b));
    assert_eq!(sum(&rsdp[..20]), 0, "RSDP checksum");
    assert_eq!(sum(&rsdp), 0, "RSDP extended checksum");

    for sig in ["XSDT", "FACP", "APIC", "MCFG", "DSDT"] {
        let path = dir.path().join(format!("{sig}.dat"));
        assert!(path.is_file(), "{} was not written", path.display());
        let dsl = iasl_disassemble(&path);
        for line in dsl.lines() {
            let lower = line.to_ascii_lowercase();
            assert!(
                !lower.contains("error")
                    && !lower.contains("invalid")
                    && !lower.contains("incorrect"),
                "{sig}: {line}\n{dsl}"
            );
        }
        match sig {
            "APIC" => {
                let lapics = dsl.matches("Processor Local APIC").count();
                assert_eq!(lapics, 4, "MADT:\n{dsl}");
                assert!(dsl.contains("I/O APIC"), "MADT:\n{dsl}");
            }
            "DSDT" => {
                for needle in ["PCI0", "PNP0A08", "COM1", "PNP0501", "_S5_"] {
                    assert!(dsl.contains(needle), "DSDT lacks {needle}:\n{dsl}");
                }
            }
            "FACP" => {
                assert!(dsl.contains("Hardware Reduced (V5) : 1"), "FADT:\n{dsl}");
            }
            _ => {}
        }
    }
    // No temporary files are left next to the tables.
    for entry in std::fs::read_dir(dir.path()).expect("read_dir") {
        let name = entry.expect("entry").file_name();
        assert!(
            !name.to_string_lossy().ends_with(".tmp"),
            "{name:?} left behind"
        );
    }
}

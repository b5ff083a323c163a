//! Linux early boot: Debian's cloud kernel, as a bzImage and as a PVH
//! vmlinux, with 2 vCPUs, gets through its E820 map, its ACPI tables and
//! its CPU count from the MADT. On the emulating nested KVM of the CI
//! machines that takes about 100 s (PVH) and 220 s (bzImage), so both boot
//! at once in one test.

use std::path::PathBuf;
use std::time::Duration;

use vmm_tests::vm::VmBuilder;
use vmm_tests::{linux_bzimage, linux_vmlinux, require_kvm};

const CMDLINE: &str = "console=ttyS0 earlyprintk=serial,ttyS0,115200 nokaslr panic=-1";
const TIMEOUT: Duration = Duration::from_secs(480);

fn early_boot(kernel: PathBuf) -> Result<(), String> {
    let name = kernel.display().to_string();
    let vm = VmBuilder::new(&kernel)
        .cpus(2)
        .memory("1G")
        .cmdline(CMDLINE)
        .spawn();
    let wait = |pattern: &str| {
        vm.console
            .wait_for(pattern, TIMEOUT)
            .map_err(|e| format!("{name}: {e}\nvmm stderr:\n{}", vm.stderr.text()))
    };
    wait("smpboot: Allowing 2 CPUs")?;
    let log = vm.console.text();
    let expect = |needle: &str| {
        if log.contains(needle) {
            Ok(())
        } else {
            Err(format!("{name}: no {needle:?} in the boot log:\n{log}"))
        }
    };
    // The E820 map as the VMM lays it out for 1 GiB.
    expect("BIOS-e820: [mem 0x0000000000000000-0x000000000009ffff] usable")?;
    expect("BIOS-e820: [mem 0x00000000000a0000-0x00000000000fffff] reserved")?;
    expect("BIOS-e820: [mem 0x0000000000100000-0x000000003fffffff] usable")?;
    // The ACPI tables, found through the RSDP at 0xE0000.
    expect("ACPI: RSDP 0x00000000000E0000")?;
    for table in ["XSDT", "FACP", "DSDT", "APIC"] {
        expect(&format!("ACPI: {table} 0x"))?;
    }
    expect("ACPI: Using ACPI (MADT) for SMP configuration information")?;
    vm.signal(libc::SIGTERM);
    Ok(())
}

#[test]
fn linux_reaches_smp_setup_as_bzimage_and_pvh() {
    require_kvm();
    let bzimage = linux_bzimage();
    let vmlinux = linux_vmlinux();
    let pvh = std::thread::spawn(move || early_boot(vmlinux));
    let bz = std::thread::spawn(move || early_boot(bzimage));
    let results = [
        pvh.join().expect("PVH boot thread"),
        bz.join().expect("bzImage boot thread"),
    ];
    let failures: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(failures.is_empty(), "{failures:#?}");
}

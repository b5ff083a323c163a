//! Boots the test guest with several vCPU counts and memory sizes and checks
//! what it reports: the CPUs in the MADT and that each of them ran the
//! guest's code, the RAM in the PVH memory map and that the guest could
//! write and read back both ends of every RAM range (above 4 GiB too), the
//! ACPI tables, and a clean power-off (exit 0); the processors are started
//! through the xAPIC registers, and once through the x2APIC ICR; a guest
//! that leaves the 8259s alone gets no interrupt through them.

use std::time::Duration;

use vmm_tests::vm::{RunningVm, VmBuilder};
use vmm_tests::{require_kvm, test_guest};

const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// The E820 map reserves the legacy hole 0xA0000..0x100000.
const LEGACY_HOLE_KIB: u64 = 384;

fn boot_and_check(cpus: u32, memory_mib: u64) {
    require_kvm();
    let memory = format!("{memory_mib}M");
    let mut vm = VmBuilder::new(test_guest())
        .cpus(cpus)
        .memory(&memory)
        .cmdline("boot test")
        .spawn();
    vm.expect_line("testguest: hello", BOOT_TIMEOUT);
    vm.expect_line("testguest: cmdline boot test", BOOT_TIMEOUT);
    let mem_line = vm.expect_line("testguest: memory ", BOOT_TIMEOUT);
    assert_eq!(
        mem_line,
        format!(
            "testguest: memory {memory_mib} MiB ({} KiB)",
            memory_mib * 1024 - LEGACY_HOLE_KIB
        ),
        "RAM reported for --memory {memory}"
    );
    // RAM below the legacy hole, from 1 MiB to 3 GiB, and what is above
    // 3 GiB moved to 4 GiB.
    let (ranges, top) = if memory_mib <= 3072 {
        (2, (memory_mib << 20) - 1)
    } else {
        (3, (1u64 << 32) + ((memory_mib - 3072) << 20) - 1)
    };
    let ram_line = vm.expect_line("testguest: ram ", BOOT_TIMEOUT);
    assert_eq!(
        ram_line,
        format!(
            "testguest: ram written and read back at both ends of {ranges} ranges, top {top:#x}"
        ),
        "RAM the guest touched for --memory {memory}"
    );
    vm.expect_line("testguest: rsdp 0xe0000 search", BOOT_TIMEOUT);
    for table in ["FACP", "DSDT", "APIC"] {
        vm.expect_line(&format!("testguest: acpi {table}"), BOOT_TIMEOUT);
    }
    let cpu_line = vm.expect_line("testguest: cpus ", BOOT_TIMEOUT);
    assert_eq!(cpu_line, format!("testguest: cpus {cpus}"));
    // Every processor in the MADT ran the guest's start-up code.
    let running = vm.expect_line("testguest: cpus running ", BOOT_TIMEOUT);
    assert_eq!(running, format!("testguest: cpus running {cpus}"));
    vm.expect_line("testguest: poweroff", BOOT_TIMEOUT);
    let status = vm.wait_exit(BOOT_TIMEOUT);
    vm.assert_no_guest_failure();
    assert_eq!(status.code(), Some(0), "stderr: {}", vm.stderr.text());
}

/// The guest reads its TSC's rate from the timing leaf (CPUID
/// 0x4000_0010), the rate KVM runs the vCPU's TSC at, as the VMM logs it.
/// Where the VMM says it gave no leaf (a host without an invariant TSC),
/// the guest must say it was not given one.
#[test]
fn the_guest_learns_its_tsc_rate_from_cpuid() {
    require_kvm();
    let mut cmd = VmBuilder::new(test_guest()).cmdline("nopci").command();
    cmd.env("RUST_LOG", "info");
    let mut vm = RunningVm::spawn(cmd);
    let line = vm.expect_line("testguest: tsc ", BOOT_TIMEOUT);
    assert_eq!(vm.wait_exit(BOOT_TIMEOUT).code(), Some(0));
    let stderr = vm.stderr.text();
    let logged = stderr
        .split("guest TSC: ")
        .nth(1)
        .and_then(|rest| rest.lines().next())
        .unwrap_or_else(|| panic!("the vmm logged nothing of the guest's TSC:\n{stderr}"));
    if logged.starts_with("no CPUID timing leaf") {
        // Only where the host could not have given one.
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").expect("/proc/cpuinfo");
        assert!(
            logged.contains("KVM did not give the TSC's rate") || !cpuinfo.contains(" nonstop_tsc"),
            "the host's TSC is invariant, yet the vmm gave no timing leaf: {logged}"
        );
        assert_eq!(line, "testguest: tsc rate not given; taken as 2 GHz");
        return;
    }
    let logged: u64 = logged
        .strip_suffix(" kHz (CPUID 0x40000010)")
        .and_then(|khz| khz.parse().ok())
        .unwrap_or_else(|| panic!("the vmm's TSC line: {logged:?}"));
    let guest: u64 = line
        .strip_prefix("testguest: tsc ")
        .and_then(|rest| rest.strip_suffix(" kHz from the hypervisor"))
        .and_then(|khz| khz.parse().ok())
        .unwrap_or_else(|| panic!("the guest was not given its TSC rate: {line:?}"));
    assert_eq!(guest, logged);
    assert!(guest > 100_000, "a TSC of {guest} kHz");
}

#[test]
fn one_cpu_64m() {
    boot_and_check(1, 64);
}

#[test]
fn one_cpu_512m() {
    boot_and_check(1, 512);
}

#[test]
fn four_cpus_3g() {
    boot_and_check(4, 3 * 1024);
}

#[test]
fn four_cpus_5g_crosses_the_pci_hole() {
    boot_and_check(4, 5 * 1024);
}

#[test]
fn two_cpus_16g() {
    boot_and_check(2, 16 * 1024);
}

#[test]
fn eight_cpus_128m() {
    boot_and_check(8, 128);
}

/// A guest that believes the ACPI tables (no 8259) never masks the 8259s;
/// the serial port's interrupt must not reach it through them (KVM makes
/// them unmasked with vector base 0: exception 4, and a triple fault), and
/// must reach it once through the IOAPIC when the guest routes it there.
#[test]
fn a_guest_that_leaves_the_8259s_alone_gets_no_interrupt_from_them() {
    require_kvm();
    let mut vm = VmBuilder::new(test_guest())
        .memory("128M")
        .cmdline("picquiet nopci")
        .spawn();
    let quiet = vm.expect_line("testguest: 8259s quiet", BOOT_TIMEOUT);
    assert_eq!(
        quiet,
        "testguest: 8259s quiet, 0 interrupts at the test vector, 1 through the ioapic"
    );
    vm.expect_line("testguest: poweroff", BOOT_TIMEOUT);
    let status = vm.wait_exit(BOOT_TIMEOUT);
    vm.assert_no_guest_failure();
    assert_eq!(status.code(), Some(0), "stderr: {}", vm.stderr.text());
}

/// The guest switches its local APIC to x2APIC mode first, so INIT and
/// STARTUP go through the x2APIC ICR (an MSR write) rather than the xAPIC
/// registers.
#[test]
fn four_cpus_started_in_x2apic_mode() {
    require_kvm();
    let mut vm = VmBuilder::new(test_guest())
        .cpus(4)
        .memory("128M")
        .cmdline("x2apic nopci")
        .spawn();
    let mode = vm.expect_line("testguest: lapic x2apic mode ", BOOT_TIMEOUT);
    // APIC base 0xfee00000, enabled (bit 11), x2APIC (bit 10), BSP (bit 8).
    assert_eq!(mode, "testguest: lapic x2apic mode 0xfee00d00");
    let running = vm.expect_line("testguest: cpus running ", BOOT_TIMEOUT);
    assert_eq!(running, "testguest: cpus running 4");
    vm.expect_line("testguest: poweroff", BOOT_TIMEOUT);
    let status = vm.wait_exit(BOOT_TIMEOUT);
    vm.assert_no_guest_failure();
    assert_eq!(status.code(), Some(0), "stderr: {}", vm.stderr.text());
}

//! Per-vCPU CPUID: what KVM supports, with this vCPU's APIC ID, a
//! topology of one socket holding `cpu_count` single-threaded cores, and
//! the hypervisor timing leaf (0x4000_0010: the TSC's and the local APIC
//! timer's rates in kHz, as QEMU gives it with KVM and VMware defined it)
//! when the TSC is invariant, so a guest need not calibrate its TSC
//! against a slower clock.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;

/// KVM's signature leaf (EAX: its highest leaf) and the timing leaf.
const LEAF_HYPERVISOR: u32 = 0x4000_0000;
const LEAF_TIMING: u32 = 0x4000_0010;
/// "KVMKVMKVM\0\0\0" in EBX, ECX, EDX.
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x4d];
/// Leaf 0x8000_0007 EDX bit 8: the TSC runs at one rate whatever the
/// core's power state (invariant), so a rate given once holds.
const LEAF_POWER_MGMT: u32 = 0x8000_0007;
const EDX_INVARIANT_TSC: u32 = 1 << 8;
/// KVM's local APIC timer runs at 1 GHz.
const APIC_TIMER_KHZ: u32 = 1_000_000;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

/// Topology level types of leaves 0xB and 0x1F.
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Number of APIC-ID bits needed to number `count` cores.
fn core_id_bits(count: u8) -> u32 {
    u32::from(count).next_power_of_two().trailing_zeros()
}

/// The topology leaves' subleaves: SMT, core, and the invalid level that
/// ends the list. KVM since Linux 6.1 gives only subleaf 0 (zeroed) of a
/// topology leaf; without a core level a guest counts each vCPU as a
/// socket of its own.
const TOPOLOGY_SUBLEAVES: u32 = 3;

/// `base` with every subleaf the topology leaves need (added where KVM
/// gave a topology leaf without them).
fn with_topology_subleaves(base: &CpuId) -> CpuId {
    let mut entries = base.as_slice().to_vec();
    for leaf in [LEAF_EXT_TOPOLOGY, LEAF_V2_EXT_TOPOLOGY] {
        if !entries.iter().any(|e| e.function == leaf) {
            continue;
        }
        for index in 0..TOPOLOGY_SUBLEAVES {
            if !entries
                .iter()
                .any(|e| e.function == leaf && e.index == index)
            {
                entries.push(kvm_cpuid_entry2 {
                    function: leaf,
                    index,
                    flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                    ..Default::default()
                });
            }
        }
    }
    // Too many entries for KVM's list: the leaves stay as KVM gave them.
    CpuId::from_entries(&entries).unwrap_or_else(|e| {
        log::warn!(
            "CPUID: no room for the topology subleaves ({} entries: {e:?}); the guest sees each vCPU as a socket of its own",
            entries.len()
        );
        base.clone()
    })
}

/// `cpuid` with the timing leaf saying `tsc_khz`, where KVM's signature
/// leaf is there to point at it and the TSC is invariant (as QEMU does: a
/// rate that may change is not worth giving).
fn with_timing_leaf(cpuid: CpuId, tsc_khz: Option<u32>) -> CpuId {
    let Some(tsc_khz) = tsc_khz else {
        return cpuid;
    };
    let mut entries = cpuid.as_slice().to_vec();
    if !entries
        .iter()
        .any(|e| e.function == LEAF_POWER_MGMT && e.edx & EDX_INVARIANT_TSC != 0)
    {
        return cpuid;
    }
    let Some(signature) = entries
        .iter_mut()
        .find(|e| e.function == LEAF_HYPERVISOR && [e.ebx, e.ecx, e.edx] == KVM_SIGNATURE)
    else {
        return cpuid;
    };
    signature.eax = signature.eax.max(LEAF_TIMING);
    entries.retain(|e| e.function != LEAF_TIMING);
    entries.push(kvm_cpuid_entry2 {
        function: LEAF_TIMING,
        eax: tsc_khz,
        ebx: APIC_TIMER_KHZ,
        ..Default::default()
    });
    CpuId::from_entries(&entries).unwrap_or_else(|e| {
        log::warn!(
            "CPUID: no room for the timing leaf ({} entries: {e:?}); the guest calibrates its TSC itself",
            entries.len()
        );
        cpuid
    })
}

/// The TSC rate in kHz that `cpuid` gives the guest through the timing
/// leaf, if the leaf is there and KVM's signature leaf reaches it.
pub fn timing_leaf_khz(cpuid: &CpuId) -> Option<u32> {
    let leaves = cpuid.as_slice();
    leaves
        .iter()
        .find(|e| e.function == LEAF_HYPERVISOR && [e.ebx, e.ecx, e.edx] == KVM_SIGNATURE)
        .filter(|signature| signature.eax >= LEAF_TIMING)?;
    leaves
        .iter()
        .find(|e| e.function == LEAF_TIMING)
        .map(|timing| timing.eax)
        .filter(|&khz| khz > 0)
}

/// Patches `base` (from KVM_GET_SUPPORTED_CPUID) for vCPU `apic_id` of
/// `cpu_count`, whose TSC runs at `tsc_khz` (if KVM said).
pub fn for_vcpu(base: &CpuId, apic_id: u8, cpu_count: u8, tsc_khz: Option<u32>) -> CpuId {
    let mut cpuid = with_timing_leaf(with_topology_subleaves(base), tsc_khz);
    let apic = u32::from(apic_id);
    let count = u32::from(cpu_count);
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            LEAF_FEATURES => {
                entry.ebx = (entry.ebx & 0x0000_ffff) | (apic << 24) | (count << 16);
                entry.ecx |= ECX_HYPERVISOR;
                if cpu_count > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                // EAX[31:26]: cores per package - 1. Each core has its own
                // thread, so caches of level 1-2 are per core, level 3 shared.
                let level = (entry.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                // The field is 6 bits: more than 64 cores read as 64 (the
                // topology leaves give the real count).
                let cores = (count - 1).min(0x3f);
                entry.eax = (entry.eax & 0x3ff) | (cores << 26) | ((sharing & 0xfff) << 14);
            }
            LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY => {
                entry.edx = apic;
                match entry.index {
                    0 => {
                        entry.eax = 0;
                        entry.ebx = 1;
                        entry.ecx = (LEVEL_SMT << 8) | entry.index;
                    }
                    1 => {
                        entry.eax = core_id_bits(cpu_count);
                        entry.ebx = count;
                        entry.ecx = (LEVEL_CORE << 8) | entry.index;
                    }
                    _ => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = entry.index;
                    }
                }
            }
            _ => {}
        }
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    /// The timing leaf says the TSC's rate where KVM's signature leaf is
    /// there to point at it (its highest leaf raised to the timing leaf)
    /// and the TSC is invariant; without KVM's signature, a rate or an
    /// invariant TSC, nothing is added.
    #[test]
    fn the_timing_leaf_gives_the_tsc_rate_behind_kvms_signature() {
        let signature = kvm_cpuid_entry2 {
            function: LEAF_HYPERVISOR,
            eax: 0x4000_0001,
            ebx: KVM_SIGNATURE[0],
            ecx: KVM_SIGNATURE[1],
            edx: KVM_SIGNATURE[2],
            ..Default::default()
        };
        let invariant = kvm_cpuid_entry2 {
            function: LEAF_POWER_MGMT,
            edx: EDX_INVARIANT_TSC,
            ..Default::default()
        };
        let base = CpuId::from_entries(&[entry(1, 0), signature, invariant]).unwrap();
        let cpuid = for_vcpu(&base, 0, 1, Some(2_994_000));
        let leaf = |f: u32| cpuid.as_slice().iter().find(|e| e.function == f).copied();
        assert_eq!(leaf(LEAF_HYPERVISOR).unwrap().eax, LEAF_TIMING);
        let timing = leaf(LEAF_TIMING).expect("the timing leaf");
        assert_eq!((timing.eax, timing.ebx), (2_994_000, APIC_TIMER_KHZ));
        assert_eq!(timing_leaf_khz(&cpuid), Some(2_994_000));

        let no_rate = for_vcpu(&base, 0, 1, None);
        assert!(no_rate.as_slice().iter().all(|e| e.function != LEAF_TIMING));
        assert_eq!(timing_leaf_khz(&no_rate), None);
        let varying = CpuId::from_entries(&[signature, entry(LEAF_POWER_MGMT, 0)]).unwrap();
        let cpuid = for_vcpu(&varying, 0, 1, Some(2_994_000));
        assert!(cpuid.as_slice().iter().all(|e| e.function != LEAF_TIMING));
        assert_eq!(timing_leaf_khz(&cpuid), None);
        let other = CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                ebx: 0x1234,
                ..signature
            },
            invariant,
        ])
        .unwrap();
        let cpuid = for_vcpu(&other, 0, 1, Some(2_994_000));
        assert!(cpuid.as_slice().iter().all(|e| e.function != LEAF_TIMING));
        assert_eq!(cpuid.as_slice()[0].eax, 0x4000_0001);
        assert_eq!(timing_leaf_khz(&cpuid), None);
    }

    #[test]
    fn apic_id_and_topology_are_per_vcpu() {
        let base = CpuId::from_entries(&[entry(1, 0), entry(0xb, 0), entry(0xb, 1)]).unwrap();
        let cpuid = for_vcpu(&base, 3, 4, None);
        let leaves = cpuid.as_slice();
        assert_eq!(leaves[0].ebx >> 24, 3);
        assert_eq!((leaves[0].ebx >> 16) & 0xff, 4);
        assert_ne!(leaves[0].ecx & ECX_HYPERVISOR, 0);
        assert_eq!(leaves[1].edx, 3);
        assert_eq!(leaves[2].ebx, 4);
        assert_eq!(leaves[2].eax, 2);
    }

    /// KVM (Linux 6.1 on) gives leaf 0xB's subleaf 0 alone: the core level
    /// (subleaf 1) and the list's end (subleaf 2) are added, so that the
    /// vCPUs are cores of one socket.
    #[test]
    fn a_topology_leaf_without_its_core_level_gets_one() {
        let base = CpuId::from_entries(&[entry(1, 0), entry(0xb, 0)]).unwrap();
        let cpuid = for_vcpu(&base, 2, 4, None);
        let sub = |index: u32| {
            *cpuid
                .as_slice()
                .iter()
                .find(|e| e.function == 0xb && e.index == index)
                .unwrap_or_else(|| panic!("no subleaf {index}"))
        };
        assert_eq!((sub(0).ecx >> 8) & 0xff, LEVEL_SMT);
        assert_eq!(sub(0).ebx, 1);
        assert_eq!((sub(1).ecx >> 8) & 0xff, LEVEL_CORE);
        assert_eq!(sub(1).ebx, 4);
        assert_eq!(sub(1).eax, 2, "APIC-ID bits for 4 cores");
        assert_eq!(sub(1).edx, 2, "the vCPU's x2APIC ID");
        assert_ne!(sub(1).flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX, 0);
        assert_eq!((sub(2).ecx >> 8) & 0xff, 0, "the list ends");
        // No leaf 0x1F from KVM: none is made up.
        assert!(!cpuid.as_slice().iter().any(|e| e.function == 0x1f));
    }

    /// Leaf 4's cores field is 6 bits: past 64 vCPUs it says 64, never a
    /// count wrapped into a smaller one.
    #[test]
    fn cache_leaf_core_counts_saturate_instead_of_wrapping() {
        let l3 = |eax: u32| kvm_cpuid_entry2 { eax, ..entry(4, 3) };
        let base = CpuId::from_entries(&[l3(3 << 5)]).unwrap();
        for (cpus, cores_field) in [(4u8, 3u32), (64, 63), (100, 63), (254, 63)] {
            let cpuid = for_vcpu(&base, 0, cpus, None);
            let eax = cpuid.as_slice()[0].eax;
            assert_eq!(eax >> 26, cores_field, "{cpus} vCPUs");
            assert_eq!((eax >> 14) & 0xfff, u32::from(cpus) - 1, "{cpus} vCPUs");
            assert_eq!((eax >> 5) & 0x7, 3, "{cpus} vCPUs: the cache level");
        }
    }
}

//! Per-vCPU CPUID: what KVM supports, with this vCPU's APIC ID and a
//! topology of one socket holding `cpu_count` single-threaded cores.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;

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

/// Patches `base` (from KVM_GET_SUPPORTED_CPUID) for vCPU `apic_id` of `cpu_count`.
pub fn for_vcpu(base: &CpuId, apic_id: u8, cpu_count: u8) -> CpuId {
    let mut cpuid = with_topology_subleaves(base);
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

    #[test]
    fn apic_id_and_topology_are_per_vcpu() {
        let base = CpuId::from_entries(&[entry(1, 0), entry(0xb, 0), entry(0xb, 1)]).unwrap();
        let cpuid = for_vcpu(&base, 3, 4);
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
        let cpuid = for_vcpu(&base, 2, 4);
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
            let cpuid = for_vcpu(&base, 0, cpus);
            let eax = cpuid.as_slice()[0].eax;
            assert_eq!(eax >> 26, cores_field, "{cpus} vCPUs");
            assert_eq!((eax >> 14) & 0xfff, u32::from(cpus) - 1, "{cpus} vCPUs");
            assert_eq!((eax >> 5) & 0x7, 3, "{cpus} vCPUs: the cache level");
        }
    }
}

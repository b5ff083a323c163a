//! Loading the kernel (bzImage or PVH ELF) and the initramfs, and writing
//! the boot information each protocol expects (zero page or hvm_start_info).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, KernelLoader};
use thiserror::Error;
use vm_memory::{ByteValued, Bytes, GuestAddress};

use super::layout::{self, E820Entry};
use super::regs::EntryMode;
use crate::vstate::memory::GuestMemory;

const PVH_START_INFO_MAGIC: u32 = 0x336e_c578;
/// The boot protocol's "undefined loader" ID.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
const HDRS_MAGIC: u32 = 0x5372_6448;
/// Offset of the 64-bit entry point from the start of the protected-mode kernel.
const LINUX64_ENTRY_OFFSET: u64 = 0x200;
/// Boot protocol 2.12: the first with `xloadflags`, which says whether the
/// kernel has the 64-bit entry.
const BOOT_PROTOCOL_64BIT: u16 = 0x020c;
/// xloadflags: the kernel has the 64-bit entry point at 0x200.
const XLF_KERNEL_64: u16 = 1 << 0;

#[derive(Debug, Error)]
pub enum BootError {
    #[error("cannot open the kernel {0:?}")]
    OpenKernel(PathBuf, #[source] std::io::Error),
    #[error("--kernel {0:?}: not a bzImage or an ELF kernel")]
    UnknownKernelFormat(PathBuf),
    #[error("--kernel {0:?}: cannot load the ELF kernel")]
    LoadElf(PathBuf, #[source] linux_loader::loader::Error),
    #[error("--kernel {0:?}: the ELF kernel has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)")]
    NoPvhEntry(PathBuf),
    #[error("--kernel {0:?}: cannot load the bzImage")]
    LoadBzImage(PathBuf, #[source] linux_loader::loader::Error),
    #[error(
        "--kernel {0:?}: the bzImage has no 64-bit entry point (boot protocol {1:#x}; a 64-bit kernel with protocol 2.12 or later is needed)"
    )]
    OldBzImage(PathBuf, u16),
    #[error("--kernel {0:?}: not a 64-bit ELF file")]
    Not64BitElf(PathBuf),
    #[error("--kernel {0:?}: not an x86-64 executable (ELF machine {1}, type {2})")]
    NotX86Executable(PathBuf, u16, u16),
    #[error("--kernel {path:?}: the PVH entry point {entry:#x} is in none of its loaded segments")]
    PvhEntryOutside { path: PathBuf, entry: u64 },
    #[error("--kernel {path:?}: cannot read its ELF headers (is it cut short?)")]
    ReadElfHeaders {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--kernel {path:?}: a segment at {start:#x}..{end:#x} is not in guest RAM between 1 MiB and {ram_end:#x}")]
    ElfSegmentOutside {
        path: PathBuf,
        start: u64,
        end: u64,
        ram_end: u64,
    },
    #[error("--kernel {path:?}: segments at {first:#x} and {second:#x} overlap")]
    ElfSegmentsOverlap {
        path: PathBuf,
        first: u64,
        second: u64,
    },
    #[error("--cmdline: {len} bytes, more than the {max} this kernel takes")]
    CmdlineTooLong { len: usize, max: u32 },
    #[error(
        "--kernel {path:?}: it needs guest RAM up to {needs:#x} to start; give the VM more memory"
    )]
    KernelTooLarge { path: PathBuf, needs: u64 },
    #[error("--kernel {0:?}: {1} ELF program headers (at most {MAX_PROGRAM_HEADERS} are taken)")]
    TooManyProgramHeaders(PathBuf, u16),
    #[error("--kernel {path:?}: a bzImage cut short ({size} bytes; its setup header says at least {needs})")]
    TruncatedBzImage {
        path: PathBuf,
        size: u64,
        needs: u64,
    },
    #[error("--cmdline: not a command line the kernel can take (at most {max} bytes)")]
    Cmdline {
        max: usize,
        #[source]
        source: linux_loader::cmdline::Error,
    },
    #[error("cannot write the command line to guest memory")]
    WriteCmdline(#[source] linux_loader::loader::Error),
    #[error("cannot read the initramfs {0:?}")]
    ReadInitramfs(PathBuf, #[source] std::io::Error),
    #[error("--initramfs {path:?}: {size} bytes do not fit in guest RAM below {limit:#x}")]
    InitramfsTooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("cannot write the initramfs to guest memory")]
    WriteInitramfs(#[source] vm_memory::GuestMemoryError),
    #[error("cannot clear the kernel's zero-filled memory (BSS)")]
    WriteKernel(#[source] vm_memory::GuestMemoryError),
    #[error("cannot write the boot information to guest memory")]
    Configure(#[source] linux_loader::configurator::Error),
}

/// The kind of kernel that was loaded.
enum LoadedKernel {
    Pvh {
        entry: u64,
        end: u64,
    },
    Linux {
        kernel_load: u64,
        end: u64,
        header: setup_header,
    },
}

/// What the vCPU set-up needs to know after loading.
#[derive(Debug, Clone, Copy)]
pub struct BootInfo {
    pub entry: EntryMode,
}

const ELFCLASS64: u8 = 2;
const ET_EXEC: u16 = 2;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
/// What Linux keeps of a command line on x86 (COMMAND_LINE_SIZE, its NUL
/// included); a PVH kernel is not asked how much it takes.
const LINUX_COMMAND_LINE_SIZE: usize = 2048;
/// Program headers looked at, at most (Linux has a handful).
const MAX_PROGRAM_HEADERS: u16 = 256;

/// A loadable ELF segment: its guest address, the bytes the file gives it,
/// and its size in memory (the rest is zeros).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Segment {
    start: u64,
    filesz: u64,
    memsz: u64,
}

impl Segment {
    fn end(&self) -> u64 {
        self.start + self.filesz.max(self.memsz)
    }
}

/// Checks an ELF kernel before anything is loaded: an x86-64 executable,
/// each loadable segment wholly in RAM between 1 MiB (below are the boot
/// structures and ACPI tables) and `ram_end`, none overlapping another.
/// Returns the segments, by address.
fn check_elf_segments(
    file: &mut File,
    path: &Path,
    ram_end: u64,
) -> Result<Vec<Segment>, BootError> {
    let unreadable = |source| BootError::ReadElfHeaders {
        path: path.to_path_buf(),
        source,
    };
    let mut ehdr = [0u8; 64];
    file.seek(SeekFrom::Start(0)).map_err(unreadable)?;
    file.read_exact(&mut ehdr).map_err(unreadable)?;
    if ehdr[4] != ELFCLASS64 {
        return Err(BootError::Not64BitElf(path.to_path_buf()));
    }
    let u16_at = |b: &[u8], at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
    let u32_at = |b: &[u8], at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let u64_at = |b: &[u8], at: usize| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&b[at..at + 8]);
        u64::from_le_bytes(bytes)
    };
    let (elf_type, machine) = (u16_at(&ehdr, 16), u16_at(&ehdr, 18));
    if elf_type != ET_EXEC || machine != EM_X86_64 {
        return Err(BootError::NotX86Executable(
            path.to_path_buf(),
            machine,
            elf_type,
        ));
    }
    let phoff = u64_at(&ehdr, 32);
    let phentsize = u16_at(&ehdr, 54);
    let phnum = u16_at(&ehdr, 56);
    // linux-loader reads every header at the ELF64 size: the check looks
    // at exactly what it will load.
    if phentsize != 56 {
        return Err(BootError::Not64BitElf(path.to_path_buf()));
    }
    if phnum > MAX_PROGRAM_HEADERS {
        return Err(BootError::TooManyProgramHeaders(path.to_path_buf(), phnum));
    }
    let mut segments: Vec<Segment> = Vec::new();
    let mut phdr = vec![0u8; usize::from(phentsize)];
    for i in 0..u64::from(phnum) {
        let at = phoff
            .checked_add(i * u64::from(phentsize))
            .ok_or_else(|| unreadable(std::io::ErrorKind::InvalidData.into()))?;
        file.seek(SeekFrom::Start(at)).map_err(unreadable)?;
        file.read_exact(&mut phdr).map_err(unreadable)?;
        if u32_at(&phdr, 0) != PT_LOAD {
            continue;
        }
        let (start, filesz, memsz) = (u64_at(&phdr, 24), u64_at(&phdr, 32), u64_at(&phdr, 40));
        let end = start.checked_add(filesz.max(memsz));
        match end {
            Some(end) if start >= layout::HIGH_RAM_START && end <= ram_end => {
                segments.push(Segment {
                    start,
                    filesz,
                    memsz,
                })
            }
            _ => {
                return Err(BootError::ElfSegmentOutside {
                    path: path.to_path_buf(),
                    start,
                    end: end.unwrap_or(u64::MAX),
                    ram_end,
                })
            }
        }
    }
    segments.sort_unstable();
    for pair in segments.windows(2) {
        if pair[1].start < pair[0].end() {
            return Err(BootError::ElfSegmentsOverlap {
                path: path.to_path_buf(),
                first: pair[0].start,
                second: pair[1].start,
            });
        }
    }
    file.seek(SeekFrom::Start(0)).map_err(unreadable)?;
    Ok(segments)
}

/// Zeroes each segment's memory past what the file gives it (its BSS):
/// linux-loader writes only the file's bytes, and after an in-place reboot
/// guest RAM still holds what the last boot left there.
fn zero_segment_tails(
    mem: &GuestMemory,
    segments: &[Segment],
) -> Result<(), vm_memory::GuestMemoryError> {
    const ZEROS: [u8; 4096] = [0; 4096];
    for s in segments.iter().filter(|s| s.memsz > s.filesz) {
        let mut at = s.start + s.filesz;
        let end = s.start + s.memsz;
        while at < end {
            let n = (end - at).min(ZEROS.len() as u64) as usize;
            mem.write_slice(&ZEROS[..n], GuestAddress(at))?;
            at += n as u64;
        }
    }
    Ok(())
}

fn load_kernel(mem: &GuestMemory, path: &Path, ram_end: u64) -> Result<LoadedKernel, BootError> {
    let mut file = File::open(path).map_err(|e| BootError::OpenKernel(path.to_path_buf(), e))?;
    let mut magic = [0u8; 4];
    let is_elf = file.read_exact(&mut magic).is_ok() && magic == *b"\x7fELF";
    file.seek(SeekFrom::Start(0))
        .map_err(|e| BootError::OpenKernel(path.to_path_buf(), e))?;
    if is_elf {
        let segments = check_elf_segments(&mut file, path, ram_end)?;
        let segments_end = segments.last().map_or(layout::HIGH_RAM_START, Segment::end);
        let result = Elf::load(
            mem,
            None,
            &mut file,
            Some(GuestAddress(layout::HIGH_RAM_START)),
        )
        .map_err(|e| BootError::LoadElf(path.to_path_buf(), e))?;
        let PvhBootCapability::PvhEntryPresent(entry) = result.pvh_boot_cap else {
            return Err(BootError::NoPvhEntry(path.to_path_buf()));
        };
        if !segments
            .iter()
            .any(|s| (s.start..s.end()).contains(&entry.0))
        {
            return Err(BootError::PvhEntryOutside {
                path: path.to_path_buf(),
                entry: entry.0,
            });
        }
        zero_segment_tails(mem, &segments).map_err(BootError::WriteKernel)?;
        return Ok(LoadedKernel::Pvh {
            entry: entry.0,
            end: result.kernel_end.max(segments_end),
        });
    }
    check_bzimage_size(&mut file, path, ram_end)?;
    // At 1 MiB, where `check_bzimage_size` measured it, whatever the
    // header's code32_start says.
    match BzImage::load(
        mem,
        Some(GuestAddress(layout::HIGH_RAM_START)),
        &mut file,
        Some(GuestAddress(layout::HIGH_RAM_START)),
    ) {
        Ok(result) => {
            let header = result
                .setup_header
                .ok_or_else(|| BootError::UnknownKernelFormat(path.to_path_buf()))?;
            let (version, xloadflags) = (header.version, header.xloadflags);
            if version < BOOT_PROTOCOL_64BIT || xloadflags & XLF_KERNEL_64 == 0 {
                return Err(BootError::OldBzImage(path.to_path_buf(), version));
            }
            let kernel_load = result.kernel_load.0;
            Ok(LoadedKernel::Linux {
                kernel_load,
                end: linux_footprint_end(&header, kernel_load, result.kernel_end),
                header,
            })
        }
        Err(linux_loader::loader::Error::Bzimage(
            linux_loader::loader::bzimage::Error::InvalidBzImage,
        )) => Err(BootError::UnknownKernelFormat(path.to_path_buf())),
        Err(e) => Err(BootError::LoadBzImage(path.to_path_buf(), e)),
    }
}

/// Checks a file that has a bzImage's setup header against its own
/// sizes and guest RAM before linux-loader reads it (whose errors say
/// neither): the setup sectors must be there, and the protected-mode
/// kernel after them must fit between 1 MiB and `ram_end`. Other files
/// are left to the loader to refuse.
fn check_bzimage_size(file: &mut File, path: &Path, ram_end: u64) -> Result<(), BootError> {
    const SETUP_SECTS: u64 = 0x1f1;
    const HEADER_MAGIC: u64 = 0x202;
    let unreadable = |e| BootError::OpenKernel(path.to_path_buf(), e);
    let size = file.metadata().map_err(unreadable)?.len();
    let mut head = [0u8; 0x206];
    if size < head.len() as u64 {
        return Ok(());
    }
    file.read_exact(&mut head).map_err(unreadable)?;
    file.seek(SeekFrom::Start(0)).map_err(unreadable)?;
    if head[HEADER_MAGIC as usize..] != *b"HdrS" {
        return Ok(());
    }
    // 0 means 4, as in the boot protocol.
    let sects = match head[SETUP_SECTS as usize] {
        0 => 4,
        n => u64::from(n),
    };
    let setup = (sects + 1) * 512;
    if size < setup {
        return Err(BootError::TruncatedBzImage {
            path: path.to_path_buf(),
            size,
            needs: setup,
        });
    }
    let needs = layout::HIGH_RAM_START + (size - setup);
    if needs > ram_end {
        return Err(BootError::KernelTooLarge {
            path: path.to_path_buf(),
            needs,
        });
    }
    Ok(())
}

/// Where a bzImage's kernel ends up needing memory to before it reads the
/// memory map: the compressed image where it was loaded, and `init_size`
/// bytes from where it decompresses to (its load address aligned to
/// `kernel_alignment`, and no lower than `pref_address`).
fn linux_footprint_end(header: &setup_header, kernel_load: u64, image_end: u64) -> u64 {
    let align = u64::from(header.kernel_alignment).max(1);
    let runtime_start = kernel_load
        .checked_next_multiple_of(align)
        .unwrap_or(u64::MAX)
        .max(header.pref_address);
    runtime_start
        .saturating_add(u64::from(header.init_size))
        .max(image_end)
}

/// Loads the initramfs at the top of RAM below `limit`, above `kernel_end`.
fn load_initramfs(
    mem: &GuestMemory,
    path: &Path,
    kernel_end: u64,
    limit: u64,
) -> Result<(u64, u64), BootError> {
    let unreadable = |e| BootError::ReadInitramfs(path.to_path_buf(), e);
    let mut file = File::open(path).map_err(unreadable)?;
    // The size first: a file larger than the room is refused unread.
    let size = file.metadata().map_err(unreadable)?.len();
    let too_large = || BootError::InitramfsTooLarge {
        path: path.to_path_buf(),
        size,
        limit,
    };
    let addr = limit.checked_sub(size).ok_or_else(too_large)? & !0xfff;
    if addr < kernel_end {
        return Err(too_large());
    }
    // Straight from the file into guest memory, a piece at a time: an
    // initramfs can be gigabytes (a copy on the heap would count against
    // the host twice, and one read(2) moves at most 2 GiB).
    const PIECE: u64 = 256 << 20;
    let mut done = 0u64;
    while done < size {
        let want = (size - done).min(PIECE) as usize;
        let n = mem
            .read_volatile_from(GuestAddress(addr + done), &mut file, want)
            .map_err(|e| match e {
                vm_memory::GuestMemoryError::IOError(e) => unreadable(e),
                other => BootError::WriteInitramfs(other),
            })?;
        if n == 0 {
            return Err(unreadable(std::io::Error::other(format!(
                "the file ended at byte {done} of {size} (it changed size while it was read)"
            ))));
        }
        done += n as u64;
    }
    Ok((addr, size))
}

#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct StartInfo(hvm_start_info);
// SAFETY: hvm_start_info is a plain-old-data repr(C) struct of integers.
unsafe impl ByteValued for StartInfo {}

#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct MemmapEntry(hvm_memmap_table_entry);
// SAFETY: hvm_memmap_table_entry is a plain-old-data repr(C) struct of integers.
unsafe impl ByteValued for MemmapEntry {}

#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct ModlistEntry(hvm_modlist_entry);
// SAFETY: hvm_modlist_entry is a plain-old-data repr(C) struct of integers.
unsafe impl ByteValued for ModlistEntry {}

/// Loads the kernel, command line and initramfs and writes the boot information.
pub fn load(
    mem: &GuestMemory,
    kernel: &Path,
    initramfs: Option<&Path>,
    cmdline: &str,
    memory_bytes: u64,
    rsdp_addr: u64,
) -> Result<BootInfo, BootError> {
    let loaded = load_kernel(mem, kernel, layout::low_ram_end(memory_bytes))?;

    // The area for it holds CMDLINE_MAX_SIZE bytes with the NUL; a bzImage
    // says its own limit, which is checked first.
    let area = layout::CMDLINE_MAX_SIZE - 1;
    let max = match &loaded {
        LoadedKernel::Linux { header, .. } => area.min(header.cmdline_size as usize),
        LoadedKernel::Pvh { .. } => area,
    };
    if cmdline.len() > max {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max: u32::try_from(max).unwrap_or(u32::MAX),
        });
    }
    let cmdline_obj = Cmdline::try_from(cmdline, layout::CMDLINE_MAX_SIZE).map_err(|source| {
        BootError::Cmdline {
            max: layout::CMDLINE_MAX_SIZE - 1,
            source,
        }
    })?;
    load_cmdline(mem, GuestAddress(layout::CMDLINE_START), &cmdline_obj)
        .map_err(BootError::WriteCmdline)?;
    let e820 = layout::e820_map(memory_bytes);
    let low_end = layout::low_ram_end(memory_bytes);

    match loaded {
        LoadedKernel::Pvh { entry, end } => {
            if cmdline.len() >= LINUX_COMMAND_LINE_SIZE {
                log::warn!(
                    "--cmdline: {} bytes; a Linux kernel booted through PVH keeps only the first {}",
                    cmdline.len(),
                    LINUX_COMMAND_LINE_SIZE - 1
                );
            }
            let mut start_info = hvm_start_info {
                magic: PVH_START_INFO_MAGIC,
                version: 1,
                cmdline_paddr: layout::CMDLINE_START,
                rsdp_paddr: rsdp_addr,
                memmap_paddr: layout::PVH_MEMMAP_START,
                memmap_entries: e820.len() as u32,
                ..Default::default()
            };
            let mut params = BootParams::new(
                &StartInfo(hvm_start_info::default()),
                GuestAddress(layout::PVH_INFO_START),
            );
            if let Some(path) = initramfs {
                let (addr, size) = load_initramfs(mem, path, end, low_end)?;
                start_info.nr_modules = 1;
                start_info.modlist_paddr = layout::PVH_MODLIST_START;
                params.set_modules(
                    &[ModlistEntry(hvm_modlist_entry {
                        paddr: addr,
                        size,
                        ..Default::default()
                    })],
                    GuestAddress(layout::PVH_MODLIST_START),
                );
            }
            params.header = StartInfo(start_info).as_slice().to_vec();
            let memmap: Vec<MemmapEntry> = e820.iter().map(pvh_memmap_entry).collect();
            params.set_sections(&memmap, GuestAddress(layout::PVH_MEMMAP_START));
            PvhBootConfigurator::write_bootparams(&params, mem).map_err(BootError::Configure)?;
            Ok(BootInfo {
                entry: EntryMode::Pvh { entry },
            })
        }
        LoadedKernel::Linux {
            kernel_load,
            end,
            header,
        } => {
            let mut zero_page = boot_params {
                hdr: header,
                ..Default::default()
            };
            zero_page.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
            zero_page.hdr.boot_flag = BOOT_FLAG_MAGIC;
            zero_page.hdr.header = HDRS_MAGIC;
            zero_page.hdr.cmd_line_ptr = layout::CMDLINE_START as u32;
            // The kernel's own limit (it copies no more), without the NUL.
            let max = header.cmdline_size;
            if cmdline.len() as u64 > u64::from(max) {
                return Err(BootError::CmdlineTooLong {
                    len: cmdline.len(),
                    max,
                });
            }
            if end > low_end {
                return Err(BootError::KernelTooLarge {
                    path: kernel.to_path_buf(),
                    needs: end,
                });
            }
            zero_page.acpi_rsdp_addr = rsdp_addr;
            if let Some(path) = initramfs {
                let limit = low_end.min(u64::from(header.initrd_addr_max) + 1);
                let (addr, size) = load_initramfs(mem, path, end, limit)?;
                zero_page.hdr.ramdisk_image = addr as u32;
                zero_page.hdr.ramdisk_size = size as u32;
            }
            for (slot, entry) in zero_page.e820_table.iter_mut().zip(&e820) {
                *slot = boot_e820_entry {
                    addr: entry.addr,
                    size: entry.size,
                    r#type: entry.kind as u32,
                };
            }
            zero_page.e820_entries = e820.len() as u8;
            let params = BootParams::new(&zero_page, GuestAddress(layout::ZERO_PAGE_START));
            LinuxBootConfigurator::write_bootparams(&params, mem).map_err(BootError::Configure)?;
            Ok(BootInfo {
                entry: EntryMode::Linux64 {
                    entry: kernel_load + LINUX64_ENTRY_OFFSET,
                },
            })
        }
    }
}

fn pvh_memmap_entry(entry: &E820Entry) -> MemmapEntry {
    MemmapEntry(hvm_memmap_table_entry {
        addr: entry.addr,
        size: entry.size,
        type_: entry.kind as u32,
        reserved: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::create_guest_ram;

    const MIB: u64 = 1 << 20;

    /// A bzImage with a 64-bit entry, one setup sector and 1 KiB of
    /// "compressed kernel", with `edit` applied to its header.
    fn fake_bzimage(dir: &Path, edit: impl FnOnce(&mut setup_header)) -> PathBuf {
        let mut header = setup_header {
            setup_sects: 1,
            boot_flag: BOOT_FLAG_MAGIC,
            header: HDRS_MAGIC,
            version: 0x020f,
            loadflags: 1,
            code32_start: layout::HIGH_RAM_START as u32,
            kernel_alignment: 2 * MIB as u32,
            xloadflags: XLF_KERNEL_64,
            cmdline_size: 255,
            pref_address: 16 * MIB,
            init_size: 8 * MIB as u32,
            initrd_addr_max: 0x7fff_ffff,
            ..Default::default()
        };
        edit(&mut header);
        let mut image = vec![0u8; 2048];
        let bytes = header.as_slice();
        image[0x1f1..0x1f1 + bytes.len()].copy_from_slice(bytes);
        let path = dir.join("bzImage");
        std::fs::write(&path, image).unwrap();
        path
    }

    fn boot(kernel: &Path, initramfs: Option<&Path>, cmdline: &str) -> Result<BootInfo, BootError> {
        let ram = create_guest_ram(64 * MIB, false).unwrap();
        load(
            &ram.memory,
            kernel,
            initramfs,
            cmdline,
            64 * MIB,
            layout::ACPI_START,
        )
    }

    #[test]
    fn a_bzimage_without_the_64_bit_entry_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(boot(&fake_bzimage(dir.path(), |_| {}), None, "console=ttyS0").is_ok());
        let i386 = fake_bzimage(dir.path(), |h| h.xloadflags = 0);
        assert!(matches!(
            boot(&i386, None, ""),
            Err(BootError::OldBzImage(..))
        ));
        let old = fake_bzimage(dir.path(), |h| h.version = 0x020b);
        assert!(matches!(
            boot(&old, None, ""),
            Err(BootError::OldBzImage(..))
        ));
    }

    #[test]
    fn a_command_line_longer_than_the_kernel_takes_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = fake_bzimage(dir.path(), |_| {});
        assert!(boot(&kernel, None, &"a".repeat(255)).is_ok());
        for len in [256, 70_000] {
            let err = boot(&kernel, None, &"a".repeat(len)).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("--cmdline: {len} bytes, more than the 255 this kernel takes")
            );
        }
        // A PVH kernel says no limit: past the area the command line is
        // written to, the length is named too.
        let at_1m = layout::HIGH_RAM_START;
        let pvh = fake_pvh_elf(dir.path(), 2, &[(at_1m, 256, 256)], Some(at_1m as u32 + 16));
        assert!(boot(&pvh, None, &"a".repeat(65_535)).is_ok());
        let err = boot(&pvh, None, &"a".repeat(70_000)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--cmdline: 70000 bytes, more than the 65535 this kernel takes"
        );
    }

    /// The kernel decompresses to `pref_address` and needs `init_size`
    /// from there: an initramfs must stay above that, and RAM reach it.
    #[test]
    fn the_initramfs_stays_clear_of_where_the_kernel_decompresses() {
        let dir = tempfile::tempdir().unwrap();
        let initramfs = dir.path().join("initrd");
        std::fs::File::create(&initramfs)
            .unwrap()
            .set_len(40 * MIB)
            .unwrap();
        // 16 MiB + 8 MiB: a 40 MiB initramfs fits below 64 MiB.
        let small = fake_bzimage(dir.path(), |_| {});
        assert!(boot(&small, Some(&initramfs), "").is_ok());
        // 16 MiB + 30 MiB: it would sit where the kernel decompresses.
        let large = fake_bzimage(dir.path(), |h| h.init_size = 30 * MIB as u32);
        assert!(matches!(
            boot(&large, Some(&initramfs), ""),
            Err(BootError::InitramfsTooLarge { .. })
        ));
        // More than RAM holds at all.
        let huge = fake_bzimage(dir.path(), |h| h.init_size = 60 * MIB as u32);
        assert!(matches!(
            boot(&huge, None, ""),
            Err(BootError::KernelTooLarge { .. })
        ));
    }

    /// linux-loader's own errors for these name neither the memory nor
    /// the file's size.
    #[test]
    fn a_bzimage_cut_short_or_larger_than_ram_is_named_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let cut = fake_bzimage(dir.path(), |h| h.setup_sects = 10);
        assert!(matches!(
            boot(&cut, None, ""),
            Err(BootError::TruncatedBzImage {
                size: 2048,
                needs: 5632,
                ..
            })
        ));
        let kernel = fake_bzimage(dir.path(), |_| {});
        std::fs::OpenOptions::new()
            .write(true)
            .open(&kernel)
            .unwrap()
            .set_len(80 * MIB)
            .unwrap();
        let err = boot(&kernel, None, "").unwrap_err();
        assert!(matches!(err, BootError::KernelTooLarge { .. }), "{err}");
        assert!(err.to_string().contains("give the VM more memory"), "{err}");
    }

    /// The segment check reads the program headers linux-loader loads: all
    /// of them, at the ELF64 size.
    #[test]
    fn elf_program_headers_the_check_cannot_see_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = fake_elf(dir.path(), 2, &[(layout::HIGH_RAM_START, 256, 256)]);
        let mut bytes = std::fs::read(&kernel).unwrap();
        bytes[56..58].copy_from_slice(&300u16.to_le_bytes());
        std::fs::write(&kernel, &bytes).unwrap();
        assert!(matches!(
            boot(&kernel, None, ""),
            Err(BootError::TooManyProgramHeaders(_, 300))
        ));
        bytes[56..58].copy_from_slice(&1u16.to_le_bytes());
        bytes[54..56].copy_from_slice(&64u16.to_le_bytes());
        std::fs::write(&kernel, &bytes).unwrap();
        assert!(matches!(
            boot(&kernel, None, ""),
            Err(BootError::Not64BitElf(_))
        ));
    }

    #[test]
    fn an_initramfs_larger_than_ram_is_refused_unread() {
        let dir = tempfile::tempdir().unwrap();
        let initramfs = dir.path().join("initrd");
        std::fs::File::create(&initramfs)
            .unwrap()
            .set_len(1 << 40)
            .unwrap();
        let kernel = fake_bzimage(dir.path(), |_| {});
        assert!(matches!(
            boot(&kernel, Some(&initramfs), ""),
            Err(BootError::InitramfsTooLarge { .. })
        ));
    }

    /// A 64-bit (or, with `class` 1, 32-bit) x86 ELF with one PT_LOAD per
    /// (physical address, file size, memory size), each 256 bytes of file.
    fn fake_elf(dir: &Path, class: u8, segments: &[(u64, u64, u64)]) -> PathBuf {
        fake_pvh_elf(dir, class, segments, None)
    }

    /// An ELF kernel with `segments` (guest address, file size, memory
    /// size; each gives up to 256 bytes of 0x90 from the file) and, with
    /// `entry`, a PVH entry note.
    fn fake_pvh_elf(
        dir: &Path,
        class: u8,
        segments: &[(u64, u64, u64)],
        entry: Option<u32>,
    ) -> PathBuf {
        const PT_NOTE: u32 = 4;
        const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
        let phnum = segments.len() + usize::from(entry.is_some());
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = class;
        elf[5] = 1; // little-endian
        elf[6] = 1; // version
        elf[16..18].copy_from_slice(&2u16.to_le_bytes()); // EXEC
        elf[18..20].copy_from_slice(&0x3eu16.to_le_bytes()); // x86-64
        elf[20..24].copy_from_slice(&1u32.to_le_bytes());
        elf[24..32].copy_from_slice(&layout::HIGH_RAM_START.to_le_bytes());
        elf[32..40].copy_from_slice(&64u64.to_le_bytes());
        elf[52..54].copy_from_slice(&64u16.to_le_bytes());
        elf[54..56].copy_from_slice(&56u16.to_le_bytes());
        elf[56..58].copy_from_slice(&(phnum as u16).to_le_bytes());
        let data_at = 64 + 56 * phnum as u64;
        let note_at = data_at + 256;
        for &(paddr, filesz, memsz) in segments {
            let mut phdr = [0u8; 56];
            phdr[..4].copy_from_slice(&PT_LOAD.to_le_bytes());
            phdr[8..16].copy_from_slice(&data_at.to_le_bytes());
            phdr[16..24].copy_from_slice(&paddr.to_le_bytes());
            phdr[24..32].copy_from_slice(&paddr.to_le_bytes());
            phdr[32..40].copy_from_slice(&filesz.to_le_bytes());
            phdr[40..48].copy_from_slice(&memsz.to_le_bytes());
            elf.extend_from_slice(&phdr);
        }
        let mut note = Vec::new();
        if let Some(entry) = entry {
            note.extend_from_slice(&4u32.to_le_bytes()); // name size
            note.extend_from_slice(&4u32.to_le_bytes()); // descriptor size
            note.extend_from_slice(&XEN_ELFNOTE_PHYS32_ENTRY.to_le_bytes());
            note.extend_from_slice(b"Xen\0");
            note.extend_from_slice(&entry.to_le_bytes());
            let mut phdr = [0u8; 56];
            phdr[..4].copy_from_slice(&PT_NOTE.to_le_bytes());
            phdr[8..16].copy_from_slice(&note_at.to_le_bytes());
            phdr[32..40].copy_from_slice(&(note.len() as u64).to_le_bytes());
            phdr[40..48].copy_from_slice(&(note.len() as u64).to_le_bytes());
            phdr[48..56].copy_from_slice(&4u64.to_le_bytes());
            elf.extend_from_slice(&phdr);
        }
        elf.resize(data_at as usize + 256, 0x90);
        elf.extend_from_slice(&note);
        let path = dir.join("kernel.elf");
        std::fs::write(&path, elf).unwrap();
        path
    }

    #[test]
    fn an_elf_file_that_is_not_an_x86_64_executable_is_named_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let path = fake_elf(dir.path(), 2, &[(layout::HIGH_RAM_START, 256, 256)]);
        let mut elf = std::fs::read(&path).unwrap();
        elf[18..20].copy_from_slice(&183u16.to_le_bytes()); // aarch64
        std::fs::write(&path, &elf).unwrap();
        let err = boot(&path, None, "").unwrap_err();
        assert!(
            matches!(err, BootError::NotX86Executable(_, 183, 2)),
            "{err}"
        );
        elf[18..20].copy_from_slice(&62u16.to_le_bytes());
        elf[16..18].copy_from_slice(&3u16.to_le_bytes()); // a shared object
        std::fs::write(&path, &elf).unwrap();
        assert!(matches!(
            boot(&path, None, ""),
            Err(BootError::NotX86Executable(_, 62, 3))
        ));
    }

    #[test]
    fn a_pvh_entry_outside_the_loaded_segments_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let at_1m = layout::HIGH_RAM_START;
        let inside = fake_pvh_elf(dir.path(), 2, &[(at_1m, 256, 256)], Some(at_1m as u32 + 16));
        assert!(boot(&inside, None, "").is_ok());
        let outside = fake_pvh_elf(dir.path(), 2, &[(at_1m, 256, 256)], Some(0x20_0000));
        let err = boot(&outside, None, "").unwrap_err();
        assert!(
            matches!(
                err,
                BootError::PvhEntryOutside {
                    entry: 0x20_0000,
                    ..
                }
            ),
            "{err}"
        );
    }

    /// What a segment has past its file bytes is zeros, even where guest
    /// RAM held something (an in-place reboot reuses it).
    #[test]
    fn a_segments_zero_filled_tail_is_cleared_in_ram_that_held_data() {
        let dir = tempfile::tempdir().unwrap();
        let at_1m = layout::HIGH_RAM_START;
        let kernel = fake_pvh_elf(
            dir.path(),
            2,
            &[(at_1m, 256, 3 * 4096 + 8)],
            Some(at_1m as u32),
        );
        let ram = create_guest_ram(64 * MIB, false).unwrap();
        let old = vec![0xaau8; 4 * 4096];
        ram.memory.write_slice(&old, GuestAddress(at_1m)).unwrap();
        load(&ram.memory, &kernel, None, "", 64 * MIB, layout::ACPI_START).unwrap();
        let mut back = vec![0u8; 4 * 4096];
        ram.memory
            .read_slice(&mut back, GuestAddress(at_1m))
            .unwrap();
        assert!(back[..256].iter().all(|&b| b == 0x90), "the file's bytes");
        let tail_end = 3 * 4096 + 8;
        assert!(back[256..tail_end].iter().all(|&b| b == 0), "the tail");
        assert!(
            back[tail_end..].iter().all(|&b| b == 0xaa),
            "past the segment"
        );
    }

    /// ELF segments are checked before anything is loaded: below 1 MiB
    /// they would land on the boot structures and ACPI tables.
    #[test]
    fn elf_segments_outside_ram_or_overlapping_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let at_1m = layout::HIGH_RAM_START;
        // A sound layout gets past the checks (to the missing PVH note).
        let sound = fake_elf(dir.path(), 2, &[(at_1m, 256, 256), (2 * MIB, 256, MIB)]);
        assert!(matches!(
            boot(&sound, None, ""),
            Err(BootError::NoPvhEntry(_))
        ));
        let elf32 = fake_elf(dir.path(), 1, &[(at_1m, 256, 256)]);
        assert!(matches!(
            boot(&elf32, None, ""),
            Err(BootError::Not64BitElf(_))
        ));
        for outside in [
            (0x8000, 256, 256),
            (at_1m, 256, 100 * MIB),
            (u64::MAX - 16, 256, 256),
        ] {
            let elf = fake_elf(dir.path(), 2, &[outside]);
            assert!(
                matches!(
                    boot(&elf, None, ""),
                    Err(BootError::ElfSegmentOutside { .. })
                ),
                "{outside:x?}"
            );
        }
        // The second starts inside the first one's zero-filled tail.
        let overlapping = fake_elf(
            dir.path(),
            2,
            &[(at_1m, 256, MIB), (at_1m + 4096, 256, 256)],
        );
        assert!(matches!(
            boot(&overlapping, None, ""),
            Err(BootError::ElfSegmentsOverlap { .. })
        ));
    }
}

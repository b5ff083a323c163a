//! MSI-X: the capability, the vector table and the pending-bit array, kept
//! in step with KVM routes (see `interrupts::msi`).

use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use crate::guest_warnings::GuestWarnings;
use crate::interrupts::msi::{GsiRouter, MsiError, MsiVector};

pub const CAP_ID: u8 = 0x11;
const ENTRY_SIZE: u64 = 16;
const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const VECTOR_MASKED: u32 = 1;
/// Where the local APICs take MSI messages: 0xFEE00000-0xFEEFFFFF.
const APIC_MESSAGE_WINDOW: u32 = 0xfee;
/// The data's delivery mode (bits 8-10): fixed and lowest priority carry a
/// vector, which must not be one of the 16 the APIC refuses.
const DELIVERY_MODE_SHIFT: u32 = 8;
const DELIVERY_LOWEST_PRIORITY: u32 = 1;
const FIRST_VALID_VECTOR: u32 = 0x10;

#[derive(Clone, Copy, Default)]
struct Entry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    control: u32,
}

impl Entry {
    /// Whether the message goes to the local APICs, with a vector they
    /// take. Anything else would be a memory write into the guest (nothing
    /// here models one) or an interrupt the APIC drops: such an entry is
    /// treated as masked, its signals held (a guest that unmasks an entry
    /// and then writes its address and data gets them once it is whole).
    fn is_apic_message(&self) -> bool {
        let carries_vector = (self.data >> DELIVERY_MODE_SHIFT) & 0x7 <= DELIVERY_LOWEST_PRIORITY;
        self.addr_hi == 0
            && self.addr_lo >> 20 == APIC_MESSAGE_WINDOW
            && !(carries_vector && self.data & 0xff < FIRST_VALID_VECTOR)
    }
}

pub struct Msix {
    entries: Vec<Entry>,
    vectors: Vec<MsiVector>,
    router: Arc<GsiRouter>,
    enabled: bool,
    function_masked: bool,
    /// The command register's bus-master bit: MSI-X messages are memory
    /// writes, which a function without it may not make.
    bus_master: bool,
    warnings: GuestWarnings,
}

impl Msix {
    pub fn new(router: Arc<GsiRouter>, count: u16) -> Result<Self, MsiError> {
        let mut vectors = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            vectors.push(MsiVector::new(&router)?);
        }
        Ok(Msix {
            entries: vec![
                Entry {
                    control: VECTOR_MASKED,
                    ..Default::default()
                };
                usize::from(count)
            ],
            vectors,
            router,
            enabled: false,
            function_masked: false,
            bus_master: false,
            warnings: GuestWarnings::default(),
        })
    }

    pub fn len(&self) -> u16 {
        self.entries.len() as u16
    }

    /// The capability body: ID, next (filled later), message control,
    /// table offset/BIR, PBA offset/BIR.
    pub fn capability(&self, bar: u8, table_offset: u32, pba_offset: u32) -> [u8; 12] {
        let mut cap = [0u8; 12];
        cap[0] = CAP_ID;
        cap[2..4].copy_from_slice(&(self.len() - 1).to_le_bytes());
        cap[4..8].copy_from_slice(&(table_offset | u32::from(bar)).to_le_bytes());
        cap[8..12].copy_from_slice(&(pba_offset | u32::from(bar)).to_le_bytes());
        cap
    }

    /// The guest wrote the capability's message control word.
    pub fn set_control(&mut self, control: u16) {
        self.enabled = control & CONTROL_ENABLE != 0;
        self.function_masked = control & CONTROL_FUNCTION_MASK != 0;
        // Cheap when nothing changed (a vector re-routes only a new
        // message), and a vector whose route failed is tried again.
        self.refresh_all();
    }

    fn refresh_all(&mut self) {
        for index in 0..self.entries.len() {
            self.refresh(index);
        }
    }

    /// The guest set or cleared bus mastering. Signals raised without it
    /// wait in their eventfds, and are delivered once it is back.
    pub fn set_bus_master(&mut self, on: bool) {
        if self.bus_master != on {
            self.bus_master = on;
            self.refresh_all();
        }
    }

    /// As at power-on: disabled, every entry cleared and masked, no bus
    /// mastering.
    pub fn reset(&mut self) {
        for entry in &mut self.entries {
            *entry = Entry {
                control: VECTOR_MASKED,
                ..Default::default()
            };
        }
        self.bus_master = false;
        self.enabled = false;
        self.function_masked = false;
        self.refresh_all();
        self.drop_held();
    }

    /// Takes the signals held for vectors that are not delivered (masked,
    /// MSI-X or bus mastering off): at a reset of the device behind them,
    /// they are the old driver's, and the next one's first unmask must
    /// raise nothing (VIRTIO 1.2, 2.1: no notification before DRIVER_OK).
    /// The device's rings are stopped by then, so no new one comes.
    pub fn drop_held(&self) {
        for (entry, vector) in self.entries.iter().zip(&self.vectors) {
            if !self.deliverable(entry) {
                // Non-blocking: nothing held reads EAGAIN.
                let _ = vector.event.read();
            }
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The eventfd that raises `vector`, if it exists.
    pub fn vector_event(&self, vector: u16) -> Option<&vmm_sys_util::eventfd::EventFd> {
        self.vectors.get(usize::from(vector)).map(|v| &v.event)
    }

    /// Whether the vector is attached: MSI-X on, bus mastering on, neither
    /// it nor the function masked, and a message the APICs take.
    fn deliverable(&self, entry: &Entry) -> bool {
        self.enabled
            && self.bus_master
            && !self.function_masked
            && entry.control & VECTOR_MASKED == 0
            && entry.is_apic_message()
    }

    fn refresh(&mut self, index: usize) {
        let entry = self.entries[index];
        let deliver = self.deliverable(&entry);
        if !deliver
            && self.enabled
            && !self.function_masked
            && entry.control & VECTOR_MASKED == 0
            && !entry.is_apic_message()
        {
            log::log!(
                self.warnings.level("MSI-X"),
                "MSI-X vector {index} unmasked with address {:#x} and data {:#x}, not an interrupt the APICs take: its interrupts are held",
                u64::from(entry.addr_hi) << 32 | u64::from(entry.addr_lo),
                entry.data
            );
        }
        let message = deliver.then(|| {
            (
                u64::from(entry.addr_hi) << 32 | u64::from(entry.addr_lo),
                entry.data,
            )
        });
        if let Err(e) = self.vectors[index].update(&self.router, message) {
            // KVM refusing a route or an irqfd is the host's failure, not
            // the guest's: never hushed by the guest's warnings.
            log::error!("MSI-X vector {index}: {e}");
        }
    }

    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        let index = (offset / ENTRY_SIZE) as usize;
        let Some(entry) = self.entries.get(index) else {
            data.fill(0);
            return;
        };
        let words = [entry.addr_lo, entry.addr_hi, entry.data, entry.control];
        let mut bytes = [0u8; 16];
        for (i, word) in words.iter().enumerate() {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&word.to_le_bytes());
        }
        let start = (offset % ENTRY_SIZE) as usize;
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = bytes.get(start + i).copied().unwrap_or(0);
        }
    }

    pub fn table_write(&mut self, offset: u64, data: &[u8]) {
        let index = (offset / ENTRY_SIZE) as usize;
        let Some(entry) = self.entries.get_mut(index) else {
            return;
        };
        let mut words = [entry.addr_lo, entry.addr_hi, entry.data, entry.control];
        let start = (offset % ENTRY_SIZE) as usize;
        for (i, byte) in data.iter().enumerate() {
            let pos = start + i;
            if pos >= 16 {
                break;
            }
            let word = &mut words[pos / 4];
            let shift = (pos % 4) * 8;
            *word = (*word & !(0xff << shift)) | (u32::from(*byte) << shift);
        }
        let old_control = entry.control;
        *entry = Entry {
            addr_lo: words[0],
            addr_hi: words[1],
            data: words[2],
            control: words[3] & VECTOR_MASKED,
        };
        // Re-route when the mask changes or an unmasked entry is rewritten.
        if entry.control != old_control || entry.control & VECTOR_MASKED == 0 {
            self.refresh(index);
        }
    }

    /// The pending-bit array from byte `offset`. A vector that is not
    /// delivered (masked, or held for another reason: MSI-X or bus
    /// mastering off, no APIC address) keeps its signals in its eventfd
    /// until it is, so its bit is whether that eventfd holds a count; read
    /// without taking it.
    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            let first = usize::try_from(offset)
                .unwrap_or(usize::MAX)
                .saturating_add(i)
                .saturating_mul(8);
            *byte = (0..8)
                .filter(|bit| self.pending(first.saturating_add(*bit)))
                .fold(0u8, |bits, bit| bits | 1 << bit);
        }
    }

    fn pending(&self, index: usize) -> bool {
        let (Some(entry), Some(vector)) = (self.entries.get(index), self.vectors.get(index)) else {
            return false;
        };
        if self.deliverable(entry) {
            return false;
        }
        let mut pfd = libc::pollfd {
            fd: vector.event.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is a valid pollfd for an eventfd we own; a zero
        // timeout only looks at its state.
        let ready = unsafe { libc::poll(&mut pfd, 1, 0) };
        ready > 0 && pfd.revents & libc::POLLIN != 0
    }
}

/// A device's MSI-X table and PBA, where they lie in its BAR, served under
/// the MSI-X state's own lock: a vCPU that masks a vector (Linux does, with
/// interrupts off, to move an interrupt) does not wait for the device's
/// lock, which a vCPU may hold while the device waits for its backend.
#[derive(Clone)]
pub struct MsixRegion {
    msix: Arc<Mutex<Msix>>,
    table: Range<u64>,
    pba: Range<u64>,
}

impl MsixRegion {
    pub fn new(msix: Arc<Mutex<Msix>>, table: Range<u64>, pba: Range<u64>) -> Self {
        MsixRegion { msix, table, pba }
    }

    /// Serves a read at `offset` in the BAR if it is the table's or the
    /// PBA's; false otherwise.
    pub fn read(&self, offset: u64, data: &mut [u8]) -> bool {
        if self.table.contains(&offset) {
            crate::bus::lock(&self.msix).table_read(offset - self.table.start, data);
        } else if self.pba.contains(&offset) {
            crate::bus::lock(&self.msix).pba_read(offset - self.pba.start, data);
        } else {
            return false;
        }
        true
    }

    /// Serves a write at `offset` in the BAR if it is the table's (the PBA
    /// is read-only); false otherwise.
    pub fn write(&self, offset: u64, data: &[u8]) -> bool {
        if self.table.contains(&offset) {
            crate::bus::lock(&self.msix).table_write(offset - self.table.start, data);
        } else if !self.pba.contains(&offset) {
            return false;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::create_guest_ram;

    fn entry_bytes(addr: u32, data: u32, masked: bool) -> [u8; 16] {
        let mut bytes = [0u8; 16];
        bytes[0..4].copy_from_slice(&addr.to_le_bytes());
        bytes[8..12].copy_from_slice(&data.to_le_bytes());
        bytes[12] = u8::from(masked);
        bytes
    }

    /// A masked vector's signals wait in its eventfd; unmasking delivers
    /// them (KVM's irqfd consumes the count). Needs /dev/kvm.
    #[test]
    fn masking_holds_signals_until_unmasked() {
        let kvm = kvm_ioctls::Kvm::new().expect("this test needs /dev/kvm");
        let ram = create_guest_ram(16 << 20, false).unwrap();
        let vm = Arc::new(crate::vstate::vm::create_vm(&kvm, &ram.memory).unwrap());
        let _vcpu = vm.create_vcpu(0).unwrap();
        let router = Arc::new(GsiRouter::new(vm.clone()));
        let mut msix = Msix::new(router, 2).unwrap();
        let signal = msix.vector_event(0).unwrap().try_clone().unwrap();
        let event = || &signal;
        let settle = || std::thread::sleep(std::time::Duration::from_millis(20));

        msix.set_control(CONTROL_ENABLE);
        msix.table_write(0, &entry_bytes(0xfee0_0000, 0x40, false));
        event().write(1).unwrap();
        settle();
        assert_eq!(
            event().read().unwrap(),
            1,
            "a signal was delivered without bus mastering"
        );
        msix.set_bus_master(true);
        event().write(1).unwrap();
        settle();
        assert!(
            event().read().is_err(),
            "an unmasked vector's signal was not taken by KVM"
        );
        event().write(1).unwrap();
        msix.set_bus_master(false);
        msix.set_bus_master(true);
        settle();
        assert!(
            event().read().is_err(),
            "a signal held while bus mastering was off was not delivered"
        );

        let pba = |msix: &Msix| {
            let mut bits = [0u8; 8];
            msix.pba_read(0, &mut bits);
            u64::from_le_bytes(bits)
        };
        msix.table_write(0, &entry_bytes(0xfee0_0000, 0x40, true));
        assert_eq!(pba(&msix), 0, "pending with nothing signalled");
        event().write(1).unwrap();
        settle();
        assert_eq!(pba(&msix), 1, "a held signal is not pending in the PBA");
        assert_eq!(pba(&msix), 1, "reading the PBA took the signal");
        assert_eq!(
            event().read().unwrap(),
            1,
            "a masked vector's signal was not held"
        );
        assert_eq!(pba(&msix), 0, "pending after the signal was taken");

        event().write(1).unwrap();
        msix.table_write(0, &entry_bytes(0xfee0_0000, 0x40, false));
        settle();
        assert!(
            event().read().is_err(),
            "the held signal was not delivered on unmask"
        );
        assert_eq!(pba(&msix), 0, "pending after delivery");

        // The function mask holds every vector the same way.
        msix.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        event().write(1).unwrap();
        settle();
        assert_eq!(pba(&msix), 1, "held by the function mask, not pending");
        assert_eq!(event().read().unwrap(), 1);

        // Unmasked at an address no APIC answers (the entry's reset value,
        // say): held and pending; still held once the address is one but
        // the data is not yet (vector 0); delivered once both are.
        msix.set_control(CONTROL_ENABLE);
        msix.table_write(0, &entry_bytes(0, 0, false));
        event().write(1).unwrap();
        settle();
        assert_eq!(pba(&msix), 1, "held at address 0, not pending");
        msix.table_write(0, &0xfee0_0000u32.to_le_bytes());
        settle();
        assert_eq!(pba(&msix), 1, "held with vector 0, not pending");
        msix.table_write(8, &0x40u32.to_le_bytes());
        settle();
        assert!(
            event().read().is_err(),
            "the signal held at address 0 was not delivered"
        );
        // Held while bus mastering is off: pending too.
        msix.set_bus_master(false);
        event().write(1).unwrap();
        settle();
        assert_eq!(pba(&msix), 1, "held without bus mastering, not pending");
        msix.set_bus_master(true);
        settle();
        assert_eq!(pba(&msix), 0, "pending after delivery");

        let mut read_back = [0u8; 16];
        msix.table_read(0, &mut read_back);
        assert_eq!(read_back, entry_bytes(0xfee0_0000, 0x40, false));

        // A reset leaves every entry cleared and masked, as at power-on:
        // the next driver's vectors start from nothing, a signal held for
        // the old one included.
        msix.table_write(0, &entry_bytes(0xfee0_0000, 0x40, true));
        event().write(1).unwrap();
        msix.reset();
        assert!(event().read().is_err(), "a held signal outlived the reset");
        msix.table_read(0, &mut read_back);
        assert_eq!(read_back, entry_bytes(0, 0, true));
        msix.set_bus_master(true);
        msix.set_control(CONTROL_ENABLE);
        event().write(1).unwrap();
        settle();
        assert_eq!(event().read().unwrap(), 1, "held after the reset");
    }
}

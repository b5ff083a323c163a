//! A type-0 configuration space: the header, BARs with their sizing
//! behaviour, and a capability list. Registers are dwords with write masks.

/// Number of dword registers (256 bytes: the conventional space).
pub const NUM_REGS: usize = 64;

const COMMAND_REG: usize = 1;
const BAR0_REG: usize = 4;
const CAPABILITY_LIST_REG: usize = 13;
const STATUS_CAPABILITIES: u32 = 1 << 20;
/// Memory space, bus master, and INTx disable are writable in COMMAND.
const COMMAND_WRITABLE: u32 = 0x0406;
const COMMAND_BUS_MASTER: u32 = 1 << 2;
const BAR_MEM_64BIT: u32 = 0b100;
const FIRST_CAPABILITY: usize = 0x40;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarInfo {
    pub index: usize,
    pub addr: u64,
    pub size: u64,
}

pub struct PciConfiguration {
    regs: [u32; NUM_REGS],
    writable: [u32; NUM_REGS],
    bars: Vec<BarInfo>,
    last_capability: Option<usize>,
    next_capability: usize,
    /// The registers as the guest first finds them (`remember_power_on`),
    /// which a reset restores.
    power_on: Option<[u32; NUM_REGS]>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigSpaceError {
    #[error("no room for a {0}-byte capability in configuration space")]
    CapabilitySpace(usize),
    #[error("BAR {0} is invalid or already used")]
    Bar(usize),
}

impl PciConfiguration {
    pub fn new(vendor: u16, device: u16, class: u32, subsystem_id: u16) -> Self {
        let mut regs = [0u32; NUM_REGS];
        let mut writable = [0u32; NUM_REGS];
        regs[0] = u32::from(device) << 16 | u32::from(vendor);
        // Class code in bits 31:8; revision 1 (virtio 1.0 modern devices).
        regs[2] = class << 8 | 1;
        regs[11] = u32::from(subsystem_id) << 16 | u32::from(vendor);
        writable[COMMAND_REG] = COMMAND_WRITABLE;
        // Interrupt line is scratch space for the guest.
        writable[15] = 0xff;
        PciConfiguration {
            regs,
            writable,
            bars: Vec::new(),
            last_capability: None,
            next_capability: FIRST_CAPABILITY,
            power_on: None,
        }
    }

    /// Adds a 64-bit memory BAR at a fixed address (taking two registers).
    pub fn add_bar64(
        &mut self,
        index: usize,
        addr: u64,
        size: u64,
    ) -> Result<(), ConfigSpaceError> {
        if index > 4 || !size.is_power_of_two() || size < 16 || addr % size != 0 {
            return Err(ConfigSpaceError::Bar(index));
        }
        if self
            .bars
            .iter()
            .any(|b| b.index == index || b.index + 1 == index)
        {
            return Err(ConfigSpaceError::Bar(index));
        }
        let mask = !(size - 1);
        self.set_bar64(index, addr);
        self.writable[BAR0_REG + index] = mask as u32 & !0xf;
        self.writable[BAR0_REG + index + 1] = (mask >> 32) as u32;
        self.bars.push(BarInfo { index, addr, size });
        Ok(())
    }

    /// Takes the registers as they are now (the device fully made, before
    /// the guest runs) as their power-on state, which `reset` restores.
    pub fn remember_power_on(&mut self) {
        self.power_on = Some(self.regs);
    }

    /// Puts every register the guest may write back as it was at power-on
    /// (a platform reset): the command register, BARs, interrupt line,
    /// capability fields.
    pub fn reset(&mut self) {
        if let Some(power_on) = self.power_on {
            for ((reg, writable), first) in self.regs.iter_mut().zip(self.writable).zip(power_on) {
                *reg = (*reg & !writable) | (first & writable);
            }
        }
    }

    /// Puts every BAR back where `add_bar64` put it (a platform reset: the
    /// VMM is the firmware that assigned them).
    pub fn reset_bars(&mut self) {
        let placed: Vec<(usize, u64)> = self.bars.iter().map(|b| (b.index, b.addr)).collect();
        for (index, addr) in placed {
            self.set_bar64(index, addr);
        }
    }

    /// The two registers of a 64-bit memory BAR (not prefetchable) at `addr`.
    fn set_bar64(&mut self, index: usize, addr: u64) {
        self.regs[BAR0_REG + index] = (addr as u32) | BAR_MEM_64BIT;
        self.regs[BAR0_REG + index + 1] = (addr >> 32) as u32;
    }

    /// Appends a capability (`body` starts with its ID byte; the next
    /// pointer byte is filled in). Returns its offset.
    pub fn add_capability(&mut self, body: &[u8]) -> Result<usize, ConfigSpaceError> {
        let len = body.len().next_multiple_of(4);
        let offset = self.next_capability;
        if body.len() < 2 || offset + len > NUM_REGS * 4 {
            return Err(ConfigSpaceError::CapabilitySpace(body.len()));
        }
        for (i, byte) in body.iter().enumerate() {
            let value = if i == 1 { 0 } else { *byte };
            self.set_byte(offset + i, value);
        }
        match self.last_capability {
            Some(prev) => self.set_byte(prev + 1, offset as u8),
            None => {
                self.regs[CAPABILITY_LIST_REG] = offset as u32;
                self.regs[COMMAND_REG] |= STATUS_CAPABILITIES;
            }
        }
        self.last_capability = Some(offset);
        self.next_capability = offset + len;
        Ok(offset)
    }

    fn set_byte(&mut self, offset: usize, value: u8) {
        let shift = (offset % 4) * 8;
        let reg = &mut self.regs[offset / 4];
        *reg = (*reg & !(0xff << shift)) | (u32::from(value) << shift);
    }

    /// Makes bytes of a register writable by the guest (e.g. in a capability).
    pub fn set_writable(&mut self, reg: usize, mask: u32) {
        self.writable[reg] |= mask;
    }

    pub fn read(&self, reg: usize) -> u32 {
        self.regs.get(reg).copied().unwrap_or(0)
    }

    /// Applies a guest write through the register's write mask.
    pub fn write(&mut self, reg: usize, offset: u64, data: &[u8]) {
        if reg >= NUM_REGS || offset as usize + data.len() > 4 {
            return;
        }
        let mut value = self.regs[reg];
        for (i, byte) in data.iter().enumerate() {
            let shift = (offset as usize + i) * 8;
            let mask = self.writable[reg] & (0xff << shift);
            value = (value & !mask) | ((u32::from(*byte) << shift) & mask);
        }
        self.regs[reg] = value;
    }

    /// Whether the function may access memory and send MSIs (COMMAND bit 2).
    pub fn bus_master(&self) -> bool {
        self.regs[COMMAND_REG] & COMMAND_BUS_MASTER != 0
    }

    #[cfg(test)]
    fn command(&self) -> u32 {
        self.regs[COMMAND_REG] & 0xffff
    }

    /// The address the guest has programmed into a BAR now.
    #[cfg(test)]
    fn bar_addr(&self, index: usize) -> u64 {
        let lo = u64::from(self.regs[BAR0_REG + index] & !0xf);
        let hi = u64::from(self.regs[BAR0_REG + index + 1]);
        hi << 32 | lo
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bar_sizing_returns_the_size_mask_and_restores() {
        let mut config = PciConfiguration::new(0x1af4, 0x1042, 0x010000, 2);
        config.add_bar64(0, 0xc000_0000, 0x1_0000).unwrap();
        assert_eq!(config.read(4), 0xc000_0004);
        config.write(4, 0, &0xffff_ffffu32.to_le_bytes());
        config.write(5, 0, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(config.read(4), 0xffff_0004);
        assert_eq!(config.read(5), 0xffff_ffff);
        config.write(4, 0, &0xc000_0000u32.to_le_bytes());
        config.write(5, 0, &0u32.to_le_bytes());
        assert_eq!(config.bar_addr(0), 0xc000_0000);
    }

    #[test]
    fn capabilities_are_chained() {
        let mut config = PciConfiguration::new(0x1af4, 0x1042, 0x010000, 2);
        let first = config.add_capability(&[0x09, 0, 16, 1]).unwrap();
        let second = config.add_capability(&[0x11, 0, 0, 0, 0, 0, 0, 0]).unwrap();
        assert_eq!(config.read(13), first as u32);
        assert_eq!((config.read(first / 4) >> 8) & 0xff, second as u32);
        assert_eq!((config.read(second / 4) >> 8) & 0xff, 0);
        assert_ne!(config.read(1) & STATUS_CAPABILITIES, 0);
    }

    #[test]
    fn read_only_registers_ignore_writes() {
        let mut config = PciConfiguration::new(0x1af4, 0x1042, 0x010000, 2);
        config.write(0, 0, &[0, 0, 0, 0]);
        assert_eq!(config.read(0), 0x1042_1af4);
        config.write(1, 0, &[0x06, 0]);
        assert_eq!(config.command(), 0x06);
    }
}

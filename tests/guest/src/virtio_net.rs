// Register fields and frame fields are cut out of wider words on purpose.
#![allow(clippy::cast_possible_truncation)]
//! A virtio-net driver for modern virtio-pci devices (1af4:1041) and a tiny
//! IPv4 stack on top: it reports the MAC, link and queue pairs, sets the
//! pair count over the control queue, and, given `ip=A.B.C.D`, either pings
//! a host (`ping=A.B.C.D`: ARP, then three ICMP echo requests, sent on
//! each queue pair in use in turn) or answers
//! ARP and echo requests until it has answered `respond=N` of them.
//!
//! With `linkwatch` (and no `ip=`), it then reports the link status after
//! each of the next two configuration-change interrupts.
//!
//! Queues are polled (no interrupts). Every wait is bounded in time
//! (`clock`) and ends in a `FAIL` line when it runs out.

use core::fmt;
use core::sync::atomic::{fence, Ordering};

use crate::clock::{Deadline, SECOND};
use crate::irq;
use crate::pcicfg::Function;
use crate::serial::{say, Bytes};
use crate::virtio_pci::{locate, rd, wr, Device, DESC_NEXT, DESC_WRITE};
use crate::Fail;

/// A value the device reported, or "-" for one it did not.
struct OrDash(Option<u16>);

impl fmt::Display for OrDash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(v) => write!(f, "{v}"),
            None => f.write_str("-"),
        }
    }
}

const F_MTU: u64 = 1 << 3;
const F_MAC: u64 = 1 << 5;
const F_STATUS: u64 = 1 << 16;
const F_CTRL_VQ: u64 = 1 << 17;
const F_MQ: u64 = 1 << 22;

/// Queue pairs driven at most; a device may offer more.
const MAX_PAIRS: u16 = 4;
const QUEUE_SIZE: u16 = 16;
/// RX buffers posted per receive queue.
const RX_BUFFERS: u16 = 8;
const BUF_SIZE: u64 = 2048;
/// virtio_net_hdr_v1 (VERSION_1 always has num_buffers).
const HDR_LEN: usize = 12;

/// Per-NIC scratch RAM: ring pages, control buffers, TX and RX buffers.
const SCRATCH_BASE: u64 = 0x60_0000;
const SCRATCH_PER_NIC: u64 = 0x4_0000;
const RINGS: u64 = 0x0;
const CTRL_RING: u64 = 0x1_0000;
const CTRL_BUF: u64 = 0x1_1000;
const TX_BUF: u64 = 0x1_2000;
const RX_BUFS: u64 = 0x2_0000;

/// How long a transmission or control command may take.
const COMPLETION_TIMEOUT: u64 = 10 * SECOND;
/// How long each ARP or echo attempt waits for its reply, and attempts.
const REPLY_TIMEOUT: u64 = SECOND;
const ATTEMPTS: u32 = 10;
/// How long a responder waits for all its echo requests.
const RESPONDER_TIMEOUT: u64 = 120 * SECOND;
/// How long `linkwatch` waits for each configuration change.
const LINK_WATCH_TIMEOUT: u64 = 60 * SECOND;

const ETH_ARP: u16 = 0x0806;
const ETH_IPV4: u16 = 0x0800;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;
const ECHO_ID: u16 = 0x7467;
const ECHO_PAYLOAD: usize = 56;
const PINGS: u16 = 3;

#[derive(Clone, Copy, PartialEq, Eq)]
struct Ip([u8; 4]);

impl fmt::Display for Ip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d] = self.0;
        write!(f, "{a}.{b}.{c}.{d}")
    }
}

struct Mac([u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(":")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

fn parse_ip(text: &[u8]) -> Option<Ip> {
    let mut out = [0u8; 4];
    let mut parts = text.split(|&b| b == b'.');
    for byte in &mut out {
        *byte = parse_num(parts.next()?)?.try_into().ok()?;
    }
    parts.next().is_none().then_some(Ip(out))
}

fn parse_num(text: &[u8]) -> Option<u32> {
    if text.is_empty() || text.len() > 9 {
        return None;
    }
    text.iter().try_fold(0u32, |n, &b| {
        b.is_ascii_digit().then(|| n * 10 + u32::from(b - b'0'))
    })
}

/// The value of `key=` among the command line's words.
fn word_value<'a>(cmdline: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    cmdline
        .split(u8::is_ascii_whitespace)
        .find_map(|w| w.strip_prefix(key)?.strip_prefix(b"="))
}

/// What the command line asks of the NIC.
enum Mode {
    /// Only report the device.
    Report,
    Ping(Ip, Ip),
    Respond(Ip, u32),
}

fn mode(cmdline: &[u8]) -> Result<Mode, Fail> {
    let Some(ip) = word_value(cmdline, b"ip") else {
        return Ok(Mode::Report);
    };
    let ip = parse_ip(ip).ok_or(Fail::new("bad ip= on the command line"))?;
    if let Some(target) = word_value(cmdline, b"ping") {
        let target = parse_ip(target).ok_or(Fail::new("bad ping= on the command line"))?;
        return Ok(Mode::Ping(ip, target));
    }
    if let Some(count) = word_value(cmdline, b"respond") {
        let count = parse_num(count).ok_or(Fail::new("bad respond= on the command line"))?;
        return Ok(Mode::Respond(ip, count));
    }
    Ok(Mode::Report)
}

/// A split virtqueue the driver fills and polls.
struct Queue {
    index: u16,
    ring: u64,
    notify: u64,
    avail_idx: u16,
    last_used: u16,
}

impl Queue {
    fn desc(&self, i: u16) -> u64 {
        self.ring + 16 * u64::from(i % QUEUE_SIZE)
    }

    fn set_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = self.desc(i);
        wr(d, addr);
        wr(d + 8, len);
        wr(d + 12, flags);
        wr(d + 14, next);
    }

    /// Makes descriptor chain `head` available (without notifying).
    fn push(&mut self, head: u16) {
        let avail = self.ring + 0x200;
        wr(avail + 4 + 2 * u64::from(self.avail_idx % QUEUE_SIZE), head);
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        wr(avail + 2, self.avail_idx);
        fence(Ordering::SeqCst);
    }

    fn kick(&self) {
        wr(self.notify, self.index);
    }

    /// The next used element (id, len), if the device returned one.
    fn pop_used(&mut self) -> Option<(u16, u32)> {
        let used = self.ring + 0x400;
        let idx: u16 = rd(used + 2);
        if idx == self.last_used {
            return None;
        }
        fence(Ordering::SeqCst);
        let elem = used + 4 + 8 * u64::from(self.last_used % QUEUE_SIZE);
        self.last_used = self.last_used.wrapping_add(1);
        Some((rd::<u32>(elem) as u16, rd(elem + 4)))
    }

    /// Submits a chain and waits for the device to return it.
    fn submit_and_wait(&mut self, bufs: &[(u64, u32, bool)]) -> Result<u32, Fail> {
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let mut flags = if write { DESC_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= DESC_NEXT;
            }
            self.set_desc(i as u16, addr, len, flags, i as u16 + 1);
        }
        self.push(0);
        self.kick();
        let deadline = Deadline::after(COMPLETION_TIMEOUT);
        while !deadline.passed() {
            if let Some((_, len)) = self.pop_used() {
                return Ok(len);
            }
            core::hint::spin_loop();
        }
        Err(Fail::new("virtio-net request timed out"))
    }
}

struct Nic {
    dev: Device,
    mac: [u8; 6],
    rx: [Option<Queue>; MAX_PAIRS as usize],
    tx: [Option<Queue>; MAX_PAIRS as usize],
    scratch: u64,
    /// Receive queues polled.
    pairs: usize,
    /// Transmit queues in use: 1 until the device takes more pairs.
    tx_pairs: usize,
    /// The pair whose receive queue the frame being handled came on.
    rx_pair: usize,
}

impl Nic {
    fn rx_buf(&self, pair: usize, id: u16) -> u64 {
        self.scratch + RX_BUFS + BUF_SIZE * (pair as u64 * u64::from(RX_BUFFERS) + u64::from(id))
    }

    /// Sends one Ethernet frame (without the virtio header) on pair 0.
    fn send(&mut self, frame: &[u8]) -> Result<(), Fail> {
        self.send_on(0, frame)
    }

    /// Sends one Ethernet frame on the transmit queue of `pair` (which must
    /// be in use).
    fn send_on(&mut self, pair: usize, frame: &[u8]) -> Result<(), Fail> {
        let buf = self.scratch + TX_BUF;
        for i in 0..HDR_LEN as u64 {
            wr(buf + i, 0u8);
        }
        // Frames shorter than the Ethernet minimum are padded with zeros.
        let len = frame.len().max(60);
        for i in 0..len {
            wr(
                buf + (HDR_LEN + i) as u64,
                frame.get(i).copied().unwrap_or(0),
            );
        }
        self.tx[pair]
            .as_mut()
            .ok_or(Fail::new("virtio-net transmit queue not in use"))?
            .submit_and_wait(&[(buf, (HDR_LEN + len) as u32, false)])
            .map(|_| ())
    }

    /// Polls every receive queue once; hands a received frame to `handle`
    /// and gives its buffer back to the device.
    fn poll(
        &mut self,
        handle: &mut impl FnMut(&mut Nic, &[u8]) -> Result<(), Fail>,
    ) -> Result<bool, Fail> {
        let mut got = false;
        for pair in 0..self.pairs {
            let Some((id, len)) = self.rx[pair].as_mut().and_then(Queue::pop_used) else {
                continue;
            };
            got = true;
            let id = id % RX_BUFFERS;
            let buf = self.rx_buf(pair, id);
            let len = (len as usize).min(BUF_SIZE as usize);
            let mut frame = [0u8; 1514];
            let frame_len = len.saturating_sub(HDR_LEN).min(frame.len());
            for (i, byte) in frame[..frame_len].iter_mut().enumerate() {
                *byte = rd(buf + (HDR_LEN + i) as u64);
            }
            if let Some(q) = self.rx[pair].as_mut() {
                q.push(id);
                q.kick();
            }
            self.rx_pair = pair;
            handle(self, &frame[..frame_len])?;
        }
        Ok(got)
    }

    /// Answers an ARP request for `ip`; returns true if `frame` was one.
    fn answer_arp(&mut self, frame: &[u8], ip: Ip) -> Result<bool, Fail> {
        if ethertype(frame) != ETH_ARP || frame.len() < 42 || be16(frame, 20) != 1 {
            return Ok(false);
        }
        if frame[38..42] != ip.0 {
            return Ok(false);
        }
        let mut reply = [0u8; 42];
        reply[0..6].copy_from_slice(&frame[22..28]);
        arp_frame(&mut reply, self.mac, 2, ip);
        reply[32..38].copy_from_slice(&frame[22..28]);
        reply[38..42].copy_from_slice(&frame[28..32]);
        self.send(&reply)?;
        Ok(true)
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn ethertype(frame: &[u8]) -> u16 {
    if frame.len() < 14 {
        return 0;
    }
    be16(frame, 12)
}

/// Fills the Ethernet source/type and the ARP body up to the sender
/// address (operation `op`); the caller sets the destination and target.
fn arp_frame(f: &mut [u8; 42], mac: [u8; 6], op: u16, ip: Ip) {
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&ETH_ARP.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes());
    f[16..18].copy_from_slice(&ETH_IPV4.to_be_bytes());
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&op.to_be_bytes());
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&ip.0);
}

/// The Internet checksum of `data`.
fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for pair in data.chunks(2) {
        let word = u16::from_be_bytes([pair[0], pair.get(1).copied().unwrap_or(0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn payload_byte(i: usize) -> u8 {
    (i as u8).wrapping_mul(3).wrapping_add(0x21)
}

const ECHO_FRAME: usize = 14 + 20 + 8 + ECHO_PAYLOAD;

/// One end of an IPv4 exchange on the link.
#[derive(Clone, Copy)]
struct Station {
    mac: [u8; 6],
    ip: Ip,
}

/// An ICMP echo message: request or reply (`kind`), id, sequence number and
/// payload.
struct Echo<'a> {
    kind: u8,
    id: u16,
    seq: u16,
    payload: &'a [u8],
}

/// An IPv4 frame carrying `echo` from `src` to `dst`.
fn echo_frame(src: Station, dst: Station, echo: &Echo<'_>) -> [u8; ECHO_FRAME] {
    let Echo {
        kind,
        id,
        seq,
        payload,
    } = *echo;
    let mut f = [0u8; ECHO_FRAME];
    f[0..6].copy_from_slice(&dst.mac);
    f[6..12].copy_from_slice(&src.mac);
    f[12..14].copy_from_slice(&ETH_IPV4.to_be_bytes());
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + 8 + ECHO_PAYLOAD) as u16).to_be_bytes());
    ip[4..6].copy_from_slice(&seq.to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64;
    ip[9] = 1; // ICMP
    ip[12..16].copy_from_slice(&src.ip.0);
    ip[16..20].copy_from_slice(&dst.ip.0);
    let sum = checksum(ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    let icmp = &mut f[34..];
    icmp[0] = kind;
    icmp[4..6].copy_from_slice(&id.to_be_bytes());
    icmp[6..8].copy_from_slice(&seq.to_be_bytes());
    icmp[8..].copy_from_slice(payload);
    let sum = checksum(icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    f
}

/// An ICMP echo message in `frame` addressed to `to`, with its source
/// address. None for anything else or a bad checksum.
fn parse_echo(frame: &[u8], to: Ip) -> Option<(Ip, Echo<'_>)> {
    if ethertype(frame) != ETH_IPV4 || frame.len() < 34 {
        return None;
    }
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0xf) * 4;
    let total = usize::from(be16(ip, 2));
    if ip[0] >> 4 != 4 || ihl < 20 || total < ihl + 8 || total > ip.len() || ip[9] != 1 {
        return None;
    }
    if ip[16..20] != to.0 || checksum(&ip[..ihl]) != 0 {
        return None;
    }
    let icmp = &ip[ihl..total];
    if checksum(icmp) != 0 {
        return None;
    }
    let src = Ip([ip[12], ip[13], ip[14], ip[15]]);
    let echo = Echo {
        kind: icmp[0],
        id: be16(icmp, 4),
        seq: be16(icmp, 6),
        payload: &icmp[8..],
    };
    Some((src, echo))
}

/// Drives the NIC at `f`, found `index`-th, as the command line says.
pub fn test_nic(f: Function, index: u8, cmdline: &[u8]) -> Result<(), Fail> {
    let mode = mode(cmdline)?;
    f.enable();
    let dev = locate(f)?;
    let features = dev.negotiate(F_MTU | F_MAC | F_STATUS | F_CTRL_VQ | F_MQ)?;
    let cfg = dev.device_cfg;
    let mut mac = [0u8; 6];
    if features & F_MAC != 0 {
        for (i, byte) in mac.iter_mut().enumerate() {
            *byte = rd(cfg + i as u64);
        }
    } else {
        mac = [0x52, 0x54, 0x00, 0x7e, 0x57, index];
    }
    // What the device reports, or "-" where it reports nothing.
    let link: &[u8] = match features & F_STATUS != 0 {
        false => b"-",
        true if rd::<u16>(cfg + 6) & 1 != 0 => b"up",
        true => b"down",
    };
    let max_pairs = if features & F_MQ != 0 {
        rd::<u16>(cfg + 8)
    } else {
        1
    };
    let mtu = (features & F_MTU != 0).then(|| rd::<u16>(cfg + 10));
    if max_pairs == 0 {
        return Err(Fail::new("virtio-net reports 0 queue pairs"));
    }
    let pairs = max_pairs.min(MAX_PAIRS);

    let scratch = SCRATCH_BASE + SCRATCH_PER_NIC * u64::from(index);
    let mut rx: [Option<Queue>; MAX_PAIRS as usize] = [None, None, None, None];
    let mut tx: [Option<Queue>; MAX_PAIRS as usize] = [None, None, None, None];
    for pair in 0..pairs {
        for (queue, is_rx) in [(2 * pair, true), (2 * pair + 1, false)] {
            let ring = scratch + RINGS + 0x1000 * u64::from(queue);
            let q = Queue {
                index: queue,
                ring,
                notify: dev.setup_queue(queue, QUEUE_SIZE, ring, None)?,
                avail_idx: 0,
                last_used: 0,
            };
            if is_rx {
                rx[usize::from(pair)] = Some(q);
            } else {
                tx[usize::from(pair)] = Some(q);
            }
        }
    }
    let mut ctrl = None;
    if features & F_CTRL_VQ != 0 {
        let index = 2 * max_pairs;
        let ring = scratch + CTRL_RING;
        ctrl = Some(Queue {
            index,
            ring,
            notify: dev.setup_queue(index, QUEUE_SIZE, ring, None)?,
            avail_idx: 0,
            last_used: 0,
        });
    }
    let mut nic = Nic {
        dev,
        mac,
        rx,
        tx,
        scratch,
        pairs: usize::from(pairs),
        tx_pairs: 1,
        rx_pair: 0,
    };
    // Post the receive buffers, one descriptor each.
    for pair in 0..usize::from(pairs) {
        for id in 0..RX_BUFFERS {
            let addr = nic.rx_buf(pair, id);
            if let Some(q) = nic.rx[pair].as_mut() {
                q.set_desc(id, addr, BUF_SIZE as u32, DESC_WRITE, 0);
                q.push(id);
            }
        }
    }
    nic.dev.driver_ok();
    for q in nic.rx.iter().flatten() {
        q.kick();
    }
    say!(
        "net 00:{:02x}.{} mac {} link {} pairs {max_pairs} mtu {}",
        f.slot,
        f.function,
        Mac(mac),
        Bytes(link),
        OrDash(mtu)
    );

    if let Some(ctrl) = ctrl.as_mut() {
        if features & F_MQ != 0 && max_pairs > 1 {
            let buf = scratch + CTRL_BUF;
            wr(buf, 4u8); // VIRTIO_NET_CTRL_MQ
            wr(buf + 1, 0u8); // VQ_PAIRS_SET
            wr(buf + 2, pairs);
            wr(buf + 0x10, 0xffu8);
            ctrl.submit_and_wait(&[(buf, 2, false), (buf + 2, 2, false), (buf + 0x10, 1, true)])?;
            let ack: u8 = rd(buf + 0x10);
            if ack != 0 {
                return Err(Fail::new("virtio-net refused VQ_PAIRS_SET"));
            }
            say!("net mq pairs {pairs} set ok");
            nic.tx_pairs = usize::from(pairs);
        }
    }

    let result = match mode {
        Mode::Report if has_word(cmdline, b"linkwatch") => {
            if features & F_STATUS == 0 {
                return Err(Fail::new(
                    "virtio-net link watch without VIRTIO_NET_F_STATUS",
                ));
            }
            watch_link(&nic, f)
        }
        Mode::Report => Ok(()),
        Mode::Ping(ip, target) => ping(&mut nic, ip, target),
        Mode::Respond(ip, count) => respond(&mut nic, ip, count),
    };
    nic.dev.reset();
    result
}

fn has_word(cmdline: &[u8], wanted: &[u8]) -> bool {
    cmdline.split(u8::is_ascii_whitespace).any(|w| w == wanted)
}

/// With `linkwatch`: takes configuration changes on MSI-X entry 0 and
/// reports the link status after each of the next two (the test takes the
/// backend away and brings it back).
fn watch_link(nic: &Nic, f: Function) -> Result<(), Fail> {
    nic.dev.route_msix(f, 0, irq::CONFIG_VECTOR)?;
    nic.dev.set_config_vector(0)?;
    // Counted before each announcement: the test acts on the line, and
    // its interrupt may arrive before the next instruction here runs.
    let mut seen = irq::config_count();
    say!("net link watch");
    for _ in 0..2 {
        let deadline = Deadline::after(LINK_WATCH_TIMEOUT);
        while irq::config_count() == seen {
            if deadline.passed() {
                return Err(Fail::new("no configuration change interrupt"));
            }
            core::hint::spin_loop();
        }
        seen = irq::config_count();
        let up = rd::<u16>(nic.dev.device_cfg + 6) & 1 != 0;
        say!("net config change: link {}", if up { "up" } else { "down" });
    }
    Ok(())
}

/// Resolves `target` with ARP, then sends it three echo requests.
fn ping(nic: &mut Nic, ip: Ip, target: Ip) -> Result<(), Fail> {
    let mut target_mac = None;
    for _ in 0..ATTEMPTS {
        let mut request = [0u8; 42];
        request[0..6].copy_from_slice(&[0xff; 6]);
        arp_frame(&mut request, nic.mac, 1, ip);
        request[38..42].copy_from_slice(&target.0);
        nic.send(&request)?;
        let deadline = Deadline::after(REPLY_TIMEOUT);
        while !deadline.passed() {
            nic.poll(&mut |nic, frame| {
                if nic.answer_arp(frame, ip)? {
                    return Ok(());
                }
                if ethertype(frame) == ETH_ARP
                    && frame.len() >= 42
                    && be16(frame, 20) == 2
                    && frame[28..32] == target.0
                    && frame[38..42] == ip.0
                {
                    let mut mac = [0u8; 6];
                    mac.copy_from_slice(&frame[22..28]);
                    target_mac = Some(mac);
                }
                Ok(())
            })?;
            if target_mac.is_some() {
                break;
            }
        }
        if target_mac.is_some() {
            break;
        }
    }
    let Some(target_mac) = target_mac else {
        say!("net ping {target} failed: no ARP reply");
        return Err(Fail::new("virtio-net: no ARP reply"));
    };
    say!("net arp {target} is-at {}", Mac(target_mac));

    let mut payload = [0u8; ECHO_PAYLOAD];
    for (i, b) in payload.iter_mut().enumerate() {
        *b = payload_byte(i);
    }
    let mut replies = 0;
    for seq in 1..=PINGS {
        let request = echo_frame(
            Station { mac: nic.mac, ip },
            Station {
                mac: target_mac,
                ip: target,
            },
            &Echo {
                kind: ICMP_ECHO_REQUEST,
                id: ECHO_ID,
                seq,
                payload: &payload,
            },
        );
        // Each pair in use carries a request, so a transmit queue the
        // device never started fails the ping.
        let pair = usize::from(seq - 1) % nic.tx_pairs;
        let mut answered = false;
        let mut back_on = 0;
        for _ in 0..ATTEMPTS {
            nic.send_on(pair, &request)?;
            let deadline = Deadline::after(REPLY_TIMEOUT);
            while !deadline.passed() {
                nic.poll(&mut |nic, frame| {
                    if nic.answer_arp(frame, ip)? {
                        return Ok(());
                    }
                    if let Some((from, echo)) = parse_echo(frame, ip) {
                        if echo.kind == ICMP_ECHO_REPLY
                            && from == target
                            && echo.id == ECHO_ID
                            && echo.seq == seq
                            && echo.payload == payload
                        {
                            answered = true;
                            back_on = nic.rx_pair;
                        }
                    }
                    Ok(())
                })?;
                if answered {
                    break;
                }
            }
            if answered {
                break;
            }
        }
        if !answered {
            say!("net ping {target} failed: no reply to seq {seq}");
            return Err(Fail::new("virtio-net: echo request unanswered"));
        }
        say!("net ping {target} seq {seq} reply ok on pair {pair} back on pair {back_on}");
        replies += 1;
    }
    say!("net ping {target} {replies}/{PINGS} replies");
    Ok(())
}

/// Answers ARP and echo requests for `ip` until `count` echoes are answered.
fn respond(nic: &mut Nic, ip: Ip, count: u32) -> Result<(), Fail> {
    let mut answered = 0u32;
    let deadline = Deadline::after(RESPONDER_TIMEOUT);
    while !deadline.passed() {
        nic.poll(&mut |nic, frame| {
            if nic.answer_arp(frame, ip)? {
                return Ok(());
            }
            let Some((from, request)) = parse_echo(frame, ip) else {
                return Ok(());
            };
            if request.kind != ICMP_ECHO_REQUEST || request.payload.len() != ECHO_PAYLOAD {
                return Ok(());
            }
            let mut from_mac = [0u8; 6];
            from_mac.copy_from_slice(&frame[6..12]);
            let seq = request.seq;
            let reply = echo_frame(
                Station { mac: nic.mac, ip },
                Station {
                    mac: from_mac,
                    ip: from,
                },
                &Echo {
                    kind: ICMP_ECHO_REPLY,
                    ..request
                },
            );
            nic.send(&reply)?;
            answered += 1;
            say!("net answered echo seq {seq} from {from}");
            Ok(())
        })?;
        if answered >= count {
            say!("net responder done {answered}");
            return Ok(());
        }
    }
    say!("net responder timed out after {answered} echoes");
    Err(Fail::new("virtio-net responder timed out"))
}

//! Ethernet frames the tests exchange with the host: ARP and ICMP echo.

pub const BROADCAST: [u8; 6] = [0xff; 6];
const ETH_ARP: u16 = 0x0806;
const ETH_IPV4: u16 = 0x0800;
const ETH_HLEN: usize = 14;

fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(64);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

fn arp(op: u16, src_mac: [u8; 6], src_ip: [u8; 4], dst_mac: [u8; 6], dst_ip: [u8; 4]) -> Vec<u8> {
    let eth_dst = if op == 1 { BROADCAST } else { dst_mac };
    let mut f = ethernet(eth_dst, src_mac, ETH_ARP);
    f.extend_from_slice(&1u16.to_be_bytes()); // Ethernet
    f.extend_from_slice(&ETH_IPV4.to_be_bytes());
    f.extend_from_slice(&[6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&src_ip);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&dst_ip);
    f
}

/// "Who has `target`? Tell `src_ip`" from `src_mac`, broadcast.
pub fn arp_request(src_mac: [u8; 6], src_ip: [u8; 4], target: [u8; 4]) -> Vec<u8> {
    arp(1, src_mac, src_ip, [0; 6], target)
}

/// "`src_ip` is at `src_mac`", to `dst_mac`.
pub fn arp_reply(src_mac: [u8; 6], src_ip: [u8; 4], dst_mac: [u8; 6], dst_ip: [u8; 4]) -> Vec<u8> {
    arp(2, src_mac, src_ip, dst_mac, dst_ip)
}

/// The fields of an ARP frame the tests look at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arp {
    /// 1 request, 2 reply.
    pub op: u16,
    pub sender_mac: [u8; 6],
    pub sender_ip: [u8; 4],
    pub target_ip: [u8; 4],
}

pub fn parse_arp(f: &[u8]) -> Option<Arp> {
    if f.len() < ETH_HLEN + 28 || f[12..14] != ETH_ARP.to_be_bytes() {
        return None;
    }
    let a = &f[ETH_HLEN..];
    Some(Arp {
        op: u16::from_be_bytes([a[6], a[7]]),
        sender_mac: a[8..14].try_into().ok()?,
        sender_ip: a[14..18].try_into().ok()?,
        target_ip: a[24..28].try_into().ok()?,
    })
}

/// The host's MAC if `f` is its ARP reply to `who` about `ip`.
pub fn is_arp_reply(f: &[u8], ip: [u8; 4], who: [u8; 4]) -> Option<[u8; 6]> {
    let arp = parse_arp(f)?;
    (arp.op == 2 && arp.sender_ip == ip && arp.target_ip == who).then_some(arp.sender_mac)
}

/// The Internet checksum.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for pair in data.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ICMP echo request with `payload`, id and sequence number.
pub fn icmp_echo_request(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src_ip: [u8; 4],
    dst_ip: [u8; 4],
    id: u16,
    seq: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0];
    icmp.extend_from_slice(&id.to_be_bytes());
    icmp.extend_from_slice(&seq.to_be_bytes());
    icmp.extend_from_slice(payload);
    let sum = checksum(&icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());

    let total = (20 + icmp.len()) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&id.to_be_bytes());
    ip.extend_from_slice(&[0x40, 0, 64, 1, 0, 0]); // DF, TTL 64, ICMP
    ip.extend_from_slice(&src_ip);
    ip.extend_from_slice(&dst_ip);
    let sum = checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());

    let mut f = ethernet(dst_mac, src_mac, ETH_IPV4);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&icmp);
    f
}

/// Whether `f` is (the start of) any echo reply from `from` with `id` and
/// `seq`, whole or cut short, whatever it carries.
pub fn is_echo_reply_numbered(f: &[u8], from: [u8; 4], id: u16, seq: u16) -> bool {
    if f.len() < ETH_HLEN + 20 || f[12..14] != ETH_IPV4.to_be_bytes() {
        return false;
    }
    let ip = &f[ETH_HLEN..];
    let ihl = usize::from(ip[0] & 0xf) * 4;
    let Some(icmp) = ip.get(ihl..ihl + 8) else {
        return false;
    };
    ip[9] == 1
        && ip[12..16] == from
        && icmp[0] == 0
        && icmp[4..6] == id.to_be_bytes()
        && icmp[6..8] == seq.to_be_bytes()
}

/// Whether `f` is an ICMP echo reply from `from` with this id, sequence
/// number and payload, its checksums right.
pub fn is_echo_reply(f: &[u8], from: [u8; 4], id: u16, seq: u16, payload: &[u8]) -> bool {
    if f.len() < ETH_HLEN + 28 || f[12..14] != ETH_IPV4.to_be_bytes() {
        return false;
    }
    let ip = &f[ETH_HLEN..];
    let ihl = usize::from(ip[0] & 0xf) * 4;
    let Some(icmp) = ip.get(ihl..) else {
        return false;
    };
    ip[9] == 1
        && ip[12..16] == from
        && checksum(&ip[..ihl]) == 0
        && icmp.len() == 8 + payload.len()
        && icmp[0] == 0
        && icmp[4..6] == id.to_be_bytes()
        && icmp[6..8] == seq.to_be_bytes()
        && icmp[8..] == *payload
        && checksum(icmp) == 0
}

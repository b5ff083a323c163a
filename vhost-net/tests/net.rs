//! vhost-net against the test frontend on a real tap, no VM: frames reach
//! the host and its answers come back, over mergeable buffers and two queue
//! pairs; malformed descriptors, malformed vhost-user messages, disconnects
//! and a refused GET_CONFIG leave the backend serving; SIGTERM ends it
//! cleanly; bad arguments are refused on one line. Each test has its own
//! network namespace and tap.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::capture::Capture;
use support::frames::{
    arp_reply, arp_request, icmp_echo_request, is_arp_reply, is_echo_reply, is_echo_reply_numbered,
    parse_arp,
};
use support::{vhost_net_bin, Backend, Netns, GUEST_IP, GUEST_MAC, HOST_IP, TIMEOUT};
use vhost_test_frontend::fuzz::{chain_of, ChainFuzzer, Target};
use vhost_test_frontend::malformed;
use vhost_test_frontend::net::{NetOptions, Received, HDR_LEN, MAX_FRAME};
use vhost_test_frontend::virtqueue::{Buf, RawDesc, DESC_F_NEXT, DESC_F_WRITE};
use vhost_test_frontend::NetClient;

const ECHO_ID: u16 = 0x4e54;

/// Asks the host for its MAC on `pair`; returns it.
fn resolve_host(client: &mut NetClient, pair: usize) -> [u8; 6] {
    let request = arp_request(GUEST_MAC, GUEST_IP, HOST_IP);
    client.send(pair, &request).expect("send the ARP request");
    let reply = client
        .recv_matching(TIMEOUT, |r| {
            is_arp_reply(&r.frame, HOST_IP, GUEST_IP).is_some()
        })
        .expect("receive")
        .expect("no ARP reply from the host");
    is_arp_reply(&reply.frame, HOST_IP, GUEST_IP).expect("an ARP reply")
}

/// Pings the host on `pair`; returns the reply. Answers the host's ARP
/// requests for the guest meanwhile.
fn ping(
    client: &mut NetClient,
    pair: usize,
    host_mac: [u8; 6],
    seq: u16,
    payload: &[u8],
) -> Received {
    ping_from(client, pair, (GUEST_MAC, GUEST_IP), host_mac, seq, payload)
}

/// `ping` from another made-up guest.
fn ping_from(
    client: &mut NetClient,
    pair: usize,
    (mac, ip): ([u8; 6], [u8; 4]),
    host_mac: [u8; 6],
    seq: u16,
    payload: &[u8],
) -> Received {
    let request = icmp_echo_request(mac, host_mac, ip, HOST_IP, ECHO_ID, seq, payload);
    client.send(pair, &request).expect("send the echo request");
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let frame = client
            .recv(left)
            .expect("receive")
            .unwrap_or_else(|| panic!("no echo reply {seq} from the host to {ip:?}"));
        if frame.frame[..6] == mac && is_echo_reply(&frame.frame, HOST_IP, ECHO_ID, seq, payload) {
            return frame;
        }
        if let Some(arp) = parse_arp(&frame.frame) {
            if arp.op == 1 && arp.target_ip == ip {
                let answer = arp_reply(mac, ip, arp.sender_mac, arp.sender_ip);
                client.send(frame.pair, &answer).expect("answer ARP");
            }
        }
    }
}

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7) as u8).collect()
}

#[test]
fn arp_and_ping_reach_the_host_and_its_answers_come_back() {
    let ns = Netns::new();
    let mut backend = Backend::start(&ns, &[]);
    let capture = Capture::start(&ns.name, &backend.tap);
    let mut client = NetClient::connect(&backend.socket, 1).expect("connect");
    assert_eq!(client.pairs(), 1);
    let before = ns.tap_stat(&backend.tap, "rx_packets");

    let host_mac = resolve_host(&mut client, 0);
    let data = payload(56);
    let request = icmp_echo_request(GUEST_MAC, host_mac, GUEST_IP, HOST_IP, ECHO_ID, 1, &data);
    let reply = ping(&mut client, 0, host_mac, 1, &data);
    assert_eq!(reply.header.len(), HDR_LEN);
    assert_eq!(reply.frame[..6], GUEST_MAC);

    // The host received exactly the frames sent (no header, no change),
    // in order.
    let seen = capture.wait_for(TIMEOUT, |f| {
        parse_arp(f).is_some_and(|a| a.op == 1 && a.sender_mac == GUEST_MAC)
    });
    assert!(seen.is_some(), "the ARP request never reached the host");
    let seen = capture.wait_for(TIMEOUT, |f| f == request.as_slice());
    assert!(seen.is_some(), "the echo request never reached the host");
    let after = ns.tap_stat(&backend.tap, "rx_packets");
    assert!(after >= before + 2, "rx_packets {before} -> {after}");
    backend.assert_alive();
}

/// Frames of a local EtherType (the host stack drops them) numbered by
/// their byte 14, of sizes from 60 to 1514 bytes.
fn numbered_frames(count: usize) -> Vec<Vec<u8>> {
    (0..count)
        .map(|i| {
            let len = 60 + (i * 97) % (1514 - 60 + 1);
            let mut f = vec![0xff; 6];
            f.extend_from_slice(&GUEST_MAC);
            f.extend_from_slice(&[0x88, 0xb5, i as u8]);
            f.extend((f.len()..len).map(|b| (b ^ i) as u8));
            f
        })
        .collect()
}

#[test]
fn a_burst_of_frames_reaches_the_host_whole_and_in_order() {
    // The backend writes the chains it finds together with one system call
    // (io_uring); each frame must still arrive alone, whole, in ring order.
    let ns = Netns::new();
    let mut backend = Backend::start(&ns, &[]);
    let capture = Capture::start(&ns.name, &backend.tap);
    let mut client = NetClient::connect(&backend.socket, 1).expect("connect");
    let before = ns.tap_stat(&backend.tap, "rx_packets");
    let frames = numbered_frames(100);
    for burst in frames.chunks(50) {
        client.send_burst(0, burst).expect("send the burst");
    }
    for (i, frame) in frames.iter().enumerate() {
        let seen = capture
            .wait_for(TIMEOUT, |f| f.len() > 14 && f[12..14] == [0x88, 0xb5])
            .unwrap_or_else(|| panic!("frame {i} never reached the host"));
        assert_eq!(seen.len(), frame.len(), "frame {i}: length");
        assert!(seen == *frame, "frame {i}: got frame {} instead", seen[14]);
    }
    let after = ns.tap_stat(&backend.tap, "rx_packets");
    assert!(after >= before + 100, "rx_packets {before} -> {after}");
    backend.assert_alive();
}

/// More frames in one kick than one pass of the tx worker may send (256
/// chains or 1 ms): the worker comes back to the rest by itself, since the
/// guest, waiting for completions, never kicks again.
#[test]
fn a_burst_longer_than_the_tx_budget_is_sent_whole_without_another_kick() {
    let ns = Netns::new();
    let mut backend = Backend::start(&ns, &["--queue-size", "1024"]);
    let capture = Capture::start(&ns.name, &backend.tap);
    let options = NetOptions {
        queue_size: 1024,
        ..NetOptions::new(1)
    };
    let mut client = NetClient::connect_with(&backend.socket, options).expect("connect");
    let frames = numbered_frames(600);
    client.send_burst(0, &frames).expect("send the burst");
    for (i, frame) in frames.iter().enumerate() {
        let seen = capture
            .wait_for(TIMEOUT, |f| f.len() > 14 && f[12..14] == [0x88, 0xb5])
            .unwrap_or_else(|| panic!("frame {i} never reached the host"));
        assert!(seen == *frame, "frame {i}: got another");
    }
    backend.assert_alive();
}

#[test]
fn a_frame_longer_than_one_buffer_spans_mergeable_buffers() {
    let ns = Netns::new();
    let backend = Backend::start(&ns, &[]);
    let options = NetOptions {
        rx_buffer_len: 256,
        ..NetOptions::new(1)
    };
    let mut client = NetClient::connect_with(&backend.socket, options).expect("connect");
    let host_mac = resolve_host(&mut client, 0);
    let data = payload(1400);
    let reply = ping(&mut client, 0, host_mac, 7, &data);
    // 12 + 14 + 20 + 8 + 1400 bytes in 256-byte buffers.
    assert_eq!(reply.buffers, 6, "num_buffers");
}

#[test]
fn without_mrg_rxbuf_frames_larger_than_the_buffer_are_dropped() {
    let ns = Netns::new();
    let mut backend = Backend::start(&ns, &[]);
    let options = NetOptions {
        features: 0,
        rx_buffer_len: 512,
        ..NetOptions::new(1)
    };
    let mut client = NetClient::connect_with(&backend.socket, options).expect("connect");
    let host_mac = resolve_host(&mut client, 0);
    let small = payload(100);
    assert_eq!(ping(&mut client, 0, host_mac, 1, &small).buffers, 1);

    let big = payload(1000);
    let request = icmp_echo_request(GUEST_MAC, host_mac, GUEST_IP, HOST_IP, ECHO_ID, 2, &big);
    client.send(0, &request).expect("send");
    // Nothing of the reply arrives: not whole, and not cut to the buffer.
    let reply = client
        .recv_matching(Duration::from_secs(1), |r| {
            is_echo_reply_numbered(&r.frame, HOST_IP, ECHO_ID, 2)
        })
        .expect("receive");
    assert!(
        reply.is_none(),
        "a 1066-byte frame arrived in 512-byte buffers: {} bytes of it",
        reply.map_or(0, |r| r.frame.len())
    );
    // The buffer the big reply did not fit takes the next frame.
    assert_eq!(ping(&mut client, 0, host_mac, 3, &small).buffers, 1);
    backend.assert_alive();
}

#[test]
fn malformed_descriptors_are_completed_and_the_backend_goes_on() {
    let ns = Netns::new();
    let mut backend = Backend::start(&ns, &[]);
    let mut client = NetClient::connect(&backend.socket, 1).expect("connect");
    let buf = client.tx_buffer(0).expect("tx buffer");
    client.write_mem(buf, &arp_request(GUEST_MAC, GUEST_IP, HOST_IP));
    let desc = |addr: u64, len: u32, flags: u16, next: u16| RawDesc {
        addr,
        len,
        flags,
        next,
    };
    let cases: [(&str, Vec<RawDesc>); 6] = [
        (
            "an address outside guest memory",
            vec![desc(1 << 40, 60, 0, 0)],
        ),
        (
            "a device-writable tx buffer",
            vec![desc(buf, 60, DESC_F_WRITE, 0)],
        ),
        ("a zero-length chain", vec![desc(buf, 0, 0, 0)]),
        (
            "a frame over 65550 bytes",
            vec![desc(buf, 12 + 65551, 0, 0)],
        ),
        (
            "a descriptor loop",
            vec![desc(buf, 12, DESC_F_NEXT, 1), desc(buf, 60, DESC_F_NEXT, 0)],
        ),
        (
            "a next index past the queue",
            vec![desc(buf, 12, DESC_F_NEXT, 999)],
        ),
    ];
    let tx_packets = ns.tap_stat(&backend.tap, "rx_packets");
    for (what, chain) in &cases {
        let used = client
            .submit_raw(1, chain, TIMEOUT)
            .unwrap_or_else(|e| panic!("{what}: {e}"))
            .unwrap_or_else(|| panic!("{what}: never completed"));
        assert_eq!(used.len, 0, "{what}");
        backend.assert_alive();
    }
    assert_eq!(
        ns.tap_stat(&backend.tap, "rx_packets"),
        tx_packets,
        "a malformed chain reached the host"
    );

    // Malformed rx chains: a device-readable buffer, one outside memory.
    let options = NetOptions {
        rx_buffers: 0,
        ..NetOptions::new(1)
    };
    drop(client);
    let mut client =
        NetClient::connect_with(&backend.socket, options).expect("connect a second time");
    for (what, chain) in [
        ("a readable rx buffer", [desc(buf, 2048, 0, 0)]),
        (
            "an rx buffer outside memory",
            [desc(1 << 40, 2048, DESC_F_WRITE, 0)],
        ),
    ] {
        let used = client
            .submit_raw(0, &chain, TIMEOUT)
            .unwrap_or_else(|e| panic!("{what}: {e}"))
            .unwrap_or_else(|| panic!("{what}: never completed"));
        assert_eq!(used.len, 0, "{what}");
    }
    assert_eq!(client.post_rx(0, 64).expect("post rx buffers"), 64);
    let host_mac = resolve_host(&mut client, 0);
    ping(&mut client, 0, host_mac, 1, &payload(32));
    backend.assert_alive();
    let log = backend.log();
    assert!(
        log.contains("descriptor") || log.contains("dropped"),
        "{log}"
    );
}

/// Tx chains made at random, and well-formed ones with one field changed
/// (see `vhost_test_frontend::fuzz`): every chain completes with nothing
/// written, the backend never writes into guest memory it was only lent
/// for reading, every unchanged chain's frame reaches the tap, and ARP and
/// ping work afterwards.
#[test]
fn random_tx_chains_are_completed_and_the_backend_goes_on() {
    const CHAINS: usize = 3000;
    let ns = Netns::new();
    let mut backend = Backend::start(&ns, &[]);
    let mut client = NetClient::connect(&backend.socket, 1).expect("connect");
    let buf = client.tx_buffer(0).expect("tx buffer");
    // The whole tx buffer: a header, an ARP request, then a pattern.
    let mut contents = vec![0u8; HDR_LEN + MAX_FRAME];
    for (i, b) in contents.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    contents[..HDR_LEN].fill(0);
    let arp = arp_request(GUEST_MAC, GUEST_IP, HOST_IP);
    contents[HDR_LEN..HDR_LEN + arp.len()].copy_from_slice(&arp);
    assert!(client.write_mem(buf, &contents));
    let frame = [
        Buf {
            addr: buf,
            len: HDR_LEN as u32,
            write: false,
        },
        Buf {
            addr: buf + HDR_LEN as u64,
            len: arp.len() as u32,
            write: false,
        },
    ];
    let targets = vec![Target {
        addr: buf,
        spread: 4096,
    }];
    let mut fuzz = ChainFuzzer::new(0x7e7_0001, targets, NetOptions::new(1).mem_size);
    let sent_before = ns.tap_stat(&backend.tap, "rx_packets");
    let mut unchanged = 0;
    for i in 0..CHAINS {
        let chain = if fuzz.below(3) == 0 {
            fuzz.random()
        } else {
            fuzz.mutated(&frame)
        };
        if chain == chain_of(&frame) {
            unchanged += 1;
        }
        let used = client
            .submit_raw(1, &chain, TIMEOUT)
            .unwrap_or_else(|e| panic!("chain {i} {chain:?}: {e}"))
            .unwrap_or_else(|| panic!("chain {i} never completed: {chain:?}"));
        assert_eq!(used.len, 0, "chain {i}: {chain:?}");
        backend.assert_alive();
    }
    let mut after = vec![0u8; contents.len()];
    assert!(client.read_mem(buf, &mut after));
    assert!(after == contents, "the backend wrote into a tx buffer");
    let sent = ns.tap_stat(&backend.tap, "rx_packets") - sent_before;
    assert!(
        sent >= unchanged && sent <= CHAINS as u64,
        "{sent} frames reached the tap; {unchanged} chains were well formed"
    );
    eprintln!("{sent} of {CHAINS} chains reached the tap ({unchanged} unchanged)");
    // The rx buffers the host's answers filled are not this test's
    // business: a fresh frontend checks the backend still works.
    drop(client);
    let mut client = NetClient::connect_retrying(&backend.socket, 1, TIMEOUT).expect("reconnect");
    let host_mac = resolve_host(&mut client, 0);
    ping(&mut client, 0, host_mac, 1, &payload(64));
    backend.assert_alive();
}

#[test]
fn a_new_frontend_is_served_after_a_disconnect() {
    let ns = Netns::new();
    let mut backend = Backend::start(&ns, &[]);
    for round in 0..3u16 {
        let mut client = NetClient::connect_retrying(&backend.socket, 1, TIMEOUT).expect("connect");
        let host_mac = resolve_host(&mut client, 0);
        ping(&mut client, 0, host_mac, round, &payload(64));
        // Dropping the client closes the connection.
    }
    backend.assert_alive();
}

/// Frontends that send nonsense over the socket lose their connection;
/// the backend keeps serving, and the next frontend's frames reach the
/// host.
#[test]
fn malformed_vhost_user_messages_drop_the_frontend_not_the_backend() {
    let ns = Netns::new();
    let mut backend = Backend::start(&ns, &[]);
    for (what, bytes) in malformed::nonsense() {
        let closed = malformed::backend_hangs_up(&backend.socket, &bytes, TIMEOUT)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(closed, "{what}: the backend kept the connection open");
        backend.assert_alive();
    }
    let mut client = NetClient::connect_retrying(&backend.socket, 1, TIMEOUT).expect("connect");
    let host_mac = resolve_host(&mut client, 0);
    ping(&mut client, 0, host_mac, 1, &payload(64));
    backend.assert_alive();
}

/// A memory table that claims more of its file than the file has ends the
/// connection before the backend maps it (touching the rx ring placed past
/// the file's end would kill it with SIGBUS); the next frontend is served.
#[test]
fn a_memory_table_past_the_end_of_its_file_drops_the_frontend_not_the_backend() {
    let ns = Netns::new();
    let mut backend = Backend::start(&ns, &[]);
    let closed =
        malformed::ring_past_the_end_of_its_memory(&backend.socket, TIMEOUT).expect("send");
    assert!(closed, "the backend kept the connection open");
    std::thread::sleep(Duration::from_millis(200));
    backend.assert_alive();
    assert!(
        backend.log().contains("run past the end of its file"),
        "{}",
        backend.log()
    );
    let mut client = NetClient::connect_retrying(&backend.socket, 1, TIMEOUT).expect("connect");
    let host_mac = resolve_host(&mut client, 0);
    ping(&mut client, 0, host_mac, 1, &payload(64));
    backend.assert_alive();
}

#[test]
fn get_config_is_refused_and_the_backend_serves_on() {
    use vhost_test_frontend::malformed;
    const SET_OWNER: u32 = 3;
    const GET_CONFIG: u32 = 24;
    let ns = Netns::new();
    let mut backend = Backend::start(&ns, &[]);
    let client = NetClient::connect(&backend.socket, 1).expect("connect");
    assert!(client.conn.config.is_empty(), "CONFIG is not offered");
    drop(client);
    // Written raw: the vhost crate's frontend would not send it without
    // the CONFIG protocol feature. Offset 0, 12 bytes, no flags, and the
    // 12 bytes of payload.
    let mut payload = Vec::new();
    for word in [0u32, 12, 0] {
        payload.extend_from_slice(&word.to_le_bytes());
    }
    payload.extend_from_slice(&[0u8; 12]);
    let bytes = [
        malformed::message(SET_OWNER, &[]),
        malformed::message(GET_CONFIG, &payload),
    ]
    .concat();
    let hung_up = malformed::backend_hangs_up_unanswered(&backend.socket, &bytes, TIMEOUT)
        .expect("send GET_CONFIG");
    assert!(hung_up, "GET_CONFIG was answered, or the connection kept");
    backend.assert_alive();
    let mut client = NetClient::connect_retrying(&backend.socket, 1, TIMEOUT).expect("connect");
    resolve_host(&mut client, 0);
}

#[test]
fn two_queue_pairs_use_a_multi_queue_tap() {
    let ns = Netns::new();
    let mut backend = Backend::start(&ns, &["--num-queues", "4"]);
    assert_ne!(
        ns.tun_flags(&backend.tap) & libc::IFF_MULTI_QUEUE as u32,
        0,
        "the tap is not multi-queue"
    );
    let capture = Capture::start(&ns.name, &backend.tap);
    let mut client = NetClient::connect(&backend.socket, 2).expect("connect");
    assert_eq!(client.pairs(), 2);
    // An ARP request on pair 1's tx queue reaches the host.
    let request = arp_request(GUEST_MAC, GUEST_IP, HOST_IP);
    let before = ns.tap_stat(&backend.tap, "rx_packets");
    client.send(1, &request).expect("send on pair 1");
    assert!(
        capture
            .wait_for(TIMEOUT, |f| f == request.as_slice())
            .is_some(),
        "the frame sent on pair 1 never reached the host"
    );
    assert!(ns.tap_stat(&backend.tap, "rx_packets") > before);
    // The host's answers come back on whichever pair the tap picks.
    let reply = client
        .recv_matching(TIMEOUT, |r| {
            is_arp_reply(&r.frame, HOST_IP, GUEST_IP).is_some()
        })
        .expect("receive")
        .expect("no ARP reply");
    let host_mac = is_arp_reply(&reply.frame, HOST_IP, GUEST_IP).expect("ARP reply");
    for pair in 0..2 {
        ping(&mut client, pair, host_mac, pair as u16, &payload(100));
    }
    backend.assert_alive();
}

#[test]
fn the_queues_of_pairs_not_enabled_are_detached_from_the_tap() {
    let ns = Netns::new();
    let mut backend = Backend::start(&ns, &["--num-queues", "4"]);
    // A frontend that uses one pair of two: the tap must not steer any
    // flow to the second pair's queue, which nobody reads.
    let mut client = NetClient::connect(&backend.socket, 1).expect("connect");
    let host_mac = resolve_host(&mut client, 0);
    for n in 0..16u8 {
        let guest = ([0x02, 0, 0, 0, 1, n], [192, 0, 2, 100 + n]);
        let hello = arp_request(guest.0, guest.1, HOST_IP);
        client.send(0, &hello).expect("send");
        ping_from(&mut client, 0, guest, host_mac, u16::from(n), &payload(20));
    }
    backend.assert_alive();
}

/// Turns pair 1's rings (queues 2 and 3) on or off, as QEMU does when the
/// guest changes how many pairs it uses.
fn set_pair_1_enabled(client: &mut NetClient, on: bool) {
    use vhost::vhost_user::VhostUserFrontend;
    use vhost_test_frontend::connection::ConnectionError;
    for queue in [2, 3] {
        client
            .conn
            .exchange(|frontend| {
                frontend
                    .set_vring_enable(queue, on)
                    .map_err(|e| ConnectionError::Request("SET_VRING_ENABLE", e))
            })
            .expect("SET_VRING_ENABLE");
    }
}

/// Waits up to TIMEOUT for `tap` to have `count` queues attached.
fn wait_for_tap_queues(ns: &Netns, tap: &str, count: usize) -> usize {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let now = ns.tap_queues(tap);
        if now == count || Instant::now() > deadline {
            return now;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A pair the frontend disables (SET_VRING_ENABLE 0, as QEMU does when the
/// guest asks for fewer pairs) leaves the tap even though no frame or kick
/// ever reaches its worker again: here its rx ring never had a buffer.
#[test]
fn a_pair_disabled_with_no_rx_buffers_leaves_the_tap() {
    let ns = Netns::new();
    let mut backend = Backend::start(&ns, &["--num-queues", "4"]);
    let mut options = NetOptions::new(2);
    options.rx_buffers = 0;
    let mut client = NetClient::connect_with(&backend.socket, options).expect("connect");
    client.post_rx(0, 64).expect("post pair 0's rx buffers");
    let hello = arp_request(GUEST_MAC, GUEST_IP, HOST_IP);
    client.send(1, &hello).expect("send on pair 1");
    assert_eq!(
        wait_for_tap_queues(&ns, &backend.tap, 2),
        2,
        "pair 1's queue never joined the tap"
    );
    set_pair_1_enabled(&mut client, false);
    assert_eq!(
        wait_for_tap_queues(&ns, &backend.tap, 1),
        1,
        "the disabled pair's queue is still on the tap"
    );
    // Enabled again, its rx ring served (a kick) and found empty: the
    // queue joins the tap, the worker stops watching it, and the pair is
    // disabled again.
    set_pair_1_enabled(&mut client, true);
    client.conn.queues[2]
        .kick
        .write(1)
        .expect("kick pair 1's rx");
    assert_eq!(
        wait_for_tap_queues(&ns, &backend.tap, 2),
        2,
        "pair 1's queue did not join the tap again"
    );
    set_pair_1_enabled(&mut client, false);
    assert_eq!(
        wait_for_tap_queues(&ns, &backend.tap, 1),
        1,
        "the pair disabled again is still on the tap"
    );
    resolve_host(&mut client, 0);
    backend.assert_alive();
}

/// Waits up to TIMEOUT for the backend's log to hold `text` `count`
/// times; returns the log.
fn wait_for_log(backend: &Backend, text: &str, count: usize) -> String {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let log = backend.log();
        if log.matches(text).count() >= count || Instant::now() > deadline {
            return log;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The tap is deleted under a connected frontend with `pairs` queue pairs
/// (as `ip link del` or a network manager does): the backend says so, a
/// frame sent meanwhile still completes, and once a tap of the same name is
/// made again (multi-queue, which one pair takes too) every pair's queue is
/// attached to it, with the frontend's header length, and frames flow both
/// ways on every pair.
fn a_deleted_tap_made_again_is_attached_again(pairs: usize) {
    let ns = Netns::new();
    let queues = (2 * pairs).to_string();
    let mut backend = Backend::start(&ns, &["--num-queues", &queues]);
    let tap = backend.tap.clone();
    let mut client = NetClient::connect(&backend.socket, pairs).expect("connect");
    let host_mac = resolve_host(&mut client, 0);
    ping(&mut client, 0, host_mac, 1, &payload(64));
    // Bursts go out through each pair's io_uring, which keeps the tap
    // queue registered: it must move to the new tap too.
    let burst = numbered_frames(16);
    for pair in 0..pairs {
        client.send_burst(pair, &burst).expect("send a burst");
    }

    ns.exec("ip", &["link", "del", &tap]);
    let log = wait_for_log(&backend, "is gone (deleted)", pairs);
    assert_eq!(
        log.matches("is gone (deleted)").count(),
        pairs,
        "every pair should report the tap gone, once:\n{log}"
    );
    for pair in 0..pairs {
        client
            .send(pair, &arp_request(GUEST_MAC, GUEST_IP, HOST_IP))
            .unwrap_or_else(|e| panic!("a frame sent on pair {pair} while the tap is gone: {e}"));
    }
    backend.assert_alive();

    // Multi-queue either way: one pair takes a tap of either kind.
    make_tap_again(&ns, &tap, true);
    let log = wait_for_log(&backend, "is back, and its queue attached again", pairs);
    assert_eq!(
        log.matches("is back, and its queue attached again").count(),
        pairs,
        "every pair should attach to the new tap:\n{log}"
    );
    assert_eq!(wait_for_tap_queues(&ns, &tap, pairs), pairs);
    // The new interface has a MAC of its own.
    let new_mac = resolve_host(&mut client, 0);
    assert_ne!(new_mac, host_mac, "the tap was not made again");
    for pair in 0..pairs {
        // Whole echo replies (payload compared) come back through the new
        // tap: its header length is the one the frontend negotiated.
        ping(&mut client, pair, new_mac, 100 + pair as u16, &payload(300));
        let before = ns.tap_stat(&tap, "rx_packets");
        client.send_burst(pair, &burst).expect("send a burst");
        let after = ns.tap_stat(&tap, "rx_packets");
        assert!(
            after >= before + burst.len() as u64,
            "pair {pair}: a burst of {} frames after the tap came back: rx_packets {before} -> {after}",
            burst.len()
        );
    }
    backend.assert_alive();
}

#[test]
fn a_deleted_tap_made_again_is_attached_again_one_pair() {
    a_deleted_tap_made_again_is_attached_again(1);
}

#[test]
fn a_deleted_multi_queue_tap_made_again_is_attached_again_two_pairs() {
    a_deleted_tap_made_again_is_attached_again(2);
}

/// Makes `tap` again in `ns` (multi-queue or not) with the host address.
fn make_tap_again(ns: &Netns, tap: &str, multi_queue: bool) {
    let mut add = vec!["tuntap", "add", "dev", tap, "mode", "tap"];
    if multi_queue {
        add.push("multi_queue");
    }
    ns.exec("ip", &add);
    ns.configure_tap(tap);
}

/// A tap deleted before any frontend came: the header length the
/// frontend negotiates meanwhile (12 bytes; a new tap starts with 10) is
/// kept for the tap made again, and frames come through whole.
#[test]
fn a_tap_deleted_before_the_frontend_came_gets_the_frontends_settings_when_made_again() {
    let ns = Netns::new();
    let mut backend = Backend::start(&ns, &[]);
    let tap = backend.tap.clone();
    ns.exec("ip", &["link", "del", &tap]);
    let mut client = NetClient::connect(&backend.socket, 1).expect("connect");
    let log = wait_for_log(&backend, "is gone (deleted)", 1);
    assert!(log.contains("is gone (deleted)"), "{log}");
    assert!(
        log.contains("is gone: its header length is set when it is back"),
        "{log}"
    );
    make_tap_again(&ns, &tap, false);
    let log = wait_for_log(&backend, "is back, and its queue attached again", 1);
    assert!(log.contains("is back"), "{log}");
    let host_mac = resolve_host(&mut client, 0);
    ping(&mut client, 0, host_mac, 7, &payload(200));
    backend.assert_alive();
}

/// A frontend that connects while a multi-queue tap is gone hears of it
/// once per pair (no warning about queues that cannot leave a tap that is
/// not there), and every pair attaches when the tap is made again.
#[test]
fn a_frontend_connecting_while_a_multi_queue_tap_is_gone_gets_it_back() {
    let ns = Netns::new();
    let mut backend = Backend::start(&ns, &["--num-queues", "4"]);
    let tap = backend.tap.clone();
    let client = NetClient::connect(&backend.socket, 2).expect("connect");
    ns.exec("ip", &["link", "del", &tap]);
    let log = wait_for_log(&backend, "is gone (deleted)", 2);
    assert_eq!(log.matches("is gone (deleted)").count(), 2, "{log}");
    drop(client);
    let mut client = NetClient::connect(&backend.socket, 2).expect("connect again");
    let log = wait_for_log(&backend, "is gone (deleted)", 4);
    assert_eq!(log.matches("is gone (deleted)").count(), 4, "{log}");
    assert!(!log.contains("cannot detach"), "{log}");
    make_tap_again(&ns, &tap, true);
    let log = wait_for_log(&backend, "is back, and its queue attached again", 2);
    assert_eq!(
        log.matches("is back, and its queue attached again").count(),
        2,
        "{log}"
    );
    assert_eq!(wait_for_tap_queues(&ns, &tap, 2), 2);
    let host_mac = resolve_host(&mut client, 0);
    ping(&mut client, 0, host_mac, 3, &payload(64));
    assert_a_burst_on_pair_1_reaches(&ns, &tap, &mut client);
    backend.assert_alive();
}

/// Eight frames sent on pair 1 reach the host through `tap`.
fn assert_a_burst_on_pair_1_reaches(ns: &Netns, tap: &str, client: &mut NetClient) {
    let before = ns.tap_stat(tap, "rx_packets");
    client
        .send_burst(1, &numbered_frames(8))
        .expect("send on pair 1");
    let after = ns.tap_stat(tap, "rx_packets");
    assert!(after >= before + 8, "rx_packets {before} -> {after}");
}

/// A pair the frontend disables while the tap is gone stays off the tap
/// made again (its worker, still looking every second, leaves it be), and
/// attaches to it once enabled again.
#[test]
fn a_pair_disabled_while_the_tap_is_gone_attaches_once_enabled_again() {
    let ns = Netns::new();
    let mut backend = Backend::start(&ns, &["--num-queues", "4"]);
    let tap = backend.tap.clone();
    let mut client = NetClient::connect(&backend.socket, 2).expect("connect");
    resolve_host(&mut client, 0);
    ns.exec("ip", &["link", "del", &tap]);
    let log = wait_for_log(&backend, "is gone (deleted)", 2);
    assert_eq!(log.matches("is gone (deleted)").count(), 2, "{log}");
    set_pair_1_enabled(&mut client, false);
    make_tap_again(&ns, &tap, true);
    let log = wait_for_log(&backend, "is back, and its queue attached again", 1);
    assert!(log.contains("pair 0: tap"), "{log}");
    // Two looks (1 s apart) at the disabled pair: it stays off the tap.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(ns.tap_queues(&tap), 1, "{}", backend.log());
    set_pair_1_enabled(&mut client, true);
    let log = wait_for_log(&backend, "is back, and its queue attached again", 2);
    assert_eq!(
        log.matches("is back, and its queue attached again").count(),
        2,
        "the pair enabled again never attached:\n{log}"
    );
    assert_eq!(wait_for_tap_queues(&ns, &tap, 2), 2);
    assert_a_burst_on_pair_1_reaches(&ns, &tap, &mut client);
    backend.assert_alive();
}

#[test]
fn sigterm_exits_0_and_removes_the_socket() {
    let ns = Netns::new();
    let mut backend = Backend::start(&ns, &[]);
    let client = NetClient::connect(&backend.socket, 1).expect("connect");
    backend.signal(libc::SIGTERM);
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(status) = backend.child.try_wait().expect("try_wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "still running after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0), "{}", backend.log());
    assert!(!backend.socket.exists(), "the socket is still there");
    drop(client);
}

/// Runs vhost-net with `args` (it must fail at once); returns its stderr.
fn refused(args: &[&str]) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("s.sock");
    let out = Command::new(vhost_net_bin())
        .arg("--socket")
        .arg(&socket)
        .args(args)
        .output()
        .expect("run vhost-net");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
    assert!(!socket.exists(), "{args:?} left a socket");
    stderr
}

#[test]
fn bad_arguments_are_refused_on_one_line() {
    let long = refused(&["--tap", "a-16-byte-name.x"]);
    assert!(
        long.starts_with("error: --tap \"a-16-byte-name.x\""),
        "{long}"
    );
    let odd = refused(&["--tap", "vnt0", "--num-queues", "3"]);
    assert!(odd.starts_with("error: --num-queues \"3\""), "{odd}");
    let size = refused(&["--tap", "vnt0", "--queue-size", "100"]);
    assert!(size.starts_with("error: --queue-size"), "{size}");
    // An interface that is not a tap (every namespace has lo).
    let not_tap = refused(&["--tap", "lo"]);
    assert!(
        not_tap.starts_with("error: --tap \"lo\": cannot attach"),
        "{not_tap}"
    );
}

//! The test bed's WAN link (`integration/src/wan.rs`): bytes cross it intact and in order,
//! no sooner than its delay and no faster than its cap, nothing crosses while it is cut, and
//! what waited crosses once it heals. The checks are bounds the link must respect whatever
//! the machine's load (load only makes a transfer slower), never speeds it must reach.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use elea_integration::wan::{LinkConfig, Relay};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// An echo server on loopback: every connection gets back what it sends.
async fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    elea_common::pattern::pattern(seed, len)
}

/// Sends `data` and reads the echo of all of it.
async fn round_trip(s: &mut TcpStream, data: &[u8]) -> Vec<u8> {
    let (mut r, mut w) = s.split();
    let send = async {
        w.write_all(data).await.unwrap();
    };
    let recv = async {
        let mut got = vec![0u8; data.len()];
        r.read_exact(&mut got).await.unwrap();
        got
    };
    tokio::join!(send, recv).1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_trip_costs_at_least_the_links_rtt_and_bytes_arrive_intact() {
    let echo = echo_server().await;
    let rtt = Duration::from_millis(40);
    let relay = Relay::start("127.0.0.1:0".parse().unwrap(), echo, LinkConfig::rtt(rtt, None)).await.unwrap();
    let mut s = TcpStream::connect(relay.addr()).await.unwrap();
    for i in 0..5 {
        let t = Instant::now();
        let msg = pattern(100, i);
        assert_eq!(round_trip(&mut s, &msg).await, msg);
        assert!(t.elapsed() >= rtt, "round trip {i} took {:?}, less than the link's {rtt:?}", t.elapsed());
    }
    // Much more than one chunk, both ways at once: every byte, in order.
    let big = pattern(5 << 20, 9);
    assert!(round_trip(&mut s, &big).await == big, "the echo of 5 MiB differs");
    let (fwd, back) = relay.carried();
    assert_eq!((fwd, back), (500 + (5 << 20), 500 + (5 << 20)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capped_link_carries_no_faster_than_its_cap() {
    let echo = echo_server().await;
    let rate = 4u64 << 20;
    let relay = Relay::start(
        "127.0.0.1:0".parse().unwrap(),
        echo,
        LinkConfig { delay: Duration::ZERO, rate: Some(rate) },
    )
    .await
    .unwrap();
    let mut s = TcpStream::connect(relay.addr()).await.unwrap();
    let data = pattern(8 << 20, 3);
    let t = Instant::now();
    assert!(round_trip(&mut s, &data).await == data);
    // 8 MiB each way at 4 MiB/s each way: the two directions overlap, so at least 2 s (less
    // one chunk's time, which may go out at once).
    let least = Duration::from_secs_f64((data.len() as f64 - 65536.0) / rate as f64);
    assert!(
        t.elapsed() >= least,
        "8 MiB crossed in {:?}, faster than the cap allows ({least:?})",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_crosses_a_cut_link_and_everything_crosses_once_it_heals() {
    let echo = echo_server().await;
    let relay =
        Relay::start("127.0.0.1:0".parse().unwrap(), echo, LinkConfig::rtt(Duration::from_millis(10), None))
            .await
            .unwrap();
    let mut s = TcpStream::connect(relay.addr()).await.unwrap();
    let msg = pattern(1000, 1);
    assert_eq!(round_trip(&mut s, &msg).await, msg);
    relay.set_cut(true);
    // An established connection and a new one: neither gets anything across.
    let mut fresh = TcpStream::connect(relay.addr()).await.unwrap();
    let pending = tokio::spawn(async move {
        let a = round_trip(&mut s, &pattern(2000, 2)).await;
        let b = round_trip(&mut fresh, &pattern(3000, 3)).await;
        (a, b)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!pending.is_finished(), "bytes crossed a cut link");
    assert_eq!(relay.carried(), (1000, 1000));
    relay.set_cut(false);
    let (a, b) = tokio::time::timeout(Duration::from_secs(20), pending).await.expect("healed").unwrap();
    assert_eq!((a, b), (pattern(2000, 2), pattern(3000, 3)));
}

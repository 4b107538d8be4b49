//! nfq-delay: holds every packet the kernel queues to netfilter queue Q for
//! `delay` ms plus a uniform random `0..=jitter` ms, then accepts it. With a
//! jitter, packets leave in a different order than they came: reordering.
//!
//! usage: nfq-delay QUEUE DELAY_MS [JITTER_MS] [SEED]
//!
//! Run it in the network namespace whose iptables send packets to the queue,
//! e.g. `iptables -A OUTPUT -j NFQUEUE --queue-num 0 --queue-bypass` (with
//! `--queue-bypass`, packets pass untouched when no nfq-delay is bound).
//! Stop it with SIGTERM or SIGINT; the kernel drops the packets it still
//! holds (at most DELAY + JITTER ms of traffic), which TCP resends.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use nfq::{Queue, Verdict};

fn arg(args: &[String], i: usize, name: &str, default: Option<u64>) -> u64 {
    match args.get(i) {
        Some(v) => v.parse().unwrap_or_else(|_| {
            eprintln!("nfq-delay: {name} must be a whole number, got {v:?}");
            std::process::exit(2)
        }),
        None => default.unwrap_or_else(|| {
            eprintln!("usage: nfq-delay QUEUE DELAY_MS [JITTER_MS] [SEED]");
            std::process::exit(2)
        }),
    }
}

/// xorshift64*: seeded, so a campaign's delays repeat with its seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let queue_num = u16::try_from(arg(&args, 0, "QUEUE", None)).unwrap_or_else(|_| {
        eprintln!("nfq-delay: QUEUE must be 0..65535");
        std::process::exit(2)
    });
    let delay = arg(&args, 1, "DELAY_MS", None);
    let jitter = arg(&args, 2, "JITTER_MS", Some(0));
    let mut rng = Rng(arg(&args, 3, "SEED", Some(1)).max(1));

    let mut queue = Queue::open()?;
    queue.bind(queue_num)?;
    // Past this many queued packets the kernel accepts new ones unqueued
    // (fail open) rather than dropping them: the fault is delay, not loss.
    queue.set_queue_max_len(queue_num, 65_536)?;
    queue.set_fail_open(queue_num, true)?;
    queue.set_nonblocking(true);
    eprintln!("nfq-delay: queue {queue_num}, {delay} ms + 0..={jitter} ms");

    // Release time, arrival order (ties keep order), the packet.
    let mut held = BinaryHeap::new();
    let mut seq = 0u64;
    loop {
        let mut got = false;
        loop {
            match queue.recv() {
                Ok(msg) => {
                    let wait = delay + rng.below(jitter + 1);
                    let at = Instant::now() + Duration::from_millis(wait);
                    held.push(Reverse((at, seq, Held(msg))));
                    seq += 1;
                    got = true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        let now = Instant::now();
        while held.peek().is_some_and(|Reverse((at, _, _))| *at <= now) {
            let Reverse((_, _, Held(mut msg))) = held.pop().expect("peeked");
            msg.set_verdict(Verdict::Accept);
            queue.verdict(msg)?;
        }
        if !got {
            std::thread::sleep(Duration::from_micros(500));
        }
    }
}

/// A queued packet; ordered by the heap's other fields only.
struct Held(nfq::Message);

impl PartialEq for Held {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for Held {}
impl PartialOrd for Held {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Held {
    fn cmp(&self, _: &Self) -> std::cmp::Ordering {
        std::cmp::Ordering::Equal
    }
}

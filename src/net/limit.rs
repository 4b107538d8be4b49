//! Per-peer rate limits on what a peer sends us: a token bucket of bytes and
//! one of frames, each refilled at its rate and holding at most one second's
//! worth (but always room for one frame of the largest allowed size).
//!
//! A frame over the limit is not read at all: its request gets no answer, so
//! the sender sees a failed delivery and repairs that doc later, and a peer
//! that keeps flooding collects strikes until it is banned.

use std::time::Instant;

/// The allowance of one peer.
#[derive(Debug, Clone)]
pub struct Bucket {
    bytes: f64,
    frames: f64,
    at: Instant,
    /// When the peer last got a strike for going over (at most one a second).
    pub struck_at: Option<Instant>,
}

/// Limits per peer; a rate of 0 is unlimited.
#[derive(Debug, Clone, Copy)]
pub struct RateLimit {
    bytes_per_sec: f64,
    frames_per_sec: f64,
    byte_burst: f64,
}

impl RateLimit {
    /// `bytes_per_sec` and `frames_per_sec` (0: unlimited); `max_frame` is the
    /// largest frame a peer may send, which the byte bucket always fits.
    pub fn new(bytes_per_sec: u64, frames_per_sec: u64, max_frame: usize) -> RateLimit {
        RateLimit {
            bytes_per_sec: bytes_per_sec as f64,
            frames_per_sec: frames_per_sec as f64,
            byte_burst: (bytes_per_sec as f64).max(max_frame as f64),
        }
    }

    /// A full bucket for a peer first heard from at `now`.
    pub fn bucket(&self, now: Instant) -> Bucket {
        Bucket {
            bytes: self.byte_burst,
            frames: self.frames_per_sec,
            at: now,
            struck_at: None,
        }
    }

    /// Takes a frame of `len` bytes from the peer's allowance at `now`; false
    /// (and nothing taken) if it is over either limit.
    pub fn admit(&self, b: &mut Bucket, len: usize, now: Instant) -> bool {
        let dt = now.saturating_duration_since(b.at).as_secs_f64();
        b.at = now;
        b.bytes = (b.bytes + dt * self.bytes_per_sec).min(self.byte_burst);
        b.frames = (b.frames + dt * self.frames_per_sec).min(self.frames_per_sec);
        let bytes_ok = self.bytes_per_sec == 0.0 || b.bytes >= len as f64;
        let frames_ok = self.frames_per_sec == 0.0 || b.frames >= 1.0;
        if !(bytes_ok && frames_ok) {
            return false;
        }
        if self.bytes_per_sec > 0.0 {
            b.bytes -= len as f64;
        }
        if self.frames_per_sec > 0.0 {
            b.frames -= 1.0;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_then_the_rate() {
        let limit = RateLimit::new(1000, 10, 500);
        let t0 = Instant::now();
        let mut b = limit.bucket(t0);
        // One second's worth at once: 10 frames of 100 bytes.
        for i in 0..10 {
            assert!(limit.admit(&mut b, 100, t0), "frame {i}");
        }
        assert!(!limit.admit(&mut b, 1, t0), "the 11th frame is over");
        // A tenth of a second refills one frame and 100 bytes.
        let t1 = t0 + Duration::from_millis(100);
        assert!(!limit.admit(&mut b, 101, t1), "101 bytes are over");
        assert!(limit.admit(&mut b, 100, t1));
        assert!(!limit.admit(&mut b, 1, t1));
        // Idle for long: the bucket holds only one second's worth.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..10 {
            assert!(limit.admit(&mut b, 1, t2));
        }
        assert!(!limit.admit(&mut b, 1, t2));
    }

    #[test]
    fn a_max_size_frame_always_fits_and_zero_is_unlimited() {
        let limit = RateLimit::new(100, 0, 4096);
        let t0 = Instant::now();
        let mut b = limit.bucket(t0);
        assert!(
            limit.admit(&mut b, 4096, t0),
            "a full bucket fits a max frame"
        );
        assert!(!limit.admit(&mut b, 1, t0));
        let open = RateLimit::new(0, 0, 10);
        let mut b = open.bucket(t0);
        for _ in 0..100_000 {
            assert!(open.admit(&mut b, 1 << 20, t0));
        }
    }
}

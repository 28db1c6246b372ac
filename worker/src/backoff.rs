//! Capped exponential backoff with jitter, for broker reconnects and cluster registration.
//! Pure: the caller supplies the randomness and does the waiting.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        let initial = initial.max(Duration::from_millis(1)).min(max);
        Backoff {
            initial,
            max,
            next: initial,
        }
    }

    /// The delay before the next attempt: a value in [d/2, d] for the current step d (jitter
    /// keeps a fleet of workers from reconnecting in lockstep after a cluster restart), then
    /// d doubles up to the cap.
    pub fn next_delay(&mut self, random: u32) -> Duration {
        let d = self.next;
        self.next = (d * 2).min(self.max);
        let half = d / 2;
        let spread = (d - half).as_micros() as u64;
        let extra = if spread == 0 {
            0
        } else {
            random as u64 % (spread + 1)
        };
        half + Duration::from_micros(extra)
    }

    /// After a success: the next failure starts again from the initial delay.
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

/// Cheap per-call randomness for jitter (no RNG dependency; quality does not matter here).
pub fn jitter() -> u32 {
    use std::time::{SystemTime, UNIX_EPOCH};
    let n = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    n.wrapping_mul(2_654_435_761) ^ std::process::id()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_with_bounded_jitter() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(250), ms(2000));
        let steps = [250, 500, 1000, 2000, 2000, 2000];
        for (i, step) in steps.iter().enumerate() {
            let d = b.next_delay(if i % 2 == 0 { 0 } else { u32::MAX });
            assert!(d >= ms(step / 2) && d <= ms(*step), "step {i}: {d:?}");
        }
        b.reset();
        assert!(b.next_delay(7) <= ms(250));
        // Degenerate settings stay sane: initial above the cap is clamped, zero is not a spin.
        let mut b = Backoff::new(ms(5000), ms(1000));
        assert!(b.next_delay(u32::MAX) <= ms(1000));
        let mut b = Backoff::new(Duration::ZERO, ms(10));
        assert!(b.next_delay(1) <= ms(1));
    }
}

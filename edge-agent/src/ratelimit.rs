//! Per-device token buckets: a sans-IO state machine driven by the caller's clock.
//!
//! Each device may send `rate` readings per second on average and `burst` at once. A
//! reading that finds no token is dropped and counted against its device, so one flooding
//! device costs the others nothing.

use std::collections::HashMap;

/// The buckets of all devices.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    rate_per_us: f64,
    burst: f64,
    buckets: HashMap<String, Bucket>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last_us: i64,
}

impl RateLimiter {
    /// `rate` readings per second with bursts of `burst`.
    pub fn new(rate: f64, burst: f64) -> Self {
        Self {
            rate_per_us: rate / 1e6,
            burst,
            buckets: HashMap::new(),
        }
    }

    /// Takes one token for `device` at `now_us` (a monotonic clock in µs). False means the
    /// reading is over the limit and must be dropped.
    pub fn allow(&mut self, device: &str, now_us: i64) -> bool {
        let (rate, burst) = (self.rate_per_us, self.burst);
        let b = match self.buckets.get_mut(device) {
            Some(b) => b,
            None => self.buckets.entry(device.to_owned()).or_insert(Bucket {
                tokens: burst,
                last_us: now_us,
            }),
        };
        let elapsed = now_us.saturating_sub(b.last_us).max(0) as f64;
        b.tokens = (b.tokens + elapsed * rate).min(burst);
        b.last_us = b.last_us.max(now_us);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Forgets devices whose buckets have refilled: they behave exactly like new ones.
    pub fn prune(&mut self, now_us: i64) {
        let (rate, burst) = (self.rate_per_us, self.burst);
        self.buckets
            .retain(|_, b| b.tokens + (now_us - b.last_us) as f64 * rate < burst);
    }

    /// Keeps at most `max` buckets: after [`prune`](Self::prune), the fullest buckets go
    /// first (they are the closest to behaving like new ones), so the devices being held to
    /// their rate stay held.
    pub fn bound(&mut self, max: usize, now_us: i64) {
        if self.buckets.len() <= max {
            return;
        }
        let rate = self.rate_per_us;
        let mut fill: Vec<(f64, String)> = self
            .buckets
            .iter()
            .map(|(k, b)| (b.tokens + (now_us - b.last_us) as f64 * rate, k.clone()))
            .collect();
        fill.sort_by(|a, b| b.0.total_cmp(&a.0));
        let surplus = self.buckets.len() - max;
        for (_, k) in fill.into_iter().take(surplus) {
            self.buckets.remove(&k);
        }
    }

    /// How many devices have state.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no device has state.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const SEC: i64 = 1_000_000;

    #[test]
    fn burst_then_rate() {
        let mut rl = RateLimiter::new(100.0, 200.0);
        let allowed = (0..300).filter(|_| rl.allow("flood", 0)).count();
        assert_eq!(allowed, 200);
        // One second later exactly 100 more tokens exist.
        let allowed = (0..300).filter(|_| rl.allow("flood", SEC)).count();
        assert_eq!(allowed, 100);
    }

    #[test]
    fn one_flooder_does_not_touch_others() {
        let mut rl = RateLimiter::new(10.0, 10.0);
        for _ in 0..1000 {
            rl.allow("flood", 0);
        }
        assert!((0..10).all(|_| rl.allow("quiet", 0)));
    }

    #[test]
    fn prune_keeps_only_devices_with_debt() {
        let mut rl = RateLimiter::new(10.0, 10.0);
        rl.allow("a", 0);
        for _ in 0..10 {
            rl.allow("b", 0);
        }
        rl.prune(SEC / 5); // a has refilled; b has 2 of 10 tokens
        assert_eq!(rl.len(), 1);
        rl.prune(10 * SEC);
        assert!(rl.is_empty());
    }

    proptest! {
        /// Over any window, a device gets at most burst + rate * seconds readings through.
        #[test]
        fn never_more_than_burst_plus_rate(steps in prop::collection::vec(0i64..50_000, 1..2000)) {
            let mut rl = RateLimiter::new(100.0, 20.0);
            let mut now = 0;
            let mut allowed = 0u64;
            for s in &steps {
                now += s;
                if rl.allow("d", now) {
                    allowed += 1;
                }
            }
            let bound = 20.0 + 100.0 * now as f64 / 1e6;
            prop_assert!(allowed as f64 <= bound + 1e-6, "{} > {}", allowed, bound);
        }
    }
}

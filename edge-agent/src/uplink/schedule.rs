//! The uplink's scheduler: which lane to send next, how many readings, and how long to wait
//! before reconnecting. No I/O and no clock: the driver passes `now` (time since it started)
//! and what the queue holds, and gets back a decision.
//!
//! Rules:
//! - **Live first.** Fresh readings go out as soon as a full batch is waiting, or when the
//!   oldest has waited `linger`; they never wait behind the backlog.
//! - **Backlog capped.** Readings from before the connection (re)started drain alongside at
//!   most `backlog_rate` readings per second, a token bucket holding one batch.
//! - **Window.** At most `max_in_flight` batches are unacknowledged; then the scheduler waits
//!   for acks.
//! - **Backoff.** Reconnects wait `backoff_min` doubling up to `backoff_max`, with "equal
//!   jitter" (half fixed, half random) so a fleet that lost the cloud together does not
//!   come back together. Only an ack resets it: a cloud that accepts the connection and then
//!   refuses or drops every batch is not hammered with reconnects.

use std::collections::BTreeMap;
use std::time::Duration;

use plantlink_wire::frame::Lane;

/// The scheduler's settings, from the agent's `[uplink]` section.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Most readings in one batch.
    pub batch_max_readings: usize,
    /// Longest a live reading waits for a fuller batch.
    pub linger: Duration,
    /// Most unacknowledged batches.
    pub max_in_flight: usize,
    /// Most backlog readings per second.
    pub backlog_rate: f64,
    /// First reconnect delay.
    pub backoff_min: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
}

/// What the queue holds for the live lane.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Live {
    /// Readings waiting to be sent.
    pub waiting: usize,
    /// How long the oldest of them has waited.
    pub oldest_wait: Duration,
}

/// What to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Read up to `max` readings of `lane` from the queue and send them.
    Send {
        /// The lane.
        lane: Lane,
        /// Most readings to read.
        max: usize,
    },
    /// Nothing to send before `until` (unless new readings or acks arrive).
    WaitUntil(Duration),
    /// Nothing to send until new readings or acks arrive.
    Idle,
}

#[derive(Debug, Clone, Copy)]
struct InFlight {
    queue_batch: u64,
    lane: Lane,
    readings: usize,
}

/// The scheduler of one agent's uplink.
#[derive(Debug)]
pub struct Scheduler {
    s: Settings,
    in_flight: BTreeMap<u64, InFlight>,
    next_seq: u64,
    tokens: f64,
    tokens_at: Duration,
    failures: u32,
    configured_in_flight: usize,
}

impl Scheduler {
    /// A scheduler starting at `now`, its backlog bucket full.
    pub fn new(settings: Settings, now: Duration) -> Self {
        let tokens = settings.batch_max_readings as f64;
        Self {
            configured_in_flight: settings.max_in_flight,
            s: settings,
            in_flight: BTreeMap::new(),
            next_seq: 1,
            tokens,
            tokens_at: now,
            failures: 0,
        }
    }

    fn refill(&mut self, now: Duration) {
        let elapsed = now.saturating_sub(self.tokens_at).as_secs_f64();
        let cap = self.s.batch_max_readings as f64;
        self.tokens = (self.tokens + elapsed * self.s.backlog_rate).min(cap);
        self.tokens_at = now.max(self.tokens_at);
    }

    /// The next step, given the live lane's state and whether backlog is waiting.
    pub fn next(&mut self, now: Duration, live: Live, backlog_waiting: bool) -> Decision {
        if self.in_flight.len() >= self.s.max_in_flight {
            return Decision::Idle;
        }
        let full = self.s.batch_max_readings;
        if live.waiting >= full || (live.waiting > 0 && live.oldest_wait >= self.s.linger) {
            return Decision::Send {
                lane: Lane::Live,
                max: live.waiting.min(full),
            };
        }
        let mut wake: Option<Duration> = None;
        if live.waiting > 0 {
            wake = Some(now + (self.s.linger - live.oldest_wait));
        }
        if backlog_waiting {
            self.refill(now);
            if self.tokens >= 1.0 {
                return Decision::Send {
                    lane: Lane::Backlog,
                    max: (self.tokens as usize).min(full),
                };
            }
            if self.s.backlog_rate > 0.0 {
                let until =
                    now + Duration::from_secs_f64((1.0 - self.tokens) / self.s.backlog_rate);
                wake = Some(wake.map_or(until, |w| w.min(until)));
            }
        }
        wake.map_or(Decision::Idle, Decision::WaitUntil)
    }

    /// Records a batch sent: its queue batch id, lane and size. Returns the wire sequence
    /// number to put in the batch frame.
    pub fn on_sent(&mut self, now: Duration, queue_batch: u64, lane: Lane, readings: usize) -> u64 {
        if lane == Lane::Backlog {
            self.refill(now);
            self.tokens -= readings as f64;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.in_flight.insert(
            seq,
            InFlight {
                queue_batch,
                lane,
                readings,
            },
        );
        seq
    }

    /// The cloud acknowledged `seq`: the queue batch to delete, if the ack is for a batch in
    /// flight (a duplicate or unknown ack releases nothing). An ack resets the backoff.
    pub fn on_ack(&mut self, seq: u64) -> Option<(u64, Lane, usize)> {
        let f = self.in_flight.remove(&seq)?;
        self.failures = 0;
        Some((f.queue_batch, f.lane, f.readings))
    }

    /// The cloud refused `seq`: the queue batch to split or quarantine, if it was in flight.
    /// The backoff stays as it is.
    pub fn on_refused(&mut self, seq: u64) -> Option<(u64, Lane, usize)> {
        self.in_flight
            .remove(&seq)
            .map(|f| (f.queue_batch, f.lane, f.readings))
    }

    /// The cloud's `Welcome` announced its window: never more in flight than it allows.
    pub fn limit_in_flight(&mut self, cloud_max: usize) {
        self.s.max_in_flight = self.configured_in_flight.min(cloud_max.max(1));
    }

    /// Batches in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// The connection is gone: everything in flight will be sent again (the queue's lanes
    /// restart). Returns how long to wait before reconnecting; `jitter` is uniform in [0, 1).
    pub fn on_disconnected(&mut self, jitter: f64) -> Duration {
        self.in_flight.clear();
        self.failures = self.failures.saturating_add(1);
        let exp = self.failures.saturating_sub(1).min(30);
        let base = self
            .s
            .backoff_min
            .saturating_mul(1u32 << exp)
            .min(self.s.backoff_max);
        base / 2 + base.mul_f64(jitter.clamp(0.0, 1.0) / 2.0)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn settings() -> Settings {
        Settings {
            batch_max_readings: 1000,
            linger: Duration::from_millis(500),
            max_in_flight: 4,
            backlog_rate: 2000.0,
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
        }
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn live_waits_for_a_full_batch_or_the_linger() {
        let mut s = Scheduler::new(settings(), Duration::ZERO);
        let few = Live {
            waiting: 10,
            oldest_wait: 100 * MS,
        };
        assert_eq!(
            s.next(Duration::ZERO, few, false),
            Decision::WaitUntil(400 * MS)
        );
        let lingered = Live {
            waiting: 10,
            oldest_wait: 500 * MS,
        };
        assert_eq!(
            s.next(Duration::ZERO, lingered, false),
            Decision::Send {
                lane: Lane::Live,
                max: 10
            }
        );
        let full = Live {
            waiting: 5000,
            oldest_wait: Duration::ZERO,
        };
        assert_eq!(
            s.next(Duration::ZERO, full, false),
            Decision::Send {
                lane: Lane::Live,
                max: 1000
            }
        );
        assert_eq!(
            s.next(Duration::ZERO, Live::default(), false),
            Decision::Idle
        );
    }

    #[test]
    fn live_goes_before_backlog_and_backlog_is_capped() {
        let mut s = Scheduler::new(settings(), Duration::ZERO);
        let ready = Live {
            waiting: 10,
            oldest_wait: 600 * MS,
        };
        assert_eq!(
            s.next(Duration::ZERO, ready, true),
            Decision::Send {
                lane: Lane::Live,
                max: 10
            }
        );
        // With nothing live, the backlog may send one batch at once (a full bucket)...
        assert_eq!(
            s.next(Duration::ZERO, Live::default(), true),
            Decision::Send {
                lane: Lane::Backlog,
                max: 1000
            }
        );
        s.on_sent(Duration::ZERO, 1, Lane::Backlog, 1000);
        // ...then waits for tokens at 2000 readings/s: one token takes 0.5 ms.
        assert_eq!(
            s.next(Duration::ZERO, Live::default(), true),
            Decision::WaitUntil(Duration::from_micros(500))
        );
        // 100 ms later, 200 readings' worth.
        assert_eq!(
            s.next(100 * MS, Live::default(), true),
            Decision::Send {
                lane: Lane::Backlog,
                max: 200
            }
        );
    }

    #[test]
    fn the_window_limits_batches_in_flight_and_acks_release_them() {
        let mut s = Scheduler::new(settings(), Duration::ZERO);
        let live = Live {
            waiting: 5000,
            oldest_wait: Duration::ZERO,
        };
        let seqs: Vec<u64> = (0..4)
            .map(|b| s.on_sent(Duration::ZERO, 100 + b, Lane::Live, 1000))
            .collect();
        assert_eq!(s.next(Duration::ZERO, live, false), Decision::Idle);
        assert_eq!(s.on_ack(seqs[2]), Some((102, Lane::Live, 1000)));
        assert_eq!(s.on_ack(seqs[2]), None, "a duplicate ack releases nothing");
        assert_eq!(s.on_ack(999), None);
        assert!(matches!(
            s.next(Duration::ZERO, live, false),
            Decision::Send { .. }
        ));
        // A lost connection forgets the window; the queue sends those readings again.
        let _ = s.on_disconnected(0.5);
        assert_eq!(s.in_flight(), 0);
        assert_eq!(
            s.on_ack(seqs[0]),
            None,
            "acks from the old connection release nothing"
        );
    }

    #[test]
    fn the_clouds_window_caps_the_configured_one() {
        let mut s = Scheduler::new(settings(), Duration::ZERO);
        s.limit_in_flight(2);
        let live = Live {
            waiting: 5000,
            oldest_wait: Duration::ZERO,
        };
        s.on_sent(Duration::ZERO, 1, Lane::Live, 1000);
        s.on_sent(Duration::ZERO, 2, Lane::Live, 1000);
        assert_eq!(s.next(Duration::ZERO, live, false), Decision::Idle);
        // A larger window from the cloud never raises the agent's own setting (4).
        s.limit_in_flight(100);
        s.on_sent(Duration::ZERO, 3, Lane::Live, 1000);
        s.on_sent(Duration::ZERO, 4, Lane::Live, 1000);
        assert_eq!(s.next(Duration::ZERO, live, false), Decision::Idle);
    }

    #[test]
    fn backoff_doubles_to_its_cap_with_equal_jitter() {
        let mut s = Scheduler::new(settings(), Duration::ZERO);
        let lows: Vec<Duration> = (0..12).map(|_| s.on_disconnected(0.0)).collect();
        assert_eq!(lows[0], 100 * MS);
        assert_eq!(lows[1], 200 * MS);
        assert_eq!(lows[2], 400 * MS);
        assert_eq!(
            *lows.last().unwrap(),
            Duration::from_secs(15),
            "half of the 30 s cap"
        );
        // A connection alone does not reset it (a cloud that refuses every batch would be
        // hammered); an ack does.
        let seq = s.on_sent(Duration::ZERO, 7, Lane::Live, 10);
        assert_eq!(s.on_refused(seq), Some((7, Lane::Live, 10)));
        assert_eq!(s.on_disconnected(0.0), Duration::from_secs(15));
        let _ = s.on_disconnected(0.0);
        let seq = s.on_sent(Duration::ZERO, 8, Lane::Live, 10);
        assert!(s.on_ack(seq).is_some());
        let d = s.on_disconnected(0.999_999);
        assert!(
            d > 199 * MS && d < 200 * MS,
            "{d:?}: the backoff restarts after an ack"
        );
    }

    proptest! {
        /// Over any run, the backlog sends at most one batch plus rate x elapsed time.
        #[test]
        fn backlog_never_beats_its_rate(steps in prop::collection::vec(0u64..50, 1..500)) {
            let mut s = Scheduler::new(settings(), Duration::ZERO);
            let mut now = Duration::ZERO;
            let mut sent = 0usize;
            for ms in steps {
                now += Duration::from_millis(ms);
                if let Decision::Send { lane: Lane::Backlog, max } = s.next(now, Live::default(), true) {
                    s.on_sent(now, 0, Lane::Backlog, max);
                    s.on_ack(s.next_seq - 1);
                    sent += max;
                }
            }
            let bound = 1000.0 + 2000.0 * now.as_secs_f64();
            prop_assert!(sent as f64 <= bound + 1e-6, "{} > {}", sent, bound);
        }
    }
}

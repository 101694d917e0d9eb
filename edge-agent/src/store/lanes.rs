//! The uplink's two lanes over the queue's id space, as a pure state machine: which id range
//! each lane reads next, which batches are in flight, and what a refused batch sends again.
//! Nothing here touches SQLite: the store reads the ranges handed out and reports what it
//! found, so the rules can be tested on plain numbers.
//!
//! Ids at or below the boundary (what was stored before the connection began) are backlog;
//! above it, live. Each lane's cursor is the last id it handed out. A batch is an id range,
//! so acknowledging it deletes exactly what it carried, whatever was stored since.

use std::collections::{BTreeMap, VecDeque};

use plantlink_wire::frame::Lane;

/// An id range handed out (or waiting to be sent again).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct InFlight {
    pub(super) first: i64,
    pub(super) last: i64,
    /// Readings sent in the batch (0 for a range waiting in the retry queue).
    pub(super) sent: usize,
}

/// What a lane reads next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Next {
    /// Ids in `(after, upto]`, oldest first.
    Range { after: i64, upto: i64 },
    /// A refused batch's part, sent again before the rest of the backlog: ids in
    /// `[first, last]`.
    Retry(InFlight),
    /// Nothing.
    Nothing,
}

/// What to do with a refused batch, given the ids of it still stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    /// None of it is stored any more (evicted meanwhile).
    Gone,
    /// One reading is left of a larger batch: it is sent again alone first.
    Again,
    /// The batch was one reading, refused on its own: it is at fault.
    Quarantine(i64),
    /// Split in two, both queued to be sent again, the first half in front.
    Split { first: usize, second: usize },
}

/// The lanes' state.
#[derive(Debug)]
pub(super) struct Lanes {
    boundary: i64,
    live_cursor: i64,
    backlog_cursor: i64,
    in_flight: BTreeMap<u64, InFlight>,
    next_batch: u64,
    retry: VecDeque<InFlight>,
}

impl Default for Lanes {
    fn default() -> Self {
        Self {
            boundary: 0,
            live_cursor: 0,
            backlog_cursor: 0,
            in_flight: BTreeMap::new(),
            next_batch: 1,
            retry: VecDeque::new(),
        }
    }
}

impl Lanes {
    /// A connection (re)starts: nothing is in flight any more, and everything stored up to
    /// `last_id` is backlog, to be sent again from the start.
    pub(super) fn restart(&mut self, last_id: i64) {
        self.in_flight.clear();
        self.retry.clear();
        self.boundary = last_id;
        self.live_cursor = last_id;
        self.backlog_cursor = 0;
    }

    /// The last id the live lane handed out.
    pub(super) fn live_cursor(&self) -> i64 {
        self.live_cursor
    }

    /// Live ids not yet handed out, when the newest stored is `last_id` (an upper bound:
    /// some may have been evicted).
    pub(super) fn live_waiting(&self, last_id: i64) -> u64 {
        last_id
            .saturating_sub(self.live_cursor.max(self.boundary))
            .max(0) as u64
    }

    /// Whether the backlog lane has ids left to hand out (or parts to send again).
    pub(super) fn backlog_waiting(&self) -> bool {
        self.backlog_cursor < self.boundary || !self.retry.is_empty()
    }

    /// What `lane` reads next. A [`Next::Retry`] is taken off the retry queue: report it
    /// with [`Self::sent_retry`], or drop it if none of it is stored.
    pub(super) fn next(&mut self, lane: Lane) -> Next {
        if lane == Lane::Backlog
            && let Some(part) = self.retry.pop_front()
        {
            return Next::Retry(part);
        }
        let (after, upto) = match lane {
            Lane::Live => (self.live_cursor, i64::MAX),
            Lane::Backlog => (self.backlog_cursor, self.boundary),
        };
        if after >= upto {
            Next::Nothing
        } else {
            Next::Range { after, upto }
        }
    }

    /// `n` readings of the [`Next::Range`] after `after` were read, up to id `last`: they
    /// are a batch in flight; returns its id.
    pub(super) fn sent(&mut self, lane: Lane, after: i64, last: i64, n: usize) -> u64 {
        match lane {
            Lane::Live => self.live_cursor = last,
            Lane::Backlog => self.backlog_cursor = last,
        }
        self.put_in_flight(after + 1, last, n)
    }

    /// The [`Next::Range`] of `lane` held nothing: the backlog skips the empty stretch.
    pub(super) fn exhausted(&mut self, lane: Lane) {
        if lane == Lane::Backlog {
            self.backlog_cursor = self.boundary;
        }
    }

    /// `n` readings of a [`Next::Retry`] part were read, up to id `last`: they are a batch
    /// in flight (returns its id), and what is left of the part stays in front.
    pub(super) fn sent_retry(&mut self, part: InFlight, last: i64, n: usize) -> u64 {
        if last < part.last {
            self.retry.push_front(InFlight {
                first: last + 1,
                last: part.last,
                sent: 0,
            });
        }
        self.put_in_flight(part.first, last, n)
    }

    fn put_in_flight(&mut self, first: i64, last: i64, sent: usize) -> u64 {
        let id = self.next_batch;
        self.next_batch += 1;
        self.in_flight.insert(id, InFlight { first, last, sent });
        id
    }

    /// Takes batch `batch` out of flight (acknowledged or refused); `None` if it is not in
    /// flight (answered already, or from before a restart).
    pub(super) fn take(&mut self, batch: u64) -> Option<InFlight> {
        self.in_flight.remove(&batch)
    }

    /// Batch `f` (taken with [`Self::take`]) was refused, and `ids` (ascending) of it are
    /// still stored: splits it, or names the one reading at fault.
    pub(super) fn refused(&mut self, f: InFlight, ids: &[i64]) -> Refusal {
        match ids.len() {
            0 => Refusal::Gone,
            1 if f.sent > 1 => {
                self.retry.push_front(InFlight {
                    first: ids[0],
                    last: ids[0],
                    sent: 0,
                });
                Refusal::Again
            }
            1 => Refusal::Quarantine(ids[0]),
            n => {
                let mid = n / 2;
                // The second half first, so that the first half ends up in front.
                self.retry.push_front(InFlight {
                    first: ids[mid],
                    last: f.last,
                    sent: 0,
                });
                self.retry.push_front(InFlight {
                    first: f.first,
                    last: ids[mid - 1],
                    sent: 0,
                });
                Refusal::Split {
                    first: mid,
                    second: n - mid,
                }
            }
        }
    }

    /// Batches in flight.
    pub(super) fn in_flight(&self) -> usize {
        self.in_flight.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Hands out what `lane` has of `stored` (ascending ids), at most `max`, as the store
    /// does: `Some((batch, ids))`, or `None` when the lane has nothing.
    fn read(
        lanes: &mut Lanes,
        stored: &std::collections::BTreeSet<i64>,
        lane: Lane,
        max: usize,
    ) -> Option<(u64, Vec<i64>)> {
        loop {
            match lanes.next(lane) {
                Next::Nothing => return None,
                Next::Retry(part) => {
                    let ids: Vec<i64> = stored
                        .range(part.first..=part.last)
                        .take(max)
                        .copied()
                        .collect();
                    let Some(&last) = ids.last() else { continue };
                    return Some((lanes.sent_retry(part, last, ids.len()), ids));
                }
                Next::Range { after, upto } => {
                    let ids: Vec<i64> = stored.range(after + 1..=upto).take(max).copied().collect();
                    let Some(&last) = ids.last() else {
                        lanes.exhausted(lane);
                        return None;
                    };
                    return Some((lanes.sent(lane, after, last, ids.len()), ids));
                }
            }
        }
    }

    #[test]
    fn a_restart_makes_everything_backlog_and_live_starts_past_it() {
        let mut lanes = Lanes::default();
        lanes.restart(10);
        assert!(lanes.backlog_waiting());
        assert_eq!(lanes.live_waiting(10), 0);
        assert_eq!(lanes.live_waiting(14), 4);
        assert_eq!(
            lanes.next(Lane::Live),
            Next::Range {
                after: 10,
                upto: i64::MAX
            }
        );
        assert_eq!(
            lanes.next(Lane::Backlog),
            Next::Range { after: 0, upto: 10 }
        );
        let b = lanes.sent(Lane::Backlog, 0, 4, 4);
        assert_eq!(
            lanes.next(Lane::Backlog),
            Next::Range { after: 4, upto: 10 }
        );
        lanes.exhausted(Lane::Backlog);
        assert!(!lanes.backlog_waiting());
        assert_eq!(lanes.next(Lane::Backlog), Next::Nothing);
        assert_eq!(
            lanes.take(b),
            Some(InFlight {
                first: 1,
                last: 4,
                sent: 4
            })
        );
        assert_eq!(lanes.take(b), None, "a batch is answered once");
        // A restart forgets what was in flight: its answer changes nothing.
        let b = lanes.sent(Lane::Live, 10, 12, 2);
        lanes.restart(12);
        assert_eq!(lanes.take(b), None);
        assert_eq!(lanes.in_flight(), 0);
    }

    #[test]
    fn refusals_split_until_one_reading_is_left() {
        let mut lanes = Lanes::default();
        lanes.restart(0);
        let f = InFlight {
            first: 1,
            last: 10,
            sent: 10,
        };
        assert_eq!(
            lanes.refused(f, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]),
            Refusal::Split {
                first: 5,
                second: 5
            }
        );
        // The first half goes first, then the second, before any other backlog.
        assert_eq!(
            lanes.next(Lane::Backlog),
            Next::Retry(InFlight {
                first: 1,
                last: 5,
                sent: 0
            })
        );
        assert_eq!(
            lanes.next(Lane::Backlog),
            Next::Retry(InFlight {
                first: 6,
                last: 10,
                sent: 0
            })
        );
        assert_eq!(lanes.next(Lane::Backlog), Next::Nothing);
        // Evicted meanwhile: one left of a larger batch is tried alone; one refused alone
        // is at fault; none left is gone.
        assert_eq!(lanes.refused(f, &[7]), Refusal::Again);
        assert_eq!(
            lanes.next(Lane::Backlog),
            Next::Retry(InFlight {
                first: 7,
                last: 7,
                sent: 0
            })
        );
        assert_eq!(
            lanes.refused(
                InFlight {
                    first: 7,
                    last: 7,
                    sent: 1
                },
                &[7]
            ),
            Refusal::Quarantine(7)
        );
        assert_eq!(lanes.refused(f, &[]), Refusal::Gone);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Store(u8),
        Evict(prop::sample::Index),
        Read(bool, usize),
        Ack(prop::sample::Index),
        Refuse(prop::sample::Index),
        Restart,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (1u8..20).prop_map(Op::Store),
            1 => any::<prop::sample::Index>().prop_map(Op::Evict),
            4 => (any::<bool>(), 1usize..8).prop_map(|(live, max)| Op::Read(live, max)),
            3 => any::<prop::sample::Index>().prop_map(Op::Ack),
            2 => any::<prop::sample::Index>().prop_map(Op::Refuse),
            1 => Just(Op::Restart),
        ]
    }

    proptest! {
        // Over plain ids, with evictions and refusals: no id is in two batches at once, a
        // batch holds only stored ids, oldest first, and between restarts everything
        // stored is handed out (or quarantined) once the lanes are drained.
        #[test]
        fn every_stored_id_is_handed_out_once(ops in prop::collection::vec(op(), 1..80)) {
            let mut lanes = Lanes::default();
            let mut stored = std::collections::BTreeSet::new();
            let mut last_id = 0i64;
            let mut flying: Vec<(u64, Vec<i64>)> = Vec::new();
            lanes.restart(0);
            for op in ops {
                match op {
                    Op::Store(n) => {
                        for _ in 0..n {
                            last_id += 1;
                            stored.insert(last_id);
                        }
                    }
                    Op::Evict(i) => {
                        if !stored.is_empty() {
                            let id = *stored.iter().nth(i.index(stored.len())).unwrap();
                            stored.remove(&id);
                        }
                    }
                    Op::Read(live, max) => {
                        let lane = if live { Lane::Live } else { Lane::Backlog };
                        if let Some((b, ids)) = read(&mut lanes, &stored, lane, max) {
                            prop_assert!(!ids.is_empty() && ids.len() <= max);
                            prop_assert!(ids.windows(2).all(|w| w[0] < w[1]));
                            for id in &ids {
                                prop_assert!(stored.contains(id));
                                prop_assert!(!flying.iter().any(|(_, f)| f.contains(id)), "{} twice", id);
                            }
                            flying.push((b, ids));
                        }
                    }
                    Op::Ack(i) => {
                        if !flying.is_empty() {
                            let (b, ids) = flying.remove(i.index(flying.len()));
                            let f = lanes.take(b).unwrap();
                            prop_assert!(f.first <= ids[0] && *ids.last().unwrap() == f.last);
                            for id in stored.range(f.first..=f.last).copied().collect::<Vec<_>>() {
                                prop_assert!(ids.contains(&id), "ack of {} deletes {} it did not carry", b, id);
                                stored.remove(&id);
                            }
                        }
                    }
                    Op::Refuse(i) => {
                        if !flying.is_empty() {
                            let (b, _) = flying.remove(i.index(flying.len()));
                            let f = lanes.take(b).unwrap();
                            let ids: Vec<i64> = stored.range(f.first..=f.last).copied().collect();
                            if let Refusal::Quarantine(id) = lanes.refused(f, &ids) {
                                stored.remove(&id);
                            }
                        }
                    }
                    Op::Restart => {
                        lanes.restart(last_id);
                        flying.clear();
                    }
                }
            }
            // Drain: live, then backlog, acking everything; what is stored and was not in
            // flight comes out exactly once.
            let mut out: Vec<i64> = flying.iter().flat_map(|(_, ids)| ids.clone()).collect();
            for lane in [Lane::Live, Lane::Backlog] {
                while let Some((_, ids)) = read(&mut lanes, &stored, lane, 3) {
                    out.extend(ids);
                }
            }
            // (Ids in flight that were evicted meanwhile are not expected.)
            out.retain(|id| stored.contains(id));
            out.sort_unstable();
            let want: Vec<i64> = stored.iter().copied().collect();
            prop_assert_eq!(out, want);
        }
    }
}

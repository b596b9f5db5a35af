//! Entry delivery bookkeeping shared by the fanout and chat scenarios: each
//! subscriber's [`DeliveryTracker`], the publish-to-delivery latency, and the
//! drain that waits until every subscriber has reached its channels' heads.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::stats::{Counter, Lat, Stats};
use crate::sys;
use crate::tracker::{Completion, DeliveryTracker, Outcome, Seen};
use crate::wire::Incoming;
use crate::workers::{Faults, Heads};

/// One subscriber's deliveries.
#[derive(Default)]
pub struct SubState {
    pub tracker: Mutex<DeliveryTracker>,
    /// Whether this subscriber was counted done in the drain.
    counted: AtomicBool,
}

impl SubState {
    fn count_done(&self, drain: &Drain) {
        if !self.counted.swap(true, Ordering::AcqRel) {
            drain.completion.done();
        }
    }
}

/// The end of a run's deliveries, for one worker.
pub struct Drain {
    completion: Completion,
    heads_known: AtomicBool,
}

impl Drain {
    /// `subscribers`: how many [`SubState`]s will be waited for.
    pub fn new(subscribers: u64) -> Drain {
        Drain {
            completion: Completion::new(subscribers),
            heads_known: AtomicBool::new(false),
        }
    }

    /// Gives every subscriber its channels' final offsets, then waits (at
    /// most `limit`) until each has received up to them or lost its connection.
    pub async fn finish(&self, subs: &[Arc<SubState>], heads: &Heads, limit: Duration) -> bool {
        for s in subs {
            s.tracker.lock().set_heads(heads);
        }
        self.heads_known.store(true, Ordering::Release);
        for s in subs {
            let reached = s.tracker.lock().reached_heads();
            if reached {
                s.count_done(self);
            }
        }
        self.completion.wait(limit).await
    }
}

/// Adds every subscriber's verdict into `stats`.
pub fn settle(subs: &[Arc<SubState>], stats: &Stats) -> Outcome {
    let mut total = Outcome::default();
    for s in subs {
        total.add(s.tracker.lock().outcome());
    }
    stats.add(Counter::Expected, total.expected);
    stats.add(Counter::Delivered, total.delivered);
    stats.add(Counter::Lost, total.lost);
    stats.add(Counter::Duplicates, total.duplicates);
    stats.add(Counter::OutOfOrder, total.out_of_order);
    stats.add(Counter::Stale, total.stale);
    total
}

/// Handles one `entry` push for a subscriber: tracks its offset and, when it
/// carries the harness's timestamp and comes from someone else, records its
/// delivery latency. Returns the offset when it was new (not a duplicate).
pub fn on_entry(
    push: &Incoming,
    me: &str,
    state: &SubState,
    drain: &Drain,
    stats: &Stats,
    faults: &Faults,
) -> Option<u64> {
    let (Some(channel), Some(offset)) = (push.channel.as_deref(), push.offset) else {
        stats.error("entry push without channel or offset");
        return None;
    };
    stats.incr(Counter::Received);
    let data = push.data.as_ref();
    let from_other = data
        .and_then(|d| d.sender.as_deref())
        .is_some_and(|s| s != me);
    let stamp = data.and_then(|d| d.attachments).and_then(|a| a.t_ns);
    let mut new = None;
    for _ in 0..faults.copies() {
        let mut t = state.tracker.lock();
        let seen = t.observe(channel, offset);
        if seen != Seen::Duplicate {
            new = Some(offset);
            if let (true, Some(t_ns)) = (from_other, stamp) {
                stats.record_us(Lat::Delivery, sys::now_ns().saturating_sub(t_ns) / 1000);
                stats.incr(Counter::Deliveries);
                stats.mark_event();
            }
        }
        if drain.heads_known.load(Ordering::Acquire) && t.reached_heads() {
            drop(t);
            state.count_done(drain);
        }
    }
    new
}

/// A subscriber's connection ended: nothing more will come for it.
pub fn on_closed(state: &SubState, drain: &Drain) {
    state.count_done(drain);
}

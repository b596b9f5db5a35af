//! Loss, duplicate and order detection by per-channel offset.
//!
//! Every persistent channel numbers its entries 1, 2, 3, ... and a subscriber
//! that subscribed at offset `s` must receive exactly `s+1 ..= head`, in
//! order. A [`ChannelTrack`] keeps the offsets received as a set of ranges
//! (one range when all is well, so it costs nothing per message), notes
//! repeats and arrivals below the highest offset as they happen, and at the
//! end, once the final head is known, counts what never came.
//!
//! The subscription point may be learnt after the first pushes were already
//! received (a reply and the pushes after it race through the reader), so it
//! only matters at the end: nothing is decided from it while counting.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

/// What one received offset was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// The next offset, or the first one.
    InOrder,
    /// New, but below an offset already received.
    OutOfOrder,
    /// Received before.
    Duplicate,
}

/// One subscriber's view of one channel.
#[derive(Clone, Debug, Default)]
pub struct ChannelTrack {
    /// Disjoint, sorted, non-adjacent inclusive ranges of received offsets.
    ranges: Vec<(u64, u64)>,
    /// The offset the subscription started after (entries `> start` are expected).
    start: Option<u64>,
    /// The final offset, once known.
    head: Option<u64>,
    duplicates: u64,
    out_of_order: u64,
}

/// The verdict on one channel, once its head is known.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Offsets in `start+1 ..= head`.
    pub expected: u64,
    /// Distinct expected offsets received.
    pub delivered: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    /// Distinct offsets at or before the subscription point.
    pub stale: u64,
}

impl Outcome {
    pub fn add(&mut self, o: Outcome) {
        self.expected += o.expected;
        self.delivered += o.delivered;
        self.lost += o.lost;
        self.duplicates += o.duplicates;
        self.out_of_order += o.out_of_order;
        self.stale += o.stale;
    }
}

impl ChannelTrack {
    pub fn set_start(&mut self, start: u64) {
        self.start = Some(start);
    }

    pub fn set_head(&mut self, head: u64) {
        self.head = Some(head);
    }

    pub fn highest(&self) -> Option<u64> {
        self.ranges.last().map(|r| r.1)
    }

    /// Whether everything up to the head has arrived or been passed: since a
    /// channel is pushed in order, a gap below the highest offset received is
    /// a loss, not a delay.
    pub fn reached_head(&self) -> bool {
        match (self.head, self.start) {
            (Some(h), Some(s)) if h <= s => true,
            (Some(h), _) => self.highest().is_some_and(|top| top >= h),
            (None, _) => false,
        }
    }

    pub fn observe(&mut self, offset: u64) -> Seen {
        // Fast path: the next offset extends the last range.
        if let Some(last) = self.ranges.last_mut() {
            if offset == last.1 + 1 {
                last.1 = offset;
                return Seen::InOrder;
            }
        }
        let highest = self.highest();
        // First range whose end is >= offset - 1: the only ones it can touch.
        let i = self
            .ranges
            .partition_point(|r| r.1.saturating_add(1) < offset);
        if let Some(r) = self.ranges.get(i) {
            if r.0 <= offset && offset <= r.1 {
                self.duplicates += 1;
                return Seen::Duplicate;
            }
        }
        // Insert, then merge with the neighbours it touches.
        let joins_prev = i < self.ranges.len() && self.ranges[i].1 + 1 == offset;
        if joins_prev {
            self.ranges[i].1 = offset;
            if i + 1 < self.ranges.len() && self.ranges[i + 1].0 == offset + 1 {
                self.ranges[i].1 = self.ranges[i + 1].1;
                self.ranges.remove(i + 1);
            }
        } else if i < self.ranges.len() && self.ranges[i].0 == offset + 1 {
            self.ranges[i].0 = offset;
        } else {
            self.ranges.insert(i, (offset, offset));
        }
        match highest {
            Some(h) if offset < h => {
                self.out_of_order += 1;
                Seen::OutOfOrder
            }
            _ => Seen::InOrder,
        }
    }

    /// Distinct offsets received within `lo ..= hi`.
    fn count_within(&self, lo: u64, hi: u64) -> u64 {
        if lo > hi {
            return 0;
        }
        self.ranges
            .iter()
            .map(|&(a, b)| {
                let (a, b) = (a.max(lo), b.min(hi));
                if a <= b {
                    b - a + 1
                } else {
                    0
                }
            })
            .sum()
    }

    /// The verdict; without a head, the highest offset received stands in for it.
    pub fn outcome(&self) -> Outcome {
        let start = self.start.unwrap_or(0);
        let head = self.head.or(self.highest()).unwrap_or(start);
        let expected = head.saturating_sub(start);
        let delivered = self.count_within(start + 1, head);
        Outcome {
            expected,
            delivered,
            lost: expected - delivered,
            duplicates: self.duplicates,
            out_of_order: self.out_of_order,
            stale: self.count_within(0, start),
        }
    }
}

/// All channels one subscriber tracks.
#[derive(Debug, Default)]
pub struct DeliveryTracker {
    channels: HashMap<String, ChannelTrack>,
}

impl DeliveryTracker {
    pub fn channel(&mut self, channel: &str) -> &mut ChannelTrack {
        self.channels.entry(channel.to_string()).or_default()
    }

    pub fn get_mut(&mut self, channel: &str) -> Option<&mut ChannelTrack> {
        self.channels.get_mut(channel)
    }

    pub fn observe(&mut self, channel: &str, offset: u64) -> Seen {
        match self.channels.get_mut(channel) {
            Some(c) => c.observe(offset),
            None => self.channel(channel).observe(offset),
        }
    }

    /// Gives every channel its final offset; a channel missing from `heads`
    /// had nothing acknowledged, so nothing past the subscription is expected.
    pub fn set_heads(&mut self, heads: &std::collections::BTreeMap<String, u64>) {
        for (name, c) in self.channels.iter_mut() {
            let head = heads.get(name).copied().or(c.start).unwrap_or(0);
            c.set_head(head);
        }
    }

    pub fn reached_heads(&self) -> bool {
        self.channels.values().all(ChannelTrack::reached_head)
    }

    pub fn outcome(&self) -> Outcome {
        let mut total = Outcome::default();
        for c in self.channels.values() {
            total.add(c.outcome());
        }
        total
    }
}

/// Counts down the subscribers still waiting for their channels' heads, so
/// the drain phase ends as soon as the last one is done rather than after a
/// fixed time.
#[derive(Debug, Default)]
pub struct Completion {
    remaining: AtomicU64,
    notify: Notify,
}

impl Completion {
    pub fn new(waiting: u64) -> Completion {
        Completion {
            remaining: AtomicU64::new(waiting),
            notify: Notify::new(),
        }
    }

    /// One more to wait for.
    pub fn add(&self) {
        self.remaining.fetch_add(1, Ordering::AcqRel);
    }

    /// One more waiter is done.
    pub fn done(&self) {
        let before = self
            .remaining
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                Some(n.saturating_sub(1))
            })
            .unwrap_or(0);
        if before <= 1 {
            self.notify.notify_waiters();
        }
    }

    pub fn remaining(&self) -> u64 {
        self.remaining.load(Ordering::Acquire)
    }

    /// Waits until every waiter is done or `limit` passes; returns whether all were.
    pub async fn wait(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.remaining() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.remaining() == 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(start: u64, head: u64, offsets: &[u64]) -> (Vec<Seen>, Outcome) {
        let mut t = ChannelTrack::default();
        let seen = offsets.iter().map(|&o| t.observe(o)).collect();
        t.set_start(start);
        t.set_head(head);
        (seen, t.outcome())
    }

    #[test]
    fn a_gap_is_one_lost_and_a_repeat_one_duplicate() {
        let (seen, out) = run(0, 5, &[1, 2, 4, 4, 5]);
        use Seen::*;
        assert_eq!(seen, vec![InOrder, InOrder, InOrder, Duplicate, InOrder]);
        assert_eq!(
            out,
            Outcome {
                expected: 5,
                delivered: 4,
                lost: 1,
                duplicates: 1,
                out_of_order: 0,
                stale: 0
            }
        );
    }

    #[test]
    fn late_arrivals_fill_gaps_and_count_as_out_of_order() {
        let (seen, out) = run(10, 15, &[11, 13, 12, 15, 14, 13]);
        use Seen::*;
        assert_eq!(
            seen,
            vec![InOrder, InOrder, OutOfOrder, InOrder, OutOfOrder, Duplicate]
        );
        assert_eq!(
            (out.lost, out.out_of_order, out.duplicates, out.delivered),
            (0, 2, 1, 5)
        );
    }

    #[test]
    fn losses_at_the_tail_and_before_the_first_push_count() {
        // Subscribed at 3; 4 never came, nor 9 and 10.
        let (_, out) = run(3, 10, &[5, 6, 7, 8]);
        assert_eq!((out.expected, out.delivered, out.lost), (7, 4, 3));
        // Nothing at all.
        let (_, out) = run(0, 4, &[]);
        assert_eq!((out.expected, out.lost), (4, 4));
    }

    #[test]
    fn entries_before_the_subscription_point_are_stale_not_delivered() {
        let (_, out) = run(5, 7, &[4, 5, 6, 7]);
        assert_eq!(
            (out.expected, out.delivered, out.lost, out.stale),
            (2, 2, 0, 2)
        );
    }

    #[test]
    fn ranges_merge_in_any_order() {
        let mut t = ChannelTrack::default();
        for o in [5, 1, 3, 2, 4, 9, 7, 8, 6] {
            assert_ne!(t.observe(o), Seen::Duplicate);
        }
        assert_eq!(t.ranges, vec![(1, 9)]);
        for o in 1..=9 {
            assert_eq!(t.observe(o), Seen::Duplicate);
        }
    }

    #[test]
    fn head_reached_even_with_a_gap() {
        let mut t = ChannelTrack::default();
        t.set_start(0);
        t.observe(1);
        t.observe(3);
        assert!(!t.reached_head());
        t.set_head(3);
        assert!(t.reached_head());
        t.set_head(4);
        assert!(!t.reached_head());
        let mut empty = ChannelTrack::default();
        empty.set_start(4);
        empty.set_head(4);
        assert!(empty.reached_head());
    }

    #[test]
    fn tracker_sums_channels() {
        let mut d = DeliveryTracker::default();
        d.channel("room:a").set_start(0);
        d.channel("room:b").set_start(0);
        for o in [1, 2, 3] {
            d.observe("room:a", o);
        }
        d.observe("room:b", 2);
        d.channel("room:c").set_start(4);
        d.set_heads(&std::collections::BTreeMap::from([
            ("room:a".to_string(), 3),
            ("room:b".to_string(), 2),
        ]));
        assert!(
            d.reached_heads(),
            "room:c had no head: nothing is expected of it"
        );
        let o = d.outcome();
        assert_eq!((o.expected, o.delivered, o.lost), (5, 4, 1));
    }

    #[tokio::test]
    async fn completion_wakes_the_waiter_when_the_last_is_done() {
        let c = std::sync::Arc::new(Completion::new(2));
        let waiter = {
            let c = c.clone();
            tokio::spawn(async move { c.wait(Duration::from_secs(30)).await })
        };
        c.done();
        c.done();
        assert!(waiter.await.unwrap());
        let none = Completion::new(1);
        tokio::time::pause();
        assert!(!none.wait(Duration::from_secs(5)).await);
    }
}

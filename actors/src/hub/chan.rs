//! One channel's local subscribers, each with where its stream stands.
//!
//! Every subscriber has its own position (the last stored entry it got) and
//! the node whose room registered it. They differ while owners change: a
//! connection that subscribes at a new owner gets its catch-up up to that
//! owner's head, while one registered at the old owner still waits for the
//! new owner to replay what it missed. So an entry is delivered to the
//! subscribers it is new to, dropped for those that have it, and held back
//! from one that would see a gap: that one is marked unregistered, and the
//! node registers it again at the owner, which replays from its position.

use std::collections::HashMap;

use super::{ConnId, Position};
use crate::placement::NodeId;

/// One subscriber of a channel on this node.
#[derive(Clone, Debug, Default)]
pub(super) struct Sub {
    /// The node whose room registered it; `None` once it must be registered
    /// again (it would have seen a gap).
    pub owner: Option<NodeId>,
    /// The offset of the last stored entry it got (in [`Chan::epoch`]).
    pub last: Option<u64>,
}

/// What a stored entry means for each subscriber.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Fanout {
    /// Those it is new to: send it.
    pub send: Vec<ConnId>,
    /// How many already had it.
    pub duplicates: usize,
    /// Those that would see a gap (their position, the entry's offset).
    pub gaps: Vec<(ConnId, u64)>,
}

#[derive(Debug, Default)]
pub(super) struct Chan {
    pub conns: HashMap<ConnId, Sub>,
    /// The epoch the positions are in.
    pub epoch: Option<String>,
}

impl Chan {
    /// `conn` registered by `owner`'s room, its catch-up ending at `at`.
    pub fn subscribe(&mut self, conn: ConnId, owner: NodeId, at: Option<Position>) {
        if let Some((epoch, _)) = &at {
            self.enter_epoch(epoch);
        }
        let sub = self.conns.entry(conn).or_default();
        sub.owner = Some(owner);
        if let Some((_, offset)) = at {
            sub.last = Some(sub.last.map_or(offset, |l| l.max(offset)));
        }
    }

    /// A new epoch: the old positions mean nothing in it.
    fn enter_epoch(&mut self, epoch: &str) {
        if self.epoch.as_deref() != Some(epoch) {
            if self.epoch.is_some() {
                for sub in self.conns.values_mut() {
                    sub.last = None;
                }
            }
            self.epoch = Some(epoch.to_string());
        }
    }

    /// The stored entry at `at` arrived: who gets it. Positions move for
    /// those who do; those with a gap lose their registration.
    pub fn stored(&mut self, at: &Position) -> Fanout {
        self.enter_epoch(&at.0);
        let offset = at.1;
        let mut out = Fanout::default();
        for (conn, sub) in &mut self.conns {
            match sub.last {
                Some(last) if offset <= last => out.duplicates += 1,
                Some(last) if offset > last + 1 => {
                    if sub.owner.take().is_some() {
                        out.gaps.push((*conn, last));
                    }
                }
                _ => {
                    sub.last = Some(offset);
                    out.send.push(*conn);
                }
            }
        }
        out
    }

    /// Those registered by `node` are registered nowhere now.
    pub fn forget_owner(&mut self, node: &NodeId) {
        for sub in self.conns.values_mut() {
            if sub.owner.as_ref() == Some(node) {
                sub.owner = None;
            }
        }
    }

    /// Every subscriber (an ephemeral push has no position).
    pub fn all(&self) -> Vec<ConnId> {
        self.conns.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(n: u64) -> Position {
        ("e1".to_string(), n)
    }

    #[test]
    fn a_subscriber_that_caught_up_further_does_not_advance_the_others() {
        let mut ch = Chan::default();
        ch.subscribe(1, NodeId::new("old"), Some(at(13)));
        // A new subscriber caught up to 14 at the new owner; 1 still waits
        // for the new owner's replay of 14.
        ch.subscribe(2, NodeId::new("new"), Some(at(14)));
        let f = ch.stored(&at(15));
        assert_eq!(f.send, vec![2]);
        assert_eq!(f.gaps, vec![(1, 13)]);
        assert_eq!(ch.conns[&1].owner, None, "1 is to be registered again");
        // The replay from 13, then live entries.
        ch.subscribe(1, NodeId::new("new"), None);
        let mut f = ch.stored(&at(14));
        f.send.sort();
        assert_eq!((f.send, f.duplicates), (vec![1], 1));
        let mut f = ch.stored(&at(15));
        f.send.sort();
        assert_eq!((f.send, f.duplicates), (vec![1], 1));
        let mut f = ch.stored(&at(16));
        f.send.sort();
        assert_eq!(f.send, vec![1, 2]);
    }

    #[test]
    fn a_gap_is_reported_once_and_a_new_epoch_resets_positions() {
        let mut ch = Chan::default();
        ch.subscribe(1, NodeId::new("n"), Some(at(3)));
        assert_eq!(ch.stored(&at(5)).gaps, vec![(1, 3)]);
        assert!(ch.stored(&at(6)).gaps.is_empty(), "already unregistered");
        let f = ch.stored(&("e2".to_string(), 1));
        assert_eq!(f.send, vec![1]);
    }
}

//! Placement: which node owns a key.
//!
//! Every room, topic, feed and user is a virtual actor that lives on exactly
//! one node, its owner: the rendezvous-hash (highest random weight) winner of
//! its key among the `up` members of the cluster. Every node computes it from
//! its own [`View`], with no coordinator; when a node joins or leaves, only
//! the keys it wins (or won) move, about 1/N of them.
//!
//! The hash is fixed here (FNV-1a of node and key, finished with splitmix64),
//! not `std`'s `DefaultHasher`, whose output may change between Rust
//! releases: nodes built by different compilers must agree on every owner.
//!
//! - [`registry`]: the activations of one actor kind on this node, and the
//!   [`Placed`] trait a virtual actor kind implements.
//! - [`dispatch`]: sending to the actor of a key: a local kameo tell or ask
//!   when this node owns it (activating it, retrying on a fresh activation
//!   if it was stopping), the owner's node over the peer link otherwise
//!   ([`crate::remote`]); hand-over when the view changes.
//! - [`moves`]: what a node does when owners change: forgetting the
//!   connections of a member that is gone, re-registering subscribers and
//!   presence at the new owners.

pub mod dispatch;
pub mod moves;
pub mod registry;

pub use registry::{Placed, Registry};

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// The kinds of virtual actor, as a message to one names it on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActorKind {
    /// Rooms, topics and feeds, keyed by channel (`room:42`).
    Room,
    /// Users, keyed by user id.
    User,
    /// Collaborative documents, keyed by document name.
    Doc,
}

impl ActorKind {
    /// The key whose HRW winner owns the actor of this kind for `key`.
    pub fn placement_key(self, key: &str) -> String {
        match self {
            ActorKind::Room => key.to_string(),
            ActorKind::User => user_key(key),
            ActorKind::Doc => format!("doc:{key}"),
        }
    }
}

/// A node's id (`node.id` in its config), unique in its cluster.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(Arc<str>);

impl NodeId {
    pub fn new(id: impl AsRef<str>) -> NodeId {
        NodeId(Arc::from(id.as_ref()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

/// The members that own keys, as one node sees them: sorted, no duplicates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct View {
    members: Vec<NodeId>,
}

impl View {
    pub fn new(members: impl IntoIterator<Item = NodeId>) -> View {
        let mut members: Vec<NodeId> = members.into_iter().collect();
        members.sort();
        members.dedup();
        View { members }
    }

    pub fn members(&self) -> &[NodeId] {
        &self.members
    }

    pub fn contains(&self, node: &NodeId) -> bool {
        self.members.binary_search(node).is_ok()
    }

    /// The owner of `key`: the member with the highest score for it.
    /// `None` only for an empty view.
    pub fn owner(&self, key: &str) -> Option<&NodeId> {
        self.members
            .iter()
            .max_by_key(|node| (score(node.as_str(), key), *node))
    }
}

/// The rendezvous weight of `node` for `key`.
pub fn score(node: &str, key: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in node.bytes().chain([0xff]).chain(key.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    splitmix64(h)
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The placement key of a user actor.
pub fn user_key(user: &str) -> String {
    format!("user:{user}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(n: usize) -> View {
        View::new((0..n).map(|i| NodeId::new(format!("node-{i}"))))
    }

    #[test]
    fn the_hash_is_pinned() {
        // Every node of every build must agree: this value may never change.
        assert_eq!(score("a", "k"), 0x6ce8_6231_c690_2716);
    }

    #[test]
    fn every_node_computes_the_same_owner_whatever_the_order() {
        let a = View::new(["c", "a", "b"].map(NodeId::new));
        let b = View::new(["b", "c", "a", "a"].map(NodeId::new));
        assert_eq!(a, b);
        for i in 0..100 {
            let key = format!("room:{i}");
            assert_eq!(a.owner(&key), b.owner(&key));
        }
        assert_eq!(View::new([]).owner("room:x"), None);
    }

    #[test]
    fn keys_spread_and_a_join_moves_about_one_nth() {
        let keys: Vec<String> = (0..6000).map(|i| format!("room:{i}")).collect();
        let three = view(3);
        let mut per_node = std::collections::HashMap::new();
        for k in &keys {
            *per_node.entry(three.owner(k).unwrap().clone()).or_insert(0) += 1;
        }
        for (node, n) in &per_node {
            assert!((1700..=2300).contains(n), "{node}: {n} of 6000");
        }
        let four = view(4);
        let newcomer = NodeId::new("node-3");
        let mut moved = 0;
        for k in &keys {
            let (before, after) = (three.owner(k).unwrap(), four.owner(k).unwrap());
            if before != after {
                assert_eq!(after, &newcomer, "{k} moved between old members");
                moved += 1;
            }
        }
        assert!((1200..=1800).contains(&moved), "{moved} of 6000 moved");
        // The figure in docs/benchmarks.md (`-- --nocapture` prints it).
        eprintln!(
            "3 -> 4 nodes: {moved} of {} keys moved ({:.1}%; 1/4 = 25%)",
            keys.len(),
            100.0 * moved as f64 / keys.len() as f64
        );
    }
}

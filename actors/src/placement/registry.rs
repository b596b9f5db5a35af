//! The activations of one virtual actor kind on this node, by key.
//!
//! Rooms and users are virtual actors: the running actor for a key is
//! looked up here and spawned when there is none. An idle actor removes
//! itself (only if the registry still maps its key to it) and then stops
//! *gracefully*, so whatever was already in its mailbox is still handled; a
//! sender that races with that stop gets its message back and
//! [`crate::placement::dispatch`] retries it on a fresh activation. Nothing
//! outside this module keeps an `ActorRef` to a virtual actor across calls.

use std::collections::HashMap;
use std::sync::Arc;

use kameo::actor::ActorRef;
use kameo::Actor;
use parking_lot::Mutex;

use super::ActorKind;
use crate::services::Services;

/// A virtual actor kind: where its activations are registered and how one starts.
pub trait Placed: Actor {
    /// What a message to it names on the wire; its placement key follows.
    const KIND: ActorKind;
    #[doc(hidden)]
    fn registry(svc: &Services) -> &Registry<Self>;
    /// Spawns the actor of `key` (on the actor runtime, which is entered).
    fn spawn(svc: &Arc<Services>, key: &str) -> ActorRef<Self>;
}

#[doc(hidden)]
pub struct Registry<A: Actor> {
    map: Mutex<HashMap<String, ActorRef<A>>>,
}

impl<A: Actor> Default for Registry<A> {
    fn default() -> Self {
        Registry {
            map: Mutex::new(HashMap::new()),
        }
    }
}

impl<A: Actor> Registry<A> {
    pub(crate) fn get_or_spawn(
        &self,
        key: &str,
        spawn: impl FnOnce() -> ActorRef<A>,
    ) -> ActorRef<A> {
        let mut map = self.map.lock();
        if let Some(r) = map.get(key) {
            if r.is_alive() {
                return r.clone();
            }
        }
        let r = spawn();
        map.insert(key.to_string(), r.clone());
        r
    }

    pub(crate) fn get(&self, key: &str) -> Option<ActorRef<A>> {
        self.map.lock().get(key).filter(|r| r.is_alive()).cloned()
    }

    /// Removes `key` only if it still maps to `actor` (a newer activation stays).
    pub(crate) fn remove_if(&self, key: &str, actor: &ActorRef<A>) -> bool {
        let mut map = self.map.lock();
        if map.get(key).is_some_and(|r| r.id() == actor.id()) {
            map.remove(key);
            true
        } else {
            false
        }
    }

    /// Removes and returns the activations whose key fails `keep`.
    pub(crate) fn take_unless(&self, keep: impl Fn(&str) -> bool) -> Vec<ActorRef<A>> {
        let mut map = self.map.lock();
        let gone: Vec<String> = map.keys().filter(|k| !keep(k)).cloned().collect();
        gone.iter().filter_map(|k| map.remove(k)).collect()
    }

    /// Every running activation.
    pub(crate) fn all(&self) -> Vec<ActorRef<A>> {
        self.map.lock().values().cloned().collect()
    }

    pub(crate) fn len(&self) -> usize {
        self.map.lock().len()
    }

    pub(crate) fn drain(&self) -> Vec<ActorRef<A>> {
        self.map.lock().drain().map(|(_, r)| r).collect()
    }
}

/// Stops an actor after its mailbox drains, without waiting for it.
pub(crate) fn stop_later<A: Actor>(actor: ActorRef<A>) {
    // Not awaited here: the actor calling this may have a full mailbox.
    tokio::spawn(async move {
        let _ = actor.stop_gracefully().await;
    });
}

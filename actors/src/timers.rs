//! The node's timers: one task fires every actor's delayed message
//! (passivation checks, token expiry, typing expiry, notification
//! coalescing) from a heap ordered by deadline.
//!
//! kameo's `send_after` spawns a task per timer, which costs every idle
//! connection a sleeping task for its token check and every user one for
//! its passivation check. Here a timer is a heap entry holding a weak
//! reference to its actor: a timer of an actor that stopped fires into
//! nothing and keeps nothing alive.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::time::Duration;

use kameo::actor::ActorRef;
use kameo::error::SendError;
use kameo::message::Message;
use kameo::Actor;
use tokio::sync::mpsc;
use tokio::time::Instant;

type Fire = Box<dyn FnOnce() + Send>;

/// Schedules delayed tells; cheap to clone.
#[derive(Clone)]
pub struct Timers {
    tx: mpsc::UnboundedSender<(Instant, Fire)>,
}

impl Timers {
    /// Starts the timer task on the current runtime.
    pub fn start() -> Timers {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(rx));
        Timers { tx }
    }

    /// Tells `actor` `msg` after `delay`, if it is still running then. When
    /// its mailbox is full the message waits for room in a task of its own,
    /// so a timer is never dropped for a busy actor.
    pub fn tell_after<A, M>(&self, actor: &ActorRef<A>, msg: M, delay: Duration)
    where
        A: Actor + Message<M>,
        M: Send + 'static,
    {
        let weak = actor.downgrade();
        let fire: Fire = Box::new(move || {
            let Some(actor) = weak.upgrade() else { return };
            if let Err(SendError::MailboxFull(msg)) = actor.tell(msg).try_send() {
                tokio::spawn(async move {
                    let _ = actor.tell(msg).await;
                });
            }
        });
        // Fails only once the runtime shuts down, when nothing needs firing.
        let _ = self.tx.send((Instant::now() + delay, fire));
    }
}

struct Entry {
    at: Instant,
    seq: u64,
    fire: Fire,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl Eq for Entry {}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Entry {
    /// Reversed: the heap's top is the earliest deadline (then the first scheduled).
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

async fn run(mut rx: mpsc::UnboundedReceiver<(Instant, Fire)>) {
    let mut heap: BinaryHeap<Entry> = BinaryHeap::new();
    let mut seq = 0u64;
    loop {
        let next = heap.peek().map(|e| e.at);
        tokio::select! {
            scheduled = rx.recv() => {
                let Some((at, fire)) = scheduled else { return };
                seq += 1;
                heap.push(Entry { at, seq, fire });
            }
            _ = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {
                let now = Instant::now();
                while heap.peek().is_some_and(|e| e.at <= now) {
                    if let Some(e) = heap.pop() {
                        (e.fire)();
                    }
                }
                if heap.capacity() > 1024 && heap.len() < heap.capacity() / 4 {
                    heap.shrink_to(heap.len() * 2);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kameo::actor::Spawn;
    use kameo::message::Context;
    use tokio::sync::mpsc::UnboundedSender;

    struct Probe(UnboundedSender<u32>);

    impl Actor for Probe {
        type Args = UnboundedSender<u32>;
        type Error = std::convert::Infallible;
        async fn on_start(tx: Self::Args, _: ActorRef<Self>) -> Result<Self, Self::Error> {
            Ok(Probe(tx))
        }
    }

    struct Ping(u32);

    impl Message<Ping> for Probe {
        type Reply = ();
        async fn handle(&mut self, m: Ping, _: &mut Context<Self, ()>) {
            let _ = self.0.send(m.0);
        }
    }

    #[tokio::test]
    async fn timers_fire_in_deadline_order_and_skip_stopped_actors() {
        let timers = Timers::start();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let probe = Probe::spawn(tx.clone());
        timers.tell_after(&probe, Ping(3), Duration::from_millis(60));
        timers.tell_after(&probe, Ping(1), Duration::from_millis(20));
        timers.tell_after(&probe, Ping(2), Duration::from_millis(20));
        let gone = Probe::spawn(tx);
        timers.tell_after(&gone, Ping(99), Duration::from_millis(40));
        gone.stop_gracefully().await.unwrap();
        gone.wait_for_shutdown().await;
        drop(gone);
        let mut got = Vec::new();
        while got.len() < 3 {
            got.push(rx.recv().await.unwrap());
        }
        assert_eq!(got, [1, 2, 3]);
        assert!(
            rx.try_recv().is_err(),
            "nothing fired for the stopped actor"
        );
    }
}

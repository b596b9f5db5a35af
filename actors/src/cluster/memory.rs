//! An in-memory [`PeerTransport`] for tests: the nodes of one process reach
//! each other through a [`MemoryNetwork`], which can cut any two of them
//! apart (a partition) and heal them again.
//!
//! Every stream is relayed by a task of the network, so cutting a pair also
//! breaks the streams already open between them: both ends see the stream
//! close, as they would when a real network drops the connection. It has no
//! cluster secret: it is for nodes of one test process only.

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::StreamExt;
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::link::BoxDuplex;
use super::transport::{Incoming, PeerTransport};

/// Bytes a relayed stream buffers in each direction.
const PIPE_BYTES: usize = 256 * 1024;

/// The nodes of one test and what separates them.
#[derive(Clone, Default)]
pub struct MemoryNetwork {
    inner: Arc<Mutex<Net>>,
}

#[derive(Default)]
struct Net {
    nodes: HashMap<String, mpsc::UnboundedSender<BoxDuplex>>,
    /// Unordered pairs that cannot reach each other.
    cut: HashSet<(String, String)>,
    /// Streams open between each pair, to break them on a cut.
    streams: HashMap<(String, String), Vec<CancellationToken>>,
}

fn pair(a: &str, b: &str) -> (String, String) {
    if a <= b {
        (a.to_string(), b.to_string())
    } else {
        (b.to_string(), a.to_string())
    }
}

impl MemoryNetwork {
    pub fn new() -> MemoryNetwork {
        MemoryNetwork::default()
    }

    /// A transport for the node called `name` (unique in this network).
    pub fn transport(&self, name: &str) -> Arc<dyn PeerTransport> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.inner.lock().nodes.insert(name.to_string(), tx);
        Arc::new(MemoryTransport {
            name: name.to_string(),
            net: self.clone(),
            incoming: Mutex::new(Some(
                futures::stream::unfold(
                    rx,
                    |mut rx| async move { rx.recv().await.map(|s| (s, rx)) },
                )
                .boxed(),
            )),
        })
    }

    /// `a` and `b` can no longer reach each other; their open streams break.
    pub fn cut(&self, a: &str, b: &str) {
        let mut net = self.inner.lock();
        let key = pair(a, b);
        for stream in net.streams.remove(&key).unwrap_or_default() {
            stream.cancel();
        }
        net.cut.insert(key);
    }

    /// Every pair can reach each other again.
    pub fn heal(&self) {
        self.inner.lock().cut.clear();
    }

    fn connect(&self, from: &str, to: &str) -> io::Result<BoxDuplex> {
        let mut net = self.inner.lock();
        let key = pair(from, to);
        if net.cut.contains(&key) {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("{from} and {to} are partitioned"),
            ));
        }
        let target = net
            .nodes
            .get(to)
            .cloned()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no node {to}")))?;
        let (mine, mut relay_a) = tokio::io::duplex(PIPE_BYTES);
        let (theirs, mut relay_b) = tokio::io::duplex(PIPE_BYTES);
        target
            .send(Box::new(theirs))
            .map_err(|_| io::Error::new(io::ErrorKind::ConnectionRefused, "node stopped"))?;
        let cut = CancellationToken::new();
        let streams = net.streams.entry(key).or_default();
        streams.retain(|t| !t.is_cancelled());
        streams.push(cut.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = cut.cancelled() => {}
                _ = tokio::io::copy_bidirectional(&mut relay_a, &mut relay_b) => {}
            }
            cut.cancel();
        });
        Ok(Box::new(mine))
    }
}

struct MemoryTransport {
    name: String,
    net: MemoryNetwork,
    incoming: Mutex<Option<Incoming>>,
}

impl PeerTransport for MemoryTransport {
    fn peer_id(&self) -> String {
        self.name.clone()
    }

    fn address(&self) -> String {
        format!("memory:{}", self.name)
    }

    fn open(&self, peer_id: &str, _address: &str) -> BoxFuture<'static, io::Result<BoxDuplex>> {
        let r = self.net.connect(&self.name, peer_id);
        Box::pin(async move { r })
    }

    fn take_incoming(&self) -> Option<Incoming> {
        self.incoming.lock().take()
    }

    fn shutdown(&self) {
        self.net.inner.lock().nodes.remove(&self.name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn streams_flow_until_the_pair_is_cut() {
        let net = MemoryNetwork::new();
        let a = net.transport("a");
        let b = net.transport("b");
        let mut incoming = b.take_incoming().unwrap();
        let mut out = a.open("b", "memory:b").await.unwrap();
        let mut inc = incoming.next().await.unwrap();
        out.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        inc.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");

        net.cut("b", "a");
        // The open stream ends on both sides, and no new one opens.
        assert_eq!(inc.read(&mut buf).await.unwrap_or(0), 0);
        assert!(a.open("b", "memory:b").await.is_err());
        net.heal();
        assert!(a.open("b", "memory:b").await.is_ok());
    }
}

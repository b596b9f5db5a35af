//! The peer link: one ordered, flow-controlled stream of frames to a peer.
//!
//! Frames are length-prefixed (u32, big endian) rmp-serde [`Frame`]s. The
//! sender numbers every payload (`Data{seq}`), keeps it until the peer
//! acknowledges it (`Ack{seq}`, cumulative), and never has more than
//! `window` unacknowledged: a full window stops it taking from its queue,
//! and a full queue makes [`Link::send`] wait (backpressure, never a silent
//! drop). When the stream breaks, the sender opens a new one, says `Hello`
//! again and resends everything unacknowledged in order; the receiver
//! remembers, per sending incarnation, the last sequence number it
//! delivered and skips what it already has. So a peer sees each payload
//! once, in order, across reconnects.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::placement::NodeId;

/// A byte stream to a peer.
pub trait Duplex: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Duplex for T {}

pub type BoxDuplex = Box<dyn Duplex>;

/// Opens a fresh stream to the peer (called again after every break).
pub type Connect = Arc<dyn Fn() -> BoxFuture<'static, io::Result<BoxDuplex>> + Send + Sync>;

#[derive(Debug, Serialize, Deserialize)]
pub enum Frame {
    /// First frame of a stream: who sends, which incarnation.
    Hello { node: NodeId, generation: u64 },
    Data {
        seq: u64,
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
    },
    /// Everything up to `seq` was delivered.
    Ack { seq: u64 },
}

pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &Frame) -> io::Result<()> {
    let body = rmp_serde::to_vec(frame).map_err(|e| io::Error::other(e.to_string()))?;
    let len = u32::try_from(body.len()).map_err(|_| io::Error::other("frame too large"))?;
    w.write_all(&len.to_be_bytes()).await?;
    w.write_all(&body).await?;
    w.flush().await
}

/// The next frame; `None` at a clean end of stream.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, max: usize) -> io::Result<Option<Frame>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("peer frame of {len} bytes over the {max} byte limit"),
        ));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    decode_frame(&body).map(Some)
}

/// One frame's body (after its length prefix), as a peer sent it.
pub fn decode_frame(body: &[u8]) -> io::Result<Frame> {
    rmp_serde::from_slice(body)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
}

/// Counters of one peer.
#[derive(Clone, Default)]
pub struct PeerMetrics {
    pub frames_out: Counter,
    pub bytes_out: Counter,
    pub frames_in: Counter,
    pub bytes_in: Counter,
    pub queue_depth: Gauge,
    pub reconnects: Counter,
}

pub struct LinkConfig {
    pub me: NodeId,
    /// Identifies this link (sender incarnation) to the receiver's dedupe.
    pub generation: u64,
    pub window: usize,
    pub queue: usize,
    pub max_frame_bytes: usize,
}

/// The sending end of a link to one peer.
pub struct Link {
    tx: mpsc::Sender<Bytes>,
    stop: CancellationToken,
    metrics: PeerMetrics,
}

impl Link {
    pub fn start(config: LinkConfig, connect: Connect, metrics: PeerMetrics) -> Link {
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        let stop = CancellationToken::new();
        tokio::spawn(run_sender(
            config,
            connect,
            rx,
            stop.clone(),
            metrics.clone(),
        ));
        Link { tx, stop, metrics }
    }

    /// Queues `payload`; waits while the queue is full. Fails only once the
    /// link is closed.
    pub async fn send(&self, payload: Bytes) -> Result<(), Bytes> {
        self.metrics.queue_depth.inc();
        let r = self.tx.send(payload).await.map_err(|e| e.0);
        if r.is_err() {
            self.metrics.queue_depth.dec();
        }
        r
    }

    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn run_sender(
    config: LinkConfig,
    connect: Connect,
    mut rx: mpsc::Receiver<Bytes>,
    stop: CancellationToken,
    metrics: PeerMetrics,
) {
    let mut unacked: VecDeque<(u64, Bytes)> = VecDeque::new();
    let mut next_seq = 1u64;
    let mut backoff = Duration::from_millis(20);
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            s = connect() => s,
        };
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "peer link: connect failed, retrying");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let (mut reader, mut writer) = tokio::io::split(stream);
        let hello = Frame::Hello {
            node: config.me.clone(),
            generation: config.generation,
        };
        let mut ok = write_frame(&mut writer, &hello).await.is_ok();
        for (seq, payload) in &unacked {
            if !ok {
                break;
            }
            ok = send_data(&mut writer, *seq, payload, &metrics)
                .await
                .is_ok();
        }
        if !ok {
            metrics.reconnects.inc();
            continue;
        }
        let (ack_tx, mut ack_rx) = watch::channel(0u64);
        let max = config.max_frame_bytes;
        let acks = tokio::spawn(async move {
            while let Ok(Some(frame)) = read_frame(&mut reader, max).await {
                if let Frame::Ack { seq } = frame {
                    let _ = ack_tx.send(seq);
                }
            }
        });
        let broken = loop {
            tokio::select! {
                _ = stop.cancelled() => {
                    acks.abort();
                    return;
                }
                changed = ack_rx.changed() => {
                    if changed.is_err() {
                        break true;
                    }
                    let acked = *ack_rx.borrow_and_update();
                    while unacked.front().is_some_and(|(s, _)| *s <= acked) {
                        unacked.pop_front();
                    }
                    backoff = Duration::from_millis(20);
                }
                payload = rx.recv(), if unacked.len() < config.window => {
                    let Some(payload) = payload else {
                        acks.abort();
                        return;
                    };
                    metrics.queue_depth.dec();
                    let seq = next_seq;
                    next_seq += 1;
                    unacked.push_back((seq, payload.clone()));
                    if send_data(&mut writer, seq, &payload, &metrics).await.is_err() {
                        break true;
                    }
                }
            }
        };
        acks.abort();
        if broken {
            metrics.reconnects.inc();
            tracing::debug!(
                peer_unacked = unacked.len(),
                "peer link broke; reconnecting"
            );
        }
    }
}

async fn send_data<W: AsyncWrite + Unpin>(
    w: &mut W,
    seq: u64,
    payload: &Bytes,
    metrics: &PeerMetrics,
) -> io::Result<()> {
    let frame = Frame::Data {
        seq,
        payload: payload.to_vec(),
    };
    write_frame(w, &frame).await?;
    metrics.frames_out.inc();
    metrics.bytes_out.inc_by(payload.len() as u64);
    Ok(())
}

/// What the receiving side remembers across streams: the last sequence
/// number delivered per sending incarnation.
#[derive(Clone, Default)]
pub struct Delivered {
    last: Arc<Mutex<HashMap<(NodeId, u64), u64>>>,
}

impl Delivered {
    fn get(&self, from: &(NodeId, u64)) -> u64 {
        self.last.lock().get(from).copied().unwrap_or(0)
    }

    fn set(&self, from: (NodeId, u64), seq: u64) {
        self.last.lock().insert(from, seq);
    }

    /// Forgets incarnations of `node` other than `keep` (a restarted peer).
    pub fn forget(&self, node: &NodeId, keep: Option<u64>) {
        self.last
            .lock()
            .retain(|(n, g), _| n != node || Some(*g) == keep);
    }
}

/// Serves one incoming stream: hands each new payload, in order, to
/// `deliver` (awaited before the next is read: the peer's order is kept)
/// and acknowledges it. Returns who sent it when the stream ends.
pub async fn serve_stream<S, F, Fut>(
    stream: S,
    delivered: Delivered,
    max_frame_bytes: usize,
    metrics_for: impl Fn(&NodeId) -> PeerMetrics,
    mut deliver: F,
) -> io::Result<NodeId>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    F: FnMut(NodeId, Bytes) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    let Some(Frame::Hello { node, generation }) = read_frame(&mut reader, max_frame_bytes).await?
    else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "a peer stream must start with Hello",
        ));
    };
    let metrics = metrics_for(&node);
    let from = (node.clone(), generation);
    let mut last = delivered.get(&from);
    let (ack_tx, mut ack_rx) = watch::channel(last);
    let acker = tokio::spawn(async move {
        while ack_rx.changed().await.is_ok() {
            let seq = *ack_rx.borrow_and_update();
            if write_frame(&mut writer, &Frame::Ack { seq }).await.is_err() {
                return;
            }
        }
    });
    let result = loop {
        let frame = match read_frame(&mut reader, max_frame_bytes).await {
            Ok(Some(f)) => f,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        let Frame::Data { seq, payload } = frame else {
            continue;
        };
        if seq <= last {
            continue; // resent after a break: already delivered
        }
        if seq != last + 1 {
            break Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("peer {node} skipped from {last} to {seq}"),
            ));
        }
        metrics.frames_in.inc();
        metrics.bytes_in.inc_by(payload.len() as u64);
        deliver(node.clone(), Bytes::from(payload)).await;
        last = seq;
        delivered.set(from.clone(), seq);
        let _ = ack_tx.send(seq);
    };
    // Let the last ack out before the stream goes.
    drop(ack_tx);
    let _ = tokio::time::timeout(Duration::from_millis(200), acker).await;
    result.map(|()| node)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Streams that the test hands to a server task, breaking the first ones
    /// after a few hundred bytes.
    #[tokio::test]
    async fn every_payload_arrives_once_in_order_across_breaks() {
        let delivered = Delivered::default();
        let got = Arc::new(Mutex::new(Vec::<u64>::new()));
        let opened = Arc::new(AtomicUsize::new(0));
        let connect: Connect = {
            let (delivered, got, opened) = (delivered.clone(), got.clone(), opened.clone());
            Arc::new(move || {
                let (delivered, got, opened) = (delivered.clone(), got.clone(), opened.clone());
                Box::pin(async move {
                    let n = opened.fetch_add(1, Ordering::SeqCst);
                    let (client, server) = tokio::io::duplex(64 * 1024);
                    tokio::spawn(async move {
                        let server = Breaking {
                            inner: server,
                            budget: if n < 3 { 700 } else { usize::MAX },
                        };
                        let _ = serve_stream(
                            server,
                            delivered,
                            1 << 20,
                            |_| PeerMetrics::default(),
                            |_, bytes| {
                                let got = got.clone();
                                async move {
                                    let n = u64::from_be_bytes(bytes[..8].try_into().unwrap());
                                    got.lock().push(n);
                                }
                            },
                        )
                        .await;
                    });
                    Ok(Box::new(client) as BoxDuplex)
                })
            })
        };
        let link = Link::start(
            LinkConfig {
                me: NodeId::new("a"),
                generation: 7,
                window: 8,
                queue: 4,
                max_frame_bytes: 1 << 20,
            },
            connect,
            PeerMetrics::default(),
        );
        for i in 0..500u64 {
            link.send(Bytes::copy_from_slice(&i.to_be_bytes()))
                .await
                .expect("link open");
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while got.lock().len() < 500 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{:?}",
                got.lock().len()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(*got.lock(), (0..500).collect::<Vec<_>>());
        assert!(
            opened.load(Ordering::SeqCst) >= 4,
            "the first streams broke"
        );
    }

    /// A stream whose reads fail after `budget` bytes.
    struct Breaking<S> {
        inner: S,
        budget: usize,
    }

    impl<S: AsyncRead + Unpin> AsyncRead for Breaking<S> {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            if self.budget == 0 {
                return std::task::Poll::Ready(Err(io::Error::other("broken on purpose")));
            }
            let before = buf.filled().len();
            let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
            let n = buf.filled().len() - before;
            self.budget = self.budget.saturating_sub(n);
            r
        }
    }

    impl<S: AsyncWrite + Unpin> AsyncWrite for Breaking<S> {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
        }
        fn poll_flush(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::pin::Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }
}

//! The inter-node transport: what peer links run over.
//!
//! [`PeerTransport`] is the seam: a node is started with one (tests hand
//! the in-memory one of [`super::memory`], which can partition nodes), or
//! starts [`Transport`]: libp2p, TCP, a private network keyed by the
//! cluster secret (pnet), noise, yamux; one `libp2p-stream` protocol for
//! peer links.
//!
//! pnet encrypts every byte with a key derived from the cluster secret
//! before any handshake: a process without the secret cannot complete a
//! connection, so it can send a node no frame at all (its attempts are
//! counted as refused). noise then authenticates each peer's id.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use parking_lot::Mutex;

use futures::StreamExt;
use libp2p::core::transport::Transport as _;
use libp2p::core::upgrade::Version;
use libp2p::multiaddr::Protocol;
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::swarm::{DialError, SwarmEvent};
use libp2p::{identity, noise, tcp, yamux, Multiaddr, PeerId, StreamProtocol, Swarm};
use libp2p_stream::{Control, IncomingStreams};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{mpsc, oneshot};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt};
use tokio_util::sync::CancellationToken;

use super::gossip::derive_key;
use super::link::BoxDuplex;

/// Link streams other nodes opened to this one.
pub type Incoming = BoxStream<'static, BoxDuplex>;

/// How a node opens and accepts the byte streams its peer links run over.
pub trait PeerTransport: Send + Sync + 'static {
    /// This node's id on the transport, gossiped as `peer_id`.
    fn peer_id(&self) -> String;
    /// Where other nodes reach it, gossiped as `transport`.
    fn address(&self) -> String;
    /// Opens a stream to the node gossiping `peer_id` at `address`.
    fn open(&self, peer_id: &str, address: &str) -> BoxFuture<'static, io::Result<BoxDuplex>>;
    /// The streams opened to this node (once; `None` after).
    fn take_incoming(&self) -> Option<Incoming>;
    fn shutdown(&self);
}

/// The protocol of peer links.
pub const LINK_PROTOCOL: StreamProtocol = StreamProtocol::new("/chorus/link/1");

/// How long connecting and opening a stream may take before the link retries.
const OPEN_TIMEOUT: Duration = Duration::from_secs(3);

/// A stream to a peer, as tokio reads it.
pub type PeerStream = Compat<libp2p::Stream>;

enum Command {
    /// Connect to `peer` at `addr` (if not connected); answer once connected.
    Connect {
        peer: PeerId,
        addr: Multiaddr,
        done: oneshot::Sender<io::Result<()>>,
    },
}

/// A running swarm and the handles to use it.
pub struct Transport {
    peer_id: PeerId,
    addr: Multiaddr,
    /// `addr` with the advertised host.
    advertised: Multiaddr,
    control: Control,
    incoming: Mutex<Option<IncomingStreams>>,
    commands: mpsc::UnboundedSender<Command>,
    stop: CancellationToken,
}

impl Transport {
    /// Listens on `listen` (port 0: any free port); returns once bound.
    /// Other nodes are told to dial `advertise` with the bound port.
    pub async fn start(
        listen: SocketAddr,
        advertise: IpAddr,
        secret: &str,
        refused: Counter,
    ) -> anyhow::Result<Transport> {
        let keypair = identity::Keypair::generate_ed25519();
        let psk = PreSharedKey::new(derive_key(secret, "transport"));
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
            .with_tokio()
            .with_other_transport(|key| {
                // Only fails for key types noise cannot use; ours is ed25519.
                let noise = noise::Config::new(key).expect("noise accepts ed25519 keys");
                tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
                    .and_then(move |socket, _| PnetConfig::new(psk).handshake(socket))
                    .upgrade(Version::V1)
                    .authenticate(noise)
                    .multiplex(yamux::Config::default())
                    .timeout(Duration::from_secs(10))
            })
            .map_err(|e| anyhow::anyhow!("transport: {e:?}"))?
            .with_behaviour(|_| libp2p_stream::Behaviour::new())?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(3600)))
            .build();
        let mut listen_addr = Multiaddr::from(listen.ip());
        listen_addr.push(Protocol::Tcp(listen.port()));
        swarm.listen_on(listen_addr)?;
        let addr = loop {
            match swarm.select_next_some().await {
                SwarmEvent::NewListenAddr { address, .. } => break address,
                SwarmEvent::ListenerError { error, .. } => return Err(error.into()),
                SwarmEvent::ListenerClosed { reason, .. } => {
                    reason?;
                    anyhow::bail!("transport listener closed");
                }
                _ => {}
            }
        };
        let mut control = swarm.behaviour().new_control();
        let incoming = control
            .accept(LINK_PROTOCOL)
            .map_err(|_| anyhow::anyhow!("link protocol registered twice"))?;
        let (commands, rx) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let peer_id = *swarm.local_peer_id();
        tokio::spawn(run_swarm(swarm, rx, refused, stop.clone()));
        Ok(Transport {
            peer_id,
            advertised: advertised(&addr, &advertise.to_string()),
            addr,
            control,
            incoming: Mutex::new(Some(incoming)),
            commands,
            stop,
        })
    }

    pub fn libp2p_peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// The bound address (a real port even when configured with port 0).
    pub fn listen_addr(&self) -> &Multiaddr {
        &self.addr
    }
}

impl PeerTransport for Transport {
    fn peer_id(&self) -> String {
        self.peer_id.to_string()
    }

    fn address(&self) -> String {
        self.advertised.to_string()
    }

    fn open(&self, peer_id: &str, address: &str) -> BoxFuture<'static, io::Result<BoxDuplex>> {
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("bad {what}"));
        let target = peer_id
            .parse::<PeerId>()
            .map_err(|_| bad("peer id"))
            .and_then(|p| Ok((p, address.parse::<Multiaddr>().map_err(|_| bad("address"))?)));
        let (control, commands) = (self.control.clone(), self.commands.clone());
        Box::pin(async move {
            let (peer, addr) = target?;
            let stream = open_stream(control, commands, peer, addr).await?;
            Ok(Box::new(stream) as BoxDuplex)
        })
    }

    fn take_incoming(&self) -> Option<Incoming> {
        let incoming = self.incoming.lock().take()?;
        Some(
            incoming
                .map(|(_, stream)| Box::new(stream.compat()) as BoxDuplex)
                .boxed(),
        )
    }

    fn shutdown(&self) {
        self.stop.cancel();
    }
}

impl Drop for Transport {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Opens a link stream to `peer` at `addr`, connecting first if needed.
async fn open_stream(
    mut control: Control,
    commands: mpsc::UnboundedSender<Command>,
    peer: PeerId,
    addr: Multiaddr,
) -> io::Result<PeerStream> {
    let (done, connected) = oneshot::channel();
    commands
        .send(Command::Connect { peer, addr, done })
        .map_err(|_| io::Error::other("transport stopped"))?;
    let timed_out = || io::Error::new(io::ErrorKind::TimedOut, "connecting to the peer timed out");
    tokio::time::timeout(OPEN_TIMEOUT, connected)
        .await
        .map_err(|_| timed_out())?
        .map_err(|_| io::Error::other("transport stopped"))??;
    let stream = tokio::time::timeout(OPEN_TIMEOUT, control.open_stream(peer, LINK_PROTOCOL))
        .await
        .map_err(|_| timed_out())?
        .map_err(|e| io::Error::new(io::ErrorKind::ConnectionRefused, e.to_string()))?;
    Ok(stream.compat())
}

/// The address to advertise: `host` (when set) with the bound port.
pub fn advertised(bound: &Multiaddr, host: &str) -> Multiaddr {
    let Ok(ip) = host.parse::<std::net::IpAddr>() else {
        return bound.clone();
    };
    bound
        .iter()
        .map(|p| match p {
            Protocol::Ip4(_) | Protocol::Ip6(_) => Protocol::from(ip),
            other => other,
        })
        .collect()
}

async fn run_swarm(
    mut swarm: Swarm<libp2p_stream::Behaviour>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    refused: Counter,
    stop: CancellationToken,
) {
    let mut waiting: HashMap<PeerId, Vec<oneshot::Sender<io::Result<()>>>> = HashMap::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            cmd = commands.recv() => {
                let Some(Command::Connect { peer, addr, done }) = cmd else { return };
                if swarm.is_connected(&peer) {
                    let _ = done.send(Ok(()));
                    continue;
                }
                let first = !waiting.contains_key(&peer);
                waiting.entry(peer).or_default().push(done);
                if first {
                    let addr = addr.with_p2p(peer).unwrap_or_else(|a| a);
                    if let Err(e) = swarm.dial(addr) {
                        fail_waiting(&mut waiting, peer, &e);
                    }
                }
            }
            event = swarm.select_next_some() => match event {
                SwarmEvent::ConnectionEstablished { peer_id, .. } => {
                    for done in waiting.remove(&peer_id).unwrap_or_default() {
                        let _ = done.send(Ok(()));
                    }
                }
                SwarmEvent::OutgoingConnectionError { peer_id: Some(peer), error, .. } => {
                    fail_waiting(&mut waiting, peer, &error);
                }
                SwarmEvent::IncomingConnectionError { send_back_addr, error, .. } => {
                    // Without the secret the pnet/noise handshake fails here.
                    refused.inc();
                    tracing::warn!(from = %send_back_addr, error = %error, "inter-node connection refused");
                }
                _ => {}
            }
        }
    }
}

fn fail_waiting(
    waiting: &mut HashMap<PeerId, Vec<oneshot::Sender<io::Result<()>>>>,
    peer: PeerId,
    error: &DialError,
) {
    for done in waiting.remove(&peer).unwrap_or_default() {
        let _ = done.send(Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            error.to_string(),
        )));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn transport(secret: &str) -> (Transport, Incoming, Counter) {
        let refused = Counter::default();
        let t = Transport::start(
            "127.0.0.1:0".parse().unwrap(),
            "127.0.0.1".parse().unwrap(),
            secret,
            refused.clone(),
        )
        .await
        .expect("transport starts");
        let incoming = t.take_incoming().expect("incoming streams");
        (t, incoming, refused)
    }

    #[tokio::test]
    async fn only_a_peer_with_the_secret_opens_a_stream() {
        let secret = "0123456789abcdef-transport";
        let (server, mut incoming, refused) = transport(secret).await;
        tokio::spawn(async move {
            while let Some(mut s) = incoming.next().await {
                let mut buf = [0u8; 5];
                if s.read_exact(&mut buf).await.is_ok() {
                    let _ = s.write_all(&buf).await;
                    let _ = s.flush().await;
                }
            }
        });
        let (friend, _, _) = transport(secret).await;
        let mut s = friend
            .open(&server.peer_id(), &server.address())
            .await
            .expect("same secret: connected");
        s.write_all(b"hello").await.unwrap();
        s.flush().await.unwrap();
        let mut echo = [0u8; 5];
        s.read_exact(&mut echo).await.unwrap();
        assert_eq!(&echo, b"hello");

        let (stranger, _, _) = transport("another-secret-entirely").await;
        let r = stranger.open(&server.peer_id(), &server.address()).await;
        assert!(r.is_err(), "a peer without the secret got a stream");
        // The stranger's swarm gives up on its dial within the transport's
        // 10 s timeout; the server counts the failed handshake by then.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while refused.get() == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "refusal not counted"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

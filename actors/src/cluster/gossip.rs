//! Gossip over UDP, signed: chitchat's messages with an HMAC-SHA256 tag.
//!
//! chitchat's own UDP transport trusts every datagram; ours appends a tag
//! keyed by the cluster secret and drops (and counts) every datagram whose
//! tag does not verify, so a process without the secret can neither join nor
//! inject membership state. The socket is bound before chitchat starts, so a
//! node configured with port 0 knows (and gossips) its real port.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use async_trait::async_trait;
use chitchat::transport::{Socket, Transport};
use chitchat::{ChitchatMessage, Deserializable, Serializable};
use hmac::{Hmac, Mac};
use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Bytes of the tag after each datagram.
const TAG: usize = 32;
/// Largest datagram read.
const MAX_DATAGRAM: usize = 65_507;

/// A key for one purpose, derived from the cluster secret.
pub fn derive_key(secret: &str, purpose: &str) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(b"chorus-cluster\0");
    mac.update(purpose.as_bytes());
    mac.finalize().into_bytes().into()
}

/// Addresses this node pretends it cannot reach (partition tests).
#[derive(Clone, Default, Debug)]
pub struct Faults {
    blocked: Arc<Mutex<HashSet<SocketAddr>>>,
}

impl Faults {
    pub fn block(&self, addr: SocketAddr) {
        self.blocked.lock().insert(addr);
    }

    pub fn heal(&self) {
        self.blocked.lock().clear();
    }

    fn is_blocked(&self, addr: &SocketAddr) -> bool {
        self.blocked.lock().contains(addr)
    }
}

/// chitchat's [`Transport`], over one pre-bound UDP socket.
pub struct SignedUdp {
    socket: Mutex<Option<tokio::net::UdpSocket>>,
    key: [u8; 32],
    faults: Faults,
    rejected: Counter,
}

impl SignedUdp {
    /// Binds `listen` now; returns the transport and the bound address.
    pub fn bind(
        listen: SocketAddr,
        secret: &str,
        faults: Faults,
        rejected: Counter,
    ) -> anyhow::Result<(SignedUdp, SocketAddr)> {
        let std_socket = std::net::UdpSocket::bind(listen)
            .with_context(|| format!("binding {listen}/UDP for gossip"))?;
        std_socket.set_nonblocking(true)?;
        let addr = std_socket.local_addr()?;
        let socket = tokio::net::UdpSocket::from_std(std_socket)?;
        Ok((
            SignedUdp {
                socket: Mutex::new(Some(socket)),
                key: derive_key(secret, "gossip"),
                faults,
                rejected,
            },
            addr,
        ))
    }
}

#[async_trait]
impl Transport for SignedUdp {
    async fn open(&self, _listen: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let socket = self
            .socket
            .lock()
            .take()
            .context("the gossip socket is already open")?;
        Ok(Box::new(SignedSocket {
            socket,
            key: self.key,
            faults: self.faults.clone(),
            rejected: self.rejected.clone(),
            buf: vec![0; MAX_DATAGRAM],
        }))
    }
}

struct SignedSocket {
    socket: tokio::net::UdpSocket,
    key: [u8; 32],
    faults: Faults,
    rejected: Counter,
    buf: Vec<u8>,
}

fn tag(key: &[u8; 32], payload: &[u8]) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(key).expect("32-byte key");
    mac.update(payload);
    mac
}

/// A datagram's payload if its tag verifies.
fn verified<'a>(key: &[u8; 32], datagram: &'a [u8]) -> Option<&'a [u8]> {
    let split = datagram.len().checked_sub(TAG)?;
    let (payload, sig) = datagram.split_at(split);
    tag(key, payload).verify_slice(sig).ok()?;
    Some(payload)
}

fn signed(key: &[u8; 32], msg: &ChitchatMessage) -> Vec<u8> {
    let mut buf = msg.serialize_to_vec();
    let sig = tag(key, &buf).finalize().into_bytes();
    buf.extend_from_slice(&sig);
    buf
}

#[async_trait]
impl Socket for SignedSocket {
    async fn send(&mut self, to: SocketAddr, msg: ChitchatMessage) -> anyhow::Result<()> {
        if self.faults.is_blocked(&to) {
            return Ok(());
        }
        let datagram = signed(&self.key, &msg);
        if let Err(e) = self.socket.send_to(&datagram, to).await {
            // A peer that is gone is the failure detector's business.
            tracing::debug!(%to, error = %e, "gossip send failed");
        }
        Ok(())
    }

    async fn recv(&mut self) -> anyhow::Result<(SocketAddr, ChitchatMessage)> {
        loop {
            let (len, from) = match self.socket.recv_from(&mut self.buf).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(error = %e, "gossip recv failed");
                    continue;
                }
            };
            if self.faults.is_blocked(&from) {
                continue;
            }
            let Some(mut payload) = verified(&self.key, &self.buf[..len]) else {
                self.rejected.inc();
                tracing::debug!(%from, len, "gossip datagram without a valid tag dropped");
                continue;
            };
            match ChitchatMessage::deserialize(&mut payload) {
                Ok(msg) => return Ok((from, msg)),
                Err(e) => {
                    self.rejected.inc();
                    tracing::debug!(%from, error = %e, "undecodable gossip datagram dropped");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_secret_verifies() {
        let key = derive_key("0123456789abcdef", "gossip");
        let other = derive_key("fedcba9876543210", "gossip");
        assert_ne!(key, derive_key("0123456789abcdef", "transport"));
        let msg = ChitchatMessage::BadCluster;
        let datagram = signed(&key, &msg);
        let payload = verified(&key, &datagram).expect("own tag");
        assert_eq!(payload, msg.serialize_to_vec().as_slice());
        assert_eq!(verified(&other, &datagram), None);
        let mut tampered = datagram.clone();
        tampered[0] ^= 1;
        assert_eq!(verified(&key, &tampered), None);
        assert_eq!(verified(&key, &datagram[..10]), None);
        assert_eq!(verified(&key, &[]), None);
    }
}

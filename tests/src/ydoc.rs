//! A y-websocket client in Rust, for tests: what a stock
//! `WebsocketProvider` does on `/doc/<name>` (y-protocols sync and awareness).

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use yrs::sync::{Awareness, Message, SyncMessage};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{Doc, GetString, ReadTxn, Text, Transact, Update, WriteTxn};

use crate::{TestNode, WAIT};

/// What a stock y-websocket provider does on `/doc/<name>`: answers the
/// server's step 1, sends its own, applies what comes, sends its edits.
pub struct YClient {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub doc: Doc,
    pub awareness: Awareness,
    pub denied: Option<String>,
    pub closed: Option<(u16, String)>,
}

impl YClient {
    pub async fn connect(node: &TestNode, name: &str, token: &str) -> YClient {
        Self::try_connect(node.addr, name, token)
            .await
            .expect("connect")
    }

    pub async fn try_connect(
        addr: std::net::SocketAddr,
        name: &str,
        token: &str,
    ) -> Result<YClient, u16> {
        let url = format!("ws://{addr}/doc/{name}?token={token}");
        match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
            .await
            .expect("handshake timeout")
        {
            Ok((ws, _)) => {
                let doc = Doc::new();
                let mut c = YClient {
                    ws,
                    awareness: Awareness::new(doc.clone()),
                    doc,
                    denied: None,
                    closed: None,
                };
                let sv = c.doc.transact().state_vector();
                c.send(Message::Sync(SyncMessage::SyncStep1(sv))).await;
                Ok(c)
            }
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
            Err(e) => panic!("connect: {e}"),
        }
    }

    pub async fn send(&mut self, m: Message) {
        self.ws
            .send(WsMessage::Binary(m.encode_v1().into()))
            .await
            .expect("send");
    }

    /// Reads and handles one frame; false once the socket is closed.
    pub async fn read_one(&mut self, deadline: tokio::time::Instant) -> bool {
        let msg = match tokio::time::timeout_at(deadline, self.ws.next()).await {
            Err(_) => return true,
            Ok(None) | Ok(Some(Err(_))) => return false,
            Ok(Some(Ok(m))) => m,
        };
        let bytes = match msg {
            WsMessage::Binary(b) => b,
            WsMessage::Close(c) => {
                self.closed = c.map(|c| (u16::from(c.code), c.reason.to_string()));
                return false;
            }
            _ => return true,
        };
        match Message::decode_v1(&bytes).expect("server sent y-protocols") {
            Message::Sync(SyncMessage::SyncStep1(sv)) => {
                let diff = self.doc.transact().encode_state_as_update_v1(&sv);
                self.send(Message::Sync(SyncMessage::SyncStep2(diff))).await;
            }
            Message::Sync(SyncMessage::SyncStep2(u)) | Message::Sync(SyncMessage::Update(u)) => {
                let u = Update::decode_v1(&u).expect("update");
                self.doc.transact_mut().apply_update(u).expect("apply");
            }
            Message::Awareness(u) => self.awareness.apply_update(u).expect("awareness"),
            Message::Auth(reason) => self.denied = reason,
            _ => {}
        }
        true
    }

    /// Reads until `f` holds, failing after [`WAIT`].
    pub async fn until(&mut self, what: &str, f: impl Fn(&YClient) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !f(self) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            let step = (tokio::time::Instant::now() + Duration::from_millis(50)).min(deadline);
            if !self.read_one(step).await {
                assert!(f(self), "closed ({:?}) before {what}", self.closed);
                return;
            }
        }
    }

    /// Reads for a moment (what is already on its way arrives).
    pub async fn drain(&mut self) {
        let until = tokio::time::Instant::now() + Duration::from_millis(150);
        while tokio::time::Instant::now() < until {
            if !self.read_one(until).await {
                return;
            }
        }
    }

    /// Edits the doc locally and sends the edit as an update.
    pub async fn edit(&mut self, f: impl FnOnce(&mut yrs::TransactionMut)) {
        let update = local_edit(&self.doc, f);
        self.send(Message::Sync(SyncMessage::Update(update))).await;
    }

    pub async fn set_awareness(&mut self, json: &str) {
        self.awareness.set_local_state_raw(json);
        let update = self.awareness.update().expect("awareness update");
        self.send(Message::Awareness(update)).await;
    }

    pub fn text(&self) -> String {
        let txn = self.doc.transact();
        txn.get_text("body")
            .map(|t| t.get_string(&txn))
            .unwrap_or_default()
    }

    pub fn states(&self) -> Vec<String> {
        self.awareness
            .iter()
            .filter_map(|(_, s)| s.data.map(|d| d.to_string()))
            .collect()
    }

    pub async fn closed_by_server(&mut self) -> (u16, String) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.read_one(deadline).await {
            assert!(tokio::time::Instant::now() < deadline, "not closed");
        }
        self.closed.clone().expect("a close frame")
    }
}

/// Applies `f` to `doc` and returns the update it made.
pub fn local_edit(doc: &Doc, f: impl FnOnce(&mut yrs::TransactionMut)) -> Vec<u8> {
    // The transaction's own update, as a Yjs client sends it (its `update`
    // event): only what it inserted and deleted, not the whole delete set.
    let mut txn = doc.transact_mut();
    f(&mut txn);
    txn.encode_update_v1()
}

pub fn insert(text: &'static str) -> impl FnOnce(&mut yrs::TransactionMut) {
    move |txn| {
        let t = txn.get_or_insert_text("body");
        let len = t.len(txn);
        t.insert(txn, len, text);
    }
}

//! The chaos test's clients: a publisher through the server API that
//! retries with the same `client_id` at the next node, and WebSocket
//! subscribers that reconnect round-robin and resubscribe with (offset,
//! epoch), recording every entry they receive.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use crate::procs::*;

pub const IDS: [&str; 3] = ["chaos-a", "chaos-b", "chaos-c"];
pub const ROOMS: [&str; 8] = [
    "chaos-0", "chaos-1", "chaos-2", "chaos-3", "chaos-4", "chaos-5", "chaos-6", "chaos-7",
];
/// A publish not acknowledged within this fails the test.
pub const PUBLISH_GIVE_UP: Duration = Duration::from_secs(60);
/// The server API's request timeout for the publisher.
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);
/// About 20 publishes per second.
pub const PUBLISH_PACE: Duration = Duration::from_millis(50);
/// A subscriber that finds no node to reconnect to within this gives up.
pub const RECONNECT_GIVE_UP: Duration = Duration::from_secs(60);

/// The current HTTP address of each node slot (a restart changes it).
#[derive(Clone)]
pub struct Cluster(pub Arc<Mutex<Vec<String>>>);

impl Cluster {
    pub fn addr(&self, slot: usize) -> String {
        self.0.lock().unwrap()[slot % IDS.len()].clone()
    }
    pub fn all(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
    pub fn set(&self, slot: usize, addr: String) {
        self.0.lock().unwrap()[slot] = addr;
    }
}

/// One acknowledged publish.
#[derive(Clone, Debug)]
pub struct Ack {
    pub room: usize,
    pub offset: u64,
    pub text: String,
    pub duplicate: bool,
    /// When the acknowledgement arrived, and when its (successful) attempt began.
    pub at: Instant,
    pub attempt: Instant,
}

/// What one subscriber saw of one room.
#[derive(Default)]
pub struct RoomSeen {
    pub joined: bool,
    /// The head in the `room.join` reply: entries after it come as pushes.
    pub join_head: u64,
    pub epoch: Option<String>,
    /// Every entry offset received (pushes and `missed`), in arrival order.
    pub offsets: Vec<u64>,
    /// The last offset seen (the one to resume from).
    pub last: u64,
}

#[derive(Default)]
pub struct SubState {
    pub user: String,
    pub slot: usize,
    pub connected: bool,
    pub reconnects: u32,
    /// Why its last socket ended.
    pub last_end: String,
    pub resubscribe_pushes: u32,
    pub missed_recovered: u64,
    pub rooms: Vec<RoomSeen>,
    pub problems: Vec<String>,
}

pub type Shared<T> = Arc<Mutex<T>>;

/// Publish `m<n>` to `room`, retrying (same `client_id`) at the next node on
/// an error, a non-200 status or a timeout, until acknowledged.
pub async fn publish(
    client: &reqwest::Client,
    cluster: &Cluster,
    room: usize,
    n: u64,
) -> Result<Ack, String> {
    let begun = Instant::now();
    let text = format!("m{n}");
    let body = json!({"sender": "pub", "text": text, "client_id": format!("c{n}")});
    let mut slot = n as usize;
    let mut last_err = String::new();
    loop {
        if begun.elapsed() > PUBLISH_GIVE_UP {
            return Err(format!(
                "publish {text} to {} not acknowledged within {PUBLISH_GIVE_UP:?}: {last_err}",
                ROOMS[room]
            ));
        }
        let addr = cluster.addr(slot);
        let url = format!("http://{addr}/api/v1/rooms/{}/messages", ROOMS[room]);
        let attempt = Instant::now();
        match client
            .post(url)
            .header("x-api-key", API_KEY)
            .json(&body)
            .send()
            .await
        {
            Ok(resp) if resp.status().as_u16() == 200 => match resp.json::<Value>().await {
                Ok(v) if v["offset"].as_u64().is_some() => {
                    return Ok(Ack {
                        room,
                        offset: v["offset"].as_u64().unwrap(),
                        text,
                        duplicate: v["duplicate"].as_bool().unwrap_or(false),
                        at: Instant::now(),
                        attempt,
                    })
                }
                other => last_err = format!("{addr}: 200 with {other:?}"),
            },
            Ok(resp) => {
                let st = resp.status();
                last_err = format!("{addr}: {st} {}", resp.text().await.unwrap_or_default());
            }
            Err(e) => last_err = format!("{addr}: {e}"),
        }
        slot += 1;
        // Retry pacing, not synchronization.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Publish round-robin over the rooms at about 20/s until told to stop.
/// Returns how many it published (the next message number).
pub async fn publisher(
    cluster: Cluster,
    acks: Shared<Vec<Ack>>,
    stop: watch::Receiver<bool>,
) -> Result<u64, String> {
    let client = reqwest::Client::builder()
        .timeout(PUBLISH_TIMEOUT)
        .build()
        .unwrap();
    let mut pace = tokio::time::interval(PUBLISH_PACE);
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0u64;
    loop {
        pace.tick().await;
        if *stop.borrow() {
            return Ok(n);
        }
        let ack = publish(&client, &cluster, (n % ROOMS.len() as u64) as usize, n).await?;
        acks.lock().unwrap().push(ack);
        n += 1;
    }
}

pub fn room_of(channel: &Value) -> Option<usize> {
    let id = channel.as_str()?.strip_prefix("room:")?;
    ROOMS.iter().position(|r| *r == id)
}

/// Why a subscriber's session ended.
pub enum End {
    Stop,
    Died(String),
}

/// Record one entry offset (a push or a `missed` item).
pub fn record(st: &mut SubState, r: usize, offset: u64, epoch: Option<&str>) {
    let user = st.user.clone();
    let seen = &mut st.rooms[r];
    if let (Some(known), Some(e)) = (&seen.epoch, epoch) {
        if known != e {
            let msg = format!(
                "{user} {}: epoch changed {known} -> {e} at {offset}",
                ROOMS[r]
            );
            st.problems.push(msg);
            st.rooms[r].epoch = Some(e.to_string());
        }
    }
    let seen = &mut st.rooms[r];
    seen.offsets.push(offset);
    seen.last = seen.last.max(offset);
}

/// The request (re)subscribing room `r`: `room.join` the first time, then
/// `subscribe` from the last offset seen.
pub fn subscribe_frame(st: &SubState, id: u64, r: usize) -> Value {
    let seen = &st.rooms[r];
    if !seen.joined {
        json!({"id": id, "op": "room.join", "args": {"room": ROOMS[r]}})
    } else {
        json!({"id": id, "op": "subscribe", "args": {
            "channel": format!("room:{}", ROOMS[r]),
            "offset": seen.last,
            "epoch": seen.epoch,
        }})
    }
}

/// A session's (re)subscribe requests in flight, by id.
#[derive(Default)]
struct Requests {
    next_id: u64,
    /// Request id → room.
    pending: HashMap<u64, usize>,
}

impl Requests {
    /// Sends the request (re)subscribing room `r`.
    async fn subscribe(
        &mut self,
        ws: &mut Ws,
        st: &Shared<SubState>,
        r: usize,
    ) -> Result<(), String> {
        self.next_id += 1;
        let frame = subscribe_frame(&st.lock().unwrap(), self.next_id, r);
        self.pending.insert(self.next_id, r);
        send(ws, &frame).await
    }
}

async fn send(ws: &mut Ws, v: &Value) -> Result<(), String> {
    ws.send(Message::text(v.to_string()))
        .await
        .map_err(|e| format!("send: {e}"))
}

/// One connection's life: (re)subscribe every room, then record entries
/// until the socket dies or the test stops.
pub async fn session(ws: &mut Ws, st: &Shared<SubState>, stop: &mut watch::Receiver<bool>) -> End {
    let n = ROOMS.len();
    let mut reqs = Requests::default();
    // A (re)subscribe in flight per room: its pushes wait for the reply,
    // whose `missed` entries come before them.
    let mut inflight = vec![true; n];
    let mut buffered: Vec<Vec<(u64, Option<String>)>> = vec![Vec::new(); n];
    let mut again = vec![false; n];
    let mut retry: Vec<(Instant, usize)> = Vec::new();
    for r in 0..n {
        if let Err(e) = reqs.subscribe(ws, st, r).await {
            return End::Died(e);
        }
    }
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        let msg = tokio::select! {
            _ = stop.changed() => return End::Stop,
            _ = tick.tick() => {
                let now = Instant::now();
                let due: Vec<usize> = retry.iter().filter(|(t, _)| *t <= now).map(|(_, r)| *r).collect();
                retry.retain(|(t, _)| *t > now);
                for r in due {
                    if let Err(e) = reqs.subscribe(ws, st, r).await {
                        return End::Died(e);
                    }
                }
                continue;
            }
            msg = ws.next() => msg,
        };
        let text = match msg {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(c))) => return End::Died(format!("close {c:?}")),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return End::Died(format!("read: {e}")),
            None => return End::Died("end of stream".into()),
        };
        let v: Value = match serde_json::from_str(&text) {
            Ok(v) => v,
            Err(e) => {
                st.lock()
                    .unwrap()
                    .problems
                    .push(format!("bad frame {text}: {e}"));
                continue;
            }
        };
        match v["push"].as_str() {
            Some("entry") => {
                let Some(r) = room_of(&v["channel"]) else {
                    continue;
                };
                let offset = v["offset"].as_u64().unwrap_or(0);
                let epoch = v["epoch"].as_str().map(str::to_string);
                if inflight[r] {
                    buffered[r].push((offset, epoch));
                } else {
                    record(&mut st.lock().unwrap(), r, offset, epoch.as_deref());
                }
                continue;
            }
            Some("resubscribe") => {
                let Some(r) = room_of(&v["channel"]) else {
                    continue;
                };
                st.lock().unwrap().resubscribe_pushes += 1;
                if inflight[r] {
                    again[r] = true;
                } else {
                    inflight[r] = true;
                    if let Err(e) = reqs.subscribe(ws, st, r).await {
                        return End::Died(e);
                    }
                }
                continue;
            }
            Some(_) => continue,
            None => {}
        }
        let Some(r) = v["id"].as_u64().and_then(|id| reqs.pending.remove(&id)) else {
            continue;
        };
        if let Some(err) = v.get("error") {
            let mut s = st.lock().unwrap();
            if err["retryable"] == true {
                retry.push((Instant::now() + Duration::from_millis(300), r));
            } else {
                let msg = format!("{} {}: (re)subscribe refused: {err}", s.user, ROOMS[r]);
                s.problems.push(msg);
                inflight[r] = false;
            }
            continue;
        }
        let ok = &v["ok"];
        {
            let mut s = st.lock().unwrap();
            let user = s.user.clone();
            if !s.rooms[r].joined {
                let seen = &mut s.rooms[r];
                seen.joined = true;
                seen.join_head = ok["offset"].as_u64().unwrap_or(0);
                seen.last = seen.join_head;
                seen.epoch = ok["epoch"].as_str().map(str::to_string);
            } else {
                if ok["recovered"] != true {
                    let last = s.rooms[r].last;
                    s.problems.push(format!(
                        "{user} {}: resubscribe from {last} not recovered: {ok}",
                        ROOMS[r]
                    ));
                }
                let missed = ok["missed"].as_array().cloned().unwrap_or_default();
                s.missed_recovered += missed.len() as u64;
                let epoch = ok["epoch"].as_str().map(str::to_string);
                for e in &missed {
                    record(
                        &mut s,
                        r,
                        e["offset"].as_u64().unwrap_or(0),
                        epoch.as_deref(),
                    );
                }
            }
            // Entries up to the head a join reply gives are history: a
            // join retried after a retryable error (the first attempt took
            // effect, its answer did not arrive in time) was subscribed
            // already and got some of them pushed. A client drops those.
            let join_head = s.rooms[r].join_head;
            for (offset, epoch) in buffered[r].drain(..) {
                if s.rooms[r].offsets.is_empty() && offset <= join_head {
                    continue;
                }
                record(&mut s, r, offset, epoch.as_deref());
            }
        }
        inflight[r] = false;
        if std::mem::take(&mut again[r]) {
            inflight[r] = true;
            if let Err(e) = reqs.subscribe(ws, st, r).await {
                return End::Died(e);
            }
        }
    }
}

/// A subscriber: joins every room on its node, reconnects round-robin to
/// another node when its socket dies, and resubscribes from its offsets.
pub async fn subscriber(
    token: String,
    cluster: Cluster,
    st: Shared<SubState>,
    mut stop: watch::Receiver<bool>,
) {
    let mut slot = st.lock().unwrap().slot;
    let mut first = true;
    loop {
        let begun = Instant::now();
        let mut last_err = String::new();
        let mut ws = loop {
            if *stop.borrow() {
                return;
            }
            if begun.elapsed() > RECONNECT_GIVE_UP {
                let mut s = st.lock().unwrap();
                let msg = format!("{}: no node to reconnect to: {last_err}", s.user);
                s.problems.push(msg);
                return;
            }
            if !first {
                slot = (slot + 1) % IDS.len();
            }
            match connect_ws(&cluster.addr(slot), &token, Duration::from_secs(5)).await {
                Ok(ws) => break ws,
                Err(e) => last_err = e,
            }
            first = false;
            // Retry pacing between attempts.
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        {
            let mut s = st.lock().unwrap();
            s.slot = slot;
            s.connected = true;
        }
        let end = session(&mut ws, &st, &mut stop).await;
        st.lock().unwrap().connected = false;
        match end {
            End::Stop => {
                let _ = ws.close(None).await;
                return;
            }
            End::Died(why) => {
                let mut s = st.lock().unwrap();
                s.reconnects += 1;
                s.last_end = why;
                drop(s);
                first = false;
            }
        }
    }
}

/// A client that connects once and never reconnects: `true` in `gone` once
/// its socket closed.
pub async fn lonely(addr: String, token: String, gone: Arc<Mutex<bool>>) {
    // A handshake refused while the cluster settles (503, 5004) is retried,
    // as a client does.
    let deadline = Instant::now() + WAIT;
    let mut ws = loop {
        match connect_ws(&addr, &token, WAIT).await {
            Ok(ws) => break ws,
            Err(e) => assert!(Instant::now() < deadline, "lonely client connects: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    while let Some(Ok(m)) = ws.next().await {
        if let Message::Close(_) = m {
            break;
        }
    }
    *gone.lock().unwrap() = true;
}

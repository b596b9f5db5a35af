//! What a process counts while it runs, and how processes' counts are merged.
//!
//! Each process (the coordinator when it runs the load itself, or each
//! worker) has one [`Stats`]: atomic counters, one HdrHistogram per latency
//! kind (microseconds), and errors by cause. At the end it becomes a
//! [`Snapshot`] (histograms serialized with HdrHistogram's V2 format, then
//! base64), which travels as JSON; the coordinator adds snapshots into a
//! [`Merged`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine as _;
use hdrhistogram::serialization::{Deserializer, Serializer as _, V2Serializer};
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::sys::{self, CpuTimes};

macro_rules! named_enum {
    ($(#[$m:meta])* $vis:vis enum $name:ident { $($(#[$d:meta])* $v:ident = $s:literal,)* }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        $vis enum $name { $($(#[$d])* $v,)* }
        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$v,)*];
            pub fn name(self) -> &'static str {
                match self { $($name::$v => $s,)* }
            }
        }
    };
}

named_enum! {
    /// Everything a run counts. Names are the report's `counts` keys.
    pub enum Counter {
        /// WebSocket handshakes completed.
        ConnOpened = "conn_opened",
        /// Connection attempts that failed (TCP or WebSocket handshake).
        ConnFailed = "conn_failed",
        /// Connections not attempted because the scenario's time ran out.
        ConnNotTried = "conn_not_tried",
        /// Connections the harness closed.
        ConnClosed = "conn_closed",
        /// Connections the server or the network closed while the harness still used them.
        ConnDropped = "conn_dropped",
        /// Connections still open when the hold ended (idle).
        StayedUp = "stayed_up",
        /// Requests sent.
        Requests = "requests",
        /// Requests answered with an error, timed out, or lost with their connection.
        RequestErrors = "request_errors",
        /// Protocol pings sent / answered.
        Pings = "pings",
        Pongs = "pongs",
        /// Messages sent (`room.send`) and acknowledged.
        Sent = "messages_sent",
        Acked = "messages_acked",
        /// Sends that left more than 10 ms behind their schedule (the harness fell behind).
        LateSends = "late_sends",
        /// Entry pushes received, all kinds, duplicates included.
        Received = "entries_received",
        /// Entries carrying the harness's timestamp, received by another
        /// connection than the sender's: the publish-to-delivery samples.
        Deliveries = "deliveries",
        /// Entries the subscribers should have received (from each one's
        /// subscription point up to the channel's final offset).
        Expected = "entries_expected",
        /// Distinct expected entries received.
        Delivered = "entries_delivered",
        /// Expected entries never received.
        Lost = "lost",
        /// Entries received more than once.
        Duplicates = "duplicates",
        /// Entries received after a higher offset of the same channel.
        OutOfOrder = "out_of_order",
        /// Entries at or before the subscription point (should not be pushed).
        Stale = "stale",
        /// Typing indicators sent, and seen by another member.
        TypingSent = "typing_sent",
        TypingSeen = "typing_seen",
        /// Read markers sent; receipts other members should see (reads that
        /// moved the marker, times the other members); receipts they saw.
        ReadsSent = "reads_sent",
        ReceiptsExpected = "receipts_expected",
        ReceiptsSeen = "receipts_seen",
        /// Presence changes watchers should see, saw, and missed.
        PresenceExpected = "presence_expected",
        PresenceSeen = "presence_seen",
        PresenceMissed = "presence_missed",
        /// Presence pushes that were not the awaited change (idle, repeats).
        PresenceOther = "presence_other",
        /// Notifications created through the server API.
        NotifCreated = "notifications_created",
        /// Notifications each user should receive, received (distinct), lost, duplicated.
        NotifExpected = "notifications_expected",
        NotifDelivered = "notifications_delivered",
        NotifLost = "notifications_lost",
        NotifDuplicates = "notifications_duplicates",
        /// `notifications` pushes (one may carry several notifications).
        NotifPushes = "notification_pushes",
        /// Server-API requests that failed.
        ApiErrors = "api_errors",
        /// Errors of every cause (see `errors`).
        Errors = "errors",
    }
}

named_enum! {
    /// The latencies a run measures. Names are the report's `latency_ms` keys.
    pub enum Lat {
        /// TCP connect + WebSocket handshake.
        Handshake = "handshake",
        /// `ping` request to reply.
        Ping = "ping_rtt",
        /// `room.send` to its acknowledgement (durable).
        PublishAck = "publish_ack",
        /// A message's send time to its arrival at another member or subscriber.
        Delivery = "publish_to_delivery",
        /// `room.typing` to another member's `typing` push.
        Typing = "typing",
        /// `room.read` to another member's `receipt` push.
        Receipt = "receipt",
        /// A user's connection completing to a watcher's `presence` push saying online.
        Online = "presence_online",
        /// A user's connection closing to a watcher's `presence` push saying offline.
        Offline = "presence_offline",
        /// Server-API request to response.
        NotifyApi = "notify_api",
        /// Server-API request sent to the `notifications` push arriving.
        NotifyDelivery = "notify_delivery",
    }
}

/// Largest latency a histogram holds (one hour, in microseconds); larger ones saturate.
const HIST_MAX_US: u64 = 3_600_000_000;
/// Distinct error causes kept; more are counted under one `other` cause.
const MAX_CAUSES: usize = 64;

pub fn new_histogram() -> Histogram<u64> {
    // The bounds are constants that hdrhistogram accepts; an error here is a bug.
    Histogram::new_with_bounds(1, HIST_MAX_US, 3)
        .unwrap_or_else(|e| unreachable!("histogram bounds rejected: {e}"))
}

/// One process's live counts.
pub struct Stats {
    counters: Vec<AtomicU64>,
    hist: Vec<Mutex<Histogram<u64>>>,
    errors: Mutex<BTreeMap<String, u64>>,
    /// Wall-clock time of the last event of the scenario's main kind
    /// (handshake, delivery, ...): the end of its throughput window.
    last_event_ns: AtomicU64,
}

impl Default for Stats {
    fn default() -> Self {
        Stats::new()
    }
}

impl Stats {
    pub fn new() -> Stats {
        Stats {
            counters: Counter::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
            hist: Lat::ALL
                .iter()
                .map(|_| Mutex::new(new_histogram()))
                .collect(),
            errors: Mutex::new(BTreeMap::new()),
            last_event_ns: AtomicU64::new(0),
        }
    }

    pub fn incr(&self, c: Counter) {
        self.add(c, 1);
    }

    pub fn add(&self, c: Counter, n: u64) {
        self.counters[c as usize].fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self, c: Counter) -> u64 {
        self.counters[c as usize].load(Ordering::Relaxed)
    }

    pub fn record(&self, lat: Lat, d: Duration) {
        self.record_us(lat, d.as_micros().min(u128::from(u64::MAX)) as u64);
    }

    pub fn record_us(&self, lat: Lat, us: u64) {
        self.hist[lat as usize].lock().saturating_record(us.max(1));
    }

    /// Counts an error under `cause` (a short, stable text: "connect: refused").
    pub fn error(&self, cause: impl Into<String>) {
        self.incr(Counter::Errors);
        let cause = cause.into();
        let mut errors = self.errors.lock();
        if errors.len() >= MAX_CAUSES && !errors.contains_key(&cause) {
            *errors.entry("other".to_string()).or_default() += 1;
        } else {
            *errors.entry(cause).or_default() += 1;
        }
    }

    /// Marks an event of the scenario's main kind now.
    pub fn mark_event(&self) {
        self.last_event_ns
            .fetch_max(sys::now_ns(), Ordering::Relaxed);
    }

    /// Connections currently open.
    pub fn open(&self) -> u64 {
        self.get(Counter::ConnOpened)
            .saturating_sub(self.get(Counter::ConnClosed) + self.get(Counter::ConnDropped))
    }

    /// Every counter, by name (zeros included: progress lines want them stable).
    pub fn counters(&self) -> BTreeMap<String, u64> {
        Counter::ALL
            .iter()
            .map(|c| (c.name().to_string(), self.get(*c)))
            .collect()
    }

    /// The whole state, serializable.
    pub fn snapshot(&self, cpu: CpuTimes) -> Result<Snapshot, StatsError> {
        let mut histograms = BTreeMap::new();
        for lat in Lat::ALL {
            let h = self.hist[*lat as usize].lock();
            if !h.is_empty() {
                histograms.insert(lat.name().to_string(), encode_histogram(&h)?);
            }
        }
        Ok(Snapshot {
            counters: self.counters(),
            histograms,
            errors: self.errors.lock().clone(),
            cpu,
            last_event_ns: self.last_event_ns.load(Ordering::Relaxed),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("serializing a histogram: {0}")]
    Serialize(String),
    #[error("reading a histogram: {0}")]
    Deserialize(String),
    #[error("merging histograms: {0}")]
    Merge(String),
}

/// HdrHistogram V2 bytes, base64.
pub fn encode_histogram(h: &Histogram<u64>) -> Result<String, StatsError> {
    let mut buf = Vec::new();
    V2Serializer::new()
        .serialize(h, &mut buf)
        .map_err(|e| StatsError::Serialize(e.to_string()))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(buf))
}

pub fn decode_histogram(s: &str) -> Result<Histogram<u64>, StatsError> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|e| StatsError::Deserialize(e.to_string()))?;
    Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .map_err(|e| StatsError::Deserialize(e.to_string()))
}

/// One process's final counts, as sent over a worker's stdout.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Snapshot {
    pub counters: BTreeMap<String, u64>,
    /// Latency kind to base64 HdrHistogram V2 (microseconds).
    pub histograms: BTreeMap<String, String>,
    pub errors: BTreeMap<String, u64>,
    pub cpu: CpuTimes,
    pub last_event_ns: u64,
}

/// Snapshots of every process, added up.
#[derive(Debug, Default)]
pub struct Merged {
    pub counters: BTreeMap<String, u64>,
    pub histograms: BTreeMap<String, Histogram<u64>>,
    pub errors: BTreeMap<String, u64>,
    pub cpu: CpuTimes,
    /// One entry per process: its CPU time, for the saturation check.
    pub process_cpu: Vec<CpuTimes>,
    pub last_event_ns: u64,
}

impl Merged {
    pub fn add(&mut self, snap: &Snapshot) -> Result<(), StatsError> {
        for (k, v) in &snap.counters {
            *self.counters.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &snap.errors {
            *self.errors.entry(k.clone()).or_default() += v;
        }
        for (k, text) in &snap.histograms {
            let h = decode_histogram(text)?;
            match self.histograms.get_mut(k) {
                Some(acc) => acc
                    .add(&h)
                    .map_err(|e| StatsError::Merge(format!("{e:?}")))?,
                None => {
                    self.histograms.insert(k.clone(), h);
                }
            }
        }
        self.cpu = self.cpu.plus(snap.cpu);
        self.process_cpu.push(snap.cpu);
        self.last_event_ns = self.last_event_ns.max(snap.last_event_ns);
        Ok(())
    }

    pub fn count(&self, c: Counter) -> u64 {
        self.counters.get(c.name()).copied().unwrap_or(0)
    }

    pub fn histogram(&self, lat: Lat) -> Option<&Histogram<u64>> {
        self.histograms.get(lat.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_merge_across_snapshots_as_if_recorded_in_one() {
        let a = Stats::new();
        let b = Stats::new();
        let mut direct = new_histogram();
        for i in 1..=1000u64 {
            let us = i * 37 % 5000 + 1;
            if i % 3 == 0 { &a } else { &b }.record_us(Lat::Delivery, us);
            direct.record(us).unwrap();
        }
        a.record_us(Lat::Handshake, 250);
        a.incr(Counter::Lost);
        b.add(Counter::Lost, 2);
        a.error("connect: refused");
        b.error("connect: refused");
        b.error("closed: 4002");

        let mut merged = Merged::default();
        for s in [&a, &b] {
            let snap = s
                .snapshot(CpuTimes {
                    user_s: 1.0,
                    sys_s: 0.5,
                })
                .unwrap();
            // Through JSON, as from a worker process.
            let text = serde_json::to_string(&snap).unwrap();
            merged.add(&serde_json::from_str(&text).unwrap()).unwrap();
        }
        let h = merged.histogram(Lat::Delivery).unwrap();
        assert_eq!(h.len(), 1000);
        for q in [0.5, 0.9, 0.99, 0.999, 1.0] {
            assert_eq!(h.value_at_quantile(q), direct.value_at_quantile(q), "q={q}");
        }
        assert_eq!(h.max(), direct.max());
        assert_eq!(merged.histogram(Lat::Handshake).unwrap().len(), 1);
        assert!(merged.histogram(Lat::Ping).is_none());
        assert_eq!(merged.count(Counter::Lost), 3);
        assert_eq!(merged.errors["connect: refused"], 2);
        assert_eq!(merged.errors["closed: 4002"], 1);
        assert_eq!(merged.count(Counter::Errors), 3);
        assert_eq!(merged.process_cpu.len(), 2);
        assert!((merged.cpu.total() - 3.0).abs() < 1e-9);
    }

    #[test]
    fn error_causes_are_bounded() {
        let s = Stats::new();
        for i in 0..(MAX_CAUSES + 10) {
            s.error(format!("cause {i}"));
        }
        let snap = s.snapshot(CpuTimes::default()).unwrap();
        assert_eq!(snap.errors.len(), MAX_CAUSES + 1);
        assert_eq!(snap.errors["other"], 10);
    }
}

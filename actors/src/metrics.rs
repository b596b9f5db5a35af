//! Prometheus metrics shared by the actors and the node (`GET /metrics`).

use chorus_protocol::ErrorCode;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::cluster::ClusterMetrics;

type Labels = Vec<(&'static str, &'static str)>;

/// Every metric the node exports. Cheap to update from any thread.
pub struct Metrics {
    registry: Registry,
    pub connections: Gauge,
    pub connections_total: Counter,
    pub frames_in: Counter,
    pub frames_out: Counter,
    pub messages_published: Counter,
    pub fanout_deliveries: Counter,
    pub slow_consumers: Counter,
    pub idle_disconnects: Counter,
    pub active_rooms: Gauge,
    pub active_users: Gauge,
    pub notifications: Counter,
    pub store_append_seconds: Histogram,
    pub append_batch_size: Histogram,
    errors: Family<Labels, Counter>,
    /// `chorus_doc_*`.
    pub docs: DocMetrics,
    /// `chorus_cluster_*`.
    pub cluster: ClusterMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("chorus");
        let m = Metrics {
            connections: Gauge::default(),
            connections_total: Counter::default(),
            frames_in: Counter::default(),
            frames_out: Counter::default(),
            messages_published: Counter::default(),
            fanout_deliveries: Counter::default(),
            slow_consumers: Counter::default(),
            idle_disconnects: Counter::default(),
            active_rooms: Gauge::default(),
            active_users: Gauge::default(),
            notifications: Counter::default(),
            store_append_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            append_batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            errors: Family::default(),
            docs: DocMetrics::default(),
            cluster: ClusterMetrics::default(),
            registry: Registry::default(),
        };
        m.cluster.register(&mut registry);
        m.docs.register(&mut registry);
        registry.register(
            "connections",
            "Open WebSocket connections",
            m.connections.clone(),
        );
        registry.register(
            "connections_opened",
            "WebSocket connections accepted",
            m.connections_total.clone(),
        );
        registry.register(
            "frames_in",
            "Frames received from clients",
            m.frames_in.clone(),
        );
        registry.register("frames_out", "Frames sent to clients", m.frames_out.clone());
        registry.register(
            "messages_published",
            "Entries appended to rooms, topics and feeds",
            m.messages_published.clone(),
        );
        registry.register(
            "fanout_deliveries",
            "Pushes queued to subscribed connections",
            m.fanout_deliveries.clone(),
        );
        registry.register(
            "slow_consumer_disconnects",
            "Connections closed because their outbound queue overflowed",
            m.slow_consumers.clone(),
        );
        registry.register(
            "idle_disconnects",
            "Connections closed with 4004 because nothing arrived within the idle timeout",
            m.idle_disconnects.clone(),
        );
        registry.register(
            "active_rooms",
            "Room/topic actors in memory",
            m.active_rooms.clone(),
        );
        registry.register(
            "active_users",
            "User actors in memory",
            m.active_users.clone(),
        );
        registry.register(
            "notifications",
            "Notifications stored",
            m.notifications.clone(),
        );
        registry.register(
            "store_append_seconds",
            "Latency of durable channel appends (one batch)",
            m.store_append_seconds.clone(),
        );
        registry.register(
            "append_batch_entries",
            "Entries per durable append batch",
            m.append_batch_size.clone(),
        );
        registry.register(
            "errors",
            "Error replies and closes, by code",
            m.errors.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Counts one error sent to a client.
    pub fn error(&self, code: ErrorCode) {
        self.errors
            .get_or_create(&vec![("code", code.name())])
            .inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        out
    }
}

/// Collaborative documents.
#[derive(Clone)]
pub struct DocMetrics {
    pub active: Gauge,
    pub connections: Gauge,
    pub updates: Counter,
    pub update_bytes: Counter,
    pub awareness_updates: Counter,
    pub compactions: Counter,
    pub load_seconds: Histogram,
    pub append_seconds: Histogram,
    pub refused: Counter,
}

impl Default for DocMetrics {
    fn default() -> Self {
        DocMetrics {
            active: Gauge::default(),
            connections: Gauge::default(),
            updates: Counter::default(),
            update_bytes: Counter::default(),
            awareness_updates: Counter::default(),
            compactions: Counter::default(),
            load_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            append_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            refused: Counter::default(),
        }
    }
}

impl DocMetrics {
    fn register(&self, r: &mut Registry) {
        let r = r.sub_registry_with_prefix("doc");
        r.register("active", "Document actors in memory", self.active.clone());
        r.register(
            "connections",
            "Open /doc (y-websocket) connections",
            self.connections.clone(),
        );
        r.register(
            "updates",
            "Document updates made durable",
            self.updates.clone(),
        );
        r.register(
            "update_bytes",
            "Bytes of document updates made durable",
            self.update_bytes.clone(),
        );
        r.register(
            "awareness_updates",
            "Awareness updates relayed (not stored)",
            self.awareness_updates.clone(),
        );
        r.register(
            "compactions",
            "Document logs compacted into a snapshot",
            self.compactions.clone(),
        );
        r.register(
            "load_seconds",
            "Time to load a document (snapshot plus tail) into memory",
            self.load_seconds.clone(),
        );
        r.register(
            "append_seconds",
            "Latency of durable document appends (one batch)",
            self.append_seconds.clone(),
        );
        r.register(
            "refused_updates",
            "Updates refused (read-only, too large, invalid, rate-limited)",
            self.refused.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_errors() {
        let m = Metrics::new();
        m.frames_in.inc();
        m.error(ErrorCode::RateLimited);
        let text = m.render();
        assert!(text.contains("chorus_frames_in_total 1"), "{text}");
        assert!(
            text.contains("chorus_errors_total{code=\"rate_limited\"} 1"),
            "{text}"
        );
    }
}

"""The ingress's Prometheus metrics, one set per app (each app has its own registry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from realtime_runtime.observability import DeliveryTracker
from realtime_runtime.service import delivery_latency_histogram, feed_frames_counter

from ingress_ws.publishing import TRANSPORTS


class IngressMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.published = Counter(
            "advanced_board_events_published",
            "Board events published to RabbitMQ, by status and transport (websocket, http).",
            ["status", "transport"],
            registry=registry,
        )
        self.publish_duration = Histogram(
            "advanced_board_event_publish_duration_seconds",
            "Time from an event's arrival to RabbitMQ's publisher confirm, by transport.",
            ["transport"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=registry,
        )
        self.connections = Gauge(
            "advanced_websocket_connections", "Open board WebSockets.", registry=registry
        )
        self.feed_frames = feed_frames_counter(registry)
        self.frames = Counter(
            "advanced_websocket_frames",
            "Client frames received, by outcome.",
            ["outcome"],
            registry=registry,
        )
        self.closes = Counter(
            "advanced_websocket_closes",
            "WebSockets closed by the server, by close code.",
            ["code"],
            registry=registry,
        )
        self.unconfirmed_bytes = Gauge(
            "advanced_websocket_unconfirmed_bytes",
            "Bytes of published events awaiting RabbitMQ's confirm, in this process.",
            registry=registry,
        )
        self.latency = delivery_latency_histogram(registry)
        self.replayed = Counter(
            "advanced_websocket_replayed_events",
            "Events sent from the board's stream on resume.",
            registry=registry,
        )
        self.resets = Counter(
            "advanced_websocket_resets",
            "Resumes whose cursor was no longer retained.",
            registry=registry,
        )
        # One span per event fanned out here; latency observed at each socket write.
        self.delivery = DeliveryTracker("websocket", self.latency.labels("websocket").observe)
        for transport in TRANSPORTS:
            self.publish_duration.labels(transport)
            for status in ("success", "error"):
                self.published.labels(status, transport)

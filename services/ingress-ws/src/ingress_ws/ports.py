"""The ingress's ports, as one set: what the lifespan wires the runtime to.

Each has a real adapter and an in-memory one in `ingress_ws.adapters`, which picks the set.
"""

from __future__ import annotations

from dataclasses import dataclass

from limits.aio.storage import Storage
from realtime_runtime.feed import ActivityStore

from ingress_ws.presence import PresenceStore
from ingress_ws.publisher import EventPublisher


@dataclass(frozen=True)
class Adapters:
    publisher: EventPublisher  # accepted events, made durable
    activity: ActivityStore  # the relayed events' fan-out and retained history
    presence: PresenceStore  # who is on each board, across replicas
    rate_limits: Storage  # the limits that hold across replicas (per client, per credential)
    # False where there is no broker to name (in memory): /readyz then shows only the pipeline.
    reports_brokers: bool

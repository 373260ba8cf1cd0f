"""Names of every exchange, queue, channel and key the suite uses, derived from settings."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Literal

QueueType = Literal["classic", "quorum"]

# RabbitMQ 4 gives quorum queues a delivery limit of 20 by default (3.x has none): past it a
# message is dead-lettered. The suite never requeues a failed message itself (a failure is
# a reject into the retry queue, counted by `x-death`), so only returns count here: channels
# closed under unacked messages by failovers, lease hand-overs and paused partitions. Set
# explicitly, high, so an upgrade does not start moving messages out of order after 20 returns;
# a message that does reach it goes to the retry queue (at-least-once), never away.
QUORUM_DELIVERY_LIMIT = 1000


@dataclass(frozen=True, slots=True)
class Topology:
    """RabbitMQ names. Boards are partitioned over `partitions` queues to keep per-board order."""

    exchange: str
    queue: str
    retry_queue: str
    dlq_queue: str
    partitions: int
    queue_type: QueueType = "classic"

    @property
    def retry_exchange(self) -> str:
        return f"{self.exchange}.retry"

    def partition_of(self, board_id: str) -> int:
        return zlib.crc32(board_id.encode()) % self.partitions

    def routing_key(self, board_id: str) -> str:
        return f"board.{self.partition_of(board_id)}"

    def partition_routing_key(self, partition: int) -> str:
        return f"board.{partition}"

    def partition_queue(self, partition: int) -> str:
        return f"{self.queue}.{partition}"

    @property
    def partition_queue_arguments(self) -> dict[str, Any]:
        """Every declarer (worker and ingress) must pass exactly these: RabbitMQ refuses a
        redeclaration with other arguments. One consumer at a time keeps a board's order; a
        rejected message dead-letters to the retry exchange."""
        return self._typed(
            {"x-single-active-consumer": True, "x-dead-letter-exchange": self.retry_exchange},
            dead_letters=True,
        )

    def retry_queue_arguments(self, retry_delay_ms: int) -> dict[str, Any]:
        """Holds a retried message for the back-off delay, then dead-letters it back to work."""
        return self._typed(
            {"x-message-ttl": retry_delay_ms, "x-dead-letter-exchange": self.exchange},
            dead_letters=True,
        )

    @property
    def dlq_queue_arguments(self) -> dict[str, Any]:
        return self._typed({}, dead_letters=False)

    def _typed(self, arguments: dict[str, Any], *, dead_letters: bool) -> dict[str, Any]:
        """Classic queues keep the arguments they always had (no `x-queue-type`), so existing
        deployments redeclare them unchanged. A quorum queue that dead-letters does it
        at-least-once: the message leaves the source only once its target confirmed it, which
        RabbitMQ allows only with `reject-publish` overflow (a full target refuses, and the
        message waits in the source)."""
        if self.queue_type == "classic":
            return arguments
        quorum: dict[str, Any] = {"x-queue-type": "quorum", **arguments}
        if dead_letters:
            quorum |= {
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
                "x-delivery-limit": QUORUM_DELIVERY_LIMIT,
            }
        return quorum


# The relay step of a board writes its keys and one part of the activity stream in one Lua
# call, which Redis Cluster runs only when every key is in one hash slot. So a board's keys and
# its part of the activity stream share the part's hash tag, `{part-N}`: the activity stream
# (and its pub/sub channel) is split in `ACTIVITY_PARTS` parts, a board's events all in one.
# Changing the number re-homes every board: it is part of the key layout, not a setting.
ACTIVITY_PARTS = 16


def activity_part_of(board_id: str) -> int:
    """The part of the activity stream (and the hash tag) a board's keys live under."""
    return zlib.crc32(board_id.encode()) % ACTIVITY_PARTS


@dataclass(frozen=True, slots=True)
class RedisKeys:
    """Redis names. Every key and stream carries `prefix`; channels are named in full.

    A board's keys, its per-board channel and its part's stream and channel all carry the
    part's hash tag (`{part-N}`), so one relay step stays in one Redis Cluster slot.
    """

    prefix: str
    activity_channel: str

    @staticmethod
    def tag(part: int) -> str:
        return f"{{part-{part}}}"

    def _board(self, board_id: str) -> str:
        return f"{self.prefix}{self.tag(activity_part_of(board_id))}:board:{board_id}"

    def activity_stream(self, part: int) -> str:
        """One part of the activity stream: every event of the boards of that part."""
        return f"{self.prefix}{self.tag(part)}:activity"

    @property
    def activity_streams(self) -> list[str]:
        return [self.activity_stream(part) for part in range(ACTIVITY_PARTS)]

    def activity_part_channel(self, part: int) -> str:
        """The live frames of one part of the activity stream (the `/sse/activity` firehose)."""
        return f"{self.activity_channel}:{self.tag(part)}"

    def board_events_channel(self, board_id: str) -> str:
        """The live frames of one board: what an edge with clients of that board listens to."""
        return f"{self.activity_part_channel(activity_part_of(board_id))}:{board_id}"

    @property
    def presence_channel(self) -> str:
        return f"{self.activity_channel}:presence"

    @property
    def workers(self) -> str:
        return f"{self.prefix}workers"

    def board_stream(self, board_id: str) -> str:
        return f"{self._board(board_id)}:events"

    def sequence(self, board_id: str) -> str:
        return f"{self._board(board_id)}:seq"

    def epoch(self, board_id: str) -> str:
        return f"{self._board(board_id)}:epoch"

    def idempotency(self, board_id: str, idempotency_key: str) -> str:
        """The relay's marker for an envelope's `idempotency_key`."""
        return f"{self._board(board_id)}:seen:{idempotency_key}"

    def presence(self, board_id: str) -> str:
        """Hash: `<instance>:<member id>` → that member's connections on that instance.

        A board's two presence keys share the hash tag `{<board id>}` (board ids hold no
        braces), so the one Lua step that changes both stays on one Redis Cluster slot.
        """
        return f"{self.prefix}presence:{{{board_id}}}:connections"

    def presence_members(self, board_id: str) -> str:
        """Hash: member id → its connections summed over every instance (joins and leaves)."""
        return f"{self.prefix}presence:{{{board_id}}}:members"

    @property
    def presence_instances(self) -> str:
        """Sorted set: ingress instance → when its presence expires (ms), unless it beats.

        It and every instance's boards set share the hash tag `{instances}`, so an instance's
        beat (its expiry and its boards) is one transaction on one Redis Cluster slot.
        """
        return f"{self.prefix}presence:{{instances}}"

    def presence_instance_boards(self, instance: str) -> str:
        """Set: the boards an instance holds presence on, for reaping it once it died."""
        return f"{self.prefix}presence:{{instances}}:{instance}:boards"

    def partition_lease(self, partition: int) -> str:
        return f"{self.prefix}lease:{partition}"

"""The bodies of the ingress's HTTP API: publish (one event or a batch) and a board's history.

A refused request's body is an `ErrorFrame`, as a refused WebSocket frame gets.
"""

from __future__ import annotations

from typing import Annotated, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, RootModel

from envelope.models import ActivityEvent, BoardMessage, ErrorFrame

MAX_BATCH = 100
"""Events one `POST /api/boards/{board_id}/events:batch` may carry."""


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class PublishBatchRequest(RootModel[list[BoardMessage]]):
    """`POST /api/boards/{board_id}/events:batch`: 1 to 100 messages, published concurrently."""

    root: Annotated[list[BoardMessage], Field(min_length=1, max_length=MAX_BATCH)]


class PublishAccepted(_Body):
    """`202` to `POST /api/boards/{board_id}/events`: RabbitMQ has confirmed the event."""

    correlation_id: str
    event_id: UUID


class BatchAccepted(PublishAccepted):
    status: Literal[202] = 202


class BatchRefused(ErrorFrame):
    """One refused event of a batch: the status the event alone would have got, and for
    `rate_limited` and `unavailable` the seconds to wait before sending it again."""

    status: Literal[400, 413, 429, 503]
    retry_after: int | None = None


class PublishBatchReply(_Body):
    """`207` to a batch: one result per message, in the order sent."""

    results: list[Annotated[BatchAccepted | BatchRefused, Field(discriminator="status")]]


class HistoryReset(_Body):
    """The cursor asked for is older than what is retained (`cursor_expired`), or of a board
    history that has since started again under a new epoch (`history_lost`): the page holds
    the oldest retained events instead."""

    reason: Literal["cursor_expired", "history_lost"]
    oldest_cursor: str | None


class HistoryPage(_Body):
    """`GET /api/boards/{board_id}/events`: retained events in `sequence` order.

    `next_after` is the `after` of the next page while more events are retained past this
    one, else null (to poll for newer events later, pass the last event's `sequence`).
    """

    events: list[ActivityEvent]
    next_after: int | None
    reset: HistoryReset | None = None

"""Reading relayed activity back: live frames from pub/sub, history from the Redis Streams.

Both edges (the WebSocket ingress and the SSE gateway) read the relay's output the same way,
so it is defined once here. One `ActivityHub` per process holds the process's Redis
subscriptions (the channels of the boards its clients watch, and the activity stream's parts
while an `/sse/activity` stream is open) and fans out to bounded per-client queues.

- `store`: the port in front of Redis (`ActivityStore`) and its adapter (`RedisActivityStore`);
- `subscription`: one client's bounded queue, and why a subscription is interrupted;
- `replay`: what a resume owes a client, read page by page;
- `hub`: the process's one subscriber, ordering, de-duplicating and fanning out.
"""

from realtime_runtime.feed.hub import MAX_TRACKED_BOARDS, ActivityHub
from realtime_runtime.feed.replay import Replay
from realtime_runtime.feed.store import (
    PAGE,
    READ_TIMEOUT_SECONDS,
    ActivityStore,
    RedisActivityStore,
)
from realtime_runtime.feed.subscription import (
    FeedUnavailable,
    HistoryLost,
    Queued,
    SlowConsumer,
    StreamInterrupted,
    Subscription,
)

__all__ = [
    "MAX_TRACKED_BOARDS",
    "PAGE",
    "READ_TIMEOUT_SECONDS",
    "ActivityHub",
    "ActivityStore",
    "FeedUnavailable",
    "HistoryLost",
    "Queued",
    "RedisActivityStore",
    "Replay",
    "SlowConsumer",
    "StreamInterrupted",
    "Subscription",
]

"""The textbook design the suite is measured against (see docs/performance.md).

One FastAPI process takes each WebSocket frame, validates it with pydantic and publishes it to
Redis pub/sub; it also subscribes and sends every event to the board's sockets. One
sse-starlette process subscribes and streams to EventSource clients through a queue per client.
No RabbitMQ, no worker, no sequence, no replay, no delivery guarantee: what a Python team would
write first, written carefully (uvloop, httptools, pydantic v2, one Redis subscription per process).
"""

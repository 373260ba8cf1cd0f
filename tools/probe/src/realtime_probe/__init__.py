"""`realtime-probe`, the synthetic check of the whole pipeline, and the two protocol clients it
is built on, which the tests use too: `realtime_probe.sse` (the one SSE parser) and
`realtime_probe.websocket` (the one board WebSocket reader).

A tool: it may import the envelope and the runtime, and no service imports it.
"""

"""What the suite's services share at run time, beside the wire contract (`envelope`).

Each I/O library comes with an extra: `feed`, `pubsub` and `presence` need `redis`; `amqp`
needs `amqp`; `service`, `security` and `uvicorn_limits` need `http`; `auth` needs `auth`.
Nothing here imports a service.
"""

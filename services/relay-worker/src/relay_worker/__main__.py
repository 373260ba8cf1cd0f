"""`relay-worker` runs the relay; `relay-worker dlq list|replay` handles dead letters."""

from __future__ import annotations

import argparse
import asyncio
import sys

from realtime_runtime.observability import configure_logging, configure_tracing
from realtime_runtime.service import serve
from realtime_runtime.settings import load_settings

from relay_worker.app import build_worker
from relay_worker.dlq import list_dead_letters, replay_dead_letters
from relay_worker.settings import WorkerSettings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="relay-worker", description=__doc__)
    commands = parser.add_subparsers(dest="command")
    dlq = commands.add_parser("dlq", help="inspect or re-drive the dead-letter queue")
    dlq_commands = dlq.add_subparsers(dest="dlq_command", required=True)
    dlq_commands.add_parser("list", help="print every dead letter with its reason")
    replay = dlq_commands.add_parser("replay", help="publish dead letters back to the exchange")
    which = replay.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", action="append", dest="ids", help="a message id (repeatable)")
    which.add_argument("--all", action="store_true", help="every dead letter")
    args = parser.parse_args(argv)

    settings = load_settings(WorkerSettings)
    if args.command == "dlq":
        if args.dlq_command == "list":
            sys.exit(asyncio.run(list_dead_letters(settings, sys.stdout)))
        sys.exit(
            asyncio.run(
                replay_dead_letters(settings, None if args.all else set(args.ids), sys.stdout)
            )
        )

    configure_logging("relay-worker", settings.log_level, settings.log_format)
    configure_tracing(settings, "relay-worker")
    app = build_worker(settings)
    serve(
        app,
        settings,
        settings.worker_port,
        drain=app.state.drain,
        ready="ready: relay-worker on {url} (/healthz, /readyz, /metrics)",
    )


if __name__ == "__main__":
    main()

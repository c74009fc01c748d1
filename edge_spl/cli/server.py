"""`edge-spl server`: publish the model and prototype versions, merge device deltas."""
from __future__ import annotations

import signal

from edge_spl.server.service import Server


def run(args) -> int:
    server = Server(args.broker, args.model, args.state, fleet=args.fleet, merge_every=args.merge_every)

    # Ctrl-C / SIGTERM only ask the loop to stop; it finishes the pending round, publishes it and
    # disconnects cleanly (a KeyboardInterrupt could land in the middle of a store transaction).
    def on_signal(signum, frame):
        server.request_stop()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()   # logs "serving model X version V on HOST:PORT fleet F", then a line per version
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    return 0

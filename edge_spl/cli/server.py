"""`edge-spl server`: publish the model and prototype versions, merge device deltas."""
from __future__ import annotations

import logging
import signal

from edge_spl.errors import EdgeSplError
from edge_spl.mqtt_auth import MqttAuth
from edge_spl.server.service import Server

log = logging.getLogger("edge_spl.server")


def _signing_key(args):
    if not getattr(args, "signing_key", None):
        return None
    from edge_spl.signing import load_signing_key

    return load_signing_key(args.signing_key, "--signing-key")


def run(args) -> int:
    if getattr(args, "server_action", None) == "rollback":
        return rollback(args)
    signing_key = _signing_key(args)
    if signing_key is not None:
        log.info("signing releases with key %s", signing_key.key_id)
    server = Server(args.broker, args.model, args.state, fleet=args.fleet, merge_every=args.merge_every,
                    max_packet=args.max_packet, auth=MqttAuth.from_args(args), signing_key=signing_key,
                    merge_rule=args.merge, clip_norm=args.clip_norm, max_count=args.max_count,
                    connect_timeout=args.wait)

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
    if server.fatal:
        raise EdgeSplError(server.fatal)
    return 0


def rollback(args) -> int:
    """`edge-spl server rollback`: a new version with the prototypes of version --to."""
    from edge_spl.protocol import Topics
    from edge_spl.server.releases import release_payload
    from edge_spl.server.rollback import publish_release, roll_back

    Topics(args.fleet)   # a bad fleet name fails before anything is stored
    signing_key = _signing_key(args)           # likewise a bad key file
    auth = MqttAuth.from_args(args)
    if auth.given and not args.broker:
        raise EdgeSplError("--username and --tls-* need --broker")
    new, was, model, history = roll_back(args.model, args.state, args.to)
    print(f"stored version {new.version} in {args.state}: the prototypes of version {args.to} "
          f"(the latest was {was.version}); merged marks of {len(new.merged)} device{'' if len(new.merged) == 1 else 's'} kept")
    if not args.broker:
        print(f"not published (no --broker): the next `edge-spl server --state {args.state}` publishes it")
        return 0
    payload = release_payload(model, new, args.fleet, history, signing_key)
    host, port = args.broker
    try:
        publish_release(args.broker, args.fleet, model, payload, auth=auth, max_packet=args.max_packet)
    except EdgeSplError as e:
        raise EdgeSplError(f"version {new.version} is stored but not published ({e}); the next "
                           f"`edge-spl server --state {args.state}` publishes it") from None
    signed = f", signed by key {signing_key.key_id}" if signing_key is not None else ""
    print(f"published version {new.version} (retained) to {host}:{port} fleet {args.fleet}{signed}")
    return 0

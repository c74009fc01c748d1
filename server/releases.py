"""The release of a stored version, as the server publishes it (the running server and
`edge-spl server rollback` both make them here)."""
from __future__ import annotations

from edge_spl.files import sha256_hex
from edge_spl.manifest import ExportedModel
from edge_spl.protocol import DEFAULT_MAX_PAYLOAD, Release, Signer, encode_release

from .store import Store, StoredVersion


def history_of(store: Store) -> str:
    """The id of the store's version history: when its version 0 was made (hex microseconds).
    A server.db deleted or replaced starts a new history, which devices follow."""
    return f"{int(store.get(0).created * 1e6):x}"


def release_payload(model: ExportedModel, v: StoredVersion, fleet: str, history: str,
                    signer: Signer | None = None, max_bytes: int = DEFAULT_MAX_PAYLOAD) -> bytes:
    return encode_release(Release(v.version, model.manifest.onnx_sha256, v.protos, dict(v.merged), v.created,
                                  sha256_hex(model.manifest.to_json()), fleet, history), max_bytes, signer)

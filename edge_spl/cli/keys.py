"""`edge-spl keys`: make the Ed25519 key pair that signs releases."""
from __future__ import annotations

from edge_spl.signing import write_key_pair


def run(args) -> int:
    private_path, public_path = write_key_pair(args.out, force=args.force)
    from edge_spl.signing import load_verify_key

    key_id = load_verify_key(public_path).key_id
    print(f"wrote {private_path} (private, mode 0600: `edge-spl server --signing-key {private_path}`; "
          f"keep it on the server only)")
    print(f"wrote {public_path} (public, key {key_id}: `edge-spl device --verify-key {public_path}` on "
          f"every device)")
    return 0

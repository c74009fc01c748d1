"""Ed25519 keys for signed releases: the server signs every release with its private key
(`release.key`), devices check it with the public key (`release.pub`).

Key files are PEM (PKCS#8 for the private key, SubjectPublicKeyInfo for the public one), so
`openssl pkey` reads them too; the private key is written with mode 0600. What a signature covers
is the wire protocol's business (`edge_spl.protocol`): this module only makes, keeps and loads
keys, and signs and verifies bytes. `cryptography` is imported when a key is made or loaded, so
the core and an unsigned device never load it.
"""
from __future__ import annotations

import logging
import os
import stat

from .errors import EdgeSplError
from .files import atomic_write_bytes, sha256_hex

log = logging.getLogger("edge_spl.signing")

PRIVATE_KEY_FILE = "release.key"
PUBLIC_KEY_FILE = "release.pub"
SIGNATURE_BYTES = 64
MAX_KEY_FILE = 64 * 1024      # a PEM key is a few hundred bytes; anything bigger is not one


def _crypto():
    """The parts of `cryptography` this module uses, or a one-line error naming the extra."""
    try:
        from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise EdgeSplError("signed releases need the 'cryptography' package: pip install "
                           "'edge-spl[server]' (or 'edge-spl[device]')") from None
    return InvalidSignature, UnsupportedAlgorithm, serialization, ed25519


class VerifyKey:
    """An Ed25519 public key: checks signatures. `key_id` (16 hex digits of the sha256 of the raw
    key) names it in payloads and log lines."""

    def __init__(self, public_key):
        _, _, serialization, ed25519 = _crypto()
        if not isinstance(public_key, ed25519.Ed25519PublicKey):
            raise TypeError(f"expected an Ed25519PublicKey, got {type(public_key).__name__}")
        self._key = public_key
        raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.key_id = sha256_hex(raw)[:16]

    def verify(self, message: bytes, signature: bytes) -> bool:
        """True when `signature` is this key's signature of exactly `message`; any other
        signature (forged, of other bytes, truncated, not bytes at all) is False, never an error."""
        InvalidSignature, _, _, _ = _crypto()
        if not isinstance(signature, (bytes, bytearray)) or len(signature) != SIGNATURE_BYTES:
            return False
        if not isinstance(message, (bytes, bytearray, memoryview)):
            return False
        try:
            self._key.verify(bytes(signature), bytes(message))
        except InvalidSignature:
            return False
        return True

    def public_pem(self) -> bytes:
        _, _, serialization, _ = _crypto()
        return self._key.public_bytes(serialization.Encoding.PEM,
                                      serialization.PublicFormat.SubjectPublicKeyInfo)

    def __repr__(self) -> str:
        return f"VerifyKey({self.key_id})"


class SigningKey:
    """An Ed25519 private key: signs. Its public half is `.public`."""

    def __init__(self, private_key):
        _, _, _, ed25519 = _crypto()
        if not isinstance(private_key, ed25519.Ed25519PrivateKey):
            raise TypeError(f"expected an Ed25519PrivateKey, got {type(private_key).__name__}")
        self._key = private_key
        self.public = VerifyKey(private_key.public_key())

    @property
    def key_id(self) -> str:
        return self.public.key_id

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(bytes(message))

    def private_pem(self) -> bytes:
        _, _, serialization, _ = _crypto()
        return self._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())

    def __repr__(self) -> str:   # never the key itself
        return f"SigningKey({self.key_id})"


def generate_key() -> SigningKey:
    _, _, _, ed25519 = _crypto()
    return SigningKey(ed25519.Ed25519PrivateKey.generate())


def write_key_pair(folder: str, key: SigningKey | None = None, force: bool = False) -> tuple[str, str]:
    """Write FOLDER/release.key (mode 0600) and FOLDER/release.pub for `key` (default: a new one).
    Refuses to replace either file unless `force`: devices that trust the old public key would
    refuse every release signed by a new one. Returns the two paths."""
    private_path = os.path.join(folder, PRIVATE_KEY_FILE)
    public_path = os.path.join(folder, PUBLIC_KEY_FILE)
    if not force:
        for path in (private_path, public_path):
            if os.path.lexists(path):
                raise EdgeSplError(f"{path} exists; give --force to replace the key pair (devices that "
                                   f"trust the old {PUBLIC_KEY_FILE} then refuse new releases)")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise EdgeSplError(f"{folder} is a file, not a folder")
    key = key or generate_key()
    try:
        atomic_write_bytes(private_path, key.private_pem(), mode=0o600)
        atomic_write_bytes(public_path, key.public.public_pem())
    except OSError as e:
        raise EdgeSplError(f"{folder}: cannot write the key pair ({e.strerror or e})") from None
    return private_path, public_path


def _read_key_file(path: str, what: str) -> bytes:
    where = f"{what} {path}" if what else path
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_FILE + 1)
    except FileNotFoundError:
        raise EdgeSplError(f"{where}: no such file (`edge-spl keys --out DIR` makes a key pair)") from None
    except IsADirectoryError:
        raise EdgeSplError(f"{where} is a folder, not a key file") from None
    except OSError as e:
        raise EdgeSplError(f"{where}: cannot read ({e.strerror or e})") from None
    if len(data) > MAX_KEY_FILE:
        raise EdgeSplError(f"{where} is not a key file (over {MAX_KEY_FILE} bytes)")
    return data


def load_signing_key(path: str, what: str = "") -> SigningKey:
    """The private key in PEM file `path` (what the server signs with). `what` (an option name,
    e.g. "--signing-key") starts the error messages."""
    _, UnsupportedAlgorithm, serialization, ed25519 = _crypto()
    where = f"{what} {path}" if what else path
    data = _read_key_file(path, what)
    if b"PUBLIC KEY-----" in data and b"PRIVATE KEY-----" not in data:
        raise EdgeSplError(f"{where} holds a public key; the server signs with the private key "
                           f"({PRIVATE_KEY_FILE})")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:     # cryptography's word for "encrypted, and no password given"
        raise EdgeSplError(f"{where} is an encrypted key; edge-spl needs an unencrypted one "
                           f"(kept with mode 0600)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise EdgeSplError(f"{where} is not a PEM private key (`edge-spl keys` writes one: "
                           f"{PRIVATE_KEY_FILE})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise EdgeSplError(f"{where} is not an Ed25519 key ({type(key).__name__})")
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = 0
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s can be read by other users (mode %o); chmod 600 it", path, stat.S_IMODE(mode))
    return SigningKey(key)


def load_verify_key(path: str, what: str = "") -> VerifyKey:
    """The public key in PEM file `path` (what a device checks releases with)."""
    _, UnsupportedAlgorithm, serialization, ed25519 = _crypto()
    where = f"{what} {path}" if what else path
    data = _read_key_file(path, what)
    if b"PRIVATE KEY-----" in data:
        # refused rather than used: a private key on a device is one that can sign releases
        raise EdgeSplError(f"{where} holds a private key; devices get the public key "
                           f"({PUBLIC_KEY_FILE}), the private key stays on the server")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise EdgeSplError(f"{where} is not a PEM public key (`edge-spl keys` writes one: "
                           f"{PUBLIC_KEY_FILE})") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise EdgeSplError(f"{where} is not an Ed25519 key ({type(key).__name__})")
    return VerifyKey(key)

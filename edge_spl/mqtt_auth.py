"""How a device or the server identifies itself to the MQTT broker: user name and password, TLS.

`MqttAuth` holds the options of `--username`, `--password-file` (or $EDGE_SPL_MQTT_PASSWORD) and
`--tls-ca`/`--tls-cert`/`--tls-key`; `apply()` sets them on the caller's paho client, so this
module never imports paho. Every file is read and checked when the options are built, so a bad
path fails at start with one line, not on the first reconnect. There is no "insecure" TLS: the
broker's certificate is always verified, host name included. docs/mosquitto.md sets up a broker
to match.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from .errors import EdgeSplError

PASSWORD_ENV = "EDGE_SPL_MQTT_PASSWORD"
MAX_FIELD_BYTES = 65535      # MQTT strings and binary fields carry a 16-bit length


@dataclass(frozen=True)
class MqttAuth:
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls_ca: str | None = None       # PEM file of the CA that signed the broker's certificate
    tls_cert: str | None = None     # client certificate (PEM), for brokers that require one
    tls_key: str | None = None      # its private key (PEM, not encrypted)

    def __post_init__(self):
        if self.username is not None:
            if not self.username or len(self.username.encode("utf-8", "replace")) > MAX_FIELD_BYTES:
                raise EdgeSplError(f"--username {self.username!r}: expected 1 to {MAX_FIELD_BYTES} bytes")
        if self.password is not None:
            if self.username is None:
                raise EdgeSplError("a password needs --username (MQTT 3.1.1 sends none without one)")
            if len(self.password.encode("utf-8", "replace")) > MAX_FIELD_BYTES:
                raise EdgeSplError(f"the password is over {MAX_FIELD_BYTES} bytes")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise EdgeSplError("--tls-cert and --tls-key go together (a client certificate and its key)")
        if self.tls_cert is not None and self.tls_ca is None:
            raise EdgeSplError("--tls-cert needs --tls-ca (the CA that signed the broker's certificate)")

    @classmethod
    def from_args(cls, args, environ=os.environ) -> "MqttAuth":
        """From the options `add_broker_auth` (edge_spl.cli) adds; checks every file now."""
        username = getattr(args, "username", None)
        password_file = getattr(args, "password_file", None)
        if password_file is not None:
            if username is None:
                raise EdgeSplError("--password-file needs --username")
            password = read_password(password_file)
        elif environ.get(PASSWORD_ENV) and username is not None:
            # without a user name it means nothing (it may be set for a whole service unit)
            password = environ[PASSWORD_ENV]
        else:
            password = None
        auth = cls(username, password, getattr(args, "tls_ca", None), getattr(args, "tls_cert", None),
                   getattr(args, "tls_key", None))
        if auth.tls:
            auth.ssl_context()   # reads and checks the PEM files
        return auth

    @property
    def tls(self) -> bool:
        return self.tls_ca is not None

    @property
    def given(self) -> bool:
        """Whether any option was given (they mean nothing without a broker)."""
        return self.username is not None or self.tls

    def ssl_context(self):
        """A client context that verifies the broker's certificate and host name (TLS 1.2+)."""
        import ssl

        files = (("--tls-ca", self.tls_ca), ("--tls-cert", self.tls_cert), ("--tls-key", self.tls_key))
        for flag, path in files:
            if path is not None and not os.path.isfile(path):
                raise EdgeSplError(f"{flag} {path}: no such file")
        try:
            ctx = ssl.create_default_context(cafile=self.tls_ca)
        except OSError as e:   # ssl.SSLError is an OSError too
            raise EdgeSplError(f"--tls-ca {self.tls_ca}: {_why(e, 'not a PEM CA certificate')}") from None
        if self.tls_cert is not None:
            try:
                ctx.load_cert_chain(self.tls_cert, self.tls_key, password=_no_passphrase)
            except _PassphraseNeeded:
                raise EdgeSplError(f"--tls-key {self.tls_key}: the key is encrypted; give it without "
                                   f"a passphrase (openssl pkey -in KEY -out KEY.plain)") from None
            except OSError as e:
                raise EdgeSplError(f"--tls-cert {self.tls_cert} / --tls-key {self.tls_key}: "
                                   f"{_why(e, 'not a PEM certificate and its key')}") from None
        return ctx

    def apply(self, client) -> None:
        """Set user name, password and TLS on a paho-mqtt Client (before it connects)."""
        if self.username is not None:
            client.username_pw_set(self.username, self.password)
        if self.tls:
            client.tls_set_context(self.ssl_context())


def read_password(path: str) -> str:
    """The whole file less its trailing line break: a password never sits on a command line,
    where `ps` and the shell history would show it."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FIELD_BYTES + 3)
    except OSError as e:
        raise EdgeSplError(f"--password-file {path}: cannot read it ({e.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise EdgeSplError(f"--password-file {path}: not UTF-8 text") from None
    text = text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text
    if not text:
        raise EdgeSplError(f"--password-file {path} is empty")
    return text


def connect_error(e: BaseException, tls: bool) -> tuple[str, bool]:
    """(one line, permanent) for an exception of paho's connect(). A failed TLS handshake (a
    certificate the CA did not sign, another host name, TLS to a plain port) does not heal by
    retrying: the caller gives up at once."""
    import ssl

    if tls and isinstance(e, ConnectionResetError):
        # the TCP connection stood, so this is the handshake: a plain MQTT port hangs up on it
        return "TLS handshake failed: the broker hung up (does that port speak TLS?)", True
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"TLS handshake failed: certificate verify failed: {e.verify_message}", True
    if isinstance(e, ssl.SSLError):
        return f"TLS handshake failed: {_why(e, 'error')} (does that port speak TLS?)", True
    return str(getattr(e, "strerror", None) or e), False


def refusal(reason_code) -> str:
    """A CONNACK refusal as one line, with what to check for the two that are about credentials."""
    text = str(reason_code).lower()
    if text in ("not authorized", "bad user name or password"):
        text += " (check --username and --password-file)"
    return text


class _PassphraseNeeded(Exception):
    pass


def _no_passphrase():
    # without a callback OpenSSL would prompt on the terminal and hang a service
    raise _PassphraseNeeded


def _why(e: OSError, fallback: str) -> str:
    """OpenSSL's message without its "[X509: CODE]" prefix and "(_ssl.c:NNN)" suffix."""
    text = e.strerror if isinstance(e.strerror, str) else str(e)
    text = re.sub(r"\s*\(_ssl\.c:\d+\)$", "", re.sub(r"^\[[A-Z0-9_]+: [A-Z0-9_]+\]\s*", "", text))
    return text or fallback

"""User-facing errors. The CLI prints any EdgeSplError as one line and exits non-zero."""


class EdgeSplError(Exception):
    """A problem the user can fix (bad file, bad argument, unreachable broker)."""


class DataError(EdgeSplError):
    """Input data that cannot be read or does not fit the model."""


class ModelError(EdgeSplError):
    """A model directory or state file that is missing, corrupt or inconsistent."""


class ProtocolError(EdgeSplError):
    """A wire payload that is malformed, oversized, of an unknown version or fails its checksum."""

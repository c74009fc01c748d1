"""edge-spl: Sparse ProtoLinear models, adapted on the device with Forward-Forward, synced over MQTT.

The core (this package without its role sub-packages) imports no role: SPL math (`spl`),
model state (`model`), data sources (`data`) and the wire protocol (`protocol`).
Roles install as `edge_spl.export`, `edge_spl.device` and `edge_spl.server`.
"""
import os as _os

__version__ = "0.1.0"

# In a source checkout the role folders (export/, device/, server/) sit beside this package
# instead of inside it; let `edge_spl.device` etc. resolve there too (an installed copy has them
# inside, and then this does nothing).
_here = _os.path.dirname(_os.path.abspath(__file__))
_root = _os.path.dirname(_here)
if not _os.path.isdir(_os.path.join(_here, "device")) and _os.path.isfile(
    _os.path.join(_root, "pyproject.toml")
):
    __path__.append(_root)  # noqa: F821 (package __path__)

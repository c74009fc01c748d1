"""The manifest that travels with an exported model, and the ONNX graph's naming contract.

ONNX contract (opset OPSET), all float32:
    inputs   x [N, d_in] (standardised, clipped), and for every layer i: P{i} [d_out, d_in], g{i} [d_out]
    outputs  logits [N, n_classes];
             h{i} [N, d_in of layer i] for i >= 1 (the input each later layer sees; h0 is x;
                  the head's is [x, last hidden output], times the head's whitening T when the
                  model has one: T is an initializer, and P of the head is in its coordinates);
             r{i} [N, d_out] routing of each hidden layer i (the head's routing is the logits)
W, b and T are baked in as initializers; P and g are fed on every call so the device's adapted
arrays take effect at once, with no re-export and no session rebuild.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import numpy as np

from .errors import ModelError
from .files import atomic_write_bytes, pack_arrays, sha256_file, sha256_hex, unpack_arrays
from .model import META_FILE
from .spl import Z_CLIP, layer_dims

FORMAT = 2   # 2: the head sees [z, h] (edge_spl.spl)
OPSET = 17
MANIFEST_FILE = "manifest.json"
ONNX_FILE = "model.onnx"
PROTOTYPES_FILE = "prototypes.npz"


def input_names(n_layers: int) -> list[str]:
    return ["x"] + [f"{k}{i}" for i in range(n_layers) for k in ("P", "g")]


def output_names(n_layers: int) -> list[str]:
    return (["logits"] + [f"h{i}" for i in range(1, n_layers)]
            + [f"r{i}" for i in range(n_layers - 1)])


@dataclass
class Manifest:
    model_id: str
    sizes: list[int]
    class_names: list[str]
    feature_names: list[str]
    mean: list[float]
    std: list[float]
    onnx_sha256: str
    prototypes_sha256: str
    z_clip: float = Z_CLIP
    opset: int = OPSET
    format: int = FORMAT
    dtype: str = "float32"

    @property
    def n_layers(self) -> int:
        return len(self.sizes) - 1

    def proto_shapes(self) -> list[tuple[tuple[int, int], tuple[int]]]:
        return [((o, i), (o,)) for i, o in layer_dims(self.sizes)]

    def validate(self) -> "Manifest":
        """Every field checked for type and range: a manifest may come from the network, and
        whatever passes here is fed to onnxruntime and the kernels as float32."""
        if self.format != FORMAT:
            raise ModelError(f"manifest format {self.format!r}, this edge-spl reads {FORMAT}")
        if (not isinstance(self.sizes, list) or len(self.sizes) < 2 or len(self.sizes) > 65
                or any(not _is_int(s) or s < 1 for s in self.sizes)):
            raise ModelError(f"manifest sizes {self.sizes!r} are not layer widths")
        for name in ("feature_names", "class_names", "mean", "std"):
            if not isinstance(getattr(self, name), list):
                raise ModelError(f"manifest: {name} is not a list")
        d, c = self.sizes[0], self.sizes[-1]
        if len(self.feature_names) != d or len(self.mean) != d or len(self.std) != d:
            raise ModelError(f"manifest: {d} inputs but {len(self.feature_names)} feature names, "
                             f"{len(self.mean)} means, {len(self.std)} stds")
        if len(self.class_names) != c:
            raise ModelError(f"manifest: {c} outputs but {len(self.class_names)} class names")
        for name in ("feature_names", "class_names"):
            names = getattr(self, name)
            if not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
                raise ModelError(f"manifest: {name} must be distinct strings")
        if not all(_is_number(v) for v in self.mean + self.std):
            raise ModelError("manifest: mean and std must be numbers")
        # as float32, which is what the device computes with: 1e39 is inf there, 1e-50 is 0
        mean, std = np.asarray(self.mean, np.float64), np.asarray(self.std, np.float64)
        # (the device keeps std^2 as its running variance: that must be a float32 too)
        if not (np.all(np.abs(mean) <= _F32_MAX) and np.all(std * std <= _F32_MAX)
                and np.all(std.astype(np.float32) > 0)):
            raise ModelError("manifest: standardisation must be finite float32 values with positive stds "
                             "whose squares are float32 too")
        if not _is_number(self.z_clip) or not 0 < self.z_clip <= _F32_MAX:
            raise ModelError(f"manifest: z_clip {self.z_clip!r} must be a positive number")
        if not _is_int(self.opset) or self.dtype != "float32":
            raise ModelError(f"manifest: opset {self.opset!r} and dtype {self.dtype!r}; expected an "
                             f"opset number and float32")
        if not isinstance(self.model_id, str) or not all(
                isinstance(h, str) for h in (self.onnx_sha256, self.prototypes_sha256)):
            raise ModelError("manifest: model_id and sha256 fields must be strings")
        return self

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> "Manifest":
        try:
            obj = json.loads(data)
            if not isinstance(obj, dict):
                raise TypeError("not an object")
            return cls(**obj).validate()
        except (ValueError, TypeError, RecursionError) as e:
            raise ModelError(f"invalid manifest ({type(e).__name__}: {str(e)[:120]})") from None

    def check_prototypes(self, protos) -> None:
        if len(protos) != self.n_layers:
            raise ModelError(f"{len(protos)} prototype layers, model has {self.n_layers}")
        for i, ((P, g), (ps, gs)) in enumerate(zip(protos, self.proto_shapes())):
            if P.shape != ps or g.shape != gs:
                raise ModelError(f"layer {i}: P{P.shape} g{g.shape}, model wants P{ps} g{gs}")
            if not (np.all(np.isfinite(P)) and np.all(np.isfinite(g))):
                raise ModelError(f"layer {i}: prototypes or gates hold NaN or infinite values")
            if not proto_values_ok(P, g):
                raise ModelError(f"layer {i}: prototype or gate values beyond +-{MAX_PROTO_ABS:g}")


def protos_to_arrays(protos) -> dict[str, np.ndarray]:
    out = {}
    for i, (P, g) in enumerate(protos):
        out[f"P{i}"], out[f"g{i}"] = P, g
    return out


def protos_from_arrays(arrays: dict, n_layers: int) -> list[tuple[np.ndarray, np.ndarray]]:
    try:
        return [(np.ascontiguousarray(arrays[f"P{i}"], np.float32),
                 np.ascontiguousarray(arrays[f"g{i}"], np.float32)) for i in range(n_layers)]
    except KeyError as e:
        raise ModelError(f"prototype array {e} missing") from None
    except (ValueError, TypeError) as e:
        raise ModelError(f"prototype arrays are not numbers ({e})") from None


_F32_MAX = float(np.finfo(np.float32).max)
# Prototype and gate values past this are no model but an overflow waiting to happen: the
# routing sums d_in products with inputs up to z_clip, and float32 ends at 3e38.
MAX_PROTO_ABS = 1e15


def proto_values_ok(P: np.ndarray, g: np.ndarray) -> bool:
    """Finite and within +-MAX_PROTO_ABS (NaN fails too)."""
    return bool(np.all(np.abs(P) <= MAX_PROTO_ABS) and np.all(np.abs(g) <= MAX_PROTO_ABS))


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)


@dataclass
class ExportedModel:
    """What the device runs: manifest, ONNX bytes and the prototypes it was exported with."""
    manifest: Manifest
    onnx_bytes: bytes
    protos: list[tuple[np.ndarray, np.ndarray]]

    @classmethod
    def load(cls, model_dir: str) -> "ExportedModel":
        check_export_dir(model_dir)
        paths = {n: os.path.join(model_dir, n) for n in (MANIFEST_FILE, ONNX_FILE, PROTOTYPES_FILE)}
        try:
            data = {n: _read(p) for n, p in paths.items()}
        except OSError as e:
            raise ModelError(f"{e.filename}: cannot read ({e.strerror})") from None
        try:
            manifest = Manifest.from_json(data[MANIFEST_FILE])
        except ModelError as e:
            raise ModelError(f"{paths[MANIFEST_FILE]}: {e}") from None
        if sha256_hex(data[ONNX_FILE]) != manifest.onnx_sha256:
            raise ModelError(f"{paths[ONNX_FILE]} does not match the manifest's sha256")
        if sha256_hex(data[PROTOTYPES_FILE]) != manifest.prototypes_sha256:
            raise ModelError(f"{paths[PROTOTYPES_FILE]} does not match the manifest's sha256")
        try:
            protos = protos_from_arrays(unpack_arrays(data[PROTOTYPES_FILE]), manifest.n_layers)
            manifest.check_prototypes(protos)
        except (ValueError, ModelError) as e:
            raise ModelError(f"{paths[PROTOTYPES_FILE]}: {e}") from None
        return cls(manifest, data[ONNX_FILE], protos)

    def save(self, model_dir: str) -> None:
        """Writes the ONNX file and prototypes first, the manifest (which names their sha256) last."""
        atomic_write_bytes(os.path.join(model_dir, ONNX_FILE), self.onnx_bytes)
        atomic_write_bytes(os.path.join(model_dir, PROTOTYPES_FILE), pack_arrays(protos_to_arrays(self.protos)))
        self.manifest.onnx_sha256 = sha256_file(os.path.join(model_dir, ONNX_FILE))
        self.manifest.prototypes_sha256 = sha256_file(os.path.join(model_dir, PROTOTYPES_FILE))
        atomic_write_bytes(os.path.join(model_dir, MANIFEST_FILE), self.manifest.to_json())


def check_export_dir(model_dir: str) -> None:
    """A one-line error for a folder that holds no export, saying what to give instead."""
    if not os.path.isdir(model_dir):
        raise ModelError(f"{model_dir}: no such folder; expected a model folder made by `edge-spl train` "
                         f"and `edge-spl export`")
    missing = [n for n in (MANIFEST_FILE, ONNX_FILE, PROTOTYPES_FILE) if not os.path.isfile(os.path.join(model_dir, n))]
    if not missing:
        return
    if os.path.isfile(os.path.join(model_dir, META_FILE)):
        hint = f"run `edge-spl export {model_dir}` first"
    elif os.path.isfile(os.path.join(model_dir, "server.db")):   # server.store.DB_FILE
        hint = "this is a server's --state folder: give the model folder the server runs (its --model)"
    else:
        hint = "expected a model folder made by `edge-spl train` and `edge-spl export`"
    raise ModelError(f"{model_dir}: no {missing[0]}; {hint}")


def remove_export(folder: str) -> list[str]:
    """Remove an export (manifest first, so no half export loads); returns the names removed.
    An export left beside a retrained model would be served as if it were the new one (its
    manifest and ONNX agree with each other), and one that failed its check must not be used."""
    gone = []
    for name in (MANIFEST_FILE, ONNX_FILE, PROTOTYPES_FILE):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            os.unlink(path)
            gone.append(name)
    return gone


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()

"""The manifest that travels with an exported model, and the ONNX graph's naming contract.

ONNX contract (opset OPSET), all float32:
    inputs   x [N, d_in] (standardised, clipped), and for every layer i: P{i} [d_out, d_in], g{i} [d_out]
    outputs  logits [N, n_classes];
             h{i} [N, d_in of layer i] for i >= 1 (the input each later layer sees; h0 is x);
             r{i} [N, d_out] routing of each hidden layer i (the head's routing is the logits)
W and b are baked in as initializers; P and g are fed on every call so the device's adapted
arrays take effect at once, with no re-export and no session rebuild.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import numpy as np

from .errors import ModelError
from .files import atomic_write_bytes, pack_arrays, sha256_file, unpack_arrays
from .spl import Z_CLIP

FORMAT = 1
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
        return [((o, i), (o,)) for i, o in zip(self.sizes[:-1], self.sizes[1:])]

    def validate(self) -> "Manifest":
        if self.format != FORMAT:
            raise ModelError(f"manifest format {self.format}, this edge-spl reads {FORMAT}")
        if len(self.sizes) < 2 or any(not isinstance(s, int) or s < 1 for s in self.sizes):
            raise ModelError(f"manifest sizes {self.sizes} are not layer widths")
        d, c = self.sizes[0], self.sizes[-1]
        if len(self.feature_names) != d or len(self.mean) != d or len(self.std) != d:
            raise ModelError(f"manifest: {d} inputs but {len(self.feature_names)} feature names, "
                             f"{len(self.mean)} means, {len(self.std)} stds")
        if len(self.class_names) != c:
            raise ModelError(f"manifest: {c} outputs but {len(self.class_names)} class names")
        if not all(np.isfinite(self.mean)) or not all(s > 0 for s in self.std):
            raise ModelError("manifest: standardisation must be finite with positive stds")
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
        except (ValueError, TypeError) as e:
            raise ModelError(f"invalid manifest ({e})") from None

    def check_prototypes(self, protos) -> None:
        if len(protos) != self.n_layers:
            raise ModelError(f"{len(protos)} prototype layers, model has {self.n_layers}")
        for i, ((P, g), (ps, gs)) in enumerate(zip(protos, self.proto_shapes())):
            if P.shape != ps or g.shape != gs:
                raise ModelError(f"layer {i}: P{P.shape} g{g.shape}, model wants P{ps} g{gs}")


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


@dataclass
class ExportedModel:
    """What the device runs: manifest, ONNX bytes and the prototypes it was exported with."""
    manifest: Manifest
    onnx_bytes: bytes
    protos: list[tuple[np.ndarray, np.ndarray]]

    @classmethod
    def load(cls, model_dir: str) -> "ExportedModel":
        paths = {n: os.path.join(model_dir, n) for n in (MANIFEST_FILE, ONNX_FILE, PROTOTYPES_FILE)}
        for p in paths.values():
            if not os.path.isfile(p):
                raise ModelError(f"{p} not found: run `edge-spl export {model_dir}` first")
        with open(paths[MANIFEST_FILE], "rb") as f:
            manifest = Manifest.from_json(f.read())
        if sha256_file(paths[ONNX_FILE]) != manifest.onnx_sha256:
            raise ModelError(f"{paths[ONNX_FILE]} does not match the manifest's sha256")
        if sha256_file(paths[PROTOTYPES_FILE]) != manifest.prototypes_sha256:
            raise ModelError(f"{paths[PROTOTYPES_FILE]} does not match the manifest's sha256")
        with open(paths[ONNX_FILE], "rb") as f:
            onnx_bytes = f.read()
        with open(paths[PROTOTYPES_FILE], "rb") as f:
            try:
                protos = protos_from_arrays(unpack_arrays(f.read()), manifest.n_layers)
            except ValueError as e:
                raise ModelError(f"{paths[PROTOTYPES_FILE]}: {e}") from None
        manifest.check_prototypes(protos)
        return cls(manifest, onnx_bytes, protos)

    def save(self, model_dir: str) -> None:
        """Writes the ONNX file and prototypes first, the manifest (which names their sha256) last."""
        atomic_write_bytes(os.path.join(model_dir, ONNX_FILE), self.onnx_bytes)
        atomic_write_bytes(os.path.join(model_dir, PROTOTYPES_FILE), pack_arrays(protos_to_arrays(self.protos)))
        self.manifest.onnx_sha256 = sha256_file(os.path.join(model_dir, ONNX_FILE))
        self.manifest.prototypes_sha256 = sha256_file(os.path.join(model_dir, PROTOTYPES_FILE))
        atomic_write_bytes(os.path.join(model_dir, MANIFEST_FILE), self.manifest.to_json())

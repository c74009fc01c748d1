"""Model state: every layer's W, b, P, g, the input standardisation, class and feature names.

On disk a model directory holds `model.npz` (arrays, no pickle) and `model.json` (metadata and the
sha256 of `model.npz`). Export adds `model.onnx` and `manifest.json`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

from .errors import ModelError
from .files import atomic_write_bytes, pack_arrays, sha256_file, unpack_arrays
from .spl import WHITEN_SHRINK, forward, head_whitening, layer_dims, standardize

FORMAT = 3   # 2: the head sees [z, h]; 3: and may whiten it with T (edge_spl.spl)
READS = (2, 3)
STATE_FILE = "model.npz"
META_FILE = "model.json"


@dataclass
class ModelState:
    """A trained SPL model. `layers[:-1]` are hidden SPL layers (W, b, P, g), `layers[-1]` is the
    prototype head (P, g, and T when it whitens its input). All arrays float32, C-contiguous."""

    layers: list[dict[str, np.ndarray]]
    mean: np.ndarray
    std: np.ndarray
    class_names: list[str]
    feature_names: list[str]
    model_id: str = "model"
    version: int = 0
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        self.layers = [{k: np.ascontiguousarray(v, np.float32) for k, v in L.items()} for L in self.layers]
        self.mean = np.ascontiguousarray(self.mean, np.float32)
        self.std = np.ascontiguousarray(self.std, np.float32)
        self.validate()

    @property
    def sizes(self) -> list[int]:
        """[d_in, hidden..., n_classes]"""
        return [self.layers[0]["P"].shape[1]] + [L["P"].shape[0] for L in self.layers]

    def validate(self) -> None:
        if not self.layers:
            raise ModelError("model has no layers")
        d = d_in = self.mean.shape[0]
        if self.std.shape != (d,) or not np.all(self.std > 0):
            raise ModelError(f"standardisation must be {d} positive stds, got shape {self.std.shape}")
        if not (np.all(np.isfinite(self.mean)) and np.all(np.isfinite(self.std))):
            raise ModelError("standardisation holds NaN or infinite values")
        if len(self.feature_names) != d:
            raise ModelError(f"{len(self.feature_names)} feature names for {d} inputs")
        for i, L in enumerate(self.layers):
            head = i == len(self.layers) - 1
            want = {"P", "g"} if head else {"W", "b", "P", "g"}
            if head and "T" in L and len(self.layers) > 1:
                want.add("T")   # whitening needs the head's input as a graph output: hidden layers
            if set(L) != want:
                raise ModelError(f"layer {i} has arrays {sorted(L)}, expected {sorted(want)}")
            d_out, d_takes = L["P"].shape
            if head and len(self.layers) > 1:
                d += d_in   # the head also sees the model's input (skip connection)
            if d_takes != d:
                raise ModelError(f"layer {i} takes {d_takes} inputs, expected {d}")
            d_in_layer = d_takes
            shapes = {"P": (d_out, d_in_layer), "g": (d_out,), "W": (d_out, d_in_layer), "b": (d_out,),
                      "T": (d_in_layer, d_in_layer)}
            for k, a in L.items():
                if a.shape != shapes[k]:
                    raise ModelError(f"layer {i} {k} has shape {a.shape}, expected {shapes[k]}")
                if not np.all(np.isfinite(a)):
                    raise ModelError(f"layer {i} {k} has non-finite values")
            if "T" in L and not _is_whitening(L["T"]):
                raise ModelError(f"layer {i} T is not a whitening (a symmetric positive definite matrix)")
            d = d_out
        if d != len(self.class_names):
            raise ModelError(f"head has {d} outputs for {len(self.class_names)} class names")

    def prototypes(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """The adaptable part: (P, g) per layer, copied."""
        return [(L["P"].copy(), L["g"].copy()) for L in self.layers]

    def with_prototypes(self, protos) -> "ModelState":
        layers = [dict(L) for L in self.layers]
        for L, (P, g) in zip(layers, protos):
            L["P"], L["g"] = P, g
        return ModelState(layers, self.mean, self.std, self.class_names, self.feature_names,
                          self.model_id, self.version, dict(self.info))

    def with_whitened_head(self, z: np.ndarray, y: np.ndarray, shrink: float = WHITEN_SHRINK) -> "ModelState":
        """The same function with a whitened head (edge_spl.spl): T from the head's inputs on the
        standardised training rows z with labels y, and the head's P re-expressed in T's
        coordinates (P A^(1/2)), so every logit stays as it was up to float32 rounding. A head
        that already whitens is whitened again on top. Needs hidden layers, and rows that vary
        within their classes (ModelError otherwise, saying which)."""
        if len(self.layers) < 2:
            raise ModelError("a head without hidden layers reads x directly and cannot whiten")
        _, hs, _ = forward(self.layers, z)
        whitening = head_whitening(hs[-1], y, shrink)
        if whitening is None:
            raise ModelError("the head's inputs hardly vary within classes: there is nothing to whiten by")
        T, T_inv = whitening
        head = dict(self.layers[-1])
        old = head.get("T")
        head["P"] = (head["P"].astype(np.float64) @ T_inv).astype(np.float32)
        head["T"] = (T if old is None else old.astype(np.float64) @ T).astype(np.float32)
        return ModelState(self.layers[:-1] + [head], self.mean, self.std, self.class_names,
                          self.feature_names, self.model_id, self.version, dict(self.info))

    def predict_logits(self, x_raw: np.ndarray) -> np.ndarray:
        """Raw feature rows in, logits out (numpy reference path)."""
        return forward(self.layers, standardize(x_raw, self.mean, self.std))[0]

    # -- files ---------------------------------------------------------------------------------

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"mean": self.mean, "std": self.std}
        for i, L in enumerate(self.layers):
            for k, a in L.items():
                out[f"{k}{i}"] = a
        return out

    def save(self, model_dir: str | os.PathLike) -> None:
        os.makedirs(model_dir, exist_ok=True)
        atomic_write_bytes(os.path.join(model_dir, STATE_FILE), pack_arrays(self.arrays()))
        meta = {
            "format": FORMAT,
            "model_id": self.model_id,
            "version": self.version,
            "sizes": self.sizes,
            "class_names": self.class_names,
            "feature_names": self.feature_names,
            "sha256": sha256_file(os.path.join(model_dir, STATE_FILE)),
            "info": self.info,
        }
        atomic_write_bytes(os.path.join(model_dir, META_FILE), json.dumps(meta, indent=2).encode())

    @classmethod
    def load(cls, model_dir: str | os.PathLike) -> "ModelState":
        meta_path = os.path.join(model_dir, META_FILE)
        state_path = os.path.join(model_dir, STATE_FILE)
        for p in (meta_path, state_path):
            if not os.path.isfile(p):
                raise ModelError(f"{p} not found: is {model_dir} a model directory made by `edge-spl train`?")
        try:
            with open(meta_path, encoding="utf-8") as f:
                meta = json.load(f)
            if not isinstance(meta, dict):
                raise ModelError(f"{meta_path}: not a JSON object")
            if meta.get("format") not in READS:
                raise ModelError(f"{meta_path}: format {meta.get('format')!r}, this edge-spl reads "
                                 f"{' and '.join(map(str, READS))}")
            if sha256_file(state_path) != meta["sha256"]:
                raise ModelError(f"{state_path} does not match the sha256 in {META_FILE} (corrupt or replaced)")
            with open(state_path, "rb") as f:
                arrays = unpack_arrays(f.read())
            sizes, names = meta["sizes"], (meta["class_names"], meta["feature_names"])
            if not isinstance(sizes, list) or not 2 <= len(sizes) <= 65 or not all(
                    isinstance(n, list) and all(isinstance(v, str) for v in n) for n in names):
                raise ModelError(f"{meta_path}: sizes, class_names and feature_names must be lists "
                                 f"(of layer widths and of names)")
            n_layers = len(sizes) - 1
            head_keys = ("P", "g", "T") if meta["format"] >= 3 and f"T{n_layers - 1}" in arrays else ("P", "g")
            keys = [("W", "b", "P", "g")] * (n_layers - 1) + [head_keys]
            layers = [{k: arrays[f"{k}{i}"] for k in ks} for i, ks in enumerate(keys)]
            extra = set(arrays) - {"mean", "std"} - {f"{k}{i}" for i, ks in enumerate(keys) for k in ks}
            if extra:
                raise ModelError(f"{state_path} holds arrays {sorted(extra)} that a format {meta['format']} "
                                 f"{'-'.join(map(str, sizes))} model does not have")
            return cls(layers, arrays["mean"], arrays["std"], list(meta["class_names"]),
                       list(meta["feature_names"]), meta.get("model_id", "model"),
                       int(meta.get("version", 0)), dict(meta.get("info", {})))
        except ModelError:
            raise
        except OSError as e:
            raise ModelError(f"{e.filename or model_dir}: cannot read ({e.strerror})") from None
        except (ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError) as e:
            raise ModelError(f"{model_dir}: unreadable model ({type(e).__name__}: {str(e)[:120]})") from None


def _is_whitening(T: np.ndarray) -> bool:
    """Symmetric (to float32 rounding) and positive definite, as head_whitening makes it."""
    T = T.astype(np.float64)
    if not np.allclose(T, T.T, rtol=1e-5, atol=1e-6 * np.max(np.abs(T))):
        return False
    try:
        np.linalg.cholesky(T)
    except np.linalg.LinAlgError:
        return False
    return True


def init_model(sizes: list[int], mean, std, class_names, feature_names, seed: int = 0,
               model_id: str = "model") -> ModelState:
    """A freshly initialised model of the given sizes [d_in, hidden..., n_classes]."""
    rng = np.random.default_rng(seed)
    layers = []
    for i, (d_in, d_out) in enumerate(layer_dims(sizes)):
        P = rng.standard_normal((d_out, d_in)).astype(np.float32)
        P /= np.linalg.norm(P, axis=1, keepdims=True) / np.sqrt(d_in)
        g = np.zeros(d_out, np.float32)
        if i == len(sizes) - 2:
            layers.append({"P": P * 0.1, "g": g})
        else:
            W = (rng.standard_normal((d_out, d_in)) * np.sqrt(2.0 / d_in)).astype(np.float32)
            layers.append({"W": W, "b": np.zeros(d_out, np.float32), "P": P, "g": g})
    return ModelState(layers, mean, std, list(class_names), list(feature_names), model_id)

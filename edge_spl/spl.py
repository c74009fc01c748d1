"""The SPL math in numpy: the single reference every other implementation is tested against.

A model is a stack of hidden SPL layers followed by a prototype head.

Hidden SPL layer (d_in -> d_out), parameters W (d_out x d_in), b (d_out), P (d_out x d_in), g (d_out):
    routing = x P^T / sqrt(d_in) - g
    mask    = routing > 0                    (hard, all-or-nothing)
    out     = silu(x W^T + b) * mask  [+ x * (1 - mask) when d_in == d_out]

Prototype head, parameters P (C x d_head), g (C), on the last hidden output h *and* the model's
standardised input z (a skip connection), u = [z, h], d_head = d_in + d_last:
    logits  = u P^T / sqrt(d_head) - g       (the head's routing is the class score)
The skip lets the device's head re-weight raw inputs when drift makes them more telling than the
frozen hidden features (gas drift, all labels: 94.9 -> 96.0 % prequential accuracy).

Whitened head (optional, what `edge-spl train` makes): a fixed symmetric matrix T (d_head x d_head)
turns u into u T before the head, and P lives in those coordinates:
    logits  = (u T) P^T / sqrt(d_head) - g
T = A^(-1/2), A the within-class covariance of u on the training data, shrunk towards its mean
variance (head_whitening). For the pretrained function nothing changes (P is re-expressed as
P A^(1/2)); what changes is the device's head step, which works coordinate by coordinate (RMS
scaling), and does far better on decorrelated coordinates of unit within-class spread: gas drift,
shuffled, all labels 96.9 -> 98.3 %, 5 % labels 89.9 -> 91.2 % (edge-spl bench adapt;
docs/pretraining.md).

Gates are used as they are; the reference code divided g by the layer's max |g|, which makes
a gate's effect depend on every other gate and gives a local learner a moving target.
"""
from __future__ import annotations

import numpy as np

Z_CLIP = 10.0  # standardised inputs are clipped to +-Z_CLIP (extreme sensor outliers; FINDINGS.md)
# head_whitening's shrinkage of the within-class covariance towards its mean variance: on gas
# drift 1e-4 .. 1e-3 all beat no whitening, 3e-4 best with all labels (docs/pretraining.md)
WHITEN_SHRINK = 3e-4
WHITEN_MIN_SPREAD = 1e-6   # head_whitening: the least within-class share of the spread it whitens


def silu(z: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):   # exp(-z) overflows to inf for z << 0; z/inf = -0 is right
        return z / (1.0 + np.exp(-z))


def routing(x: np.ndarray, P: np.ndarray, g: np.ndarray) -> np.ndarray:
    """match - g, for a batch x (n x d_in)."""
    return (x @ P.T) / np.sqrt(P.shape[1], dtype=x.dtype) - g


def spl_forward(x, W, b, P, g):
    """Hidden SPL layer. Returns (out, routing)."""
    r = routing(x, P, g)
    mask = (r > 0).astype(x.dtype)
    out = silu(x @ W.T + b) * mask
    if W.shape[0] == W.shape[1]:
        out = out + x * (1.0 - mask)
    return out, r


def standardize(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    z = (np.asarray(x, np.float32) - mean) / std
    return np.clip(z, -Z_CLIP, Z_CLIP).astype(np.float32)


def layer_dims(sizes) -> list[tuple[int, int]]:
    """(d_in, d_out) of every layer of a model of widths [d_in, hidden..., n_classes]; the head
    takes [z, h] (see the module docstring), or z alone when there is no hidden layer."""
    dims = list(zip(sizes[:-2], sizes[1:-1]))
    head_in = sizes[0] + sizes[-2] if len(sizes) > 2 else sizes[0]
    return dims + [(head_in, sizes[-1])]


def head_input(z: np.ndarray, h: np.ndarray, n_layers: int) -> np.ndarray:
    return np.concatenate([z, h], axis=-1) if n_layers > 1 else z


def head_whitening(U: np.ndarray, y: np.ndarray,
                   shrink: float = WHITEN_SHRINK) -> tuple[np.ndarray, np.ndarray] | None:
    """(T, T^-1) for the head's inputs U (n x d_head) with class labels y: T = A^(-1/2) with
    A = (1 - shrink) S + shrink (tr S / d) I, S the pooled within-class covariance of U. Both
    symmetric, float64. A class with one row adds nothing to S. None when the rows hardly vary
    within their classes (tr S below WHITEN_MIN_SPREAD of the total spread of U, which is what
    rounding leaves of classes made of identical rows): T would scale u by ~1e10, and the device's
    float32 steps on such coordinates are noise."""
    U = np.asarray(U, np.float64)
    y = np.asarray(y)
    if U.ndim != 2 or len(y) != len(U) or len(U) == 0:
        raise ValueError(f"head_whitening: U {U.shape} and y {y.shape} must be n x d and n, n > 0")
    if not 0.0 < shrink <= 1.0:
        raise ValueError(f"shrink {shrink}: expected a number in (0, 1]")
    D = U.copy()
    for c in np.unique(y):
        rows = y == c
        D[rows] -= D[rows].mean(axis=0)
    d = U.shape[1]
    S = D.T @ D / len(U)
    scale = np.trace(S) / d
    total = np.mean(np.square(U - U.mean(axis=0)))
    if not scale > WHITEN_MIN_SPREAD * total:
        return None
    w, V = np.linalg.eigh((1.0 - shrink) * S + shrink * scale * np.eye(d))
    w = np.maximum(w, shrink * scale * 1e-3)   # rounding can take the smallest a hair below
    return (V / np.sqrt(w)) @ V.T, (V * np.sqrt(w)) @ V.T


def forward(layers, z):
    """Whole model on standardised inputs z (n x d). `layers` is a sequence of dicts with keys
    W, b, P, g (hidden) and, last, P, g and optionally T (head). Returns (logits, hs, rs): hs[i]
    is the input of layer i (hs[0] is z, hs[-1] the head's input: [z, h], times T when the head
    has one) and rs[i] its routing (rs[-1] is the logits)."""
    z = np.asarray(z, np.float32)
    h = z
    hs, rs = [], []
    for layer in layers[:-1]:
        hs.append(h)
        h, r = spl_forward(h, layer["W"], layer["b"], layer["P"], layer["g"])
        rs.append(r)
    head = layers[-1]
    h = head_input(z, h, len(layers))
    if "T" in head:
        h = h @ head["T"]
    hs.append(h)
    logits = routing(h, head["P"], head["g"])
    rs.append(logits)
    return logits, hs, rs


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)

"""Pretrain an SPL model with backprop (see docs/pretraining.md for the objective and its choices).

    L = CE(logits, y) + meta_weight * L_meta
CE trains hidden W, b and the head's P, g. The hidden P, g get no gradient from CE (hard masks);
a SARS-style meta loss trains them: per sample and unit, the oracle o = dCE/dmask says whether
switching the unit on lowers the loss (o < 0); routing is pushed towards that with a BCE on
sigmoid(routing / tau) weighted by |o|, plus a penalty holding the mean active fraction near rho.
"""
from __future__ import annotations

import os
import re
import time
from typing import Callable

import numpy as np
import torch
from torch.nn import functional as F

from edge_spl.data import GAS_FEATURES, OCCUPANCY_FEATURES, Dataset
from edge_spl.errors import DataError, ModelError
from edge_spl.model import ModelState, init_model
from edge_spl.protocol import DEFAULT_MAX_PAYLOAD
from edge_spl.spl import WHITEN_SHRINK, forward, layer_dims, standardize

from .spl_torch import SPLModel, mask_oracle

STD_FLOOR = 1e-6  # relative to a feature's scale, so a constant column still gets a positive std
MAX_STD = 1e18    # the device keeps std^2 as a float32 running variance (max ~3.4e38)


def model_id_for(dataset: Dataset) -> str:
    """A model id from the data: 'gas-drift', 'occupancy', or the file's stem."""
    if dataset.feature_names == GAS_FEATURES:
        return "gas-drift"
    stem = os.path.splitext(os.path.basename(dataset.source or ""))[0]
    if dataset.feature_names == OCCUPANCY_FEATURES and stem.startswith("datatraining"):
        return "occupancy"
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-.")
    return stem or "model"


def check_hidden(hidden) -> list[int]:
    try:
        widths = [int(h) for h in hidden]
    except (TypeError, ValueError):
        widths = []
    if not widths or any(w < 1 for w in widths):
        raise ModelError(f"hidden layer widths {hidden!r}: expected one or more positive whole numbers")
    return widths


def check_fits_the_wire(sizes: list[int], whiten: bool = True) -> None:
    """Refuse, before allocating anything, a model whose prototypes (one release) or ONNX file
    (W, b and, when `whiten`, the head's T) would not fit in one MQTT payload: the server could
    never publish it."""
    dims = layer_dims(sizes)
    weights = [o * i + o for i, o in dims]   # P, g (and W, b) per layer
    whitening = dims[-1][0] ** 2 if whiten and len(dims) > 1 else 0
    limit = DEFAULT_MAX_PAYLOAD * 0.9   # room for the manifest and the message's framing
    biggest = 4 * max(sum(weights), sum(weights[:-1]) + whitening)
    if biggest > limit:
        hint = ("train it with --no-whiten (the head's whitening is what does not fit), or use smaller --hidden layers"
                if 4 * max(sum(weights), sum(weights[:-1])) <= limit else
                "use smaller --hidden layers (or fewer features or classes: is --label the right column?)")
        raise ModelError(f"a {'-'.join(map(str, sizes))} model has {biggest / 1e6:.1f} MB of prototypes or "
                         f"weights, over the {limit / 1e6:.1f} MB that fit in one MQTT payload; {hint}")


def split_stratified(y: np.ndarray, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, heldout) row indices: `holdout` of every class held out (a class with a single
    labelled row stays in training). Sorted, so training order comes only from the epoch shuffle."""
    if not 0.0 <= holdout < 1.0:
        raise DataError(f"holdout {holdout}: expected a fraction in [0, 1)")
    rng = np.random.default_rng(seed)
    train, held = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = int(round(holdout * len(idx)))
        k = min(k, len(idx) - 1)
        held.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


def standardisation(X: np.ndarray, feature_names=None) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std (float32). Refuses a feature whose spread is beyond what the
    device can track in float32 (it keeps std^2 as a running variance)."""
    X = X.astype(np.float64)
    mean = X.mean(axis=0)
    std = X.std(axis=0)
    std = np.maximum(std, STD_FLOOR * np.maximum(np.abs(mean), 1.0))
    wide = np.flatnonzero(std > MAX_STD)
    if len(wide):
        j = int(wide[0])
        name = feature_names[j] if feature_names is not None else f"column {j}"
        raise DataError(f"feature {name!r} spreads over {std[j]:.3g} (std): beyond float32 once squared "
                        f"(at most {MAX_STD:g}); rescale that column{f' and {len(wide) - 1} more' if len(wide) > 1 else ''}")
    return mean.astype(np.float32), std.astype(np.float32)


def active_fractions(layers, z: np.ndarray) -> list[float]:
    """Share of (sample, unit) pairs switched on, per hidden layer (numpy reference path)."""
    if len(z) == 0:
        return [float("nan")] * (len(layers) - 1)
    _, _, rs = forward(layers, z)
    return [float((r > 0).mean()) for r in rs[:-1]]


def accuracy(layers, z: np.ndarray, y: np.ndarray) -> float | None:
    if len(z) == 0:
        return None
    return float((forward(layers, z)[0].argmax(axis=1) == y).mean())


def meta_loss(trace, tau: float, rho: float, fraction_weight: float) -> torch.Tensor:
    """BCE of sigmoid(routing/tau) against the oracle's sign, weighted by the oracle's size,
    plus the active-fraction penalty. Needs the oracle (mask grads) from a backward pass of CE
    through `trace` first."""
    total = 0.0
    for r, o in zip(trace.rs, mask_oracle(trace)):
        s = r / tau
        target = (o < 0).to(s.dtype)
        # The sign of a near-zero oracle (a sample already classified well, a unit that barely
        # matters) is noise; weighting by |o| lets the units and samples that matter decide.
        a = o.abs()
        weight = a / a.mean().clamp_min(1e-12)
        total = total + F.binary_cross_entropy_with_logits(s, target, weight=weight)
        total = total + fraction_weight * (torch.sigmoid(s).mean() - rho) ** 2
    return total


def _progress_bar(epochs: int):
    import sys

    from tqdm import tqdm

    bar = tqdm(total=epochs, desc="train", unit="epoch", file=sys.stderr, leave=False)

    def update(epoch, stats):
        meta = "settling" if stats["meta"] is None else f"{stats['meta']:.3f}"
        bar.set_postfix(ce=f"{stats['ce']:.3f}", meta=meta, refresh=False)
        bar.update(1)
    return update, bar


def pretrain(dataset: Dataset, hidden=(256, 256), epochs: int = 60, holdout: float = 0.2,
             seed: int = 0, progress: bool | Callable[[int, dict], None] | None = None, *,
             lr: float = 3e-3, batch_size: int | None = None, meta_weight: float = 1.0,
             tau: float = 1.0, rho: float = 0.25, fraction_weight: float = 10.0,
             settle: float = 0.2, model_id: str | None = None,
             whiten: float | None = WHITEN_SHRINK) -> tuple[ModelState, dict]:
    """Train an SPL model on `dataset`. Returns (state, report).

    `progress=True` shows a tqdm bar on stderr; a callable `progress(epoch, stats)` is called
    after every epoch instead (epoch from 1; stats: mean "ce" and "meta", meta None while
    settling). The last `settle` share of the epochs keeps routing fixed, so W, b and the head
    fit the masks that get exported. `whiten`: after training, whiten the head's input with this
    shrinkage (ModelState.with_whitened_head; None: do not) -- the same function, in coordinates
    the device's head step learns far better in, estimated on every labelled row (held-out ones
    too: no logit changes). It is skipped (report["whiten_note"] says so) when the rows are too
    few to estimate the within-class covariance (fewer than head inputs + classes)."""
    t0 = time.perf_counter()
    widths = check_hidden(hidden)
    if int(epochs) < 1:
        raise ModelError(f"epochs {epochs}: expected at least 1")
    if whiten is not None and not 0.0 < whiten <= 1.0:
        raise ModelError(f"whiten {whiten}: expected a shrinkage in (0, 1], or None")
    if not 0.0 <= settle < 1.0 or tau <= 0 or not 0.0 < rho < 1.0:
        raise ModelError(f"settle {settle}, tau {tau}, rho {rho}: expected settle in [0, 1), tau > 0, rho in (0, 1)")
    classes = dataset.classes()
    labelled = np.array([v is not None for v in dataset.y], bool)
    if len(classes) < 2:
        raise DataError(f"{dataset.source or 'data'}: {len(classes)} class(es) among the labels, need at least 2")
    index = {c: k for k, c in enumerate(classes)}
    unknown = sorted({v for v in dataset.y if v is not None and v not in index})
    if unknown:
        raise DataError(f"{dataset.source or 'data'}: labels {unknown[:5]} are not among the classes {classes}")
    X = np.asarray(dataset.X, np.float32)[labelled]
    if not np.all(np.isfinite(X)):
        raise DataError(f"{dataset.source or 'data'}: non-finite feature values")
    y = np.array([index[v] for v in dataset.y if v is not None], np.int64)
    tr, te = split_stratified(y, float(holdout), seed)

    mean, std = standardisation(X[tr], dataset.feature_names)
    z_tr, z_te = standardize(X[tr], mean, std), standardize(X[te], mean, std)
    y_tr, y_te = y[tr], y[te]
    sizes = [X.shape[1]] + widths + [len(classes)]
    d_head = sizes[0] + widths[-1]
    if whiten is not None and len(y) - len(classes) < d_head:
        whiten_note = (f"head not whitened: {len(y)} labelled rows for {d_head} head inputs; the "
                       f"within-class covariance needs {d_head + len(classes)} or more")
        whiten = None
    else:
        whiten_note = None
    check_fits_the_wire(sizes, whiten is not None)
    state0 = init_model(sizes, mean, std, classes, dataset.feature_names, seed=seed,
                        model_id=model_id or model_id_for(dataset))

    bar = None
    if progress is True:
        progress, bar = _progress_bar(int(epochs))
    elif not progress:
        progress = None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny matrices: one thread is as fast, and results do not vary with cores
    try:
        torch.manual_seed(seed)
        model = SPLModel.from_state(state0)
        task, routing = model.task_parameters(), model.routing_parameters()
        opt = torch.optim.Adam(task + routing, lr=lr)
        meta_epochs = int(round(int(epochs) * (1.0 - settle)))
        bs = batch_size or int(np.clip(len(tr) // 20, 32, 256))
        gen = torch.Generator().manual_seed(seed)
        zt, yt = torch.from_numpy(z_tr), torch.from_numpy(y_tr)
        last_meta = 0.0
        for epoch in range(1, int(epochs) + 1):
            model.train()
            ce_sum = meta_sum = 0.0
            order = torch.randperm(len(zt), generator=gen)
            for start in range(0, len(zt), bs):
                sel = order[start:start + bs]
                opt.zero_grad(set_to_none=True)
                trace = model.trace(zt[sel], relax=True)
                ce = F.cross_entropy(trace.logits, yt[sel])
                # CE reaches W, b, head P, g, and the relaxed masks (the oracle); never hidden P, g.
                ce.backward(inputs=task + trace.masks)
                if routing and epoch <= meta_epochs:
                    meta = meta_weight * meta_loss(trace, tau, rho, fraction_weight)
                    meta.backward(inputs=routing)
                    meta_sum += meta.item() * len(sel)
                opt.step()
                ce_sum += ce.item() * len(sel)
            meta_now = meta_sum / len(zt) if epoch <= meta_epochs else None  # None: settling
            last_meta = last_meta if meta_now is None else meta_now
            if progress is not None:
                progress(epoch, {"ce": ce_sum / len(zt), "meta": meta_now})
        model.eval()
        state = model.to_state(state0)
    finally:
        torch.set_num_threads(threads)
        if bar is not None:
            bar.close()

    # Whitening leaves every logit as it is, so it may use the held-out rows too: held-out
    # accuracy cannot move, and the covariance needs rows (gas, 384 head inputs: with 178-290 rows
    # it made the device learn worse, with 355 and 445 better; docs/pretraining.md)
    z_all = np.concatenate([z_tr, z_te])
    if whiten is not None:
        try:
            state = state.with_whitened_head(z_all, np.concatenate([y_tr, y_te]), whiten)
        except ModelError as e:   # the rows do not vary within their classes
            whiten_note, whiten = f"head not whitened: {e}", None
    report = {
        "model_id": state.model_id,
        "sizes": sizes,
        "n_train": int(len(tr)),
        "n_heldout": int(len(te)),
        "train_acc": accuracy(state.layers, z_tr, y_tr),
        "heldout_acc": accuracy(state.layers, z_te, y_te),
        "active": active_fractions(state.layers, z_all),
        "epochs": int(epochs),
        "seed": int(seed),
        "final_ce": ce_sum / len(zt),
        "final_meta": last_meta,   # of the last epoch that trained routing
        "whiten": whiten,            # the shrinkage used, or None: not whitened
        "whiten_note": whiten_note,  # why not, when it was asked for
        "seconds": time.perf_counter() - t0,
    }
    state.info = {"trained_on": dataset.source, **{k: report[k] for k in (
        "n_train", "n_heldout", "train_acc", "heldout_acc", "active", "epochs", "seed", "whiten")}}
    return state, report

"""FF vs BP: how closely the device learner's Forward-Forward updates of P, g follow the backprop
gradient of the pretraining objective L_VFE = CE + lambda * L_meta, on the same samples at the
same parameters.

Per sample, along the stream of the `edge-spl` learner (its defaults):
  - FF update: what FFLearner did to each layer's P, g (after - before the step). For a layer it
    did not move (hidden layers while lr_hidden is 0), the hidden FF rule computed here on that
    layer's inputs, exactly as the kernel would apply it with step 1: the hidden_frac most
    strongly routed units are positive (target 1) for the real input and negative (target 0) for
    a hybrid of it and the previous sample;
  - plus, for the head, the plain FF kernel rule (step 1, one-vs-rest targets, none of the
    learner's step sizes or preconditioning), to tell the rule apart from the learner's tuning;
  - BP direction: minus the gradient of CE + lambda * L_meta (export.pretrain's meta loss, on the
    SPLModel trace) w.r.t. the same P, g, at the parameters before the step and on the input the
    learner saw (its re-standardised z).
Reported per layer: the mean per-sample cosine per batch, the mean cosine of updates summed over
windows of consecutive samples, and the cosine of the whole batch's summed updates.
"""
from __future__ import annotations

import inspect
import math

import numpy as np

from edge_spl.model import ModelState
from edge_spl.spl import Z_CLIP, forward, layer_dims, softmax

from .streams import Stream


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def ff_direction(h: np.ndarray, G: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The FF kernel's step (device/kernels.py `_ff_update`) with lr 1, returned rather than
    applied: for units with target >= 0, e = sigmoid(G) - target, dP[j] = -e h / sqrt(d_in),
    dg[j] = +e; other units do not move."""
    h = np.asarray(h, np.float64)
    e = np.where(target >= 0, sigmoid(np.asarray(G, np.float64)) - target, 0.0)
    return -np.outer(e, h) / math.sqrt(h.shape[0]), e


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0.0 or nb == 0.0:
        return float("nan")
    return float(a @ b / (na * nb))


def _flat(P, g) -> np.ndarray:
    return np.concatenate([np.ravel(P), np.ravel(g)]).astype(np.float64)


def _meta_settings() -> dict:
    """lambda, tau, rho and the fraction weight as pretraining used them (its defaults)."""
    from edge_spl.export.pretrain import pretrain

    p = inspect.signature(pretrain).parameters
    return {k: p[k].default for k in ("meta_weight", "tau", "rho", "fraction_weight")}


def _learner_z(learner, x: np.ndarray) -> np.ndarray:
    """The standardised input the learner just used, from its running mean/variance after the step
    (its kernel updates them first, then standardises with them)."""
    from edge_spl.device import kernels

    floor = kernels.var_floor(learner.manifest.std)
    z = (x.astype(np.float64) - learner.mean_) / np.sqrt(np.maximum(learner.var_.astype(np.float64), floor))
    return np.clip(z, -Z_CLIP, Z_CLIP).astype(np.float32)


def ff_bp_cosine(state: ModelState, exported, stream: Stream, learn: np.ndarray, seed: int = 0,
                 window: int = 50, learner_kwargs: dict | None = None) -> dict:
    import torch
    from torch.nn import functional as F

    from edge_spl.device.learner import FFLearner
    from edge_spl.export.pretrain import meta_loss
    from edge_spl.export.spl_torch import SPLModel

    settings = _meta_settings()
    learner = FFLearner(exported, seed=seed, **(learner_kwargs or {}))
    hidden_frac = float(getattr(learner, "hidden_frac", 0.25))
    mix = float(getattr(learner, "mix", 0.5))
    rng = np.random.default_rng(seed + 7919)
    model = SPLModel.from_state(state)
    layers_t = list(model.hidden) + [model.head]
    n_layers = len(layers_t)
    sizes = state.sizes
    dims = layer_dims(sizes)
    n_batches = len(stream.names)
    # one track per layer (the learner's update, or the hidden rule), plus the head's plain FF
    # rule (the kernel step without the learner's preconditioning or step sizes)
    layer_of = list(range(n_layers)) + [n_layers - 1]
    n_tracks = len(layer_of)

    per_sample = [[[] for _ in range(n_batches)] for _ in range(n_tracks)]
    per_window = [[[] for _ in range(n_batches)] for _ in range(n_tracks)]
    batch_sum = [[float("nan")] * n_batches for _ in range(n_tracks)]
    applied = [False] * n_layers
    z_ok = z_n = 0

    def zeros():
        return [[np.zeros(dims[i][0] * dims[i][1] + dims[i][1]) for _ in range(2)] for i in layer_of]

    win, tot = zeros(), zeros()
    in_window = 0
    prev_z = None

    for t in range(len(stream.y)):
        b = int(stream.batch[t])
        x = stream.X[t]
        label = int(learn[t])
        before = [(P.copy(), g.copy()) for P, g in learner.protos_]
        pred, conf = learner.step(x, label)
        z = _learner_z(learner, x)

        layers = [dict(L, P=P, g=g) for L, (P, g) in zip(state.layers, before)]
        logits, hs, rs = forward(layers, z[None, :])
        p = softmax(logits[0].astype(np.float64))
        z_n += 1
        z_ok += int(np.argmax(p) == pred and abs(p[pred] - conf) < 1e-3)

        # FF: the learner's own change, or the hidden rule where the learner did not move the layer
        ff = []
        neg_hs = neg_rs = None
        for i, ((P0, g0), (P1, g1)) in enumerate(zip(before, learner.protos_)):
            dP, dg = P1.astype(np.float64) - P0, g1.astype(np.float64) - g0
            if np.any(dP) or np.any(dg):
                applied[i] = True
                ff.append(_flat(dP, dg))
                continue
            if i == n_layers - 1 or prev_z is None:
                ff.append(None)   # head without a label, or no previous sample for a negative
                continue
            if neg_hs is None:
                neg = z.copy()
                take = rng.random(z.shape[0]) < mix
                neg[take] = prev_z[take]
                _, neg_hs, neg_rs = forward(layers, neg[None, :])
            k = max(1, math.ceil(hidden_frac * sizes[i + 1]))
            top = np.argpartition(rs[i][0], -k)[-k:]
            tpos = np.full(sizes[i + 1], -1.0)
            tpos[top] = 1.0
            tneg = np.full(sizes[i + 1], -1.0)
            tneg[top] = 0.0
            aP, ag = ff_direction(hs[i][0], rs[i][0], tpos)
            bP, bg = ff_direction(neg_hs[i][0], neg_rs[i][0], tneg)
            ff.append(_flat(aP + bP, ag + bg))
        if label >= 0:
            ff.append(_flat(*ff_direction(hs[-1][0], logits[0], np.eye(sizes[-1])[label])))
        else:
            ff.append(None)
        prev_z = z

        # BP: gradient of CE + lambda * L_meta at the same parameters and input
        bp = [None] * n_layers
        if label >= 0:
            with torch.no_grad():
                for L, (P, g) in zip(layers_t, before):
                    L.P.copy_(torch.from_numpy(P))
                    L.g.copy_(torch.from_numpy(g))
            for L in layers_t:
                L.P.grad = L.g.grad = None
            trace = model.trace(torch.from_numpy(z[None, :]), relax=True)
            ce = F.cross_entropy(trace.logits, torch.tensor([label]))
            ce.backward(inputs=[model.head.P, model.head.g] + trace.masks)
            if n_layers > 1:
                meta = settings["meta_weight"] * meta_loss(trace, settings["tau"], settings["rho"],
                                                           settings["fraction_weight"])
                meta.backward(inputs=model.routing_parameters())
            for i, L in enumerate(layers_t):
                if L.P.grad is not None:
                    bp[i] = -_flat(L.P.grad.numpy(), L.g.grad.numpy())

        for k, i in enumerate(layer_of):
            if ff[k] is None or bp[i] is None:
                continue
            per_sample[k][b].append(cosine(ff[k], bp[i]))
            for acc in (win, tot):
                acc[k][0] += ff[k]
                acc[k][1] += bp[i]
        in_window += 1
        last_of_batch = t + 1 == len(stream.y) or stream.batch[t + 1] != b
        if in_window == window or last_of_batch:
            for k in range(n_tracks):
                per_window[k][b].append(cosine(win[k][0], win[k][1]))
                win[k][0][:] = 0.0
                win[k][1][:] = 0.0
            in_window = 0
        if last_of_batch:
            for k in range(n_tracks):
                batch_sum[k][b] = cosine(tot[k][0], tot[k][1])
                tot[k][0][:] = 0.0
                tot[k][1][:] = 0.0

    def mean(v):
        v = [a for a in v if not math.isnan(a)]
        return float(np.mean(v)) if v else None

    rows = []
    for k, i in enumerate(layer_of):
        head = i == n_layers - 1
        if k == n_tracks - 1:
            kind, rule = "head-rule", "plain label-conditioned FF kernel rule on the head (step 1, no preconditioning)"
        elif head:
            kind, rule = "head", "label-conditioned FF on the head (the learner's own update)"
        else:
            kind = "hidden"
            rule = ("hidden FF, hybrid negatives (the learner's own update)" if applied[i] else
                    "hidden FF rule computed on the layer's inputs (the learner's lr_hidden is 0: not applied)")
        rows.append({
            "layer": i, "shape": [dims[i][1], dims[i][0]], "kind": kind, "ff": rule,
            "per_sample": [mean(v) for v in per_sample[k]],
            "window_sum": [mean(v) for v in per_window[k]],
            "batch_sum": [None if math.isnan(v) else v for v in batch_sum[k]],
            "mean_per_sample": mean([c for v in per_sample[k] for c in v]),
            "mean_window_sum": mean([c for v in per_window[k] for c in v]),
            "mean_batch_sum": mean(batch_sum[k]),
        })
    return {"batches": list(stream.names), "window": int(window), "seed": int(seed),
            "bp_objective": "CE + meta_weight * L_meta (export.pretrain.meta_loss)", "bp_settings": settings,
            "learner_input_check": z_ok / max(z_n, 1), "layers": rows}

"""The SPL model in torch, for pretraining with backprop. Its forward is exactly the numpy
reference (edge_spl.spl.forward); tests hold the two together.

Gradient paths, by construction:
  - a hidden layer's routing is computed from its *detached* input, and its hard mask carries no
    gradient, so the task loss never reaches hidden P, g, and the meta loss (which sees only
    routing) never reaches W, b or earlier layers;
  - with `relax=True` each hidden mask is a leaf tensor that requires grad, so d(loss)/d(mask) per
    sample and unit (the SARS "oracle") comes out of the same backward pass as the task gradient;
  - the head's routing is the logits, so the task loss trains the head's P, g directly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from edge_spl.model import ModelState


def _param(a: np.ndarray) -> nn.Parameter:
    return nn.Parameter(torch.tensor(np.asarray(a, np.float32)))


class SPLLayer(nn.Module):
    """Hidden SPL layer d_in -> d_out with computation W, b, prototypes P and gates g."""

    def __init__(self, W, b, P, g):
        super().__init__()
        self.W, self.b, self.P, self.g = _param(W), _param(b), _param(P), _param(g)
        self.d_out, self.d_in = self.W.shape
        self.inv_sqrt = 1.0 / math.sqrt(self.d_in)

    @property
    def pass_through(self) -> bool:
        return self.d_in == self.d_out

    def routing(self, x: torch.Tensor) -> torch.Tensor:
        """x P^T / sqrt(d_in) - g, from the detached input: gradients go to P, g only."""
        return (x.detach() @ self.P.T) * self.inv_sqrt - self.g

    def forward(self, x: torch.Tensor, relax: bool = False):
        """Returns (out, routing, mask). With relax=True the mask is a leaf requiring grad."""
        r = self.routing(x)
        mask = (r > 0).to(x.dtype).detach()
        if relax:
            mask.requires_grad_(True)
        out = nn.functional.silu(x @ self.W.T + self.b) * mask
        if self.pass_through:
            out = out + x * (1.0 - mask)
        return out, r, mask


class SPLHead(nn.Module):
    """Prototype head: logits = x P^T / sqrt(d_in) - g, on x = its input times T when it whitens
    (T a fixed buffer, never trained)."""

    def __init__(self, P, g, T=None):
        super().__init__()
        self.P, self.g = _param(P), _param(g)
        self.inv_sqrt = 1.0 / math.sqrt(self.P.shape[1])
        self.register_buffer("T", None if T is None else torch.tensor(np.asarray(T, np.float32)))

    def whiten(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.T is None else x @ self.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: the head's input as `whiten` returns it."""
        return (x @ self.P.T) * self.inv_sqrt - self.g


@dataclass
class Trace:
    """One forward pass in full: logits, every layer's input (hs[0] is z), hidden routing and masks."""
    logits: torch.Tensor
    hs: list[torch.Tensor]
    rs: list[torch.Tensor]
    masks: list[torch.Tensor]


class SPLModel(nn.Module):
    """Hidden SPL layers followed by a prototype head, on standardised, clipped inputs."""

    def __init__(self, hidden: list[SPLLayer], head: SPLHead):
        super().__init__()
        self.hidden = nn.ModuleList(hidden)
        self.head = head

    def trace(self, z: torch.Tensor, relax: bool = False) -> Trace:
        h, hs, rs, masks = z, [], [], []
        for layer in self.hidden:
            hs.append(h)
            h, r, m = layer(h, relax)
            rs.append(r)
            masks.append(m)
        if self.hidden:   # the head sees [z, h] (skip connection, edge_spl.spl)
            h = torch.cat([z, h], dim=-1)
        h = self.head.whiten(h)
        hs.append(h)
        return Trace(self.head(h), hs, rs, masks)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.trace(z).logits

    # -- parameter groups: who trains what ------------------------------------------------------

    def task_parameters(self) -> list[nn.Parameter]:
        """Trained by the task loss: hidden W, b and the head's P, g."""
        return [p for L in self.hidden for p in (L.W, L.b)] + [self.head.P, self.head.g]

    def routing_parameters(self) -> list[nn.Parameter]:
        """Trained by the meta loss: hidden P, g."""
        return [p for L in self.hidden for p in (L.P, L.g)]

    # -- conversions ------------------------------------------------------------------------------

    @classmethod
    def from_state(cls, state: ModelState) -> "SPLModel":
        hidden = [SPLLayer(L["W"], L["b"], L["P"], L["g"]) for L in state.layers[:-1]]
        head = SPLHead(state.layers[-1]["P"], state.layers[-1]["g"], state.layers[-1].get("T"))
        return cls(hidden, head)

    def layer_arrays(self) -> list[dict[str, np.ndarray]]:
        def a(p):
            return p.detach().cpu().numpy().astype(np.float32, copy=True)
        layers = [{"W": a(L.W), "b": a(L.b), "P": a(L.P), "g": a(L.g)} for L in self.hidden]
        layers.append({"P": a(self.head.P), "g": a(self.head.g)})
        if self.head.T is not None:
            layers[-1]["T"] = a(self.head.T)
        return layers

    def to_state(self, template: ModelState | None = None, **meta) -> ModelState:
        """A ModelState holding this model's arrays. Metadata (mean, std, class_names,
        feature_names, model_id, version, info) comes from `template`, overridden by `meta`."""
        fields = ("mean", "std", "class_names", "feature_names", "model_id", "version", "info")
        values = {}
        if template is not None:
            values = {k: getattr(template, k) for k in fields}
            values["info"] = dict(template.info)
        values.update(meta)
        missing = [k for k in fields[:4] if k not in values]
        if missing:
            raise TypeError(f"to_state needs a template or {missing}")
        return ModelState(self.layer_arrays(), **values)


def mask_oracle(trace: Trace) -> list[torch.Tensor]:
    """d(loss)/d(mask) per sample and unit, after a backward pass through a relaxed trace.
    Negative where switching the unit on (or keeping it on) lowers the loss."""
    out = []
    for m in trace.masks:
        if m.grad is None:
            raise RuntimeError("mask_oracle needs trace(z, relax=True) and a backward pass first")
        out.append(m.grad)
    return out

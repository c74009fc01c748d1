"""Inference of `edge-spl bench speed`: the device's session (onnxruntime fed the live P, g)
against onnxruntime with P, g baked into the graph as initializers, the way the device called
onnxruntime before (session.run with a feeds dict, default session options), and torch eager;
and the whole device step (sample in, prediction out, FF update done)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from edge_spl.device.session import OnnxModel, session_options
from edge_spl.manifest import output_names


def baked_onnx(onnx_bytes: bytes, protos) -> bytes:
    """The same graph with every P{i}, g{i} an initializer instead of an input: what a model
    whose prototypes never change would ship (onnxruntime can then fold and prepack them)."""
    m = onnx.load_from_string(onnx_bytes)
    names = set()
    for i, (P, g) in enumerate(protos):
        m.graph.initializer.extend([numpy_helper.from_array(np.asarray(P, np.float32), f"P{i}"),
                                    numpy_helper.from_array(np.asarray(g, np.float32), f"g{i}")])
        names |= {f"P{i}", f"g{i}"}
    keep = [v for v in m.graph.input if v.name not in names]
    del m.graph.input[:]
    m.graph.input.extend(keep)
    return m.SerializeToString()


class BakedModel:
    """onnxruntime with P, g baked in, called the fastest way too: x and the outputs bound once
    to preallocated arrays (IOBinding), default graph optimisations, one thread."""

    def __init__(self, onnx_bytes: bytes, protos, sizes, n: int):
        self.session = ort.InferenceSession(baked_onnx(onnx_bytes, protos), sess_options=session_options(),
                                            providers=["CPUExecutionProvider"])
        self.x = np.zeros((n, sizes[0]), np.float32)
        b = self.session.io_binding()
        b.bind_cpu_input("x", self.x)
        self.outs = {}
        for o in self.session.get_outputs():
            shape = [n] + [int(s) for s in o.shape[1:]]
            a = self.outs[o.name] = np.zeros(shape, np.float32)
            b.bind_output(o.name, "cpu", 0, np.float32, shape, a.ctypes.data)
        self.binding = b

    def run(self, z: np.ndarray) -> dict:
        np.copyto(self.x, z)
        self.session.run_with_iobinding(self.binding)
        return self.outs


class PlainRunModel:
    """How the device called onnxruntime before this benchmark: session.run with a feeds dict
    of the live arrays, default session options (memory arena, every graph optimisation)."""

    def __init__(self, onnx_bytes: bytes, n_layers: int):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(onnx_bytes, sess_options=opts, providers=["CPUExecutionProvider"])
        self.names = output_names(n_layers)
        self.feeds: dict = {}

    def run(self, z: np.ndarray, protos) -> list:
        self.feeds["x"] = z
        for i, (P, g) in enumerate(protos):
            self.feeds[f"P{i}"] = P
            self.feeds[f"g{i}"] = g
        return self.session.run(self.names, self.feeds)


class TorchEager:
    """The SPL model in torch (export.spl_torch), every output the device needs, one thread."""

    def __init__(self, state):
        import torch

        from edge_spl.export.spl_torch import SPLModel
        self.torch = torch
        self.model = SPLModel.from_state(state).eval()

    def run(self, z) -> object:
        with self.torch.inference_mode():
            return self.model.trace(z)


def agreement(state, exported, protos, z: np.ndarray) -> dict:
    """Largest |difference| of the logits between the alternatives (they compute the same)."""
    import torch
    dev = OnnxModel(exported).run(z, protos)["logits"].copy()
    baked = BakedModel(exported.onnx_bytes, protos, exported.manifest.sizes, len(z)).run(z)["logits"]
    plain = PlainRunModel(exported.onnx_bytes, exported.manifest.n_layers).run(z, protos)[0]
    tl = TorchEager(state).run(torch.from_numpy(z)).logits.numpy()
    return {"ort_baked": float(np.abs(dev - baked).max()), "ort_live_run": float(np.abs(dev - plain).max()),
            "torch": float(np.abs(dev - tl).max())}

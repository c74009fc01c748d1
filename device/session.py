"""The ONNX model on the device: one onnxruntime session, fed the live prototype arrays each call.

The graph takes P{i}, g{i} as inputs (see edge_spl.manifest), so the learner's in-place updates
and an adopted release take effect on the next call with no session rebuild.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort

from edge_spl.errors import ModelError
from edge_spl.manifest import ExportedModel, input_names, output_names


class OnnxModel:
    def __init__(self, exported: ExportedModel):
        m = exported.manifest
        self.n_layers = m.n_layers
        self.d_in = m.sizes[0]
        opts = ort.SessionOptions()
        # One thread each: the device runs one sample at a time, and on a Pi the learner and the
        # MQTT thread need the other cores; thread pools only add wake-up latency here.
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(exported.onnx_bytes, sess_options=opts,
                                                providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for bad graphs
            raise ModelError(f"onnxruntime cannot load the model ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''})") from None
        have_in = [i.name for i in self.session.get_inputs()]
        have_out = [o.name for o in self.session.get_outputs()]
        want_in, want_out = input_names(self.n_layers), output_names(self.n_layers)
        if have_in != want_in or sorted(have_out) != sorted(want_out):
            raise ModelError(f"ONNX graph has inputs {have_in} and outputs {have_out}; the manifest's "
                             f"{self.n_layers} layers need inputs {want_in} and outputs {want_out}")
        self.output_names = want_out
        # One feeds dict for the session's life; run() only swaps references into it.
        self._feeds: dict[str, np.ndarray] = {}

    def run(self, z: np.ndarray, protos) -> dict[str, np.ndarray]:
        """z: standardised, clipped float32 [N, d_in]; protos: the live [(P, g), ...] list.
        Returns {"logits": [N, C], "h1".., "r0"..} as float32 arrays."""
        if z.dtype != np.float32 or z.ndim != 2 or z.shape[1] != self.d_in:
            raise ValueError(f"z must be float32 [N, {self.d_in}], got {z.dtype}{list(z.shape)}")
        feeds = self._feeds
        feeds["x"] = z
        for i, (P, g) in enumerate(protos):
            feeds[f"P{i}"] = P
            feeds[f"g{i}"] = g
        outs = self.session.run(self.output_names, feeds)
        return dict(zip(self.output_names, outs))

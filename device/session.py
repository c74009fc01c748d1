"""The ONNX model on the device: one onnxruntime session, fed the live prototype arrays each call.

The graph takes P{i}, g{i} as inputs (see edge_spl.manifest), so the learner's in-place updates
and an adopted release take effect on the next call with no session rebuild.

Speed (docs/bench-speed.md measures each choice):
  - the live P, g are bound once per batch size with an IOBinding that points at their memory,
    and outputs go to preallocated arrays, so a call copies nothing and converts nothing; the
    binding is redone only when the caller hands other array objects;
  - onnxruntime's MatMulScaleFusion is disabled: it folds 1/sqrt(d_in) into the prototype
    MatMul as alpha, and a MatMul with alpha != 1 misses MLAS's one-row kernel, so for a single
    sample every call would repack the whole transposed P (live P cannot be prepacked). With the
    scale as its own Mul the routing is the same math (float rounding may differ in the last bit);
  - no memory arena: the device's tensors are small and fixed, and the arena only adds RSS.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort

from edge_spl.errors import ModelError
from edge_spl.manifest import ExportedModel, input_names, output_names
from edge_spl.spl import layer_dims

# onnxruntime graph rewrites that slow down a graph whose matrices are inputs (see above)
DISABLED_OPTIMIZERS = ["MatMulScaleFusion"]


def session_options(threads: int = 1) -> ort.SessionOptions:
    """One thread each: the device runs one sample at a time, and on a Pi the learner and the
    MQTT thread need the other cores; thread pools only add wake-up latency here."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.enable_cpu_mem_arena = False
    opts.log_severity_level = 3
    return opts


class _Bound:
    """One IOBinding for one batch size: x copied into `x`, outputs written into `outs`."""

    def __init__(self, session, n: int, d_in: int, shapes: dict[str, list[int]], protos):
        self.x = np.zeros((n, d_in), np.float32)
        self.outs = {name: np.zeros([n] + shape, np.float32) for name, shape in shapes.items()}
        self.protos = [(P, g) for P, g in protos]
        b = session.io_binding()
        b.bind_cpu_input("x", self.x)
        for i, (P, g) in enumerate(self.protos):
            b.bind_cpu_input(f"P{i}", P)
            b.bind_cpu_input(f"g{i}", g)
        for name, a in self.outs.items():
            b.bind_output(name, "cpu", 0, np.float32, list(a.shape), a.ctypes.data)
        self.binding = b

    def fed_with(self, protos) -> bool:
        """True when `protos` are the very arrays bound (in place updates need no rebinding)."""
        if len(protos) != len(self.protos):
            return False
        for (P, g), (bP, bg) in zip(protos, self.protos):
            if P is not bP or g is not bg:
                return False
        return True


class OnnxModel:
    def __init__(self, exported: ExportedModel):
        m = exported.manifest
        self.n_layers = m.n_layers
        self.d_in = m.sizes[0]
        self._proto_shapes = m.proto_shapes()
        try:
            self.session = ort.InferenceSession(exported.onnx_bytes, sess_options=session_options(),
                                                providers=["CPUExecutionProvider"],
                                                disabled_optimizers=DISABLED_OPTIMIZERS)
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
        sizes = m.sizes
        self._out_shapes = {"logits": [sizes[-1]]}
        dims = layer_dims(sizes)
        self._out_shapes.update({f"h{i}": [dims[i][0]] for i in range(1, self.n_layers)})
        self._out_shapes.update({f"r{i}": [sizes[i + 1]] for i in range(self.n_layers - 1)})
        self._bound: dict[int, _Bound] = {}
        self._check(exported)

    def _check(self, exported: ExportedModel) -> None:
        """One run with the model's prototypes on a few ordinary inputs (zero, +-1, a fixed
        random row). The manifest's sha256 only says the ONNX file is the one it names; a graph
        whose shapes do not fit the manifest, or whose baked weights (W, b, T) hold NaN or
        overflow, fails here with a one-line error instead of on the first sample."""
        z = np.zeros((4, self.d_in), np.float32)
        z[1], z[2] = 1.0, -1.0
        z[3] = np.random.default_rng(0).uniform(-3.0, 3.0, self.d_in)
        try:
            outs = self.run(z, exported.protos)
            bad = sorted(name for name, a in outs.items() if not np.all(np.isfinite(a)))
        except Exception as e:  # onnxruntime's own exception types
            text = str(e).strip()
            raise ModelError(f"the ONNX graph does not run with the manifest's shapes ({type(e).__name__}: "
                             f"{text.splitlines()[0] if text else ''})") from None
        finally:
            self._bound.clear()   # the learner binds its own arrays
        if bad:
            raise ModelError(f"the ONNX graph gives NaN or infinite {', '.join(bad)} on ordinary inputs: "
                             f"its baked weights are damaged; export the model again")

    def run(self, z: np.ndarray, protos) -> dict[str, np.ndarray]:
        """z: standardised, clipped float32 [N, d_in]; protos: the live [(P, g), ...] list.
        Returns {"logits": [N, C], "h1".., "r0"..} as float32 arrays. They are this model's own
        buffers: valid until the next run() with the same N, which overwrites them."""
        if z.dtype != np.float32 or z.ndim != 2 or z.shape[1] != self.d_in:
            raise ValueError(f"z must be float32 [N, {self.d_in}], got {z.dtype}{list(z.shape)}")
        n = z.shape[0]
        b = self._bound.get(n)
        if b is None or not b.fed_with(protos):
            b = self._bind(n, protos)
        np.copyto(b.x, z)
        self.session.run_with_iobinding(b.binding)
        return b.outs

    def _bind(self, n: int, protos) -> _Bound:
        if len(protos) != self.n_layers:
            raise ValueError(f"{len(protos)} prototype layers, the model has {self.n_layers}")
        for i, ((P, g), (ps, gs)) in enumerate(zip(protos, self._proto_shapes)):
            for name, a, shape in ((f"P{i}", P, ps), (f"g{i}", g, gs)):
                # the binding points at the array's memory: it must be exactly what the graph reads
                if (not isinstance(a, np.ndarray) or a.dtype != np.float32
                        or not a.flags.c_contiguous or a.shape != shape):
                    raise ValueError(f"{name} must be a C-contiguous float32 array of shape {shape}, "
                                     f"got {getattr(a, 'dtype', type(a).__name__)}"
                                     f"{list(getattr(a, 'shape', []))}")
        if len(self._bound) > 8:   # callers with many batch sizes: keep memory bounded
            self._bound.clear()
        b = self._bound[n] = _Bound(self.session, n, self.d_in, self._out_shapes, protos)
        return b

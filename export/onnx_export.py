"""Build the ONNX graph of an SPL model directly from its arrays (see edge_spl.manifest for the
contract). Built with onnx.helper rather than traced from torch, so the graph is exactly the
reference math, the opset is a fixed rule, and export needs no torch."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edge_spl.manifest import OPSET, ExportedModel, Manifest, input_names, output_names
from edge_spl.model import ModelState
from edge_spl.spl import layer_dims

# onnxruntime 1.17+ reads IR version 9 / opset 17; newer onnx writes a newer IR by default.
IR_VERSION = 9


def build_onnx(state: ModelState) -> bytes:
    sizes = state.sizes
    n = len(state.layers)
    nodes, inits = [], []

    def const(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    dims = layer_dims(sizes)
    one = const("one", 1.0)
    h = "x"
    for i, L in enumerate(state.layers):
        d_in = dims[i][0]
        inv_sqrt = const(f"inv_sqrt{i}", 1.0 / np.sqrt(d_in))
        head = i == n - 1
        # routing = (h @ P^T) * (1/sqrt(d_in)) - g
        nodes += [
            helper.make_node("Transpose", [f"P{i}"], [f"Pt{i}"], perm=[1, 0]),
            helper.make_node("MatMul", [h, f"Pt{i}"], [f"m{i}"]),
            helper.make_node("Mul", [f"m{i}", inv_sqrt], [f"ms{i}"]),
            helper.make_node("Sub", [f"ms{i}", f"g{i}"], ["logits" if head else f"r{i}"]),
        ]
        if head:
            break
        Wt = const(f"Wt{i}", L["W"].T)
        b = const(f"b{i}", L["b"])
        nodes += [
            helper.make_node("MatMul", [h, Wt], [f"zw{i}"]),
            helper.make_node("Add", [f"zw{i}", b], [f"z{i}"]),
            helper.make_node("Sigmoid", [f"z{i}"], [f"sz{i}"]),
            helper.make_node("Mul", [f"z{i}", f"sz{i}"], [f"a{i}"]),           # silu
            helper.make_node("Greater", [f"r{i}", const(f"zero{i}", 0.0)], [f"mb{i}"]),
            helper.make_node("Cast", [f"mb{i}"], [f"mask{i}"], to=TensorProto.FLOAT),
        ]
        last_hidden = i == n - 2
        out = "hlast" if last_hidden else f"h{i + 1}"
        if sizes[i] == sizes[i + 1]:   # pass-through for switched-off units
            nodes += [
                helper.make_node("Mul", [f"a{i}", f"mask{i}"], [f"am{i}"]),
                helper.make_node("Sub", [one, f"mask{i}"], [f"inv{i}"]),
                helper.make_node("Mul", [h, f"inv{i}"], [f"pt{i}"]),
                helper.make_node("Add", [f"am{i}", f"pt{i}"], [out]),
            ]
        else:
            nodes.append(helper.make_node("Mul", [f"a{i}", f"mask{i}"], [out]))
        if last_hidden:   # the head sees [x, h] (skip connection), whitened by T when it has one
            head_in = f"h{i + 1}"
            if "T" in state.layers[-1]:
                nodes += [helper.make_node("Concat", ["x", out], ["u"], axis=1),
                          helper.make_node("MatMul", ["u", const("T", state.layers[-1]["T"])], [head_in])]
            else:
                nodes.append(helper.make_node("Concat", ["x", out], [head_in], axis=1))
            out = head_in
        h = out

    def vi(name, shape):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)

    inputs = [vi("x", ["N", sizes[0]])]
    for i in range(n):
        inputs += [vi(f"P{i}", [dims[i][1], dims[i][0]]), vi(f"g{i}", [dims[i][1]])]
    assert [v.name for v in inputs] == input_names(n)
    out_shapes = {"logits": ["N", sizes[-1]]}
    out_shapes.update({f"h{i}": ["N", dims[i][0]] for i in range(1, n)})
    out_shapes.update({f"r{i}": ["N", sizes[i + 1]] for i in range(n - 1)})
    outputs = [vi(name, out_shapes[name]) for name in output_names(n)]
    graph = helper.make_graph(nodes, f"spl_{state.model_id}", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="edge-spl")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model.SerializeToString()


def export_model(state: ModelState) -> ExportedModel:
    manifest = Manifest(
        model_id=state.model_id, sizes=state.sizes, class_names=list(state.class_names),
        feature_names=list(state.feature_names), mean=[float(v) for v in state.mean],
        std=[float(v) for v in state.std], onnx_sha256="", prototypes_sha256="",
    ).validate()
    return ExportedModel(manifest, build_onnx(state), state.prototypes())

"""ONNX Runtime backend: CUDA provider when present and asked for, else CPU.

Intermediate tensors are captured by exposing them as extra graph outputs (one session per set
of captured layers, cached). Layers are named like the PyTorch modules they came from when the
graph carries PyTorch's exporter scopes (node names such as ``/layer1/layer1.0/conv1/Conv``):
the module's output is the output of the last node inside its scope, so ``layer3`` means the same
tensor on both backends. Otherwise a layer is a node's output tensor, named as in the graph.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..types import LayerInfo, ModelSpec
from .base import Backend, BackendError, ForwardResult, forward_error

MAX_SESSIONS = 3


def _scope_path(node_name: str) -> str:
    """PyTorch exporter scope -> module path: '/layer2/layer2.0/downsample/downsample.0/Conv'
    -> 'layer2.0.downsample.0'. A numbered child shows as '<parent name>.<index>'. Returns ''
    when the name is not a PyTorch scope."""
    if not node_name.startswith("/"):
        return ""
    parts: list[str] = []
    prev = ""
    for comp in node_name.strip("/").split("/")[:-1]:
        # '/features/features.1/features.1.0/block/block.0/...': each numbered scope repeats its
        # parent's full name ('features.1' then 'features.1.0'), so only the new tail is added
        if prev and comp.startswith(prev + "."):
            parts.append(comp[len(prev) + 1:])
        else:
            parts.append(comp)
        prev = comp
    return ".".join(parts)


_REPEAT = re.compile(r"^(.*)_(\d+)$")


def _normalise_repeats(path: str, known: set[str]) -> str:
    """A module called twice appears as 'relu' then 'relu_1'; map the repeat back to 'relu'."""
    parts = path.split(".")
    for i, comp in enumerate(parts):
        m = _REPEAT.match(comp)
        if m:
            base = ".".join([*parts[:i], m.group(1)])
            if base in known and ".".join(parts[: i + 1]) not in known:
                parts[i] = m.group(1)
    return ".".join(parts)


class OnnxBackend(Backend):
    name = "onnxruntime"
    supports_gradients = False

    def __init__(self, onnx_path: str, spec: ModelSpec, device: str = "auto") -> None:
        import onnx
        import onnxruntime as ort

        self.spec = spec
        self.path = onnx_path
        self._ort = ort
        try:
            model = onnx.load(onnx_path)
        except Exception as e:  # e.g. missing external weight files
            raise BackendError(f"{onnx_path}: cannot read the model or its external data "
                               f"({' '.join(str(e).split())[:300]})") from e
        with contextlib.suppress(Exception):  # shapes then come from the dry run alone
            model = onnx.shape_inference.infer_shapes(model)
        self._model = model
        init = {i.name for i in model.graph.initializer}
        inputs = [i for i in model.graph.input if i.name not in init]
        if len(inputs) != 1:
            raise BackendError(f"{onnx_path}: expected one image input, the graph has {len(inputs)}")
        self.input_name = inputs[0].name
        dims = inputs[0].type.tensor_type.shape.dim
        #: the batch size the graph was exported for, when it is fixed (None: any)
        self.fixed_batch: int | None = dims[0].dim_value if dims and dims[0].dim_value > 0 else None
        self.output_names = [o.name for o in model.graph.output]
        available = ort.get_available_providers()
        want_cuda = device.startswith("cuda") or (device == "auto" and "CUDAExecutionProvider" in available)
        if device.startswith("cuda") and "CUDAExecutionProvider" not in available:
            raise BackendError(f"device '{device}': ONNX Runtime has no CUDA provider here (use cpu or auto)")
        self.providers = (["CUDAExecutionProvider"] if want_cuda else []) + ["CPUExecutionProvider"]
        self.device = "cuda" if want_cuda else "cpu"
        # layers: PyTorch module scopes when present, else every float node output
        self._tensor_of: dict[str, str] = {}
        self._kind_of: dict[str, str] = {}
        graph_outputs = set(self.output_names)
        meta = {p.key: p.value for p in model.metadata_props}
        scopes = {n.name: _scope_path(n.name) for n in model.graph.node}
        known = set(json.loads(meta["convlens.modules"])) if "convlens.modules" in meta else set()
        known = known or {".".join(s.split(".")[: j + 1]) for s in scopes.values() if s
                          for j in range(s.count(".") + 1)}
        for node in model.graph.node:
            if node.op_type == "Constant" or not node.output:
                continue
            scope = _normalise_repeats(scopes[node.name], known)
            if scope:
                parts = scope.split(".")
                for j in range(1, len(parts) + 1):  # a module's output = its last node's output
                    name = ".".join(parts[:j])
                    self._tensor_of.pop(name, None)
                    self._tensor_of[name] = node.output[0]
                    self._kind_of[name] = node.op_type
        self.scoped = bool(self._tensor_of)
        if not self.scoped:
            for node in model.graph.node:
                if node.op_type != "Constant" and node.output and node.output[0] not in graph_outputs:
                    self._tensor_of[node.output[0]] = node.output[0]
                    self._kind_of[node.output[0]] = node.op_type
        # each session holds the weights: keep the few most recent capture sets only
        self._sessions: OrderedDict[tuple[str, ...], Any] = OrderedDict()

    def layer_names(self) -> list[str]:
        return list(self._tensor_of)

    def _session(self, tensors: tuple[str, ...]) -> Any:
        if tensors in self._sessions:
            self._sessions.move_to_end(tensors)
        else:
            import onnx

            model = self._model
            if tensors:
                model = onnx.ModelProto()
                model.CopyFrom(self._model)
                present = {o.name for o in model.graph.output}
                for t in tensors:
                    if t not in present:
                        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
                        present.add(t)
            opts = self._ort.SessionOptions()
            opts.log_severity_level = 3
            if os.environ.get("CONVLENS_ORT_THREADS"):
                opts.intra_op_num_threads = int(os.environ["CONVLENS_ORT_THREADS"])
            try:
                self._sessions[tensors] = self._ort.InferenceSession(
                    model.SerializeToString(), opts, providers=self.providers
                )
            except Exception as e:
                raise BackendError(f"{self.path}: ONNX Runtime cannot run this model ({' '.join(str(e).split())[:300]})") from e
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)
        return self._sessions[tensors]

    def forward(self, batch: np.ndarray, capture: Sequence[str] = (), _check: bool = True) -> ForwardResult:
        if _check:
            self.check_capture(capture)
        self.check_batch(batch)
        tensors = tuple(dict.fromkeys(self._tensor_of[c] for c in capture))
        sess = self._session(tensors)
        names = self.output_names + [t for t in tensors if t not in self.output_names]
        x = np.ascontiguousarray(batch, dtype=np.float32)
        try:
            if self.fixed_batch is None or len(x) == self.fixed_batch:
                values = sess.run(names, {self.input_name: x})
            else:  # a graph exported for one batch size: run it chunk by chunk, padding the last
                k = self.fixed_batch
                parts = []
                for i in range(0, len(x), k):
                    chunk = x[i:i + k]
                    pad = k - len(chunk)
                    if pad:
                        chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
                    parts.append([v[: k - pad] for v in sess.run(names, {self.input_name: chunk})])
                values = [np.concatenate(vs) for vs in zip(*parts, strict=True)]
        except Exception as e:  # noqa: BLE001
            raise forward_error(self.path, batch.shape, e) from None
        by_name = dict(zip(names, values, strict=True))
        outs = [np.asarray(by_name[n], dtype=np.float32) for n in self.output_names]
        acts = {c: np.asarray(by_name[self._tensor_of[c]], dtype=np.float32) for c in capture}
        return ForwardResult(outs, acts)

    def _discover_layers(self) -> list[LayerInfo]:
        names = self.layer_names()
        shapes: dict[str, tuple[int, ...]] = {}
        try:
            res = self.forward(self.dummy_batch(1), capture=names, _check=False)
            shapes = {n: tuple(a.shape[1:]) for n, a in res.activations.items()}
        except BackendError:
            pass  # an input size the model does not accept: list layers without shapes
        return [LayerInfo(n, self._kind_of[n], shapes.get(n, ())) for n in names]

    def tensor_name(self, layer: str) -> str:
        return self._tensor_of[layer]

    def close(self) -> None:
        self._sessions.clear()

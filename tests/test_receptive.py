"""Receptive fields: the geometry against brute force (gradient support for eager models, impulse
responses on ONNX Runtime), ONNX against eager, and the errors for layers without a field."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from engine.models.receptive import (
    ReceptiveField,
    ReceptiveFieldError,
    _hook_values,
    layer_receptive_field,
    onnx_layer_tensors,
    receptive_field,
    receptive_field_onnx,
    receptive_fields,
    receptive_fields_onnx,
)
from engine.models.zoo import RNet
from engine.types import ConvLensError


class Odd(nn.Module):
    """Every awkward case at once: an even kernel with padding='same' (1 before, 2 after), a pad
    module and F.pad with asymmetric pads, anisotropic stride and dilation, a dilated ceil-mode
    max pool, 'valid', a functional average pool, and two branches of different kernels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 4, padding="same")
        self.pad = nn.ZeroPad2d((1, 0, 2, 0))
        self.conv2 = nn.Conv2d(4, 4, 3, stride=(2, 1), dilation=2, padding=(0, 1))
        self.pool = nn.MaxPool2d(3, stride=2, padding=1, dilation=2, ceil_mode=True)
        self.conv3 = nn.Conv2d(4, 4, (2, 3), dilation=(1, 3), padding="valid")
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, (4, 1), padding="same")  # half a row below a: misaligned
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = self.conv2(self.pad(x))
        x = self.conv3(self.pool(x))
        x = F.avg_pool2d(F.pad(x, (0, 1, 2, 0)), 3, stride=(1, 2), padding=1)
        a, b = self.a(x), self.b(x)
        return self.out(torch.cat([a + b, a], 1))


class WindowSum(nn.Module):
    """A max pool's windows summed instead of maxed: the gradient then reaches every pixel of
    every window (a max sends it to one), so gradient support shows the full geometry."""

    def __init__(self, pool: nn.MaxPool2d) -> None:
        super().__init__()
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.pool
        k, s, pad, d = (nn.modules.utils._pair(v) for v in (p.kernel_size, p.stride, p.padding, p.dilation))
        oh, ow = p(x).shape[-2:]
        xp = F.pad(x, (pad[1], pad[1] + s[1] * 2, pad[0], pad[0] + s[0] * 2))
        cols = F.unfold(xp, k, dilation=d, stride=s)
        n, c = x.shape[:2]
        hh = (xp.shape[2] - d[0] * (k[0] - 1) - 1) // s[0] + 1
        ww = (xp.shape[3] - d[1] * (k[1] - 1) - 1) // s[1] + 1
        return cols.view(n, c, k[0] * k[1], hh, ww).sum(2)[..., :oh, :ow]


def positive_copy(model: nn.Module) -> nn.Module:
    """Float64 copy with positive constant weights and biases (no dead unit, no cancellation)."""
    m = copy.deepcopy(model).double().eval()
    for mod in list(m.modules()):
        if hasattr(mod, "inplace"):
            mod.inplace = False
        for name, child in list(mod.named_children()):
            if isinstance(child, nn.MaxPool2d):
                setattr(mod, name, WindowSum(child))
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.Conv2d | nn.Linear):
                mod.weight.fill_(1.0 / mod.weight[0].numel())
                if mod.bias is not None:
                    mod.bias.fill_(0.01)
            elif isinstance(mod, nn.BatchNorm2d):
                mod.weight.fill_(1.0), mod.bias.fill_(0.01), mod.running_mean.zero_(), mod.running_var.fill_(1.0)
    return m


Box = tuple[int, int, int, int]


def gradient_boxes(model: nn.Module, layer: str, size: tuple[int, int]) -> dict[tuple[int, int], Box | None]:
    """Bounding box of the nonzero gradient d out[0, i, j] / d input, at corners, edges, centre."""
    m = positive_copy(model)
    store: dict[str, torch.Tensor] = {}
    hook = m.get_submodule(layer).register_forward_hook(lambda _m, _i, o: store.setdefault("out", o))
    x = (torch.rand(1, 3, *size, dtype=torch.float64) + 0.5).requires_grad_()
    with contextlib.suppress(RuntimeError):  # e.g. RNet's dense layers at another size: the layer has run
        m(x)
    hook.remove()
    out = store["out"]
    h, w = out.shape[-2:]
    boxes = {}
    for i, j in {(0, 0), (0, w // 2), (h // 2, w // 2), (h // 2, 0), (h - 1, w - 1), (h - 1, 0)}:
        (g,) = torch.autograd.grad(out[0, 0, i, j], x, retain_graph=True)
        nz = g[0].abs().sum(0).nonzero()
        if not len(nz):  # the window lies in the padding only
            boxes[(i, j)] = None
            continue
        boxes[(i, j)] = (int(nz[:, 0].min()), int(nz[:, 1].min()), int(nz[:, 0].max()) + 1, int(nz[:, 1].max()) + 1)
    return boxes


MODELS = {
    "resnet18": torchvision.models.resnet18,
    "vgg11": torchvision.models.vgg11,
    "alexnet": torchvision.models.alexnet,
    "densenet121": torchvision.models.densenet121,
    "mobilenet_v2": torchvision.models.mobilenet_v2,
    "convnext_tiny": torchvision.models.convnext_tiny,
    "odd": Odd,
    "rnet": RNet,
}


@pytest.mark.parametrize(("arch", "layer", "size"), [
    ("resnet18", "maxpool", (64, 64)), ("resnet18", "layer1", (96, 96)), ("resnet18", "layer2", (128, 112)),
    ("resnet18", "layer3", (256, 256)), ("vgg11", "features.5", (64, 64)), ("vgg11", "features.10", (96, 96)),
    ("alexnet", "features.5", (127, 127)), ("alexnet", "features.12", (224, 224)),
    ("densenet121", "features.transition1", (64, 64)), ("mobilenet_v2", "features.4", (64, 64)),
    ("odd", "conv2", (37, 29)), ("odd", "conv3", (37, 29)), ("odd", "b", (37, 29)), ("odd", "out", (41, 33)),
    ("rnet", "pool1", (24, 24)), ("rnet", "pool2", (24, 24)), ("rnet", "prelu3", (24, 24)), ("rnet", "conv3", (30, 26)),
])
def test_fields_match_the_gradient_support(arch: str, layer: str, size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    model = MODELS[arch]().eval()
    rf = receptive_field(model, layer, size)
    for (i, j), box in gradient_boxes(model, layer, size).items():
        assert clipped(rf, i, j, size) == box, (arch, layer, (i, j), rf)


def clipped(rf: ReceptiveField, i: int, j: int, size: tuple[int, int]) -> Box | None:
    top, left, bottom, right = rf.clipped_box(i, j, size)
    return (top, left, bottom, right) if bottom > top and right > left else None


def test_geometry_by_hand() -> None:
    rf = ReceptiveField().then(7, 2, 3).then(3, 2, 1)  # ResNet stem: conv 7/2 pad 3, max pool 3/2 pad 1
    assert (rf.size, rf.stride, rf.offset) == ((11, 11), (4, 4), (0.0, 0.0))
    assert rf.centre(2, 3) == (8.0, 12.0) and rf.box(0, 0) == (-5, -5, 6, 6)
    assert rf.clipped_box(0, 0, (32, 32)) == (0, 0, 6, 6) and rf.clipped_box(7, 7, (32, 32)) == (23, 23, 32, 32)
    even = ReceptiveField().then(2, 2)  # a 2x2/2 pool: centre between pixels 0 and 1
    assert even.offset == (0.5, 0.5) and even.box(1, 0) == (2, 0, 4, 2)
    dil = ReceptiveField().then((3, 1), (1, 2), (0, 0), (2, 1))
    assert (dil.size, dil.stride, dil.offset) == ((5, 1), (1, 2), (2.0, 0.0))
    with pytest.raises(ReceptiveFieldError, match="different strides"):
        ReceptiveField().then(3, 2).union(ReceptiveField(), "add")
    shifted = ReceptiveField().then(3).union(ReceptiveField().then(2), "add")  # centres 1 and 0.5
    assert shifted.box(0, 0) == (0, 0, 3, 3) and any("misaligned" in n for n in shifted.notes)


def test_torchvision_families_trace_and_name_every_stage() -> None:
    rf = receptive_fields(torchvision.models.resnet18().eval(), (224, 224))
    assert [(rf[n].size[0], rf[n].stride[0]) for n in ("layer1", "layer2", "layer3", "layer4")] == \
        [(43, 4), (99, 8), (211, 16), (435, 32)]
    assert rf["layer2.0.downsample"].stride == (8, 8) and "fc" not in rf
    vgg = receptive_field(torchvision.models.vgg16().eval(), "features.29", (224, 224))  # conv5_3 + ReLU
    assert (vgg.size, vgg.stride, vgg.offset) == ((196, 196), (16, 16), (7.5, 7.5))
    for arch, layer in [("mobilenet_v3_small", "features.12"), ("efficientnet_b0", "features.7"),
                        ("convnext_tiny", "features.7"), ("shufflenet_v2_x0_5", "stage4")]:
        got = receptive_field(getattr(torchvision.models, arch)().eval(), layer, (224, 224))
        assert got.stride == (32, 32) and not got.is_global, arch
        if arch in ("mobilenet_v3_small", "efficientnet_b0"):  # squeeze-excitation gates
            assert any("squeeze-excitation" in n for n in got.notes), arch


def test_channels_last_blocks_keep_the_field() -> None:
    rf = receptive_fields(torchvision.models.convnext_tiny().eval(), (64, 64))  # permute, LayerNorm, Linear
    assert rf["features.1.0.block.5"] == rf["features.1.0.block.3"] == rf["features.1.0.block.0"]
    assert rf["features.1.0.block.0"].size == (4 + 6 * 4,) * 2  # stem 4/4, then a 7x7 depthwise conv


def test_a_model_in_train_mode_is_left_as_it_is() -> None:
    model = torchvision.models.resnet18().train()
    before = model.bn1.running_mean.clone(), model.bn1.num_batches_tracked.clone()
    assert receptive_field(model, "layer2", (64, 64)).size == (99, 99)
    assert model.training and torch.equal(model.bn1.running_mean, before[0])
    assert torch.equal(model.bn1.num_batches_tracked, before[1])


def test_global_pool_sees_the_whole_input() -> None:
    rf = receptive_field(torchvision.models.resnet18().eval(), "avgpool", (96, 80))
    assert rf.is_global and rf.clipped_box(0, 0, (96, 80)) == (0, 0, 96, 80)
    assert any("global pool" in n for n in rf.notes)


def test_layers_without_a_field_raise_clear_errors() -> None:
    model = torchvision.models.resnet18().eval()
    with pytest.raises(ReceptiveFieldError, match="'fc' has no receptive field.*not spatial"):
        receptive_field(model, "fc", (64, 64))
    with pytest.raises(ConvLensError, match="no layer 'layer9'"):
        receptive_field(model, "layer9", (64, 64))
    with pytest.raises(ReceptiveFieldError, match="'dense4'.*not spatial"):  # after RNet's permute + flatten
        receptive_field(RNet().eval(), "dense4", (24, 24))

    class Up(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3)
            self.up = nn.Upsample(scale_factor=2)
            self.head = nn.Conv2d(3, 3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.up(self.conv(x)))

    assert receptive_field(Up(), "conv", (16, 16)).size == (3, 3)
    with pytest.raises(ReceptiveFieldError, match="'head'.*Upsample"):
        receptive_field(Up(), "head", (16, 16))


def test_the_real_pretrained_rnet(rnet_spec) -> None:
    from engine.models import load_model

    rf = receptive_fields(load_model(rnet_spec).module, (24, 24))
    got = [(rf[n].size[0], rf[n].stride[0], rf[n].offset[0]) for n in ("conv1", "pool1", "conv2", "pool2", "conv3")]
    assert got == [(3, 1, 1.0), (5, 2, 2.0), (9, 2, 4.0), (13, 4, 6.0), (17, 4, 8.0)]


class Looping(nn.Module):
    """Data-dependent control flow: fx cannot trace it, but it is a chain of modules."""

    def __init__(self, skip: bool = False) -> None:
        super().__init__()
        self.skip = skip
        self.blocks = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                                    nn.Conv2d(4, 4, 3, dilation=2, padding="same"), nn.AvgPool2d(3, 2, 1))
        self.head = nn.Conv2d(4, 4, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            if x.shape[-1] < 2:
                break
            x = b(x)
        if self.skip:
            x = x + 1  # an op outside modules
        return self.head(x)


def test_untraceable_chains_fall_back_to_hooks() -> None:
    torch.manual_seed(0)
    with pytest.raises(Exception):  # noqa: B017 - the premise: fx cannot trace it
        torch.fx.symbolic_trace(Looping())
    size = (40, 36)
    for layer in ("blocks.2", "blocks.4", "head"):
        rf = receptive_field(Looping().eval(), layer, size)
        for (i, j), box in gradient_boxes(Looping().eval(), layer, size).items():
            assert clipped(rf, i, j, size) == box, (layer, (i, j))
    assert receptive_field(Looping(skip=True).eval(), "blocks.4", size).stride == (4, 4)
    with pytest.raises(ReceptiveFieldError, match="no layer 'blocks'"):  # iterated, never called
        receptive_field(Looping().eval(), "blocks", size)
    with pytest.raises(ReceptiveFieldError, match="'head'.*outside modules.*after 'blocks.4'.*fx could not trace"):
        receptive_field(Looping(skip=True).eval(), "head", size)
    # on a traceable chain the fallback and fx agree layer by layer
    vgg = torchvision.models.vgg11().eval()
    hooks = _hook_values(vgg, torch.zeros(1, 3, 64, 64), "test")
    assert {k: v for k, v in hooks.items() if isinstance(v, ReceptiveField)} == receptive_fields(vgg, (64, 64))


def _export(model: nn.Module, size: tuple[int, int]) -> object:
    import onnx

    buf = io.BytesIO()
    torch.onnx.export(model.eval(), (torch.zeros(1, 3, *size),), buf, dynamo=False, opset_version=17,
                      input_names=["input"], dynamic_axes={"input": {0: "batch"}})
    proto = onnx.load_from_string(buf.getvalue())
    tag = proto.metadata_props.add()  # as the backend's export does: exact module names
    tag.key, tag.value = "convlens.modules", json.dumps([n for n, _ in model.named_modules() if n])
    return proto


@pytest.mark.parametrize(("arch", "stages"), [
    ("resnet18", ["conv1", "maxpool", "layer1", "layer2.0.downsample", "layer2", "layer3", "layer4", "avgpool"]),
    ("odd", ["conv1", "pad", "conv2", "pool", "conv3", "a", "b", "out"]),
    ("mobilenet_v2", ["features.1", "features.4", "features.14", "features.18"]),
    ("convnext_tiny", ["features.0", "features.1", "features.4", "features.7"]),  # Transpose, LayerNorm, MatMul
])
def test_onnx_agrees_with_eager(arch: str, stages: list[str]) -> None:
    torch.manual_seed(0)
    model, size = MODELS[arch]().eval(), (64, 56)
    proto = _export(model, size)
    eager = receptive_fields(model, size)
    tensors = onnx_layer_tensors(proto)
    both = [n for n in eager if n in tensors]  # the exporter folds BatchNorms into convs
    assert set(stages) <= set(both)
    onnx_fields = receptive_fields_onnx(proto, size)
    assert {n: onnx_fields.get(n) for n in both} == {n: eager[n] for n in both}
    last = both[-1]
    assert receptive_field_onnx(proto, tensors[last], size) == receptive_field_onnx(proto, last, size) == eager[last]


def test_backends_agree_on_the_demo_and_a_user_class(rnet_spec, tmp_path: Path) -> None:
    from engine.backends import open_backend
    from engine.models import build_spec, load_model

    torch.save(Odd().state_dict(), tmp_path / "odd.pt")
    odd = build_spec(str(tmp_path / "odd.pt"), arch="tests.test_receptive:Odd", input_size="40x32")
    torch.export.save(torch.export.export(Odd().eval(), (torch.zeros(1, 3, 40, 32),)), tmp_path / "odd.pt2")
    exported = build_spec(str(tmp_path / "odd.pt2"), input_size="40x32")
    assert load_model(exported).format == "export"
    for spec in (rnet_spec, odd, exported):
        loaded = load_model(spec)
        eager = open_backend(loaded, "torch", "cpu")
        onnx_be = open_backend(loaded, "onnx", "cpu", onnx_dir=tmp_path)
        checked = 0
        for layer in onnx_be.layer_names():
            try:
                want = layer_receptive_field(eager, layer)
            except ReceptiveFieldError:
                with pytest.raises(ReceptiveFieldError):
                    layer_receptive_field(onnx_be, layer)
                continue
            assert layer_receptive_field(onnx_be, layer) == want, layer
            checked += 1
        assert checked >= 5


def test_the_real_ocr_onnx_classifier(ocr_onnx: Path) -> None:
    rf = receptive_field_onnx(ocr_onnx, "depthwise_conv2d_0.tmp_0")  # conv 3/2 pad 1, 1x1, depthwise 3/(2,1)
    assert (rf.size, rf.stride, rf.offset) == ((7, 7), (4, 2), (0.0, 0.0))
    with pytest.raises(ReceptiveFieldError, match="input_size"):  # its H and W are dynamic
        receptive_field_onnx(ocr_onnx, "tmp_0")
    gated = receptive_field_onnx(ocr_onnx, "tmp_0", (48, 192))
    assert gated.size == (7, 7) and any("squeeze-excitation" in n for n in gated.notes)
    import onnx

    model = onnx.load(str(ocr_onnx))
    fields = receptive_fields_onnx(model, (48, 192))  # every node output, as the backend names them
    convs = [fields[n.output[0]] for n in model.graph.node if n.op_type == "Conv"]
    assert {f.stride[1] for f in convs if not f.is_global} == {2}  # strides (2, 1): text keeps its width
    last = fields["pool2d_9.tmp_0"]  # the last spatial map: 3 kernel-3 and 8 kernel-5 convs at jump 2, a 2x2 pool
    assert (last.size[1], last.stride, last.offset[1]) == (81, (64, 4), 1.0)
    assert fields["pool2d_10.tmp_0"].is_global
    from engine.backends import open_backend
    from engine.models import build_spec, load_model

    backend = open_backend(load_model(build_spec(str(ocr_onnx), input_size="48x192")), device="cpu")
    assert layer_receptive_field(backend, "pool2d_9.tmp_0") == last
    with pytest.raises(ReceptiveFieldError, match="not spatial"):
        receptive_field_onnx(model, next(n.output[0] for n in model.graph.node if n.op_type == "MatMul"), (48, 192))


def test_onnx_geometry_matches_impulse_responses(tmp_path: Path) -> None:
    """auto_pad SAME_UPPER / SAME_LOWER, pads, Pad nodes, dilated pools, Add and Concat branches,
    against what ONNX Runtime itself does with one lit pixel per batch item."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    def w(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
        return numpy_helper.from_array(np.full(shape, 0.1, np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], kernel_shape=[4, 4], strides=[2, 2], auto_pad="SAME_UPPER"),
        helper.make_node("Pad", ["c1", "pads"], ["p1"]),
        helper.make_node("AveragePool", ["p1"], ["a1"], kernel_shape=[3, 3], strides=[1, 2], pads=[0, 0, 1, 2]),
        # degenerate: with the Pad's two rows, the first window lies wholly in padding
        helper.make_node("AveragePool", ["p1"], ["deg"], kernel_shape=[3, 3], pads=[1, 0, 0, 0]),
        helper.make_node("Conv", ["a1", "w2"], ["c2"], kernel_shape=[3, 2], auto_pad="SAME_LOWER"),
        helper.make_node("Conv", ["c2", "w2"], ["d2"], kernel_shape=[3, 2], dilations=[2, 3], pads=[2, 0, 1, 3]),
        helper.make_node("MaxPool", ["d2"], ["m1"], kernel_shape=[2, 2], dilations=[2, 2], pads=[1, 1, 0, 0]),
        helper.make_node("Relu", ["m1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w3"], ["b1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["r1", "w4"], ["b2"], kernel_shape=[1, 1]),
        helper.make_node("Add", ["b1", "b2"], ["s"]),
        helper.make_node("Concat", ["s", "r1"], ["y"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "geometry", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 29, 23])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [w("w1", (1, 1, 4, 4)), w("w2", (1, 1, 3, 2)), w("w3", (1, 1, 3, 3)), w("w4", (1, 1, 1, 1)),
         numpy_helper.from_array(np.array([0, 0, 2, 0, 0, 0, 0, 1], np.int64), "pads")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "geometry.onnx"
    onnx.save(model, str(path))
    h, wd = 29, 23
    impulses = np.zeros((h * wd, 1, h, wd), np.float32)
    impulses[np.arange(h * wd), 0, np.arange(h * wd) // wd, np.arange(h * wd) % wd] = 1
    for tensor in ("c1", "a1", "c2", "d2", "m1", "s", "y", "deg"):
        m = onnx.ModelProto()
        m.CopyFrom(model)
        m.graph.output[0].name = tensor
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        out = sess.run(None, {"x": impulses})[0]
        rf = receptive_field_onnx(path, tensor)
        for i in range(out.shape[2]):
            for j in range(out.shape[3]):
                lit = np.flatnonzero(out[:, :, i, j].any(1))
                rows, cols = lit // wd, lit % wd
                box = (rows.min(), cols.min(), rows.max() + 1, cols.max() + 1) if len(lit) else None
                if tensor == "deg" and i == 0:  # the window lies in padding: the box is a superset
                    assert box is None and clipped(rf, i, j, (h, wd)) is not None
                else:
                    assert clipped(rf, i, j, (h, wd)) == box, (tensor, i, j)

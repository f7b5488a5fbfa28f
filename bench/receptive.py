"""How long computing every layer's receptive field takes, eager (torch.fx trace + one shape
pass) and ONNX (shape inference + graph walk), for torchvision models with random weights.

"agree": layers whose ONNX field (by the backend's layer names) equals the eager one (the
exporter folds BatchNorms into convolutions, so those have no ONNX tensor). Each call computes
the fields of all layers at once, so a method should call
``receptive_fields`` / ``receptive_fields_onnx`` once per model, not once per layer.

    .venv/bin/python bench/receptive.py [--archs resnet18 resnet50 ...] [--size 224] [--repeat 3]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+",
                        default=["resnet18", "resnet50", "vgg16", "densenet121", "efficientnet_b0", "convnext_tiny"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    import onnx
    import torch
    import torchvision

    from engine.models.receptive import receptive_fields, receptive_fields_onnx

    size = (args.size, args.size)
    print(f"{'arch':<16} {'layers':>6} {'eager s':>8} {'onnx s':>8} {'agree':>6}  deepest spatial field")
    for arch in args.archs:
        model = getattr(torchvision.models, arch)().eval()
        eager_t, onnx_t = [], []
        for _ in range(args.repeat):
            t = time.perf_counter()
            fields = receptive_fields(model, size)
            eager_t.append(time.perf_counter() - t)
        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (torch.zeros(1, 3, *size),), buf, dynamo=False, opset_version=17)
        proto = onnx.load_from_string(buf.getvalue())
        tag = proto.metadata_props.add()  # as the backend's export does: exact module names
        tag.key, tag.value = "convlens.modules", json.dumps([n for n, _ in model.named_modules() if n])
        for _ in range(args.repeat):
            t = time.perf_counter()
            onnx_fields = receptive_fields_onnx(proto, size)
            onnx_t.append(time.perf_counter() - t)
        agree = sum(onnx_fields.get(k) == f for k, f in fields.items())
        deepest = [f for f in fields.values() if not f.is_global][-1]
        print(f"{arch:<16} {len(fields):>6} {min(eager_t):>8.3f} {min(onnx_t):>8.3f} {agree:>6}  "
              f"size {deepest.size}, stride {deepest.stride}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

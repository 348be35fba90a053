"""Does the GPU fast path keep every activation channels_last? Checked without a GPU.

    python bench/layout_check.py [--stock-ops] [--config configs/cifar10.yaml]

Traces one training step of the UNet (forward, loss, backward) on meta tensors with the
decompositions `torch.compile` applies on CUDA (inductor's table; GroupNorm's decomposition takes
its non-CPU branch on meta), in bf16 and channels_last as the loop runs on a GPU. Meta convolutions
return NCHW, so here they follow cuDNN's rule instead: channels_last out when the input or weight is
channels_last (the backward meta kernel already does). Then it counts, over the traced graph:

  nchw_activations   results of non-view ops shaped like an activation (4-D, square spatial,
                     more than 3 channels) that are not channels_last: each is a layout break,
                     which costs a transposing copy on the GPU
  layout_copies      clone/copy_ nodes on 4-D tensors whose output strides differ from the input's

Prints one JSON line. `--stock-ops` uses ATen's GroupNorm and interpolate (what the model did before
pipeline.models.unet.GroupNorm); the test suite checks ours gives zero of both and the stock ops do not.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VIEW_OPS = ("permute", "view", "slice", "squeeze", "unsqueeze", "expand", "as_strided", "aten.t.",
            "transpose", "alias", "split", "select", "reshape", "chunk")


def _cudnn_like_meta_convolution():
    """Override the Meta kernel of aten.convolution to pick cuDNN's output layout. Returns the
    library handle: the override lasts as long as it does (run this in its own process)."""
    from torch._meta_registrations import meta_conv
    from torch._prims_common import suggest_memory_format

    def convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups):
        out = meta_conv(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
        if torch.channels_last in (suggest_memory_format(input), suggest_memory_format(weight)):
            out = out.contiguous(memory_format=torch.channels_last)
        return out

    lib = torch.library.Library("aten", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
        lib.impl("convolution", convolution, "Meta")
    return lib


def check(config: Path, stock_ops: bool, batch: int = 8) -> dict:
    from torch._inductor.decomposition import select_decomp_table
    from torch.func import functional_call
    from torch.fx.experimental.proxy_tensor import make_fx

    from pipeline.models import unet
    from pipeline.config import load_config
    from pipeline.factory import build_model

    lib = _cudnn_like_meta_convolution()  # noqa: F841 - keeps the override alive
    unet.CHANNELS_LAST_OPS = not stock_ops
    cfg = load_config(config)
    with torch.device("meta"):
        net = build_model(cfg).to(torch.bfloat16).to(memory_format=torch.channels_last)
    params = dict(net.named_parameters())
    size, channels = cfg.data.image_size, cfg.data.channels
    x = torch.empty(batch, channels, size, size, dtype=torch.bfloat16, device="meta")
    x = x.contiguous(memory_format=torch.channels_last)
    t = torch.zeros(batch, dtype=torch.long, device="meta")

    def step(params, x, t):
        loss = functional_call(net, params, (x, t)).float().square().mean()
        return torch.autograd.grad(loss, list(params.values()))

    graph = make_fx(step, decomposition_table=select_decomp_table())(params, x, t).graph
    nchw, copies, where = 0, 0, {}
    for node in graph.nodes:
        out = node.meta.get("val")
        if node.op != "call_function" or not isinstance(out, torch.Tensor):
            continue
        name = str(node.target)
        src = node.args[0].meta.get("val") if node.args and isinstance(node.args[0], torch.fx.Node) else None
        if any(k in name for k in ("clone", "copy_")) and isinstance(src, torch.Tensor) and src.dim() == 4 \
                and src.stride() != out.stride():
            copies += 1
            where[name] = where.get(name, 0) + 1
        if any(k in name for k in VIEW_OPS):
            continue
        if out.dim() == 4 and out.shape[1] > 3 and out.shape[2] == out.shape[3] > 1 \
                and not out.is_contiguous(memory_format=torch.channels_last):
            nchw += 1
            where[name] = where.get(name, 0) + 1
    return dict(ops="stock" if stock_ops else "ours", nodes=len(graph.nodes), nchw_activations=nchw,
                layout_copies=copies, by_op=dict(sorted(where.items(), key=lambda kv: -kv[1])[:8]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=REPO / "configs/cifar10.yaml")
    p.add_argument("--stock-ops", action="store_true", help="ATen GroupNorm and interpolate (the ablation)")
    args = p.parse_args(argv)
    print(json.dumps(check(args.config, args.stock_ops)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tests for pipeline.unet (the DDPM UNet of Ho et al. 2020)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from pipeline.models.unet import GroupNorm, UNet, _num_groups, count_parameters, timestep_embedding, upsample_nearest_2x

CIFAR_REFERENCE_PARAMS = 35_746_307  # exact count of the reference (TF) implementation


def tiny(in_channels: int = 3, **kw) -> UNet:
    cfg = dict(image_size=16, in_channels=in_channels, channels=16, channel_mult=(1, 2),
               num_res_blocks=1, attention_resolutions=(8,), dropout=0.0)
    cfg.update(kw)
    return UNet(**cfg)


def demo() -> UNet:
    return UNet(28, in_channels=1, channels=16, channel_mult=(1, 2, 4), num_res_blocks=1,
                attention_resolutions=(7,), dropout=0.1)


@torch.no_grad()
def perturb(model: UNet, seed: int = 0) -> UNet:
    """Move every parameter away from its (partly zero) init so all paths carry signal."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


# ------------------------------------------------------------------ parameter counts
def test_cifar10_param_count_matches_reference():
    with torch.device("meta"):
        model = UNet(32, in_channels=3, channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                     attention_resolutions=(16,), dropout=0.1)
    n = count_parameters(model)
    print(f"CIFAR-10 UNet params: {n:,} (reference {CIFAR_REFERENCE_PARAMS:,})")
    assert abs(n - 35.7e6) / 35.7e6 < 0.005
    assert n == CIFAR_REFERENCE_PARAMS


def test_256px_param_count():
    with torch.device("meta"):
        model = UNet(256, in_channels=3, channels=128, channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
                     attention_resolutions=(16,), dropout=0.0)
    n = count_parameters(model)
    print(f"256x256 UNet params: {n:,}")
    assert abs(n - 114e6) / 114e6 < 0.005


def test_demo_model_builds():
    model = demo()
    n = count_parameters(model)
    print(f"demo UNet params: {n:,}")
    assert n > 0
    out = model(torch.randn(2, 1, 28, 28), torch.tensor([0, 999]))
    assert out.shape == (2, 1, 28, 28)
    # attention exists at the 7x7 level (plus the middle block)
    assert sum(type(m).__name__ == "AttnBlock" for m in model.modules()) == 1 + 1 + 2


def test_group_count_fallback():
    # the paper's widths (incl. up-path concatenations) all get the reference 32 groups
    for c in (128, 256, 384, 512, 640, 768, 1024):
        assert _num_groups(c) == 32
    # narrow demo widths keep >= 4 channels per group (1-channel groups would erase temb)
    assert _num_groups(16) == 4
    assert _num_groups(32) == 8
    assert _num_groups(48) == 12
    assert _num_groups(64) == 16
    assert _num_groups(3) == 1


def test_all_group_norms_in_paper_config_use_32_groups():
    with torch.device("meta"):
        model = UNet(32)
    gns = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert gns and all(m.num_groups == 32 for m in gns)


# ------------------------------------------------------------------ forward behaviour
@pytest.mark.parametrize("in_channels", [1, 3])
def test_forward_shape(in_channels):
    model = tiny(in_channels)
    x = torch.randn(2, in_channels, 16, 16)
    out = model(x, torch.tensor([3, 500]))
    assert out.shape == x.shape and out.dtype == torch.float32


def test_out_channels_override():
    model = tiny(3, out_channels=6)
    assert model(torch.randn(2, 3, 16, 16), torch.tensor([1, 2])).shape == (2, 6, 16, 16)


def test_reference_zero_init():
    """As the reference (init_scale=0): ResBlock conv2, attention proj_out and conv_out start at zero,
    so the untrained model predicts exactly zero noise."""
    model = tiny(3)
    for name, p in model.named_parameters():
        if ".conv2." in name or "proj_out." in name or name.startswith("conv_out."):
            assert torch.count_nonzero(p) == 0, name
        if name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name
    out = model(torch.randn(2, 3, 16, 16), torch.tensor([0, 10]))
    assert torch.count_nonzero(out) == 0


def test_gradients_reach_every_parameter():
    model = perturb(tiny(3))
    x = torch.randn(2, 3, 16, 16)
    loss = (model(x, torch.tensor([5, 900])) - x).pow(2).mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert torch.count_nonzero(p.grad) > 0, name


def test_first_step_gradient_only_reaches_conv_out_at_init():
    model = tiny(3)
    x = torch.randn(2, 3, 16, 16)
    (model(x, torch.tensor([5, 900])) - x).pow(2).mean().backward()
    assert torch.count_nonzero(model.conv_out.weight.grad) > 0
    assert all(p.grad is not None for p in model.parameters())


def test_timestep_changes_output():
    model = perturb(tiny(3)).eval()
    x = torch.randn(1, 3, 16, 16).expand(2, -1, -1, -1)
    with torch.no_grad():
        out = model(x, torch.tensor([0, 999]))
    assert not torch.allclose(out[0], out[1], atol=1e-4)


def test_timestep_changes_demo_output():
    """Regression: with 1-channel groups GroupNorm cancelled the timestep shift entirely."""
    model = perturb(demo()).eval()
    x = torch.randn(1, 1, 28, 28).expand(2, -1, -1, -1)
    with torch.no_grad():
        out = model(x, torch.tensor([0, 999]))
    assert (out[0] - out[1]).abs().max() > 1e-3


def test_float_and_int_timesteps_agree():
    model = perturb(tiny(3)).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        a = model(x, torch.tensor([7, 123]))
        b = model(x, torch.tensor([7.0, 123.0]))
    torch.testing.assert_close(a, b)


def test_timestep_embedding_matches_reference_formula():
    t = torch.tensor([0, 1, 999])
    emb = timestep_embedding(t, 8)
    half = 4
    freqs = torch.exp(-math.log(10000) / (half - 1) * torch.arange(half, dtype=torch.float64))
    args = t.double()[:, None] * freqs[None]
    ref = torch.cat([args.sin(), args.cos()], 1).float()
    torch.testing.assert_close(emb, ref)
    assert timestep_embedding(t, 9).shape == (3, 9)
    assert emb.dtype == torch.float32


def test_attention_matches_reference_math():
    """AttnBlock == the reference einsum attention (single head, scale C**-0.5)."""
    block = perturb(tiny(3)).mid_attn.eval()
    x = torch.randn(2, 32, 8, 8)
    B, C, H, W = x.shape
    h = block.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
    q, k, v = block.qkv(h).chunk(3, dim=-1)
    w = torch.softmax(torch.einsum("bic,bjc->bij", q, k) * C ** -0.5, dim=-1)
    ref = x + block.proj_out(torch.einsum("bij,bjc->bic", w, v)).transpose(1, 2).reshape(B, C, H, W)
    with torch.no_grad():
        torch.testing.assert_close(block(x), ref, atol=1e-5, rtol=1e-4)


def test_uses_scaled_dot_product_attention(monkeypatch):
    calls = []
    orig = F.scaled_dot_product_attention

    def spy(q, k, v, *a, **kw):
        calls.append(q.shape)
        return orig(q, k, v, *a, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = tiny(3)  # attention at 8: 1 down + 2 up + 1 middle
    model(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]))
    assert len(calls) == 4
    assert all(s[0] == 2 and s[1] == 1 for s in calls)  # (B, 1 head, HW, C)


def test_channels_last_matches_contiguous():
    """Forward and every parameter gradient: the channels_last path (our GroupNorm and upsample over
    NHWC views) computes what the stock NCHW ops compute."""
    model = perturb(tiny(3))
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([3, 700])
    ref = model(x, t)
    ref_grads = torch.autograd.grad(ref.square().mean(), list(model.parameters()))
    with torch.no_grad():
        out_input_cl = model(x.contiguous(memory_format=torch.channels_last), t)
    model_cl = model.to(memory_format=torch.channels_last)
    out_cl = model_cl(x.contiguous(memory_format=torch.channels_last), t)
    assert out_cl.is_contiguous(memory_format=torch.channels_last)
    cl_grads = torch.autograd.grad(out_cl.square().mean(), list(model_cl.parameters()))
    torch.testing.assert_close(out_input_cl, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out_cl, ref, atol=1e-5, rtol=1e-4)
    for (name, _), a, b in zip(model.named_parameters(), cl_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("n,c,h,w,groups", [(2, 64, 8, 8, 32), (3, 16, 5, 7, 4), (2, 256, 4, 4, 32), (1, 12, 3, 3, 3)])
def test_group_norm_channels_last_matches_stock(n, c, h, w, groups):
    g = torch.Generator().manual_seed(c + h)
    norm = GroupNorm(groups, c, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(c, generator=g))
        norm.bias.copy_(torch.randn(c, generator=g))
    x = torch.randn(n, c, h, w, generator=g) * 3 + 1  # a mean far from 0 tests the variance formula
    x_cl = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    x_ref = x.clone().requires_grad_()
    y, y_ref = norm(x_cl), F.group_norm(x_ref, groups, norm.weight, norm.bias, 1e-6)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    dy = torch.randn(n, c, h, w, generator=g).contiguous(memory_format=torch.channels_last)
    grads = torch.autograd.grad(y, [x_cl, norm.weight, norm.bias], dy)
    grads_ref = torch.autograd.grad(y_ref, [x_ref, norm.weight, norm.bias], dy)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert grads[0].is_contiguous(memory_format=torch.channels_last)


def test_group_norm_output_dtype_is_stock_cuda_dtype():
    """float32 under autocast (as ATen on CUDA, weight float32); the module's dtype when it is bf16."""
    x = torch.randn(2, 32, 4, 4).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert GroupNorm(8, 32)(x.bfloat16()).dtype == torch.float32
    norm16 = GroupNorm(8, 32).bfloat16()
    out = norm16(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), F.group_norm(x, 8), atol=2e-2, rtol=2e-2)


def test_group_norm_under_cuda_decomposition_stays_channels_last():
    """What torch.compile sees on a GPU, traced here with fake CUDA tensors (no GPU needed): the
    stock decomposition copies a channels_last input and returns NCHW; ours must copy nothing and
    return channels_last. Fake tensors are the only way to run the CUDA decomposition on this machine."""
    from torch._inductor.decomposition import select_decomp_table
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake = lambda t: FakeTensor(mode, t.to("meta"), torch.device("cuda", 0))  # noqa: E731
    norm = GroupNorm(32, 128, eps=1e-6)
    with mode:
        x = fake(torch.empty(8, 128, 32, 32, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last))
        w, b = fake(norm.weight.detach()), fake(norm.bias.detach())

    def traced(fn):
        gm = make_fx(fn, decomposition_table=select_decomp_table())(x, w, b)
        out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        copies = [str(n.target) for n in gm.graph.nodes
                  if n.op == "call_function" and any(k in str(n.target) for k in ("clone", "copy", "contiguous"))]
        return (out[0] if isinstance(out, (tuple, list)) else out).meta["val"], copies

    stock, stock_copies = traced(lambda x, w, b: F.group_norm(x.float(), 32, w, b, 1e-6))
    print(f"stock: strides {stock.stride()}, copies {stock_copies}")
    ours, our_copies = traced(lambda x, w, b: torch.func.functional_call(norm, {"weight": w, "bias": b}, (x,)))
    assert ours.device.type == "cuda" and ours.shape == x.shape
    assert ours.is_contiguous(memory_format=torch.channels_last), ours.stride()
    assert our_copies == []


@pytest.mark.parametrize("config", ["cifar10", "lsun256"])
def test_gpu_training_step_keeps_every_activation_channels_last(config):
    """bench/layout_check.py traces a whole training step (forward, loss, backward) with the
    decompositions torch.compile uses on CUDA, on meta tensors: no activation may leave channels_last
    and no copy may change a layout. The stock ops must fail the same check, or it proves nothing.
    Meta tensors stand in for the GPU (the check needs no values); each run is its own process
    because it overrides the meta convolution kernel."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]

    def run(*extra):
        p = subprocess.run([sys.executable, str(repo / "bench/layout_check.py"), "--config",
                            str(repo / f"configs/{config}.yaml"), *extra],
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        return json.loads(p.stdout.strip().splitlines()[-1])

    ours = run()
    assert ours["nchw_activations"] == 0 and ours["layout_copies"] == 0, ours
    if config == "cifar10":
        stock = run("--stock-ops")
        print(stock)
        assert stock["nchw_activations"] > 100 and stock["layout_copies"] > 50, stock


@pytest.mark.parametrize("channels_last", [False, True])
def test_upsample_is_nearest_interpolate_exactly(channels_last):
    x = torch.randn(2, 8, 5, 3)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    y = upsample_nearest_2x(x)
    assert torch.equal(y, F.interpolate(x, scale_factor=2.0, mode="nearest"))
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    dy = torch.randn(y.shape)
    torch.testing.assert_close(torch.autograd.grad(y, x, dy)[0],
                               torch.autograd.grad(F.interpolate(x, scale_factor=2.0, mode="nearest"), x, dy)[0])


def test_bf16_autocast_forward():
    model = perturb(tiny(3))
    x = torch.randn(2, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, torch.tensor([1, 999]))
    assert out.shape == x.shape
    assert out.dtype == torch.bfloat16  # returned as-is; the loss casts to float32
    assert torch.isfinite(out.float()).all()
    out.float().pow(2).mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_dynamo_traces_without_graph_breaks():
    import torch._dynamo

    torch._dynamo.reset()
    model = perturb(tiny(3)).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t), model(x, t))
        model_cl = model.to(memory_format=torch.channels_last)  # the GPU layout: our norm/upsample path
        x_cl = x.contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(compiled(x_cl, t), model_cl(x_cl, t))
    torch._dynamo.reset()


# ------------------------------------------------------------------ validation / config
def test_bad_image_size_names_key():
    with pytest.raises(ValueError) as e:
        UNet(30, channel_mult=(1, 2, 2, 2))
    msg = str(e.value)
    assert "data.image_size=30" in msg and "model.channel_mult=[1, 2, 2, 2]" in msg
    assert "multiple of 8" in msg


def test_bad_attention_resolution_names_key_and_lists_valid():
    with pytest.raises(ValueError) as e:
        UNet(32, attention_resolutions=(12,))
    msg = str(e.value)
    assert "model.attention_resolutions" in msg and "[32, 16, 8, 4]" in msg


def test_attention_at_odd_level_valid():
    UNet(28, in_channels=1, channels=16, channel_mult=(1, 2, 4), num_res_blocks=1,
         attention_resolutions=(28, 14, 7))


@pytest.mark.parametrize("kw, key", [
    (dict(channels=0), "model.channels"),
    (dict(dropout=1.0), "model.dropout"),
    (dict(dropout=-0.1), "model.dropout"),
    (dict(num_res_blocks=0), "model.num_res_blocks"),
    (dict(channel_mult=()), "model.channel_mult"),
])
def test_other_validation(kw, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        UNet(32, **kw)


def test_from_config():
    cfg = SimpleNamespace(channels=16, channel_mult=[1, 2, 4], num_res_blocks=1,
                          attention_resolutions=[7], dropout=0.1)
    model = UNet.from_config(cfg, image_size=28, channels=1)
    assert (model.in_channels, model.out_channels, model.channels) == (1, 1, 16)
    assert model.channel_mult == (1, 2, 4) and model.attention_resolutions == (7,)
    assert count_parameters(model) == count_parameters(demo())

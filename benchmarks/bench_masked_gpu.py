"""GPU cases of the Triton masked kernels for the one-command GPU suite (issue #5 targets, H100).

Cases (format: docs/gpu_suite.md; ``benchmarks/gpu_suite.py`` checks, times and compares them):

* ``masked_linear_{fwd,dgrad,wgrad_scoregrad}_bf16_4096``: masked GEMM M = N = K = 4096 against
  cuBLAS dense on the same shapes. Target: within 10% (speed-up >= 0.9). Also fp32 (no tf32) and
  structured-scores forwards.
* ``masked_linear_fwd_bf16_M{16,64,256}_4096x4096``: the memory-bound regime against
  "materialise where(S >= t, W, 0), then cuBLAS" (target: speed-up >= 1.3) and against
  torch.compile(mode="max-autotune") of the same graph (target: >= 1.0).
* ``masked_conv_fwd_bwd_bf16_cl_b32_*``: ResNet-50 layer shapes, batch 32, channels_last:
  masked forward + backward (grad_x and the score gradient: frozen weights) against dense cuDNN
  forward + backward (grad_x and grad_W: the same three convolutions). Target: speed-up >= 1/1.05.
* ``channel_gate_{fwd,bwd}_bf16_{nchw,channels_last}_32x256x56x56``: against eager ``x * g``
  and its eager backward.

Every case checks its result against the reference backend before it is timed.
Names end in ``/triton`` (``/torch`` in a dry run). ``gpu_cases(dry_run=True)`` builds tiny
cases on the CPU with the reference kernels, to check the wiring without a GPU. The targets are
ratios to baselines of the same run, so the cases carry no ``target_us``: read ``speedup``.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from bise_kernels.backends import reference as ref

DENSITY = 0.5
BF16, FP32 = 2, 4
FULL = SimpleNamespace(gemm=4096, small_m=(16, 64, 256), conv_batch=32, conv_scale=1, gate=(32, 256, 56, 56))
TINY = SimpleNamespace(gemm=64, small_m=(16,), conv_batch=2, conv_scale=16, gate=(2, 8, 5, 5))
DGRAD, SCORE_GRAD, FROZEN_WEIGHTS = [True, False, False, False], [False, False, False, True], [True, False, False, True]

# ResNet-50 conv layers (in, out, kernel, stride, input size)
RESNET50_CONVS = [
    (64, 64, 3, 1, 56), (64, 256, 1, 1, 56), (256, 64, 1, 1, 56), (128, 128, 3, 2, 56),
    (256, 256, 3, 1, 14), (1024, 256, 1, 1, 14), (512, 512, 3, 1, 7), (512, 2048, 1, 1, 7),
]


def _close(got, want, rel: float = 1e-2) -> None:
    """Max error relative to the largest reference value (bf16 outputs: ~2^-8)."""
    listed = isinstance(got, (tuple, list))
    for g, w in zip(got if listed else [got], want if listed else [want]):
        if (g is None) != (w is None):
            raise AssertionError("a gradient is missing")
        if g is None:
            continue
        err = (g.float() - w.float()).abs().max() / w.float().abs().max().clamp_min(1e-12)
        if not err <= rel:
            raise AssertionError(f"differs from the reference by {float(err):.3g} (relative to max |value|)")


def _selection(scores: torch.Tensor):
    """(thr, cut) of the top-k at DENSITY."""
    return ref.topk_select([scores], max(1, round(DENSITY * scores.numel())))


def _threshold(scores: torch.Tensor):
    """The same threshold with every tie kept (``scores >= thr``): the where(S >= t, W, 0) graph."""
    thr, _ = _selection(scores)
    return thr, torch.full((), ref.KEEP_ALL_TIES, dtype=torch.int64, device=scores.device)


def _linear_cases(k, size, device, dry_run) -> list[dict]:
    cases = []
    m = n = kk = size.gemm
    x = torch.randn(m, kk, device=device, dtype=torch.bfloat16)
    gy = torch.randn(m, n, device=device, dtype=torch.bfloat16)
    w = torch.randn(n, kk, device=device, dtype=torch.bfloat16)
    s = torch.randn(n, kk, device=device)
    thr, cut = _selection(s)
    flops, io = 2 * m * n * kk, (m * kk + m * n) * BF16 + n * kk * (BF16 + FP32)
    fwd, bwd = k.masked_linear_forward, k.masked_linear_backward
    cases.append({
        "name": f"masked_linear_fwd_bf16_{m}", "flops": flops, "bytes": io,
        "fn": lambda: fwd(x, w, None, s, thr, cut),
        "check": lambda: _close(fwd(x, w, None, s, thr, cut), ref.masked_linear_forward(x, w, None, s, thr, cut)),
        "baselines": {"cublas_dense": lambda: F.linear(x, w)},
    })
    backward_cases = ((DGRAD, "dgrad", lambda: gy @ w, io), (SCORE_GRAD, "wgrad_scoregrad", lambda: gy.t() @ x,
                                                             io + n * kk * FP32))
    for needs, label, baseline, nbytes in backward_cases:
        cases.append({
            "name": f"masked_linear_{label}_bf16_{m}", "flops": flops, "bytes": nbytes,
            "fn": lambda needs=needs: bwd(gy, x, w, s, thr, cut, "ste", 1.0, needs),
            "check": lambda needs=needs: _close(bwd(gy, x, w, s, thr, cut, "ste", 1.0, needs),
                                                ref.masked_linear_backward(gy, x, w, s, thr, cut, "ste", 1.0, needs)),
            "baselines": {"cublas_dense": baseline},
        })
    x32, w32 = x.float(), w.float()  # fp32 without tf32 (torch's default)
    cases.append({
        "name": f"masked_linear_fwd_fp32_{m}", "flops": flops, "bytes": 2 * io,
        "fn": lambda: fwd(x32, w32, None, s, thr, cut),
        "check": lambda: _close(fwd(x32, w32, None, s, thr, cut),
                                ref.masked_linear_forward(x32, w32, None, s, thr, cut), 1e-4),
        "baselines": {"cublas_dense": lambda: F.linear(x32, w32)},
    })
    s_unit = torch.randn(n, device=device)
    thr_u, cut_u = _selection(s_unit)
    cases.append({
        "name": f"masked_linear_fwd_bf16_{m}_structured", "flops": flops, "bytes": io,
        "fn": lambda: fwd(x, w, None, s_unit, thr_u, cut_u),
        "check": lambda: _close(fwd(x, w, None, s_unit, thr_u, cut_u),
                                ref.masked_linear_forward(x, w, None, s_unit, thr_u, cut_u)),
        "baselines": {"cublas_dense": lambda: F.linear(x, w)},
    })

    # memory-bound: the weight and its scores dominate the traffic
    t, keep_all = _threshold(s)
    t_value = float(t)
    where_mm = None if dry_run else torch.compile(lambda a, wt, st: a @ torch.where(st >= t_value, wt, 0).t(),
                                                  mode="max-autotune")
    for rows in size.small_m:
        xs = torch.randn(rows, kk, device=device, dtype=torch.bfloat16)
        baselines = {
            "materialise_then_cublas": lambda xs=xs: F.linear(xs, torch.where(s >= t, w, 0)),
            "cublas_dense": lambda xs=xs: F.linear(xs, w),
        }
        if where_mm is not None:
            baselines["compile_max_autotune_where_mm"] = lambda xs=xs: where_mm(xs, w, s)
        cases.append({
            "name": f"masked_linear_fwd_bf16_M{rows}_{n}x{kk}", "flops": 2 * rows * n * kk,
            "bytes": n * kk * (BF16 + FP32) + (rows * kk + rows * n) * BF16,
            "fn": lambda xs=xs: fwd(xs, w, None, s, t, keep_all),
            "check": lambda xs=xs: _close(fwd(xs, w, None, s, t, keep_all), F.linear(xs, torch.where(s >= t, w, 0))),
            "baselines": baselines,
        })
    return cases


def _conv_cases(k, size, device) -> list[dict]:
    cases, batch = [], size.conv_batch
    for cin, cout, ks, stride, px in RESNET50_CONVS:
        cin, cout, px = cin // size.conv_scale, cout // size.conv_scale, max(ks, px // size.conv_scale)
        x = torch.randn(batch, cin, px, px, device=device, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        w = torch.randn(cout, cin, ks, ks, device=device, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        s = torch.randn(w.shape, device=device)
        thr, cut = _selection(s)
        geo = ((stride, stride), (ks // 2, ks // 2), (1, 1), 1)
        gy = torch.randn_like(F.conv2d(x, w, None, *geo))

        def masked(x=x, w=w, s=s, thr=thr, cut=cut, geo=geo, gy=gy):
            y = k.masked_conv2d_forward(x, w, None, s, thr, cut, *geo)
            return y, k.masked_conv2d_backward(gy, x, w, s, thr, cut, *geo, "ste", 1.0, FROZEN_WEIGHTS)

        def check(masked=masked, x=x, w=w, s=s, thr=thr, cut=cut, geo=geo, gy=gy):
            y, grads = masked()
            _close([y, *grads], [ref.masked_conv2d_forward(x, w, None, s, thr, cut, *geo),
                                 *ref.masked_conv2d_backward(gy, x, w, s, thr, cut, *geo, "ste", 1.0, FROZEN_WEIGHTS)])

        def dense(x=x, w=w, geo=geo, gy=gy):
            F.conv2d(x, w, None, *geo)
            return torch.ops.aten.convolution_backward(gy, x, w, None, *geo[:3], False, [0, 0], 1, [True, True, False])

        cases.append({
            "name": f"masked_conv_fwd_bwd_bf16_cl_b{batch}_{cin}x{cout}_k{ks}_s{stride}_{px}px",
            "fn": masked, "check": check, "baselines": {"cudnn_dense": dense},
            "flops": 3 * 2 * gy.numel() * cin * ks * ks, "bytes": None,
        })
    return cases


def _gate_cases(k, size, device) -> list[dict]:
    cases = []
    for layout in ("nchw", "channels_last"):
        x = torch.randn(size.gate, device=device, dtype=torch.bfloat16)
        if layout == "channels_last":
            x = x.to(memory_format=torch.channels_last)
        gy = torch.randn_like(x)
        s = torch.randn(x.shape[1], device=device)
        thr, cut = _selection(s)
        g = ref.keep_mask(s, thr, cut).to(x.dtype).reshape(1, -1, 1, 1)
        label = f"{layout}_{'x'.join(map(str, x.shape))}"

        def forward(x=x, s=s, thr=thr, cut=cut):
            return k.channel_gate_forward(x, s, thr, cut, 1)

        def backward(x=x, gy=gy, s=s, thr=thr, cut=cut):
            return k.channel_gate_backward(gy, x, s, thr, cut, 1, "sigmoid", 1.0, [True, True])

        def eager_backward(x=x, gy=gy, g=g, s=s):
            return gy * g, (gy.float() * x.float()).sum((0, 2, 3)) * ref.score_slope(s, "sigmoid", 1.0)

        cases.append({
            "name": f"channel_gate_fwd_bf16_{label}", "bytes": 2 * x.numel() * BF16, "flops": None,
            "fn": forward, "check": lambda forward=forward, x=x, g=g: _close(forward(), x * g, 0.0),
            "baselines": {"eager_x_mul_g": lambda x=x, g=g: x * g},
        })
        cases.append({
            "name": f"channel_gate_bwd_bf16_{label}", "bytes": 3 * x.numel() * BF16, "flops": None,
            "fn": backward, "check": lambda backward=backward, eager=eager_backward: _close(backward(), eager(), 1e-3),
            "baselines": {"eager": eager_backward},
        })
    return cases


def _kernels(dry_run: bool):
    """(kernels, backend name): the Triton kernels; the reference ones in a dry run."""
    if dry_run:
        return ref, "torch"
    from bise_kernels.backends.triton import channel_gate, masked_conv, masked_linear

    modules = (masked_linear, masked_conv, channel_gate)
    return SimpleNamespace(**{name: getattr(m, name) for m in modules for name in m.KERNELS}), "triton"


def gpu_cases(dry_run: bool = False) -> list[dict]:
    """Every masked-kernel case (allocates ~1.5 GB on the GPU). ``dry_run``: tiny cases on the CPU."""
    if not dry_run and not torch.cuda.is_available():
        raise RuntimeError("bench_masked_gpu cases need a CUDA device (or dry_run=True)")
    kernels, backend = _kernels(dry_run)
    size, device = (TINY, "cpu") if dry_run else (FULL, "cuda")
    torch.manual_seed(0)
    cases = _linear_cases(kernels, size, device, dry_run) + _conv_cases(kernels, size, device) \
        + _gate_cases(kernels, size, device)
    return [dict(case, name=f"{case['name']}/{backend}", backend=backend) for case in cases]

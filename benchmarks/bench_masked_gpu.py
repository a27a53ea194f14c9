"""GPU cases of the masked kernels for the one-command GPU suite, per GPU backend and the public API.

Cases (format: docs/gpu_suite.md; ``benchmarks/gpu_suite.py`` checks, times and compares them),
each for the backends "cuda" and "triton" (``<case>/<backend>``) and, where a public function
does the same job, through the public API (``<case>/api``: checks, the top-k selection at density
0.5 and the op, backend "auto"):

* ``masked_linear_{fwd,dgrad,wgrad_scoregrad}_bf16_4096``: masked GEMM M = N = K = 4096 against
  "cublas_dense" (the same GEMM unmasked) and "materialise_then_cublas" (where(S >= t, W, 0),
  then the GEMM; for the score gradient: the dense weight gradient times W). Target: >= 0.9x
  cuBLAS dense. Also fp32 (no tf32) and structured-scores forwards.
* ``masked_linear_fwd_bf16_M{16,256}_4096x4096``: the memory-bound regime against
  materialise-then-cuBLAS (target >= 1.3x) and torch.compile(mode="max-autotune") of the same
  where-then-matmul graph (target >= 1.0x).
* ``masked_linear_keep_*``: the same GEMMs with the selection packed once into a bool keep mask
  (``masked_linear_keep``; the mask is built outside the timed call, as it is once per step), for
  the backends that have the kernel (Triton: small M only), beside "selection_path" (that backend's masked_linear on the
  same selection) and the baselines above; at M <= 256 the Triton kernel is the fused small-M
  GEMM reading W and the mask. ``/api``: a ``MaskedLinear(mask_mode="keep")`` forward (its cached
  mask). Targets as above (small M: >= 1.3x materialise-then-cuBLAS, >= 1.0x max-autotune).
* ``masked_linear_keep_fwd_bwd_bf16_M{16,256}_4096x4096``: the packed-mask layer's forward and
  backward (grad_x and the score gradient, weights frozen) at small M, per backend with both keep
  kernels and ``/api`` (``MaskedLinear(mask_mode="keep")`` through autograd), against
  "materialise_then_cublas" (target >= 1.3x), "cublas_dense" and "selection_path": whether the
  Triton small-M GEMMs beat the cuda backend's mask pass + cuBLAS over a whole layer step
  (no max-autotune baseline: its compile of the three GEMMs per shape would not fit the budget).
* ``masked_conv_fwd_bwd_bf16_cl_b32_*``: ResNet-50 layer shapes, batch 32, channels_last:
  masked forward + backward (grad_x and the score gradient: frozen weights) against "cudnn_dense"
  (forward + grad_x + grad_W of the dense conv) and "materialise_then_cudnn". Target >= 0.95x.
* ``channel_gate_{fwd,bwd}_bf16_{nchw,channels_last}_32x256x56x56``: against eager ``x * g``
  and its eager backward, and the backward compiled by ``torch.compile`` (Inductor fuses the
  product, its float32 reduction and the slope: eager makes float32 copies of gy and x).

Every case checks its result against the reference backend before it is timed. In a dry run
(``gpu_cases(dry_run=True)``) the cases are tiny, on the CPU, for the backend "torch" and the API.
"""


from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

import bise_kernels
from bise_kernels.backends import BackendUnavailableError, kernel_table
from bise_kernels.backends import reference as ref

GPU_BACKENDS = ("cuda", "triton")
DENSITY = 0.5
BF16, FP32 = 2, 4
FULL = SimpleNamespace(gemm=4096, small_m=(16, 256), conv_batch=32, conv_scale=1, gate=(32, 256, 56, 56))
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


def _api_grads(y, inputs, gy):
    return torch.autograd.grad(y, inputs, gy)


def _linear_data(size, device) -> SimpleNamespace:
    m = n = kk = size.gemm
    d = SimpleNamespace(m=m, n=n, k=kk)
    d.x = torch.randn(m, kk, device=device, dtype=torch.bfloat16)
    d.gy = torch.randn(m, n, device=device, dtype=torch.bfloat16)
    d.w = torch.randn(n, kk, device=device, dtype=torch.bfloat16)
    d.s = torch.randn(n, kk, device=device)
    d.thr, d.cut = _selection(d.s)
    d.t, d.keep_all = _threshold(d.s)
    d.w_eff = lambda: torch.where(d.s >= d.t, d.w, 0)
    d.x32, d.w32 = d.x.float(), d.w.float()  # fp32 without tf32 (torch's default)
    d.s_unit = torch.randn(n, device=device)
    d.thr_u, d.cut_u = _selection(d.s_unit)
    d.small = [torch.randn(rows, kk, device=device, dtype=torch.bfloat16) for rows in size.small_m]
    d.small_gy = [torch.randn(rows, n, device=device, dtype=torch.bfloat16) for rows in size.small_m]
    d.keep = ref.keep_mask(d.s, d.thr, d.cut)  # the top-k selection, packed
    d.keep_t = ref.keep_mask(d.s, d.t, d.keep_all)  # S >= t, packed: the where(S >= t, W, 0) mask
    return d


def _keep_layer(d) -> torch.nn.Module:
    """A MaskedLinear(mask_mode="keep") on d's weight and scores with the threshold t (the small-M API case)."""
    layer = bise_kernels.MaskedLinear(d.k, d.n, bias=False, threshold=float(d.t), mask_mode="keep",
                                      device=d.w.device, dtype=d.w.dtype)
    with torch.no_grad():
        layer.weight.copy_(d.w)
        layer.scores.copy_(d.s)
    layer.weight.requires_grad_(False)
    return layer


def _keep_cases(k, d, where_mm, large_m: bool) -> list[dict]:
    """Packed-mask cases of one backend's kernel table ``k`` (only the kernels it has); ``k is None``: the API.

    ``large_m``: also the M = 4096 GEMMs (not for Triton, whose packed-mask kernel is for small M: each
    case would autotune a new shape key within the suite's budget)."""
    x, gy, w, s, thr, cut, keep = d.x, d.gy, d.w, d.s, d.thr, d.cut, d.keep
    cases = []
    flops, io = 2 * d.m * d.n * d.k, (d.m * d.k + d.m * d.n) * BF16 + d.n * d.k * (BF16 + 1)
    if large_m and k is not None and "masked_linear_keep_forward" in k:
        fwd = k["masked_linear_keep_forward"]
        cases.append({
            "name": f"masked_linear_keep_fwd_bf16_{d.m}", "flops": flops, "bytes": io,
            "target_speedup": {"cublas_dense": 0.9},
            "fn": lambda: fwd(x, w, None, keep),
            "check": lambda: _close(fwd(x, w, None, keep), ref.masked_linear_keep_forward(x, w, None, keep)),
            "baselines": {"cublas_dense": lambda: F.linear(x, w),
                          "selection_path": lambda: k["masked_linear_forward"](x, w, None, s, thr, cut)},
        })
    if large_m and k is not None and "masked_linear_keep_backward" in k:
        bwd = k["masked_linear_keep_backward"]
        for needs, label, nbytes, dense in ((DGRAD, "dgrad", io, lambda: gy @ w),
                                            (SCORE_GRAD, "wgrad_scoregrad", io + d.n * d.k * FP32,
                                             lambda: gy.t() @ x)):
            cases.append({
                "name": f"masked_linear_keep_{label}_bf16_{d.m}", "flops": flops, "bytes": nbytes,
                "target_speedup": {"cublas_dense": 0.9},
                "fn": lambda needs=needs: bwd(gy, x, w, s, keep, "ste", 1.0, needs),
                "check": lambda needs=needs: _close(bwd(gy, x, w, s, keep, "ste", 1.0, needs),
                                                    ref.masked_linear_keep_backward(gy, x, w, s, keep, "ste", 1.0,
                                                                                    needs)),
                "baselines": {"cublas_dense": dense,
                              "selection_path": lambda needs=needs: k["masked_linear_backward"](
                                  gy, x, w, s, thr, cut, "ste", 1.0, needs)},
            })
    # The keep mask is made again in every timed call, as in training (the scores change after every
    # optimiser step): the baselines read the fp32 scores every call too. The module gets a new version
    # of its scores (an in-place no-op) so that its cached mask is not reused.
    if k is None:
        layer = _keep_layer(d)

        def small_fwd(a):
            with torch.no_grad():
                layer.scores.add_(0.0)
            return layer(a)

        selection = lambda a: bise_kernels.masked_linear(a, w, None, s, threshold=d.t)  # noqa: E731
    elif "masked_linear_keep_forward" in k:
        keep_mask = k["keep_mask"] if "keep_mask" in k else bise_kernels._ops.keep_mask
        small_fwd = lambda a: k["masked_linear_keep_forward"](a, w, None, keep_mask(s, d.t, d.keep_all))  # noqa: E731
        selection = lambda a: k["masked_linear_forward"](a, w, None, s, d.t, d.keep_all)  # noqa: E731
    else:
        return cases
    cases += _small_m_cases("masked_linear_keep_fwd", small_fwd, d, where_mm, mask_bytes=FP32 + 1 + 1,
                            extra={"selection_path": selection})  # the mask made (scores read, mask written), read
    if k is None:
        step = _api_step(lambda a, scores: small_fwd(a), layer.scores)
        selection_step = _api_step(lambda a, scores: bise_kernels.masked_linear(a, w, None, scores, threshold=d.t),
                                   s.clone().requires_grad_())
    elif "masked_linear_keep_backward" in k:
        def step(a, gy):
            keep = keep_mask(s, d.t, d.keep_all)  # once a step, read by forward and backward
            y = k["masked_linear_keep_forward"](a, w, None, keep)
            return y, k["masked_linear_keep_backward"](gy, a, w, s, keep, "ste", 1.0, FROZEN_WEIGHTS)

        def selection_step(a, gy):
            y = k["masked_linear_forward"](a, w, None, s, d.t, d.keep_all)
            return y, k["masked_linear_backward"](gy, a, w, s, d.t, d.keep_all, "ste", 1.0, FROZEN_WEIGHTS)
    else:
        return cases
    return cases + _small_m_step_cases(step, d, selection_step)


def _api_step(forward, scores):
    """``forward(x, scores)`` and its backward through autograd (grad_x and the gradient of the leaf
    ``scores``), as (y, (grad_x, None, None, grad_scores))."""
    def step(a, gy):
        a = a.detach().requires_grad_()
        y = forward(a, scores)
        gx, gs = torch.autograd.grad(y, (a, scores), gy)
        return y, (gx, None, None, gs)

    return step


def _small_m_step_cases(step, d, selection_step) -> list[dict]:
    """The packed-mask layer's forward + backward (grad_x, score gradient; weights frozen, as in
    edge-popup training) at the small batches: whether the fused small-M GEMMs pay off over a whole
    layer step. Baselines: materialise W * keep then cuBLAS forward, grad_x and the dense weight
    gradient times W; the dense layer's forward, grad_x and grad_W; the same backend's selection path.
    Bytes: the mask made (fp32 scores read, 1 byte written), W read three times and the mask twice, the
    fp32 score gradient written once."""
    cases = []
    for xs, gy in zip(d.small, d.small_gy):
        def materialise(xs=xs, gy=gy):
            w_eff = d.w_eff()
            return F.linear(xs, w_eff), gy @ w_eff, (gy.t() @ xs) * d.w

        def dense(xs=xs, gy=gy):
            return F.linear(xs, d.w), gy @ d.w, gy.t() @ xs

        def check(xs=xs, gy=gy):
            y, grads = step(xs, gy)
            want = ref.masked_linear_keep_backward(gy, xs, d.w, d.s, d.keep_t, "ste", 1.0, FROZEN_WEIGHTS)
            _close([y, *grads], [ref.masked_linear_keep_forward(xs, d.w, None, d.keep_t), *want])

        rows = xs.shape[0]
        cases.append({
            "name": f"masked_linear_keep_fwd_bwd_bf16_M{rows}_{d.n}x{d.k}", "flops": 3 * 2 * rows * d.n * d.k,
            "bytes": d.n * d.k * (FP32 + 1 + 3 * BF16 + 2 + FP32) + 3 * (rows * d.k + rows * d.n) * BF16,
            "target_speedup": {"materialise_then_cublas": 1.3},
            "fn": lambda xs=xs, gy=gy: step(xs, gy), "check": check,
            "baselines": {"materialise_then_cublas": materialise, "cublas_dense": dense,
                          "selection_path": lambda xs=xs, gy=gy: selection_step(xs, gy)},
        })
    return cases


def _linear_cases(k, d, where_mm) -> list[dict]:
    """Masked-linear cases of one backend's kernel table ``k``; ``k is None``: the public API."""
    x, gy, w, s, thr, cut = d.x, d.gy, d.w, d.s, d.thr, d.cut
    flops, io = 2 * d.m * d.n * d.k, (d.m * d.k + d.m * d.n) * BF16 + d.n * d.k * (BF16 + FP32)
    api = k is None
    fwd = (lambda a, wt, b, st, th, ct: bise_kernels.masked_linear(a, wt, b, st, density=DENSITY)) if api \
        else k["masked_linear_forward"]
    cases = [{
        "name": f"masked_linear_fwd_bf16_{d.m}", "flops": flops, "bytes": io, "target_speedup": {"cublas_dense": 0.9},
        "fn": lambda: fwd(x, w, None, s, thr, cut),
        "check": lambda: _close(fwd(x, w, None, s, thr, cut), ref.masked_linear_forward(x, w, None, s, thr, cut)),
        "baselines": {"cublas_dense": lambda: F.linear(x, w),
                      "materialise_then_cublas": lambda: F.linear(x, d.w_eff())},
    }]
    if not api:
        bwd = k["masked_linear_backward"]
        backward_cases = (
            (DGRAD, "dgrad", io, {"cublas_dense": lambda: gy @ w, "materialise_then_cublas": lambda: gy @ d.w_eff()}),
            (SCORE_GRAD, "wgrad_scoregrad", io + d.n * d.k * FP32,
             {"cublas_dense": lambda: gy.t() @ x, "materialise_then_cublas": lambda: (gy.t() @ x) * w}),
        )
        for needs, label, nbytes, baselines in backward_cases:
            cases.append({
                "name": f"masked_linear_{label}_bf16_{d.m}", "flops": flops, "bytes": nbytes,
                "target_speedup": {"cublas_dense": 0.9},
                "fn": lambda needs=needs: bwd(gy, x, w, s, thr, cut, "ste", 1.0, needs),
                "check": lambda needs=needs: _close(bwd(gy, x, w, s, thr, cut, "ste", 1.0, needs),
                                                    ref.masked_linear_backward(gy, x, w, s, thr, cut, "ste", 1.0,
                                                                               needs)),
                "baselines": baselines,
            })
    x32, w32 = d.x32, d.w32
    cases.append({
        "name": f"masked_linear_fwd_fp32_{d.m}", "flops": flops,
        "bytes": (d.m * d.k + d.m * d.n) * FP32 + d.n * d.k * (FP32 + FP32),  # x, y, W in fp32; the fp32 scores
        "fn": lambda: fwd(x32, w32, None, s, thr, cut),
        "check": lambda: _close(fwd(x32, w32, None, s, thr, cut),
                                ref.masked_linear_forward(x32, w32, None, s, thr, cut), 1e-4),
        "baselines": {"cublas_dense": lambda: F.linear(x32, w32)},
    })
    s_unit, thr_u, cut_u = d.s_unit, d.thr_u, d.cut_u
    cases.append({
        "name": f"masked_linear_fwd_bf16_{d.m}_structured", "flops": flops, "bytes": io,
        "fn": lambda: fwd(x, w, None, s_unit, thr_u, cut_u),
        "check": lambda: _close(fwd(x, w, None, s_unit, thr_u, cut_u),
                                ref.masked_linear_forward(x, w, None, s_unit, thr_u, cut_u)),
        "baselines": {"cublas_dense": lambda: F.linear(x, w)},
    })

    t, keep_all = d.t, d.keep_all
    small_fwd = (lambda a: bise_kernels.masked_linear(a, w, None, s, threshold=t)) if api \
        else (lambda a: k["masked_linear_forward"](a, w, None, s, t, keep_all))
    return cases + _small_m_cases("masked_linear_fwd", small_fwd, d, where_mm, mask_bytes=FP32)


def _small_m_cases(prefix, small_fwd, d, where_mm, mask_bytes, extra=None) -> list[dict]:
    """Memory-bound forwards at the small batches ``d.small``: the weight and its mask (fp32 scores,
    or the 1-byte keep mask) dominate the traffic; baselines materialise W * keep then cuBLAS, dense
    cuBLAS, and (where it compiles) torch.compile max-autotune of where(S >= t, W, 0) @ x."""
    cases = []
    for xs in d.small:
        baselines = {"materialise_then_cublas": lambda xs=xs: F.linear(xs, d.w_eff()),
                     "cublas_dense": lambda xs=xs: F.linear(xs, d.w),
                     **{name: (lambda xs=xs, f=f: f(xs)) for name, f in (extra or {}).items()}}
        targets = {"materialise_then_cublas": 1.3}
        if where_mm is not None:
            baselines["compile_max_autotune"] = lambda xs=xs: where_mm(xs, d.w, d.s)
            targets["compile_max_autotune"] = 1.0
        cases.append({
            "name": f"{prefix}_bf16_M{xs.shape[0]}_{d.n}x{d.k}", "flops": 2 * xs.shape[0] * d.n * d.k,
            "bytes": d.n * d.k * (BF16 + mask_bytes) + (xs.shape[0] * d.k + xs.shape[0] * d.n) * BF16,
            "target_speedup": targets,
            "fn": lambda xs=xs: small_fwd(xs),
            "check": lambda xs=xs: _close(small_fwd(xs), F.linear(xs, d.w_eff())),
            "baselines": baselines,
        })
    return cases


def _conv_data(size, device) -> list[SimpleNamespace]:
    layers, batch = [], size.conv_batch
    for cin, cout, ks, stride, px in RESNET50_CONVS:
        cin, cout, px = cin // size.conv_scale, cout // size.conv_scale, max(ks, px // size.conv_scale)
        d = SimpleNamespace(cin=cin, cout=cout, ks=ks, stride=stride, px=px, batch=batch)
        d.x = torch.randn(batch, cin, px, px, device=device, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        d.w = torch.randn(cout, cin, ks, ks, device=device, dtype=torch.bfloat16).to(
            memory_format=torch.channels_last)
        d.s = torch.randn(d.w.shape, device=device)
        d.thr, d.cut = _selection(d.s)
        d.t, _ = _threshold(d.s)
        d.keep = ref.keep_mask(d.s, d.thr, d.cut)  # the selection packed once (1 byte per weight)
        d.geo = ((stride, stride), (ks // 2, ks // 2), (1, 1), 1)
        d.gy = torch.randn_like(F.conv2d(d.x, d.w, None, *d.geo))
        layers.append(d)
    return layers


def _conv_cases(k, layers) -> list[dict]:
    cases = []
    for d in layers:
        x, w, s, thr, cut, geo, gy = d.x, d.w, d.s, d.thr, d.cut, d.geo, d.gy
        if k is None:
            def masked(x=x, w=w, s=s, geo=geo, gy=gy):
                xg, sg = x.detach().requires_grad_(), s.detach().requires_grad_()
                y = bise_kernels.masked_conv2d(xg, w, None, sg, density=DENSITY, stride=geo[0], padding=geo[1],
                                               dilation=geo[2], groups=geo[3])
                gx, gs = _api_grads(y, (xg, sg), gy)
                return y, (gx, None, None, gs)
        else:
            def masked(x=x, w=w, s=s, thr=thr, cut=cut, geo=geo, gy=gy):
                y = k["masked_conv2d_forward"](x, w, None, s, thr, cut, *geo)
                return y, k["masked_conv2d_backward"](gy, x, w, s, thr, cut, *geo, "ste", 1.0, FROZEN_WEIGHTS)

        def check(masked=masked, x=x, w=w, s=s, thr=thr, cut=cut, geo=geo, gy=gy):
            y, grads = masked()  # the keep-mask case passes its own path: the same reference
            _close([y, *grads], [ref.masked_conv2d_forward(x, w, None, s, thr, cut, *geo),
                                 *ref.masked_conv2d_backward(gy, x, w, s, thr, cut, *geo, "ste", 1.0, FROZEN_WEIGHTS)])

        def dense(x=x, w=w, geo=geo, gy=gy):
            F.conv2d(x, w, None, *geo)
            return torch.ops.aten.convolution_backward(gy, x, w, None, *geo[:3], False, [0, 0], 1, [True, True, False])

        def materialise(x=x, w=w, s=s, t=d.t, geo=geo, gy=gy):
            w_eff = torch.where(s >= t, w, 0)
            F.conv2d(x, w_eff, None, *geo)
            gx, gw, _ = torch.ops.aten.convolution_backward(gy, x, w_eff, None, *geo[:3], False, [0, 0], 1,
                                                            [True, True, False])
            return gx, gw * w

        cases.append({
            "name": f"masked_conv_fwd_bwd_bf16_cl_b{d.batch}_{d.cin}x{d.cout}_k{d.ks}_s{d.stride}_{d.px}px",
            "fn": masked, "check": check, "target_speedup": {"cudnn_dense": 0.95},
            "baselines": {"cudnn_dense": dense, "materialise_then_cudnn": materialise},
            "flops": 3 * 2 * gy.numel() * d.cin * d.ks * d.ks,
        })
        if k is not None and "masked_conv2d_keep_forward" in k:
            def keep_path(x=x, w=w, s=s, keep=d.keep, geo=geo, gy=gy):
                y = k["masked_conv2d_keep_forward"](x, w, None, keep, *geo)
                return y, k["masked_conv2d_keep_backward"](gy, x, w, s, keep, *geo, "ste", 1.0, FROZEN_WEIGHTS)

            cases.append({
                "name": f"masked_conv_keep_fwd_bwd_bf16_cl_b{d.batch}_{d.cin}x{d.cout}_k{d.ks}_s{d.stride}_{d.px}px",
                "fn": keep_path, "check": lambda keep_path=keep_path, check=check: check(keep_path),
                "target_speedup": {"cudnn_dense": 0.95},
                "baselines": {"cudnn_dense": dense, "selection_path": masked},
                "flops": 3 * 2 * gy.numel() * d.cin * d.ks * d.ks,
            })
    return cases


def _gate_data(size, device) -> list[SimpleNamespace]:
    gates = []
    for layout in ("nchw", "channels_last"):
        d = SimpleNamespace(layout=layout)
        d.x = torch.randn(size.gate, device=device, dtype=torch.bfloat16)
        if layout == "channels_last":
            d.x = d.x.to(memory_format=torch.channels_last)
        d.gy = torch.randn_like(d.x)
        d.s = torch.randn(d.x.shape[1], device=device)
        d.thr, d.cut = _selection(d.s)
        d.g = ref.keep_mask(d.s, d.thr, d.cut).to(d.x.dtype).reshape(1, -1, 1, 1)
        gates.append(d)
    return gates


def _gate_grads(gy, g, x, s):
    """The gate's backward written in plain PyTorch: grad_x and the "sigmoid" score gradient."""
    return gy * g, (gy.float() * x.float()).sum((0, 2, 3)) * ref.score_slope(s, "sigmoid", 1.0)


def _gate_cases(k, gates, gate_grads) -> list[dict]:
    """``gate_grads``: the compiled :func:`_gate_grads` (None in a dry run: nothing is compiled)."""
    cases = []
    for d in gates:
        x, gy, s, thr, cut, g = d.x, d.gy, d.s, d.thr, d.cut, d.g
        label = f"{d.layout}_{'x'.join(map(str, x.shape))}"
        if k is None:
            def forward(x=x, s=s):
                return bise_kernels.channel_gate(x, s, density=DENSITY)

            def backward(x=x, gy=gy, s=s):
                xg, sg = x.detach().requires_grad_(), s.detach().requires_grad_()
                return _api_grads(bise_kernels.channel_gate(xg, sg, density=DENSITY), (xg, sg), gy)
        else:
            def forward(x=x, s=s, thr=thr, cut=cut):
                return k["channel_gate_forward"](x, s, thr, cut, 1)

            def backward(x=x, gy=gy, s=s, thr=thr, cut=cut):
                return k["channel_gate_backward"](gy, x, s, thr, cut, 1, "sigmoid", 1.0, [True, True])

        def eager_backward(x=x, gy=gy, g=g, s=s):
            return _gate_grads(gy, g, x, s)

        bwd_baselines = {"eager": eager_backward}
        if gate_grads is not None:
            bwd_baselines["compiled"] = lambda x=x, gy=gy, g=g, s=s: gate_grads(gy, g, x, s)

        cases.append({
            "name": f"channel_gate_fwd_bf16_{label}", "bytes": 2 * x.numel() * BF16,
            "fn": forward, "check": lambda forward=forward, x=x, g=g: _close(forward(), x * g, 0.0),
            "baselines": {"eager_x_mul_g": lambda x=x, g=g: x * g},
        })
        cases.append({
            "name": f"channel_gate_bwd_bf16_{label}", "bytes": 3 * x.numel() * BF16,
            "fn": backward, "check": lambda backward=backward, eager=eager_backward: _close(backward(), eager(), 1e-3),
            "baselines": bwd_baselines,
        })
    return cases


def gpu_cases(dry_run: bool = False) -> list[dict]:
    """Every masked case for every GPU backend and the API (under 1 GB on the GPU, shared between them).

    ``dry_run``: tiny cases on the CPU for the backend "torch" and the API.
    """
    if not dry_run and not torch.cuda.is_available():
        raise RuntimeError("bench_masked_gpu cases need a CUDA device (or dry_run=True)")
    size, device, backends = (TINY, "cpu", ("torch",)) if dry_run else (FULL, "cuda", GPU_BACKENDS)
    torch.manual_seed(0)
    linear, convs, gates = _linear_data(size, device), _conv_data(size, device), _gate_data(size, device)
    t_value = float(linear.t)
    # dynamic=False: one graph per M (once a second M ran, a shared compile served every M with its
    # shape-generic recompile, a weaker baseline than max-autotune's own for that M)
    # W and S marked static, as a model's parameters are: max-autotune's CUDA graphs copy every other input
    # into their own buffers before each replay (~96 MB per call here), which would flatter the masked kernels
    where_mm = None
    if not dry_run:
        for t in (linear.w, linear.s):
            torch._dynamo.mark_static_address(t)
        where_mm = torch.compile(lambda a, wt, st: a @ torch.where(st >= t_value, wt, 0).t(), mode="max-autotune",
                                 dynamic=False)
    gate_grads = None if dry_run else torch.compile(_gate_grads, dynamic=False)
    cases = []
    for backend in (*backends, "api"):
        why = None
        try:
            kernels = None if backend == "api" else kernel_table(backend)
        except BackendUnavailableError as exc:
            kernels, why = kernel_table("torch"), f"backend {backend!r} unavailable: {exc}"
        built = (_linear_cases(kernels, linear, where_mm)
                 + _keep_cases(kernels, linear, where_mm, large_m=backend != "triton")
                 + _conv_cases(kernels, convs) + _gate_cases(kernels, gates, gate_grads))
        for case in built:
            name = f"{case['name']}/{backend}"
            cases.append({"name": name, "backend": backend, "skip": why} if why else
                         dict(case, name=name, backend=backend))
    return cases

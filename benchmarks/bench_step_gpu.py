"""GPU cases of whole masked training steps, the per-call overhead and a CUDA-graph capture.

Cases (format: docs/gpu_suite.md):

* ``step_mlp4x4096_bf16_b{256,4096}/<backend>``: one training step (forward, loss, backward, SGD
  on the scores; weights frozen) of a 4-layer 4096-wide MLP masked by ``bise_kernels.MaskedLinear``
  (density 0.5, top-k re-selected every step), for the backends "cuda", "triton" and "auto",
  against "dense_step" (the plain MLP training its weights) and "edge_popup" (the edge-popup
  reference: sort the scores, scatter a 0/1 mask, multiply, dense matmul, straight-through
  backward). Targets: <= 1.10x the dense step; >= 3x faster than edge-popup at batch 256.
  ``.../cuda+keep``: the same step with ``mask_mode="keep"`` (the selection packed once per step
  into a bool mask that forward and backward read), beside "selection_step" (the default mode).
* ``step_resnet50_convs_bf16_cl_b{32,128}/<backend>``: the same for a stack of nine ResNet-50
  bottleneck convolutions (three layer1 blocks: 1x1 256->64, 3x3 64->64, 1x1 64->256) at 56x56,
  channels_last, with ``MaskedConv2d``. Target <= 1.10x the dense step.
* ``overhead_masked_linear_256_b32/api``: the public ``masked_linear`` forward + backward on a
  256x256 layer, batch 32 (checks, selection, custom op and autograd), against the same with
  ``F.linear`` ("dense_fwd_bwd"). Target <= 1.5x; and no slower than "materialise_fwd_bwd", the same
  semantics in plain PyTorch (benchmarks/by_hand.py: ``torch.kthvalue``, ``W * mask`` materialised,
  straight-through to the scores).
  ``.../module``: the same through a ``MaskedLinear`` whose selection is cached (a layer's cost per
  call within a training step), against the same by hand with the mask computed once.
* ``cuda_graph_masked_step/api``: a probe, not a timing: whether a masked MLP training step can be
  captured in a CUDA graph and replayed (``captured``, ``replayed``, ``error``).

In a dry run everything is tiny, on the CPU, for the backend "torch" and "auto"; the graph probe
is skipped.
"""

from __future__ import annotations

from copy import deepcopy
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

import bise_kernels
import by_hand
from bise_kernels.backends import available_backends
from edgepopup import EdgePopupSubnet

GPU_BACKENDS = ("cuda", "triton", "auto")
DENSITY = 0.5
LR = 1e-3
FULL = SimpleNamespace(mlp_width=4096, mlp_batches=(256, 4096), conv_batches=(32, 128), conv_px=56, conv_div=1)
TINY = SimpleNamespace(mlp_width=64, mlp_batches=(8,), conv_batches=(2,), conv_px=8, conv_div=16)


class _EdgePopup(nn.Module):
    """A dense layer whose frozen weight is masked by edge-popup's sort-and-scatter each call."""

    def __init__(self, dense: nn.Module):
        super().__init__()
        self.dense = dense
        dense.weight.requires_grad_(False)
        self.scores = nn.Parameter(torch.randn_like(dense.weight))

    def forward(self, x):
        w = self.dense.weight * EdgePopupSubnet.apply(self.scores, DENSITY)
        if isinstance(self.dense, nn.Linear):
            return F.linear(x, w, self.dense.bias)
        return self.dense._conv_forward(x, w, self.dense.bias)


def _mlp(width, device):
    layers = []
    for i in range(4):
        layers += [nn.Linear(width, width, bias=False)] + ([nn.ReLU()] if i < 3 else [])
    return nn.Sequential(*layers).to(device=device, dtype=torch.bfloat16)


def _convs(div, device):
    wide, narrow = 256 // div, 64 // div
    layers = []
    for _ in range(3):
        layers += [nn.Conv2d(wide, narrow, 1, bias=False), nn.ReLU(),
                   nn.Conv2d(narrow, narrow, 3, padding=1, bias=False), nn.ReLU(),
                   nn.Conv2d(narrow, wide, 1, bias=False), nn.ReLU()]
    return nn.Sequential(*layers).to(device=device, dtype=torch.bfloat16, memory_format=torch.channels_last)


def _variant(dense: nn.Sequential, kind: str) -> nn.Sequential:
    """The dense net itself ("dense"), or a copy whose linear/conv layers are masked."""
    if kind == "dense":
        return dense
    layers = []
    for layer in dense:
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            copy = deepcopy(layer)
            if kind == "edge_popup":
                layer = _EdgePopup(copy)
            else:
                cls = bise_kernels.MaskedLinear if isinstance(layer, nn.Linear) else bise_kernels.MaskedConv2d
                layer = cls.from_dense(copy, density=DENSITY)
                if kind == "masked_keep":
                    layer.mask_mode = "keep"
        layers.append(layer)
    return nn.Sequential(*layers)


def _step_fn(net: nn.Module, x: torch.Tensor, backend: str | None = None):
    """One SGD step on the trainable parameters (scores, or the dense weights).

    The backend is set process-wide for the step (``set_backend``), not per thread: on CUDA the
    backward runs in autograd's device thread, which a thread-local ``use_backend`` misses.
    """
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=LR)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = _loss_backward(net, x, backend)
        opt.step()
        return loss

    return step


def _loss_backward(net: nn.Module, x: torch.Tensor, backend: str | None) -> torch.Tensor:
    """A step's forward, loss and backward with ``backend`` set process-wide (as :func:`_step_fn` says)."""
    previous = bise_kernels.get_backend()
    if backend is not None:
        bise_kernels.set_backend(backend)
    try:
        loss = net(x).float().square().mean()
        loss.backward()
    finally:
        bise_kernels.set_backend(previous)
    return loss.detach()


def _loss_and_grads(net: nn.Module, x: torch.Tensor, backend: str):
    """The step's loss and the gradients of its trainable parameters on ``backend`` (nothing stepped)."""
    net.zero_grad(set_to_none=True)
    loss = _loss_backward(net, x, backend)
    return loss, [p.grad.float() for p in net.parameters() if p.requires_grad]


def _check_step(net: nn.Module, x: torch.Tensor, backend: str) -> None:
    """The masked step's loss and score gradients on ``backend`` against a copy of the same state on the
    reference backend ("torch"), before the timed steps change the scores: a fast wrong step must not
    pass (a finite loss proves little). bf16 tolerances."""
    want_loss, want = _loss_and_grads(deepcopy(net), x, "torch")
    loss, got = _loss_and_grads(net, x, backend)
    net.zero_grad(set_to_none=True)
    torch.testing.assert_close(loss, want_loss, rtol=2e-2, atol=0)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=5e-2, atol=2e-2 * float(w.abs().max()))


def _step_cases(name, dense, x, backends, targets) -> list[dict]:
    baselines = {"dense_step": _step_fn(_variant(dense, "dense"), x),
                 "edge_popup": _step_fn(_variant(dense, "edge_popup"), x)}
    masked = _variant(dense, "masked")
    cases = []
    for backend in backends:
        case = {"name": f"{name}/{backend}", "backend": backend, "target_speedup": targets}
        if backend not in ("auto", *available_backends(x.device.type)):
            cases.append(dict(case, skip=f"backend {backend!r} unavailable on {x.device.type}"))
            continue
        step = _step_fn(masked, x, backend)
        cases.append(dict(case, fn=step, check=lambda backend=backend: _check_step(masked, x, backend),
                          baselines=baselines))
    return cases


def _keep_step_case(name, dense, x, backend, targets) -> dict:
    """The masked step with ``mask_mode="keep"`` beside the same step in the default mode."""
    case = {"name": f"{name}/{backend}+keep", "backend": backend, "target_speedup": targets}
    if backend not in available_backends(x.device.type):
        return dict(case, skip=f"backend {backend!r} unavailable on {x.device.type}")
    net = _variant(dense, "masked_keep")
    step = _step_fn(net, x, backend)
    baselines = {"selection_step": _step_fn(_variant(dense, "masked"), x, backend),
                 "dense_step": _step_fn(_variant(dense, "dense"), x)}
    return dict(case, fn=step, check=lambda: _check_step(net, x, backend), baselines=baselines)


def _overhead_cases(device, dry_run) -> list[dict]:
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(32, 256, device=device, generator=g, requires_grad=True)
    w = torch.randn(256, 256, device=device, generator=g, requires_grad=True)
    s = torch.randn(256, 256, device=device, generator=g, requires_grad=True)
    gy = torch.randn(32, 256, device=device, generator=g)

    def masked():
        return torch.autograd.grad(bise_kernels.masked_linear(x, w, None, s, density=DENSITY), (x, s), gy)

    def dense():
        return torch.autograd.grad(F.linear(x, w), (x, w), gy)

    layer = bise_kernels.MaskedLinear(256, 256, bias=False, density=DENSITY, device=device)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.scores.copy_(s)

    def module():  # the selection is cached: what a layer costs per call within a training step
        return torch.autograd.grad(layer(x), (x, layer.scores), gy)

    def written_by_hand(mask):  # benchmarks/by_hand.py: W * mask materialised, STE to the scores
        return torch.autograd.grad(F.linear(x, by_hand.masked_weight(w, s, mask)), (x, s), gy)

    cached = by_hand.keep_mask(s, by_hand.top_k_threshold(s, DENSITY), w.dtype)
    # "wall": the host cost is the figure (do_bench's GPU events would hide most of it). "materialise_*":
    # the plain-PyTorch path of the same semantics (its own top-k per call for the api, the mask computed
    # once for the module); "auto" must not be slower than it (issue #13).
    return [{"name": f"overhead_masked_linear_256_b32/{path}", "backend": "auto", "fn": fn, "timer": "wall",
             "check": lambda fn=fn, hand=hand: _same_gradients(fn(), hand()),
             "baselines": {"dense_fwd_bwd": dense, "materialise_fwd_bwd": hand},
             "target_speedup": {"dense_fwd_bwd": 1 / 1.5, "materialise_fwd_bwd": 1.0}}
            for path, fn, hand in (
                ("api", masked,
                 lambda: written_by_hand(by_hand.keep_mask(s, by_hand.top_k_threshold(s, DENSITY), w.dtype))),
                ("module", module, lambda: written_by_hand(cached)))]


def _fail(message: str):
    raise AssertionError(message)


def _same_gradients(got, by_hand) -> None:
    """The masked path's gradients are finite and those of the plain-PyTorch baseline (so the baseline
    computes the same thing: the same mask, the straight-through score gradient)."""
    for g, h in zip(got, by_hand, strict=True):
        torch.isfinite(g).all() or _fail("non-finite gradient")
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-4)


def _graph_probe() -> dict:
    """Capture one masked training step (forward, backward, in-place score update) in a CUDA graph."""
    result = {"captured": False, "replayed": False}
    try:
        net = _variant(_mlp(1024, "cuda"), "masked")
        x = torch.randn(64, 1024, device="cuda", dtype=torch.bfloat16)
        scores = [p for p in net.parameters() if p.requires_grad]

        def step():
            loss = net(x).float().square().mean()
            grads = torch.autograd.grad(loss, scores)
            with torch.no_grad():
                for p, g in zip(scores, grads):
                    p.sub_(LR * g)
            return loss

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss = step()
        result["captured"] = True
        graph.replay()
        torch.cuda.synchronize()
        result["replayed"] = bool(torch.isfinite(loss))
    except Exception as exc:  # noqa: BLE001 - the outcome is the measurement
        result["error"] = f"{type(exc).__name__}: {exc}"[:500]
    return result


def gpu_cases(dry_run: bool = False) -> list[dict]:
    """The step, overhead and graph cases (a few GB on the GPU, most of it the batch-128 conv activations)."""
    if not dry_run and not torch.cuda.is_available():
        raise RuntimeError("bench_step_gpu cases need a CUDA device (or dry_run=True)")
    size, device, backends = (TINY, "cpu", ("torch", "auto")) if dry_run else (FULL, "cuda", GPU_BACKENDS)
    torch.manual_seed(0)
    cases = []
    mlp = _mlp(size.mlp_width, device)
    for batch in size.mlp_batches:
        x = torch.randn(batch, size.mlp_width, device=device, dtype=torch.bfloat16)
        targets = {"dense_step": 1 / 1.1, **({"edge_popup": 3.0} if batch == size.mlp_batches[0] else {})}
        cases += _step_cases(f"step_mlp4x{size.mlp_width}_bf16_b{batch}", mlp, x, backends, targets)
        cases.append(_keep_step_case(f"step_mlp4x{size.mlp_width}_bf16_b{batch}", mlp, x, backends[0],
                                     {"dense_step": 1 / 1.1}))
    convs = _convs(size.conv_div, device)
    for batch in size.conv_batches:
        x = torch.randn(batch, 256 // size.conv_div, size.conv_px, size.conv_px, device=device,
                        dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        cases += _step_cases(f"step_resnet50_convs_bf16_cl_b{batch}", convs, x, backends, {"dense_step": 1 / 1.1})
    cases += _overhead_cases(device, dry_run)
    probe = {"name": "cuda_graph_masked_step/api", "backend": "auto"}
    cases.append(dict(probe, skip="needs CUDA") if dry_run else dict(probe, probe=_graph_probe))
    return cases

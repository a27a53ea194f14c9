"""Every torch.ops.bise_kernels_ext op, called directly with bad input, raises the error the Python
checks raise for the same mistake (TypeError for a dtype, layout or kind of tensor, else ValueError) naming
the argument (the checks of csrc/checks.h, shared by the CPU and CUDA implementations); odd but
valid input (non-contiguous, empty) gives the reference's result.

Each case calls the implementation of one device through the dispatcher (``redispatch`` to that
device's key), so a tensor on another device reaches the implementation as it would in a mixed-device
call. On CPU the "other" device is ``meta``; on CUDA it is the CPU. The CUDA cases run in a child
process so that a crash fails one test instead of killing the run; they need a GPU and an
extension built with its CUDA kernels.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from bise_kernels.backends import reference as R

try:
    from bise_kernels._extension import ext_ops

    EXT = ext_ops()
except ImportError as exc:  # the compiled extension is missing
    pytest.skip(f"bise_kernels._C unavailable: {exc}", allow_module_level=True)

OTHER = {"cpu": "meta", "cuda": "cpu"}
KEY = {"cpu": torch._C.DispatchKey.CPU, "cuda": torch._C.DispatchKey.CUDA}


def call(name: str, device: str, *args):
    """The ``device`` implementation of op ``name`` on ``args``, whatever devices the args are on."""
    return getattr(EXT, name).default.redispatch(torch._C.DispatchKeySet(KEY[device]), *args)


@dataclass
class Case:
    op: str
    args: Callable[[str, str], tuple]  # (device, other device) -> arguments
    match: str  # the error message must contain this (a regex), with {device} filled in
    error: type = ValueError  # as bise_kernels/_checks.py: TypeError for a dtype, layout or kind of tensor

    def check(self, device: str) -> None:
        with pytest.raises(self.error, match=self.match.format(device=device)):
            call(self.op, device, *self.args(device, OTHER[device]))


def _t(*shape, device, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)


def _sel(device, dtype=torch.float32):
    """A valid (thr, cut) on ``device``."""
    return torch.zeros((), dtype=dtype, device=device), torch.full((), 5, dtype=torch.int64, device=device)


def _layer(d):
    w, s = _t(3, 4, device=d), _t(3, 4, device=d)
    return (w, s, *_sel(d))


def _grad_args(d, **over):
    w, s, thr, cut = _layer(d)
    args = dict(grad=_t(3, 4, device=d), w=w, s=s, thr=thr, cut=cut, estimator="ste", temperature=1.0)
    args.update(over)
    return (args["grad"], args["w"], args["s"], args["thr"], args["cut"], args["estimator"], args["temperature"],
            True, True)


def _keep(d, *shape):
    return torch.ones(shape or (3, 4), dtype=torch.bool, device=d)


def _keep_grad_args(d, **over):
    args = dict(grad=_t(3, 4, device=d), w=_t(3, 4, device=d), s=_t(3, 4, device=d), keep=_keep(d), estimator="ste",
                temperature=1.0)
    args.update(over)
    return (args["grad"], args["w"], args["s"], args["keep"], args["estimator"], args["temperature"], True, True)


def _gate_args(d, **over):
    args = dict(x=_t(2, 5, 3, device=d), s=_t(5, device=d), thr=_sel(d)[0], cut=_sel(d)[1], dim=1)
    args.update(over)
    return args["x"], args["s"], args["thr"], args["cut"], args["dim"]


def _gate_bwd_args(d, gy=None, estimator="sigmoid", temperature=1.0, **over):
    x, s, thr, cut, dim = _gate_args(d, **over)
    gy = _t(*x.shape, device=d) if gy is None else gy
    return gy, x, s, thr, cut, dim, estimator, temperature, True, True


def _nested(device):
    """A nested (3, 4)-and-(3, 4) tensor: its sizes() fails inside torch ("NestedTensorImpl doesn't support
    sizes"), so the check must come first."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "nested tensors are in prototype stage"
        return torch.nested.nested_tensor([_t(3, 4, device=device), _t(3, 4, device=device)])


CASES = {
    # ------------------------------------------------------------------ topk_select
    "topk_empty_list": Case("topk_select", lambda d, o: ([], 1, None), "scores is an empty list"),
    "topk_other_device": Case("topk_select", lambda d, o: ([_t(4, device=d), _t(4, device=o)], 1, None),
                              r"scores\[1\] must be a {device} tensor"),
    "topk_int_scores": Case("topk_select", lambda d, o: ([torch.arange(4, device=d)], 1, None),
                            r"scores\[0\] must be float32/float64/float16/bfloat16", TypeError),
    "topk_mixed_dtypes": Case("topk_select", lambda d, o: ([_t(4, device=d), _t(4, device=d).half()], 1, None),
                              r"scores\[1\] has dtype Half but scores\[0\] has Float", TypeError),
    "topk_empty_tensor": Case("topk_select", lambda d, o: ([_t(4, device=d), _t(0, device=d)], 1, None),
                              r"scores\[1\] is empty"),
    "topk_k_zero": Case("topk_select", lambda d, o: ([_t(4, device=d)], 0, None), r"k must be in \[1, 4\]"),
    "topk_k_too_large": Case("topk_select", lambda d, o: ([_t(4, device=d), _t(3, device=d)], 8, None),
                             r"k must be in \[1, 7\]"),
    "topk_hint_shape": Case("topk_select", lambda d, o: ([_t(4, device=d)], 1, _t(2, device=d)),
                            r"hint must have 1 element\(s\), got shape \[2\]"),
    "topk_hint_dtype": Case("topk_select", lambda d, o: ([_t(4, device=d)], 1, torch.ones(1, dtype=torch.int32)),
                            "hint must be a float tensor", TypeError),
    # ------------------------------------------------------------------ batched_topk_select
    "batched_ks_length": Case("batched_topk_select", lambda d, o: ([_t(4, device=d), _t(4, device=d)], [1], None),
                              r"ks has 1 entries for 2 problem\(s\)"),
    "batched_ks_range": Case("batched_topk_select", lambda d, o: ([_t(4, device=d), _t(2, device=d)], [1, 3], None),
                             r"ks\[1\] must be in \[1, 2\]"),
    "batched_other_device": Case("batched_topk_select", lambda d, o: ([_t(4, device=d), _t(4, device=o)], [1, 1], None),
                                 r"scores\[1\] must be a {device} tensor"),
    "batched_hints_shape": Case("batched_topk_select",
                                lambda d, o: ([_t(4, device=d), _t(4, device=d)], [1, 1], _t(3, device=d)),
                                r"hints must have 2 element\(s\)"),
    # ------------------------------------------------------------------ keep_mask
    "keep_mask_other_device": Case("keep_mask", lambda d, o: (_t(4, device=o), *_sel(d), 0),
                                   "scores must be a {device} tensor"),
    "keep_mask_thr_device": Case("keep_mask", lambda d, o: (_t(4, device=d), *_sel(o), 0),
                                 "thr and cut must be on the scores' device"),
    "keep_mask_cut_device": Case("keep_mask", lambda d, o: (_t(4, device=d), _sel(d)[0], _sel(o)[1], 0),
                                 r"thr and cut must be on the scores' device {device}.*, got {device}.* and "),
    "keep_mask_thr_dtype": Case("keep_mask", lambda d, o: (_t(4, device=d), *_sel(d, torch.float16), 0),
                                "thr must have the scores' dtype", TypeError),
    "keep_mask_cut_shape": Case("keep_mask", lambda d, o: (_t(4, device=d), _sel(d)[0], torch.ones(2, dtype=torch.int64,
                                                                                                  device=d), 0),
                                "cut must be a one-element tensor", TypeError),
    "keep_mask_int_scores": Case("keep_mask", lambda d, o: (torch.arange(4, device=d), *_sel(d), 0),
                                 "scores must be float32/float64/float16/bfloat16", TypeError),
    # ------------------------------------------------------------------ masked_weight
    # an empty weight launches no pass: the finiteness checks it would make are made all the same (the CUDA
    # implementation returned without them)
    "weight_empty_nan_thr": Case("masked_weight", lambda d, o: (_t(0, 4, device=d), _t(0, 4, device=d),
                                                               torch.tensor(float("nan"), device=d), _sel(d)[1]),
                                 "threshold contains non-finite values"),
    "weight_empty_rows_nan_scores": Case("masked_weight", lambda d, o: (_t(3, 0, device=d),
                                                                       torch.tensor([0.0, float("inf"), 1.0], device=d),
                                                                       *_sel(d)),
                                         r"scores contains non-finite values \(e.g. inf\)"),
    "keep_mask_empty_nan_thr": Case("keep_mask", lambda d, o: (_t(0, device=d), torch.tensor(float("nan"), device=d),
                                                              _sel(d)[1], 0, True),
                                    "threshold contains non-finite values"),
    "weight_other_device": Case("masked_weight", lambda d, o: (_t(3, 4, device=o), *_layer(d)[1:]),
                                "weight must be a {device} tensor"),
    "weight_scores_other_device": Case("masked_weight", lambda d, o: (_layer(d)[0], _t(3, 4, device=o), *_sel(d)),
                                       "scores must be a {device} tensor"),
    "weight_selection_other_device": Case("masked_weight", lambda d, o: (*_layer(d)[:2], *_sel(o)),
                                          "thr and cut must be on the scores' device"),
    "weight_sparse": Case("masked_weight", lambda d, o: (_t(3, 4, device=d).to_sparse(), *_layer(d)[1:]),
                          "weight must be a dense \\(strided\\) tensor, got layout Sparse", TypeError),
    "weight_nested": Case("masked_weight", lambda d, o: (_nested(d), *_layer(d)[1:]),
                          "weight must be a dense \\(strided\\) tensor, got a nested tensor", TypeError),
    "weight_int": Case("masked_weight", lambda d, o: (torch.ones(3, 4, dtype=torch.int32, device=d), *_layer(d)[1:]),
                       "weight must be float32/float64/float16/bfloat16", TypeError),
    "weight_scalar": Case("masked_weight", lambda d, o: (_t(device=d), _t(device=d), *_sel(d)),
                          "weight must have at least one dimension"),
    "weight_scores_shape": Case("masked_weight", lambda d, o: (_layer(d)[0], _t(4, 3, device=d), *_sel(d)),
                                r"scores must have weight's shape \[3, 4\] or \(3,\), got \[4, 3\]"),
    "weight_cut_other_device": Case("masked_weight", lambda d, o: (*_layer(d)[:3], _sel(o)[1]),
                                    "thr and cut must be on the scores' device"),
    "weight_thr_other_device": Case("masked_weight", lambda d, o: (*_layer(d)[:2], _sel(o)[0], _sel(d)[1]),
                                    "thr and cut must be on the scores' device"),
    "weight_thr_shape": Case("masked_weight", lambda d, o: (*_layer(d)[:2], _t(2, device=d), _sel(d)[1]),
                             "thr must be a one-element tensor", TypeError),
    "weight_thr_dtype": Case("masked_weight", lambda d, o: (*_layer(d)[:2], *_sel(d, torch.float64)),
                             "thr must have the scores' dtype", TypeError),
    "weight_cut_dtype": Case("masked_weight", lambda d, o: (*_layer(d)[:3], torch.zeros((), device=d)),
                             "cut must be int64", TypeError),
    # ------------------------------------------------------------------ masked_score_grad
    "score_grad_other_device": Case("masked_score_grad", lambda d, o: _grad_args(d, grad=_t(3, 4, device=o)),
                                    "grad_w_eff must be a {device} tensor"),
    "score_grad_shape": Case("masked_score_grad", lambda d, o: _grad_args(d, grad=_t(4, 3, device=d)),
                             r"grad_w_eff must have weight's shape \[3, 4\], got \[4, 3\]"),
    "score_grad_dtype": Case("masked_score_grad", lambda d, o: _grad_args(d, grad=_t(3, 4, device=d).half()),
                             "grad_w_eff has dtype Half but weight has Float", TypeError),
    "score_grad_strides": Case("masked_score_grad", lambda d, o: _grad_args(d, grad=_t(4, 3, device=d).t()),
                               r"grad_w_eff must be contiguous \(it is masked in place\), got strides \[1, 3\]"),
    "score_grad_estimator": Case("masked_score_grad", lambda d, o: _grad_args(d, estimator="straight"),
                                 "estimator must be 'ste' or 'sigmoid', got 'straight'"),
    "score_grad_temperature": Case("masked_score_grad", lambda d, o: _grad_args(d, temperature=0.0),
                                   "temperature must be a positive finite float"),
    "score_grad_temperature_nan": Case("masked_score_grad", lambda d, o: _grad_args(d, temperature=float("nan")),
                                       "temperature must be a positive finite float"),
    "score_grad_temperature_inf": Case("masked_score_grad", lambda d, o: _grad_args(d, temperature=float("inf")),
                                       "temperature must be a positive finite float, got inf"),
    "score_grad_weight_other_device": Case("masked_score_grad", lambda d, o: _grad_args(d, w=_t(3, 4, device=o)),
                                           "weight must be a {device} tensor"),
    # ------------------------------------------------------------------ keep_weight
    "keep_weight_other_device": Case("keep_weight", lambda d, o: (_t(3, 4, device=d), _keep(o)),
                                     "keep must be a {device} tensor"),
    "keep_weight_float_keep": Case("keep_weight", lambda d, o: (_t(3, 4, device=d), _t(3, 4, device=d)),
                                   "keep must be a bool tensor, got Float", TypeError),
    "keep_weight_shape": Case("keep_weight", lambda d, o: (_t(3, 4, device=d), _keep(d, 4, 3)),
                              r"keep must have weight's shape \[3, 4\] or \(3,\), got \[4, 3\]"),
    "keep_weight_conv_shape": Case("keep_weight", lambda d, o: (_t(3, 2, 2, 2, device=d), _keep(d, 3, 2, 2, 1)),
                                   r"keep must have weight's shape \[3, 2, 2, 2\] or \(3,\), got \[3, 2, 2, 1\]"),
    "keep_weight_int": Case("keep_weight", lambda d, o: (torch.ones(3, 4, dtype=torch.int32, device=d), _keep(d)),
                            "weight must be float32/float64/float16/bfloat16", TypeError),
    "keep_weight_scalar": Case("keep_weight", lambda d, o: (_t(device=d), _keep(d, 1)),
                               "weight must have at least one dimension"),
    # ------------------------------------------------------------------ keep_score_grad
    "keep_grad_other_device": Case("keep_score_grad", lambda d, o: _keep_grad_args(d, grad=_t(3, 4, device=o)),
                                   "grad_w_eff must be a {device} tensor"),
    "keep_grad_strides": Case("keep_score_grad", lambda d, o: _keep_grad_args(d, grad=_t(4, 3, device=d).t()),
                              "grad_w_eff must be contiguous"),
    "keep_grad_scores_shape": Case("keep_score_grad", lambda d, o: _keep_grad_args(d, s=_t(3, device=d)),
                                   r"scores must have keep's shape \[3, 4\], got \[3\]"),
    "keep_grad_scores_other_device": Case("keep_score_grad", lambda d, o: _keep_grad_args(d, s=_t(3, 4, device=o)),
                                          "scores must be a {device} tensor"),
    "keep_grad_keep_dtype": Case("keep_score_grad",
                                 lambda d, o: _keep_grad_args(d, keep=torch.ones(3, 4, dtype=torch.uint8, device=d)),
                                 "keep must be a bool tensor, got Byte", TypeError),
    "keep_grad_estimator": Case("keep_score_grad", lambda d, o: _keep_grad_args(d, estimator="hard"),
                                "estimator must be 'ste' or 'sigmoid'"),
    # ------------------------------------------------------------------ channel_gate_forward
    "gate_other_device": Case("channel_gate_forward", lambda d, o: _gate_args(d, x=_t(2, 5, 3, device=o)),
                              "x must be a {device} tensor"),
    "gate_scores_other_device": Case("channel_gate_forward", lambda d, o: _gate_args(d, s=_t(5, device=o)),
                                     "scores must be a {device} tensor"),
    "gate_int": Case("channel_gate_forward",
                     lambda d, o: _gate_args(d, x=torch.ones(2, 5, 3, dtype=torch.int32, device=d)),
                     "x must be float32/float64/float16/bfloat16", TypeError),
    "gate_scalar": Case("channel_gate_forward", lambda d, o: _gate_args(d, x=_t(device=d), dim=0),
                        "x must have at least one dimension"),
    "gate_dim": Case("channel_gate_forward", lambda d, o: _gate_args(d, dim=3), r"dim must be in \[-3, 2\], got 3"),
    "gate_dim_negative": Case("channel_gate_forward", lambda d, o: _gate_args(d, dim=-4), "dim must be in"),
    # dim = -x.dim() is valid (the first dim): the error is then about the scores' shape, not dim
    "gate_dim_most_negative": Case("channel_gate_forward", lambda d, o: _gate_args(d, dim=-3),
                                   r"scores must have shape \(2,\) \(x.shape\[0\]\), got \[5\]"),
    "gate_grad_cut_other_device": Case("channel_gate_backward", lambda d, o: _gate_bwd_args(d, cut=_sel(o)[1]),
                                       "thr and cut must be on the scores' device"),
    "gate_scores_shape": Case("channel_gate_forward", lambda d, o: _gate_args(d, s=_t(4, device=d)),
                              r"scores must have shape \(5,\) \(x.shape\[1\]\), got \[4\]"),
    "gate_scores_2d": Case("channel_gate_forward", lambda d, o: _gate_args(d, s=_t(5, 1, device=d)),
                           r"scores must have shape \(5,\)"),
    "gate_thr_device": Case("channel_gate_forward", lambda d, o: _gate_args(d, thr=_sel(o)[0]),
                            "thr and cut must be on the scores' device"),
    # ------------------------------------------------------------------ channel_gate_backward
    "gate_grad_other_device": Case("channel_gate_backward", lambda d, o: _gate_bwd_args(d, gy=_t(2, 5, 3, device=o)),
                                   "grad_y must be a {device} tensor"),
    "gate_grad_shape": Case("channel_gate_backward", lambda d, o: _gate_bwd_args(d, gy=_t(2, 5, 4, device=d)),
                            r"grad_y must have x's shape \[2, 5, 3\], got \[2, 5, 4\]"),
    "gate_grad_dtype": Case("channel_gate_backward",
                            lambda d, o: _gate_bwd_args(d, gy=_t(2, 5, 3, device=d, dtype=torch.float64)),
                            "grad_y has dtype Double but x has Float", TypeError),
    "gate_grad_estimator": Case("channel_gate_backward", lambda d, o: _gate_bwd_args(d, estimator="hard"),
                                "estimator must be 'ste' or 'sigmoid'"),
    "gate_grad_temperature": Case("channel_gate_backward", lambda d, o: _gate_bwd_args(d, temperature=-1.0),
                                  "temperature must be a positive finite float"),
    "gate_grad_x_other_device": Case("channel_gate_backward", lambda d, o: _gate_bwd_args(d, x=_t(2, 5, 3, device=o)),
                                     "x must be a {device} tensor"),
}

@pytest.mark.parametrize("case", list(CASES), ids=str)
def test_bad_input_names_the_argument_cpu(case):
    CASES[case].check("cpu")


def test_every_op_has_bad_input_cases():
    ops = {c.op for c in CASES.values()}
    assert ops == {"topk_select", "batched_topk_select", "keep_mask", "masked_weight", "masked_score_grad",
                   "keep_weight", "keep_score_grad", "channel_gate_forward", "channel_gate_backward"}


def _kernels_by_key() -> dict[str, set[str]]:
    """Each bise_kernels_ext op (short name) -> the dispatch keys among CPU, CUDA and the composite one
    that have a kernel registered."""
    names = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("bise_kernels_ext::")}
    keys = ("CPU", "CUDA", "CompositeImplicitAutograd")
    return {n: {k for k in keys if torch._C._dispatch_has_kernel_for_dispatch_key(f"bise_kernels_ext::{n}", k)}
            for n in names}


def test_every_op_has_one_kernel_per_device_of_the_build():
    """Every op is either one composite kernel (the layer compositions) or one kernel per device: CPU
    always, CUDA in a build WITH_CUDA (an op given a CPU kernel only would fail on CUDA tensors with
    "no kernel"). The CUDA half runs where the extension has its CUDA kernels: on a GPU, or without
    one in scripts/check_device_build.sh."""
    from bise_kernels import _C

    table = _kernels_by_key()
    assert {n for n, k in table.items() if "CPU" in k} == {c.op for c in CASES.values()} | {"topk_keep_mask"}
    device = {"CPU", "CUDA"} if _C.WITH_CUDA else {"CPU"}
    bad = {n: k for n, k in table.items() if k not in ({"CompositeImplicitAutograd"}, device)}
    assert not bad, f"ops without exactly one composite kernel or one kernel per device {sorted(device)}: {bad}"


# ----------------------------------------------------------------------------- valid but unusual input


def _odd_layouts(device):
    """Non-contiguous, channels_last, and empty inputs with the reference's result, one per op."""
    w = _t(6, 10, device=device).t()  # non-contiguous (10, 6)
    s = _t(6, 10, device=device).t()
    thr, cut = R.topk_select([s], 31)
    yield "masked_weight", (w, s, thr, cut), (w * R.keep_mask(s, thr, cut)).contiguous()
    su = _t(10, device=device)
    thr_u, cut_u = R.topk_select([su], 4)
    yield "masked_weight", (w, su, thr_u, cut_u), w * R.keep_mask(su, thr_u, cut_u)[:, None]
    empty = _t(0, 4, device=device)
    yield "masked_weight", (empty, empty, thr, cut), empty
    # no weights per unit: every score gradient is a sum of nothing
    w0, g0, s0 = _t(3, 0, device=device), _t(3, 0, device=device), _t(3, device=device)
    yield "masked_score_grad", (g0, w0, s0, thr, cut, "ste", 1.0, True, True), torch.zeros(3, device=device)
    kw = R.keep_mask(s, thr, cut)  # non-contiguous like s
    yield "keep_weight", (w, kw), (w * kw).contiguous()
    yield "keep_weight", (w, R.keep_mask(su, thr_u, cut_u)), w * R.keep_mask(su, thr_u, cut_u)[:, None]
    yield "keep_score_grad", (g0, w0, s0, torch.ones(3, dtype=torch.bool, device=device), "ste", 1.0, True, True), \
        torch.zeros(3, device=device)
    x = _t(2, 5, 4, 3, device=device).permute(0, 1, 3, 2)  # neither contiguous nor channels_last
    sg = _t(5, device=device)
    thr_g, cut_g = R.topk_select([sg], 2)
    yield "channel_gate_forward", (x, sg, thr_g, cut_g, 1), R.channel_gate_forward(x, sg, thr_g, cut_g, 1)
    xc = _t(2, 5, 4, 3, device=device).to(memory_format=torch.channels_last)
    yield "channel_gate_forward", (xc, sg, thr_g, cut_g, -3), R.channel_gate_forward(xc, sg, thr_g, cut_g, 1)
    keep = R.keep_mask(sg, thr_g, cut_g)
    yield "channel_gate_backward", (x, x, sg, thr_g, cut_g, 1, "ste", 1.0, True, False), (x * keep[:, None, None], None)
    flat = _t(9, 7, device=device).t()
    yield "keep_mask", (flat, *R.topk_select([flat], 20), 0), R.keep_mask(flat, *R.topk_select([flat], 20), 0)
    yield "topk_select", ([flat, w], 50, None), R.topk_select([flat, w], 50)


def _check_odd_layouts(device):
    for name, args, want in _odd_layouts(device):
        got = call(name, device, *args)
        if name == "channel_gate_backward":
            got, want = got[0], want[0]
        if isinstance(want, tuple):
            for g, w in zip(got, want):
                assert torch.equal(g.cpu(), w.cpu()), name
        else:
            assert got.shape == want.shape and torch.equal(got.cpu(), want.cpu()), name


def test_odd_layouts_and_empty_inputs_match_the_reference_cpu():
    _check_odd_layouts("cpu")


# ----------------------------------------------------------------------------- CUDA, in a child process


def run_cuda_cases() -> list[str]:
    """All cases on CUDA; returns the failures (called in the child process)."""
    failures = []
    for name, case in CASES.items():
        try:
            case.check("cuda")
        except BaseException as exc:  # noqa: BLE001 - report every failing case, then fail once
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
    try:
        _check_odd_layouts("cuda")
        torch.cuda.synchronize()
    except BaseException as exc:  # noqa: BLE001
        failures.append(f"odd layouts: {type(exc).__name__}: {exc}")
    return failures


def test_bad_input_names_the_argument_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from bise_kernels import _C

    if not _C.WITH_CUDA:
        pytest.skip("the extension was built without its CUDA kernels")
    here = os.path.dirname(os.path.abspath(__file__))
    code = "import sys, test_native_checks as t; f = t.run_cuda_cases(); print('\\n'.join(f)); sys.exit(1 if f else 0)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], cwd=here, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, f"exit status {done.returncode}\n{done.stdout}\n{done.stderr[-4000:]}"


@pytest.mark.parametrize("op", ["masked_score_grad", "keep_score_grad"])
@pytest.mark.parametrize("need_weight", [True, False])
def test_in_place_score_grads_declare_the_mutation_in_their_schema(op, need_weight):
    """masked_score_grad / keep_score_grad mask grad_w_eff in place (need_weight): the schema must say so
    (Tensor(a!)), or functionalization (torch.compile, export) would reuse the mutated buffer as if unchanged.
    opcheck's test_schema runs the op under SchemaCheckMode, which compares every argument before and after."""
    w, s, g = _t(3, 4, device="cpu"), _t(3, 4, device="cpu"), _t(3, 4, device="cpu")
    mask = (*_sel("cpu"),) if op == "masked_score_grad" else (s > 0,)
    args = (g, w, s, *mask, "sigmoid", 0.5, True, need_weight)
    torch.library.opcheck(getattr(EXT, op), args, test_utils=("test_schema",))
    assert getattr(EXT, op).default._schema.arguments[0].alias_info.is_write


@pytest.mark.parametrize("dim", [0, 2, 3, -1])
@pytest.mark.parametrize("memory_format", [torch.channels_last, "channels_last_3d"])
def test_gate_of_a_channels_last_x_along_another_dim_matches_the_reference(dim, memory_format):
    """The gate reads a channels_last x in place only for dim 1 (its channels innermost); along any other
    dim the implementation must take the contiguous view, forward and backward."""
    if memory_format == "channels_last_3d":
        memory_format, x = torch.channels_last_3d, _t(2, 3, 4, 5, 3, device="cpu")
    else:
        x = _t(2, 3, 4, 5, device="cpu")
    x = x.contiguous(memory_format=memory_format)
    assert not x.is_contiguous()
    s = _t(x.shape[dim], device="cpu")
    thr, cut = R.topk_select([s], 2)
    got = call("channel_gate_forward", "cpu", x, s, thr, cut, dim)
    torch.testing.assert_close(got, R.channel_gate_forward(x, s, thr, cut, dim), rtol=0, atol=0)
    gy = _t(*x.shape, device="cpu").contiguous(memory_format=memory_format)
    gx, gs = call("channel_gate_backward", "cpu", gy, x, s, thr, cut, dim, "sigmoid", 0.5, True, True)
    want_gx, want_gs = R.channel_gate_backward(gy, x, s, thr, cut, dim, "sigmoid", 0.5, (True, True))
    torch.testing.assert_close(gx, want_gx, rtol=0, atol=0)
    torch.testing.assert_close(gs, want_gs)


def test_keep_mask_checks_finiteness_only_when_asked():
    """keep_mask's check_finite defaults to False (a select's (thr, cut) was checked by the select): no error
    then (what a NaN score's entry holds is unspecified); with check_finite=True it is a named ValueError."""
    scores = torch.tensor([float("nan"), 1.0, -1.0, 2.0])
    thr, cut = torch.tensor(0.5), torch.tensor(4)
    assert EXT.keep_mask(scores, thr, cut, 0).tolist()[1:] == [True, False, True]
    with pytest.raises(ValueError, match=r"scores contains non-finite values \(e.g. nan\)"):
        EXT.keep_mask(scores, thr, cut, 0, True)

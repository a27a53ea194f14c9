"""The op schemas, declared once as torch.library custom ops, with fake impls and autograd.

Each op's implementation asks the backend registry for the kernel of the selected backend on
the tensor's device, so one schema serves every backend. The autograd formula lives here once;
backends only provide forward and backward kernels (contract: ``backends/reference.py``).
Ops take the selection as ``(thr, cut)`` 0-dim tensors, so the mask is recomputed from the
scores inside kernels and never saved: the only state kept for backward is what autograd
already holds (x, weight, scores). ``masked_linear_keep`` and ``masked_conv2d_keep`` take the
selection packed once into a bool keep mask instead (1 byte per weight, saved for backward in
place of ``(thr, cut)``).

Every op is called from Python through :func:`_plain_op` / :func:`_layer_op`: in plain eager
mode (no compile, export or torch.jit.trace trace, no dispatch or function mode, no torch.func
transform, plain tensors: not :func:`_uncached`) the same kernels and the same autograd formula run in a ``torch.autograd.Function``
(layer ops) without the custom-op dispatch; otherwise the custom op
(``torch.ops.bise_kernels.<op>``, also ``<op>.op``) runs; under a torch.func transform, a layer
op runs its formula in an autograd.Function of its own (torch refuses the custom op's autograd
there). The paths are tested to give the same results (tests/kernels/test_opcheck.py,
test_masked_ops.py).
"""

from __future__ import annotations

import contextlib
import functools
import sys
from typing import Callable, Optional

import torch
from torch import Tensor

from . import backends
from .backends import reference
from ._checks import check_estimator, check_keep_op_scores, conv2d_output_shape

LIB = "bise_kernels"


def _kernel(name: str, t: Tensor):
    return backends.resolve(name, t.device.type, t.dtype)[1]


def _forward_kernel(name: str, t: Tensor, estimator: object, temperature: object):
    """:func:`_kernel` for a layer op's forward, after the estimator check that the native forward makes:
    the Python kernels (torch, triton) read the estimator in their backward only, so an estimator or
    temperature set on a module after construction passed an eval forward there and not on cpp / cuda."""
    check_estimator(estimator, temperature)
    return _kernel(name, t)


def _forward_backend(ctx) -> None:
    """Remember the backend selected when the forward ran (``use_backend`` is per thread)."""
    ctx.backend = backends.get_backend()


def _backward_backend(ctx):
    """The forward's backend for the backward, which autograd may run in another thread (on CUDA,
    always: a device thread of its own), where a ``use_backend`` of the caller does not hold."""
    return contextlib.nullcontext() if ctx.backend == backends.get_backend() else backends.use_backend(ctx.backend)


def _or_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    """Custom ops cannot return None: a gradient that is not needed comes back empty."""
    return like.new_empty(0) if t is None else t


def _or_none(t: Tensor, needed: bool) -> Optional[Tensor]:
    return t if needed else None


# ----------------------------------------------------------------------------- output layouts
# A custom op's fake impl declares its outputs' strides, and torch.compile's generated code relies on
# them (Inductor asserts them after each call): every backend's result is brought to the declared
# layout here, at the cost of a copy only where a kernel wrote another one (cpp's select writes
# contiguous masks, and its conv backward a contiguous weight gradient, for channels_last tensors).
# The rules: a mask or a gradient has the layout of its tensor (torch.empty_like's), a linear output
# is contiguous, a conv output channels_last where x or the weight is (as ATen's conv2d picks).


def _same_layout(t: Tensor, want: Tensor) -> bool:
    """Whether ``t`` has ``want``'s strides wherever they matter (dims longer than 1)."""
    return all(a == b for a, b, n in zip(t.stride(), want.stride(), t.shape) if n > 1)


def _like(out: Tensor, ref: Tensor) -> Tensor:
    """``out`` (of ``ref``'s shape) in the layout of ``torch.empty_like(ref)``, the fake impls' rule."""
    if out.is_contiguous() and (ref.dim() <= 1 or ref.is_contiguous()):  # the common cases (a 1-d ref's is contiguous)
        return out
    want = torch.empty_like(ref, dtype=out.dtype, device="meta")
    return out if _same_layout(out, want) else torch.empty_like(ref, dtype=out.dtype).copy_(out)


def _conv_format(x: Tensor, weight: Tensor) -> torch.memory_format:
    """channels_last where x or the weight is (and is not also contiguous), else contiguous."""
    cl = torch.channels_last
    return cl if any(t.dim() == 4 and t.is_contiguous(memory_format=cl) and not t.is_contiguous()
                     for t in (x, weight)) else torch.contiguous_format


def _conv_output(out: Tensor, x: Tensor, weight: Tensor) -> Tensor:
    return out.contiguous(memory_format=_conv_format(x, weight))


def _empty_conv_output(x: Tensor, weight: Tensor, stride, padding, dilation) -> Tensor:
    shape = conv2d_output_shape(x.shape, weight.shape, stride, padding, dilation)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_conv_format(x, weight))


def _grads_like(grads, like: tuple, empty: Tensor) -> tuple:
    """A backward op's outputs: each gradient in its input's layout, an empty tensor where not needed."""
    return tuple(_or_empty(None if g is None else _like(g, t), empty) for g, t in zip(grads, like))


def _per_unit(weight: Tensor) -> Tensor:
    """A tensor like the bias of ``weight``'s layer, which its gradient takes after (``weight[:, 0]`` fails for
    in_features 0)."""
    return weight.new_empty(weight.shape[:1])


def _empty_grads(like: tuple, needs: list, empty: Tensor) -> tuple:
    return tuple(torch.empty_like(t) if n else empty.new_empty(0) for t, n in zip(like, needs))


# ----------------------------------------------------------------------------- the eager path

_PLAIN_TYPES = (Tensor, torch.nn.Parameter)
_PLAIN_ARGUMENT_TYPES = frozenset((*_PLAIN_TYPES, type(None), bool, int, float, str))
"""Argument types that need no closer look: plain tensors and the schemas' scalars."""


def _uncached() -> bool:
    """Traced (torch.compile, export, torch.jit.trace) or under a torch.func transform: the modules'
    selection caches stand aside (traced and wrapped tensors have no data pointer to key a cache on,
    a transform's are new at every call, and a trace would record a cached selection as a constant),
    and no call is :func:`_plain_eager` (a jit trace then holds one custom-op node per op, not the
    reference's inlined ops). 0.25 us outside all, 0.08 of it the tracing test (timeit, load 2)."""
    return (torch.compiler.is_compiling() or torch._C._functorch.maybe_current_level() is not None
            or torch._C._get_tracing_state() is not None)


def _plain_eager(args: tuple) -> bool:
    """Whether a call needs nothing of the dispatcher: not :func:`_uncached` (traced or transformed),
    no dispatch or torch-function mode, only plain tensors (no fake or wrapper subclasses; lists of
    tensors included). 0.64 us for masked_linear's 8 arguments, 0.59 with _uncached's tests inline
    (timeit, load 0.5): one definition of "traced or transformed" for the ops and the caches."""
    if _uncached() or torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
        return False
    for a in args:
        if type(a) in _PLAIN_ARGUMENT_TYPES:  # 3.0 -> 0.6 us for masked_linear's 8 arguments
            continue
        for t in (a if isinstance(a, list) else (a,)):
            if type(t) not in _PLAIN_ARGUMENT_TYPES and isinstance(t, Tensor):
                return False
    return True


def _plain_op(op, impl: Callable) -> Callable:
    """The Python callable of an op without autograd: ``impl`` directly in plain eager mode (see
    :func:`_layer_op`), else the custom op ``op``."""

    @functools.wraps(impl)
    def call(*args):
        return impl(*args) if _plain_eager(args) else op(*args)

    call.op = op
    return call


_NATIVE_LAYER_OPS: dict[tuple, Optional[Callable]] = {}


def _native_layer_op(name: str, x: Tensor) -> Optional[Callable]:
    """The extension op running layer op ``name`` in one call with a C++ autograd node
    (csrc/masked_autograd.cpp) when the backend selected for x's device and dtype runs the op's
    forward and backward kernels natively ("cpp", "cuda"; :func:`..backends.native.layer_op`), else None.

    Cached per (op, backend, device type, dtype): the registry's tables are fixed once its
    modules are loaded, so the two registry lookups a call used to make happen once per key.
    None while compiling: dynamo cannot trace the registry (a fullgraph compile would break), and
    a traced call runs the custom op, whose native kernels make the same checks.
    """
    if torch.compiler.is_compiling():
        return None
    key = (name, backends.get_backend(), x.device.type, x.dtype)
    op = _NATIVE_LAYER_OPS.get(key, _NATIVE_LAYER_OPS)
    if op is _NATIVE_LAYER_OPS:
        forward = backends.resolve(f"{name}_forward", key[2], key[3])[1]
        backward = backends.resolve(f"{name}_backward", key[2], key[3])[1]
        native = sys.modules.get("bise_kernels.backends.native")  # imported by the backend that resolved
        op = _NATIVE_LAYER_OPS[key] = native.layer_op(name, forward, backward) if native is not None else None
    return op


def _layer_op(name: str, op, forward: Callable, setup: Callable, backward: Callable) -> Callable:
    """The Python callable of layer op ``name``: the custom op ``op`` unless :func:`_plain_eager`,
    else the extension's one-call op (:func:`_native_layer_op`) on the "cpp" and "cuda" backends,
    else ``forward`` (the op's implementation) directly, in an autograd.Function with the op's
    ``setup`` and ``backward`` when a gradient is needed.

    Why: the custom-op call costs about 40 us of dispatch on top of the kernels, and an
    autograd.Function with a separate setup_context another 50 us of signature binding (cProfile of
    a MaskedLinear forward + backward, docs/masked.md); a masked layer would cost several dense
    ones per call. An old-style Function (forward(ctx, ...)) binds nothing. It is applied through
    the C ``_FunctionBase.apply`` that ``Function.apply`` ends in: what that Python wrapper adds
    (a setup_context probe, unwrapping functorch tensors) cannot apply here, as :func:`_plain_eager`
    rules out functorch transforms, and costs 2.5 of its 6 us (benchmarks/bench_masked_overhead.py).
    The native op goes further: its autograd node is C++, so the engine runs no Python for it, and
    its backward makes its dispatcher calls from C++ (docs/masked.md, "Per-call overhead").
    ``call.run(native, *args)``: the same, for a caller that has looked ``native`` up.
    """

    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            output = forward(*inputs)
            setup(ctx, inputs, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    apply = super(torch.autograd.Function, Eager).apply

    class Transformed(torch.autograd.Function):
        """The same under a torch.func transform (grad, vjp): a transform needs forward and
        setup_context apart, and refuses the custom op's autograd (torch._library.autograd has them
        together, torch 2.13). No vmap rule (nor jacrev, which vmaps the backward): the kernels have none."""

        @staticmethod
        def forward(*inputs):
            return forward(*inputs)

        @staticmethod
        def setup_context(ctx, inputs, output):
            setup(ctx, inputs, output)

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    Transformed.__name__ = Transformed.__qualname__ = name  # torch's errors name it (vmap: no rule)

    def run(native: Optional[Callable], *args):
        """``call`` with ``native = _native_layer_op(name, args[0])`` given by a caller that looks it
        up anyway (to decide ``functional._fused_check``): one lookup per call (~1 us)."""
        if not _plain_eager(args):
            if torch._C._functorch.maybe_current_level() is not None and not torch.compiler.is_compiling():
                return Transformed.apply(*args)
            return op(*args)
        if native is not None:
            return native(*args)
        if torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
            return apply(*args)
        return forward(*args)

    @functools.wraps(forward)
    def call(*args):
        return run(_native_layer_op(name, args[0]), *args)

    call.op, call.run = op, run
    return call


# ----------------------------------------------------------------------------- selection


def _first(scores: list[Tensor]) -> Tensor:
    """The tensor a select op dispatches on (an empty list: a ValueError, not an IndexError)."""
    if not scores:
        raise ValueError("scores is an empty list: a selection needs at least one tensor")
    return scores[0]


def _topk_select(scores: list[Tensor], k: int, hint: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Exact top-k over the concatenation of the flattened ``scores``: (threshold, tie cut).

    Returned as the kernel made them: every backend's results are new tensors, never an input, a
    view of one or a buffer it reuses (the contract, backends/reference.py; tested per backend in
    tests/kernels/test_select_kernels.py), as a custom op's outputs must be. A copy here cost two
    launches per select on CUDA and 3.2 us of a public topk_select of 4096 CPU scores (28.8 -> 25.7 us,
    one thread, interleaved, load 1.8)."""
    return _kernel("topk_select", _first(scores))(scores, k, hint)


_topk_select_op = torch.library.custom_op(f"{LIB}::topk_select", _topk_select, mutates_args=())


@_topk_select_op.register_fake
def _(scores, k, hint):
    s = scores[0]
    return s.new_empty(()), torch.empty((), dtype=torch.int64, device=s.device)


def _batched_topk_select(scores: list[Tensor], ks: list[int], hints: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """One independent top-k per tensor: thresholds and tie cuts of shape (len(scores),), as the
    kernel made them (see :func:`_topk_select`)."""
    return _kernel("batched_topk_select", _first(scores))(scores, ks, hints)


_batched_topk_select_op = torch.library.custom_op(f"{LIB}::batched_topk_select", _batched_topk_select,
                                                  mutates_args=())


@_batched_topk_select_op.register_fake
def _(scores, ks, hints):
    s = scores[0]
    return s.new_empty((len(scores),)), torch.empty((len(scores),), dtype=torch.int64, device=s.device)


def _keep_mask(scores: Tensor, thr: Tensor, cut: Tensor, offset: int, check_finite: bool = False) -> Tensor:
    """Bool mask of the selection ``(thr, cut)``, flat indices counted from ``offset``.
    ``check_finite``: also reject NaN / inf scores and thr (a selection nobody checked yet); the
    native kernels do it in their pass (registry ``CHECKS_FINITE``), the others in Python."""
    return _like(_kernel("keep_mask", scores)(scores, thr, cut, offset, check_finite), scores)


_keep_mask_op = torch.library.custom_op(f"{LIB}::keep_mask", _keep_mask, mutates_args=())


@_keep_mask_op.register_fake
def _(scores, thr, cut, offset, check_finite=False):
    return torch.empty_like(scores, dtype=torch.bool)


def _topk_keep_mask(scores: list[Tensor], k: int, hint: Optional[Tensor]) -> list[Tensor]:
    """The keep masks of the exact top-k over the concatenation, one per tensor. A backend without
    this kernel (only the reference has it) composes its own ``topk_select`` and ``keep_mask``."""
    s = _first(scores)
    name, kernel = backends.resolve("topk_keep_mask", s.device.type, s.dtype)
    if name != "torch":
        masks = kernel(scores, k, hint)
    else:
        masks = reference.compose_topk_keep_mask(_kernel("topk_select", s), _kernel("keep_mask", s), scores, k, hint)
    return [_like(m, t) for m, t in zip(masks, scores)]


_topk_keep_mask_op = torch.library.custom_op(f"{LIB}::topk_keep_mask", _topk_keep_mask, mutates_args=())


@_topk_keep_mask_op.register_fake
def _(scores, k, hint):
    return [torch.empty_like(t, dtype=torch.bool) for t in scores]


topk_select = _plain_op(_topk_select_op, _topk_select)
batched_topk_select = _plain_op(_batched_topk_select_op, _batched_topk_select)
keep_mask = _plain_op(_keep_mask_op, _keep_mask)
topk_keep_mask = _plain_op(_topk_keep_mask_op, _topk_keep_mask)


def _backward_kernel(name: str) -> Callable:
    """A backward kernel called directly (the eager path): grads with None where not needed."""
    return lambda grad_y, x, *args: _kernel(name, x)(grad_y, x, *args)


DIFFERENTIABLE_ONCE = (
    "bise_kernels' masked layers and channel gate are differentiable once: their straight-through gradient has no "
    "gradient of its own (a backward through the result of a backward with create_graph=True is not supported)")
"""The error of a second backward (the C++ node's too: csrc/masked_autograd.cpp)."""


class _DifferentiableOnce(torch.autograd.Function):
    """``compute(*inputs)``, a layer's backward run under create_graph=True, without a graph: its
    gradients raise :data:`DIFFERENTIABLE_ONCE` when differentiated (each depends on ``inputs``: grad_y
    and the saved tensors). Differentiating the kernels instead gave a different wrong answer per
    backend. Normal backwards (grad mode off) never come here. The kernels get ``inputs`` as forward
    receives them: under a torch.func transform, unwrapped (a Triton kernel cannot read a wrapper)."""

    @staticmethod
    def forward(compute, *inputs):
        return compute(*inputs)

    @staticmethod
    def setup_context(ctx, inputs, output):  # a separate setup_context: what torch.func transforms need
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(DIFFERENTIABLE_ONCE)


def _run_backward(compute: Callable, *inputs: Tensor) -> tuple:
    """``compute(*inputs)``, through :class:`_DifferentiableOnce` under create_graph=True."""
    return _DifferentiableOnce.apply(compute, *inputs) if torch.is_grad_enabled() else compute(*inputs)


def _layer_backward(ctx, backward_op, grad_y: Tensor, layout: Callable, *geometry) -> tuple:
    """(grad_x, grad_weight, grad_bias, grad_scores) of a masked layer, None where not needed;
    ``layout(grad_y, x)``: grad_y as the backward kernel takes it.

    Saved: x, weight, scores, then the selection ``(thr, cut)`` or the packed ``keep`` mask, read
    once (torch.utils.checkpoint's non-reentrant mode unpacks each saved tensor only once)."""
    x, weight, scores, *selection = ctx.saved_tensors
    grad_y = layout(grad_y, x)
    nx, nw, nb, ns = ctx.needs_input_grad[:4]
    needs = [nx, nw, nb and ctx.has_bias, ns]
    with _backward_backend(ctx):
        grads = _run_backward(lambda *saved: backward_op(*saved, *geometry, ctx.estimator, ctx.temperature, needs),
                              grad_y, x, weight, scores, *selection)
    return tuple(_or_none(g, n) for g, n in zip(grads, needs))


def _save_layer(ctx, saved, bias, estimator, temperature) -> None:
    ctx.save_for_backward(*saved)
    ctx.estimator, ctx.temperature = estimator, temperature
    ctx.has_bias = bias is not None
    _forward_backend(ctx)


# ----------------------------------------------------------------------------- masked linear


def _masked_linear(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], scores: Tensor, thr: Tensor, cut: Tensor,
    estimator: str, temperature: float,
) -> Tensor:
    return _forward_kernel("masked_linear_forward", x, estimator, temperature)(x, weight, bias, scores, thr, cut
                                                                               ).contiguous()


_masked_linear_op = torch.library.custom_op(f"{LIB}::masked_linear", _masked_linear, mutates_args=())


@_masked_linear_op.register_fake
def _(x, weight, bias, scores, thr, cut, estimator, temperature):
    return x.new_empty(x.shape[:-1] + (weight.shape[0],))


@torch.library.custom_op(f"{LIB}::masked_linear_backward", mutates_args=())
def masked_linear_backward(
    grad_y: Tensor, x: Tensor, weight: Tensor, scores: Tensor, thr: Tensor, cut: Tensor,
    estimator: str, temperature: float, needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    grads = _kernel("masked_linear_backward", x)(grad_y, x, weight, scores, thr, cut, estimator, temperature, needs)
    return _grads_like(grads, (x, weight, _per_unit(weight), scores), x)


@masked_linear_backward.register_fake
def _(grad_y, x, weight, scores, thr, cut, estimator, temperature, needs):
    return _empty_grads((x, weight, _per_unit(weight), scores), needs, x)


def _linear_setup(ctx, inputs, output):
    x, weight, bias, scores, thr, cut, estimator, temperature = inputs
    _save_layer(ctx, (x, weight, scores, thr, cut), bias, estimator, temperature)


def _contiguous(grad_y: Tensor, x: Tensor) -> Tensor:
    return grad_y.contiguous()


def _linear_backward(backward_op):
    return lambda ctx, grad_y: (*_layer_backward(ctx, backward_op, grad_y, _contiguous), None, None, None, None)


_masked_linear_op.register_autograd(_linear_backward(masked_linear_backward), setup_context=_linear_setup)
masked_linear = _layer_op("masked_linear", _masked_linear_op, _masked_linear, _linear_setup,
                          _linear_backward(_backward_kernel("masked_linear_backward")))


# ----------------------------------------------------------------------------- masked linear, packed mask


def _masked_linear_keep(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], scores: Tensor, keep: Tensor, estimator: str,
    temperature: float,
) -> Tensor:
    """masked_linear with the selection packed once into ``keep`` (bool, the scores' shape), which the
    forward and backward read instead of the scores; ``scores`` only receives its gradient."""
    check_keep_op_scores(scores, weight, keep)
    return _forward_kernel("masked_linear_keep_forward", x, estimator, temperature)(x, weight, bias, keep).contiguous()


_masked_linear_keep_op = torch.library.custom_op(f"{LIB}::masked_linear_keep", _masked_linear_keep, mutates_args=())


@_masked_linear_keep_op.register_fake
def _(x, weight, bias, scores, keep, estimator, temperature):
    return x.new_empty(x.shape[:-1] + (weight.shape[0],))


@torch.library.custom_op(f"{LIB}::masked_linear_keep_backward", mutates_args=())
def masked_linear_keep_backward(
    grad_y: Tensor, x: Tensor, weight: Tensor, scores: Tensor, keep: Tensor, estimator: str, temperature: float,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    grads = _kernel("masked_linear_keep_backward", x)(grad_y, x, weight, scores, keep, estimator, temperature, needs)
    return _grads_like(grads, (x, weight, _per_unit(weight), scores), x)


@masked_linear_keep_backward.register_fake
def _(grad_y, x, weight, scores, keep, estimator, temperature, needs):
    return _empty_grads((x, weight, _per_unit(weight), scores), needs, x)


def _linear_keep_setup(ctx, inputs, output):
    x, weight, bias, scores, keep, estimator, temperature = inputs
    _save_layer(ctx, (x, weight, scores, keep), bias, estimator, temperature)


def _linear_keep_backward(backward_op):
    return lambda ctx, grad_y: (*_layer_backward(ctx, backward_op, grad_y, _contiguous), None, None, None)


_masked_linear_keep_op.register_autograd(_linear_keep_backward(masked_linear_keep_backward),
                                         setup_context=_linear_keep_setup)
masked_linear_keep = _layer_op("masked_linear_keep", _masked_linear_keep_op, _masked_linear_keep,
                               _linear_keep_setup,
                               _linear_keep_backward(_backward_kernel("masked_linear_keep_backward")))


# ----------------------------------------------------------------------------- masked conv2d


def _masked_conv2d(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], scores: Tensor, thr: Tensor, cut: Tensor,
    stride: list[int], padding: list[int], dilation: list[int], groups: int, estimator: str, temperature: float,
) -> Tensor:
    kernel = _forward_kernel("masked_conv2d_forward", x, estimator, temperature)
    return _conv_output(kernel(x, weight, bias, scores, thr, cut, stride, padding, dilation, groups), x, weight)


_masked_conv2d_op = torch.library.custom_op(f"{LIB}::masked_conv2d", _masked_conv2d, mutates_args=())


@_masked_conv2d_op.register_fake
def _(x, weight, bias, scores, thr, cut, stride, padding, dilation, groups, estimator, temperature):
    return _empty_conv_output(x, weight, stride, padding, dilation)


@torch.library.custom_op(f"{LIB}::masked_conv2d_backward", mutates_args=())
def masked_conv2d_backward(
    grad_y: Tensor, x: Tensor, weight: Tensor, scores: Tensor, thr: Tensor, cut: Tensor,
    stride: list[int], padding: list[int], dilation: list[int], groups: int,
    estimator: str, temperature: float, needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    grads = _kernel("masked_conv2d_backward", x)(
        grad_y, x, weight, scores, thr, cut, stride, padding, dilation, groups, estimator, temperature, needs
    )
    return _grads_like(grads, (x, weight, _per_unit(weight), scores), x)


@masked_conv2d_backward.register_fake
def _(grad_y, x, weight, scores, thr, cut, stride, padding, dilation, groups, estimator, temperature, needs):
    return _empty_grads((x, weight, _per_unit(weight), scores), needs, x)


def _conv_setup(ctx, inputs, output):
    x, weight, bias, scores, thr, cut, stride, padding, dilation, groups, estimator, temperature = inputs
    _save_layer(ctx, (x, weight, scores, thr, cut), bias, estimator, temperature)
    ctx.conv = (stride, padding, dilation, groups)


def _conv_keep_setup(ctx, inputs, output):
    x, weight, bias, scores, keep, stride, padding, dilation, groups, estimator, temperature = inputs
    _save_layer(ctx, (x, weight, scores, keep), bias, estimator, temperature)
    ctx.conv = (stride, padding, dilation, groups)


def _conv_layout(grad_y: Tensor, x: Tensor) -> Tensor:
    """grad_y channels_last when x is (so cuDNN's backward needs no layout conversion), else contiguous."""
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return grad_y.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _conv_backward(backward_op, n_other_inputs: int = 8):
    """The gradients of a masked conv2d's inputs: x, weight, bias, scores, then None for the
    ``n_other_inputs`` others (selection or keep mask, geometry, estimator)."""
    def backward(ctx, grad_y):
        return (*_layer_backward(ctx, backward_op, grad_y, _conv_layout, *ctx.conv), *([None] * n_other_inputs))

    return backward


_masked_conv2d_op.register_autograd(_conv_backward(masked_conv2d_backward), setup_context=_conv_setup)
masked_conv2d = _layer_op("masked_conv2d", _masked_conv2d_op, _masked_conv2d, _conv_setup,
                          _conv_backward(_backward_kernel("masked_conv2d_backward")))


# ----------------------------------------------------------------------------- masked conv2d, packed mask


def _masked_conv2d_keep(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], scores: Tensor, keep: Tensor,
    stride: list[int], padding: list[int], dilation: list[int], groups: int, estimator: str, temperature: float,
) -> Tensor:
    """masked_conv2d with the selection packed once into ``keep`` (as :func:`_masked_linear_keep`)."""
    check_keep_op_scores(scores, weight, keep)
    kernel = _forward_kernel("masked_conv2d_keep_forward", x, estimator, temperature)
    return _conv_output(kernel(x, weight, bias, keep, stride, padding, dilation, groups), x, weight)


_masked_conv2d_keep_op = torch.library.custom_op(f"{LIB}::masked_conv2d_keep", _masked_conv2d_keep, mutates_args=())


@_masked_conv2d_keep_op.register_fake
def _(x, weight, bias, scores, keep, stride, padding, dilation, groups, estimator, temperature):
    return _empty_conv_output(x, weight, stride, padding, dilation)


@torch.library.custom_op(f"{LIB}::masked_conv2d_keep_backward", mutates_args=())
def masked_conv2d_keep_backward(
    grad_y: Tensor, x: Tensor, weight: Tensor, scores: Tensor, keep: Tensor,
    stride: list[int], padding: list[int], dilation: list[int], groups: int,
    estimator: str, temperature: float, needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    grads = _kernel("masked_conv2d_keep_backward", x)(
        grad_y, x, weight, scores, keep, stride, padding, dilation, groups, estimator, temperature, needs
    )
    return _grads_like(grads, (x, weight, _per_unit(weight), scores), x)


@masked_conv2d_keep_backward.register_fake
def _(grad_y, x, weight, scores, keep, stride, padding, dilation, groups, estimator, temperature, needs):
    return _empty_grads((x, weight, _per_unit(weight), scores), needs, x)


_masked_conv2d_keep_op.register_autograd(_conv_backward(masked_conv2d_keep_backward, 7),
                                         setup_context=_conv_keep_setup)
masked_conv2d_keep = _layer_op("masked_conv2d_keep", _masked_conv2d_keep_op, _masked_conv2d_keep,
                               _conv_keep_setup, _conv_backward(_backward_kernel("masked_conv2d_keep_backward"), 7))


# ----------------------------------------------------------------------------- channel gate


def _channel_gate(x: Tensor, scores: Tensor, thr: Tensor, cut: Tensor, dim: int, estimator: str,
                  temperature: float) -> Tensor:
    return _like(_forward_kernel("channel_gate_forward", x, estimator, temperature)(x, scores, thr, cut, dim), x)


_channel_gate_op = torch.library.custom_op(f"{LIB}::channel_gate", _channel_gate, mutates_args=())


@_channel_gate_op.register_fake
def _(x, scores, thr, cut, dim, estimator, temperature):
    return torch.empty_like(x)


@torch.library.custom_op(f"{LIB}::channel_gate_backward", mutates_args=())
def channel_gate_backward(
    grad_y: Tensor, x: Tensor, scores: Tensor, thr: Tensor, cut: Tensor, dim: int, estimator: str,
    temperature: float, needs: list[bool],
) -> tuple[Tensor, Tensor]:
    grads = _kernel("channel_gate_backward", x)(grad_y, x, scores, thr, cut, dim, estimator, temperature, needs)
    return _grads_like(grads, (x, scores), x)


@channel_gate_backward.register_fake
def _(grad_y, x, scores, thr, cut, dim, estimator, temperature, needs):
    return _empty_grads((x, scores), needs, x)


def _gate_setup(ctx, inputs, output):
    x, scores, thr, cut, dim, estimator, temperature = inputs
    ctx.save_for_backward(x, scores, thr, cut)
    ctx.dim, ctx.estimator, ctx.temperature = dim, estimator, temperature
    _forward_backend(ctx)


def _gate_backward(backward_op):
    def backward(ctx, grad_y):
        x, scores, thr, cut = ctx.saved_tensors
        needs = list(ctx.needs_input_grad[:2])
        with _backward_backend(ctx):
            gx, gs = _run_backward(lambda *saved: backward_op(*saved, ctx.dim, ctx.estimator, ctx.temperature, needs),
                                   grad_y, x, scores, thr, cut)
        return _or_none(gx, needs[0]), _or_none(gs, needs[1]), None, None, None, None, None

    return backward


_channel_gate_op.register_autograd(_gate_backward(channel_gate_backward), setup_context=_gate_setup)
channel_gate = _layer_op("channel_gate", _channel_gate_op, _channel_gate, _gate_setup,
                         _gate_backward(_backward_kernel("channel_gate_backward")))

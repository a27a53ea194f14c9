"""Every public op (torch.ops.bise_kernels.*) passes torch.library.opcheck on every backend available
here (schema, fake impl, autograd registration, AOT dispatch with dynamic shapes), and a masked
model runs under torch.compile(fullgraph=True) and torch.export with the results of eager mode."""

import pytest
import torch
from torch import nn

import bise_kernels as bk
from bise_kernels import backends
from bise_kernels.backends.reference import KEEP_ALL_TIES

OPS = torch.ops.bise_kernels


def _t(*shape, seed, dtype=torch.float32, grad=False):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return t.requires_grad_(grad)


def _tie_selection(scores):
    """``(thr, cut)`` cutting through a tie group at 0.0 (the tie rule is part of what is checked)."""
    with torch.no_grad():
        scores.view(-1)[:3] = 0.0
    return torch.tensor(0.0), torch.tensor(2, dtype=torch.int64)  # of the three ties, keep the first two


def _cases():
    """(op, args) per public op; forward ops get inputs that require grad (autograd is checked)."""
    scores = _t(6, 5, seed=0)
    scores2 = _t(7, seed=1)
    thr, cut = _tie_selection(scores)
    hint = torch.tensor(0.1)
    x, w, b = _t(3, 5, seed=2, grad=True), _t(6, 5, seed=3, grad=True), _t(6, seed=4, grad=True)
    s = scores.clone().requires_grad_()
    xc, wc, bc = _t(2, 4, 7, 6, seed=5, grad=True), _t(6, 2, 3, 2, seed=6, grad=True), _t(6, seed=7, grad=True)
    sc = _t(6, seed=8, grad=True)
    conv = ([2, 1], [1, 2], [1, 2], 2)
    xg, sg = _t(2, 6, 5, seed=9, grad=True), _t(6, seed=10, grad=True)
    all_ties = torch.tensor(KEEP_ALL_TIES)
    gy_c = _t(*bk._checks.conv2d_output_shape(xc.shape, wc.shape, *conv[:3]), seed=11)
    return {
        "topk_select": (OPS.topk_select, ([scores, scores2], 20, None)),
        "topk_select_hinted": (OPS.topk_select, ([scores], 12, hint)),
        "batched_topk_select": (OPS.batched_topk_select, ([scores, scores2], [12, 3], torch.tensor([0.1, -0.2]))),
        "keep_mask": (OPS.keep_mask, (scores2, thr, torch.tensor(33), 30)),
        "keep_mask_checked": (OPS.keep_mask, (scores2, thr, torch.tensor(KEEP_ALL_TIES), 0, True)),
        "topk_keep_mask": (OPS.topk_keep_mask, ([scores, scores2], 20, None)),
        "masked_linear": (OPS.masked_linear, (x, w, b, s, thr, cut, "ste", 1.0)),
        "masked_linear_structured": (OPS.masked_linear, (x, w, None, sc, thr, all_ties, "sigmoid", 0.7)),
        "masked_linear_backward": (OPS.masked_linear_backward, (
            _t(3, 6, seed=12), x.detach(), w.detach(), scores, thr, cut, "sigmoid", 0.5, [True, True, True, True])),
        "masked_linear_keep": (OPS.masked_linear_keep, (x, w, b, s, bk.backends.reference.keep_mask(scores, thr, cut),
                                                        "sigmoid", 0.7)),
        "masked_linear_keep_structured": (OPS.masked_linear_keep, (x, w, None, sc, sc.detach() > 0, "ste", 1.0)),
        "masked_linear_keep_backward": (OPS.masked_linear_keep_backward, (
            _t(3, 6, seed=12), x.detach(), w.detach(), scores, scores > 0, "sigmoid", 0.5, [True, True, True, True])),
        "masked_conv2d": (OPS.masked_conv2d, (xc, wc, bc, sc, thr, all_ties, *conv, "sigmoid", 0.5)),
        "masked_conv2d_backward": (OPS.masked_conv2d_backward, (
            gy_c, xc.detach(), wc.detach(), sc.detach(), thr, cut, *conv, "ste", 1.0, [True, False, True, True])),
        "masked_conv2d_keep": (OPS.masked_conv2d_keep, (xc, wc, bc, sc, sc.detach() > 0, *conv, "sigmoid", 0.5)),
        "masked_conv2d_keep_weight": (OPS.masked_conv2d_keep, (xc, wc, None, wc.detach().clone().requires_grad_(),
                                                               wc.detach() > 0.2, *conv, "ste", 1.0)),
        "masked_conv2d_keep_backward": (OPS.masked_conv2d_keep_backward, (
            gy_c, xc.detach(), wc.detach(), sc.detach(), sc.detach() > 0, *conv, "ste", 1.0,
            [True, True, False, True])),
        "channel_gate": (OPS.channel_gate, (xg, sg, thr, all_ties, 1, "sigmoid", 1.0)),
        "channel_gate_backward": (OPS.channel_gate_backward, (
            _t(2, 6, 5, seed=13), xg.detach(), sg.detach(), thr, cut, 1, "sigmoid", 1.0, [True, True])),
    }


CASES = list(_cases())


def test_every_public_op_has_a_case():
    ops = {name for name in dir(OPS) if not name.startswith("_") and isinstance(getattr(OPS, name),
                                                                                 torch._ops.OpOverloadPacket)}
    assert ops == {op._qualified_op_name.split("::")[1] for op, _ in _cases().values()}


def _kernel_name(op) -> str:
    """The registry's kernel behind an op (forward ops run ``<op>_forward``)."""
    name = op._qualified_op_name.split("::")[1]
    layer_ops = ("masked_linear", "masked_linear_keep", "masked_conv2d", "masked_conv2d_keep", "channel_gate")
    return name + "_forward" if name in layer_ops else name


@pytest.mark.parametrize("case", CASES)
def test_opcheck(backend, case):
    op, args = _cases()[case]
    kernel = _kernel_name(op)
    if not backends.BACKENDS[backend].supports(kernel):
        pytest.skip(f"backend {backend!r} has no {kernel} kernel")
    assert backends.resolve(kernel, "cpu")[0] == backend  # the backend under test runs the op
    torch.library.opcheck(op, args)


def _relayout(a):
    """``a`` with the same values in another layout: channels_last for a 4-d tensor, column-major for
    the last two dims of a 2-d or 3-d one (lists element-wise); the rest as it is."""
    if isinstance(a, list):
        return [_relayout(t) for t in a]
    if not isinstance(a, torch.Tensor) or a.dim() < 2:
        return a
    t = a.detach()
    t = t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t.mT.contiguous().mT
    return t.requires_grad_(a.requires_grad)


@pytest.mark.parametrize("case", CASES)
def test_fake_layouts_match_on_non_contiguous_inputs(backend, case):
    """The fake impls' output strides (torch.compile's generated code asserts them) hold for channels_last
    and column-major inputs: the masks and gradients of the cpp backend were contiguous, the conv outputs
    of every backend channels_last where the fake said contiguous (an Inductor-compiled channels_last
    masked conv failed on its first call)."""
    op, args = _cases()[case]
    if not backends.BACKENDS[backend].supports(_kernel_name(op)):
        pytest.skip(f"backend {backend!r} has no {_kernel_name(op)} kernel")
    torch.library.opcheck(op, tuple(_relayout(a) for a in args), test_utils=("test_faketensor",))


@torch._inductor.config.patch(force_disable_caches=True)  # a cached graph would keep old fake layouts
def test_inductor_compiles_a_channels_last_masked_conv_net():
    """The Inductor-compiled channels_last masked conv net (forward and backward) equals eager mode."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Conv2d(4, 2, 1))  # 1x1 maps: strides of length-1 dims
    bk.mask_model(net, density=0.5, freeze_weights=False)
    net = net.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 6, 6).to(memory_format=torch.channels_last)
    expected = net(x)
    expected.square().sum().backward()
    want = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()
    torch._dynamo.reset()
    y = torch.compile(net, fullgraph=True)(x)
    torch.testing.assert_close(y, expected)
    y.square().sum().backward()
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.grad, want[name], msg=name)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gate = bk.ChannelGate(4, temperature=0.5)
        self.fc = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):
        return self.fc(self.gate(torch.relu(self.conv(x))).flatten(1))


def _masked_net():
    torch.manual_seed(0)
    net = _Net()
    bk.mask_model(net, density=0.5, scope="global", freeze_weights=False)
    with torch.no_grad():
        net.gate.scores.copy_(torch.tensor([0.3, -0.1, 0.0, 0.2]))
    return net


def test_compile_fullgraph_of_a_masked_model_matches_eager(backend):
    net, x = _masked_net(), torch.randn(2, 3, 5, 5)
    expected = net(x)
    expected.sum().backward()
    want = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    y.sum().backward()
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.grad, want[name], rtol=0, atol=0, msg=name)


def test_export_of_a_masked_model_matches_eager(backend):
    net, x = _masked_net(), torch.randn(2, 3, 5, 5)
    program = torch.export.export(net, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert {"bise_kernels.topk_select.default", "bise_kernels.masked_conv2d.default",
            "bise_kernels.masked_linear.default", "bise_kernels.channel_gate.default"} <= targets
    x2 = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(program.module()(x2), net(x2), rtol=0, atol=0)


# ----------------------------------------------------------------------------- the eager path


def _layer_calls():
    """(name, callable of bise_kernels._ops, arguments) of each layer op, from the opcheck cases."""
    cases = _cases()
    for name in ("masked_linear", "masked_linear_structured", "masked_linear_keep", "masked_conv2d",
                 "masked_conv2d_keep", "channel_gate"):
        op, args = cases[name]
        yield name, getattr(bk._ops, op._qualified_op_name.split("::")[1]), args


@pytest.mark.parametrize("name", [name for name, _, _ in _layer_calls()])
def test_eager_path_equals_the_custom_op(backend, name):
    """In plain eager mode the layer ops skip the custom-op dispatch: same output and gradients, to the bit."""
    call, args = next((c, a) for n, c, a in _layer_calls() if n == name)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    results = []
    for fn in (call, call.op):
        y = fn(*args)
        results.append((y, *torch.autograd.grad(y.square().sum(), leaves)))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def _dispatched_ops(fn) -> set[str]:
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = set()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.add(str(func))
            return func(*args, **(kwargs or {}))

    with Record():
        fn()
    return seen


def test_eager_path_is_plain_eager_only():
    """Under a dispatch mode (as in tracing) the custom op runs; in plain eager it does not."""
    _, call, args = next(_layer_calls())
    assert "bise_kernels.masked_linear.default" in _dispatched_ops(lambda: call(*args))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        call(*args).sum().backward()
    names = {e.name for e in prof.events()}
    assert not {"bise_kernels::masked_linear", "bise_kernels::masked_linear_backward"} & names, names


def test_a_torch_function_mode_sees_the_custom_ops():
    """Under a torch-function mode (as a user's tracer or counter) the public calls run the custom ops,
    which the mode sees; the plain eager path would hide them."""
    seen = []

    class Record(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    _, call, args = next(_layer_calls())
    with Record():
        call(*args)
        bk.topk_mask(_t(40, seed=20), 0.3)
    assert "bise_kernels.masked_linear.default" in seen
    assert "bise_kernels.topk_keep_mask.default" in seen


class Tagged(torch.Tensor):
    """A wrapper subclass with its own __torch_function__ (as DTensor or a tracer's); ``seen``: what it saw."""
    seen: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(str(func))
        return super().__torch_function__(func, types, args, kwargs or {})


def test_a_tensor_subclass_sees_the_custom_ops(backend):
    """A tensor subclass (a wrapper with its own __torch_function__, as DTensor or a tracer's) gets the
    custom ops, not the plain eager path's kernels, and its type survives."""
    seen = Tagged.seen = []
    x, w, s = _t(3, 5, seed=21), _t(4, 5, seed=22), _t(4, 5, seed=23, grad=True)
    y = bk.masked_linear(x.as_subclass(Tagged), w, None, s, density=0.5)
    assert type(y) is Tagged and "bise_kernels.masked_linear.default" in seen
    torch.testing.assert_close(y.as_subclass(torch.Tensor), bk.masked_linear(x, w, None, s, density=0.5),
                               rtol=0, atol=0)


@pytest.mark.parametrize("call, error, message", [
    (lambda s: OPS.topk_select([s], 31, None), ValueError, r"k must be in \[1, 30\]"),
    (lambda s: OPS.topk_select([s], 0, None), ValueError, r"k must be in \[1, 30\]"),
    (lambda s: OPS.topk_keep_mask([s], 31, None), ValueError, r"k must be in \[1, 30\]"),
    (lambda s: OPS.topk_select([s.long()], 3, None), TypeError, r"scores\[0\] must be"),
    (lambda s: OPS.batched_topk_select([s, s], [1, 0], None), ValueError, r"ks\[1\] must be in \[1, 30\]"),
    (lambda s: OPS.topk_select([], 1, None), ValueError, "scores is an empty list"),
])
def test_raw_select_ops_check_their_arguments_on_every_backend(backend, call, error, message):
    """The raw ops (torch.ops.bise_kernels.*) without the public API's checks: cpp checked in C++, the
    Python kernels did not (Triton gave (nan, INT64_MIN) for k past the scores, the reference sorted int64)."""
    with pytest.raises(error, match=message):
        call(torch.arange(30.0).reshape(5, 6))




def test_compile_fullgraph_before_any_eager_call(backend, monkeypatch):
    """A fullgraph compile as the first call of a process (the native-op cache empty): dynamo must not
    trace the registry lookup (_ops._native_layer_op returns None while compiling)."""
    monkeypatch.setattr(bk._ops, "_NATIVE_LAYER_OPS", {})
    net, x = _masked_net(), torch.randn(2, 3, 5, 5)
    torch._dynamo.reset()
    y = torch.compile(net, backend="eager", fullgraph=True)(x)
    torch.testing.assert_close(y, net(x), rtol=0, atol=0)


@pytest.mark.parametrize("layouts", ["x_cl", "w_cl"])
def test_mixed_layout_conv_output_is_in_atens_layout(backend, layouts):
    """Only one of x and the weight channels_last: the output takes F.conv2d's layout, in the custom op
    (its fake impl says so too) as in ATen, and on the eager path (cpp: the C++ autograd node, whose output
    was contiguous for a channels_last weight), with and without a gradient."""
    cl = torch.channels_last
    x, w = _t(2, 4, 7, 6, seed=30), _t(6, 4, 3, 3, seed=31)
    x, w = (x.contiguous(memory_format=cl), w) if layouts == "x_cl" else (x, w.contiguous(memory_format=cl))
    s, thr, cut = _t(6, seed=32), torch.tensor(0.0), torch.tensor(KEEP_ALL_TIES)
    args = (x, w, None, s, thr, cut, [1, 1], [0, 0], [1, 1], 1, "ste", 1.0)
    want = torch.nn.functional.conv2d(x, w).stride()
    assert OPS.masked_conv2d(*args).stride() == want
    assert bk._ops.masked_conv2d(*args).stride() == want
    trained = (x, w.detach().requires_grad_(), *args[2:])
    assert bk._ops.masked_conv2d(*trained).stride() == want
    torch.library.opcheck(OPS.masked_conv2d, args, test_utils=("test_faketensor",))


@pytest.mark.parametrize("shape", [(6, 5), (2, 2)])
def test_keep_mask_of_column_major_scores_has_the_fake_layout(backend, shape):
    """keep_mask of 2-d non-contiguous scores (the cases' scores are 1-d): the mask has the scores'
    layout, as the fake impl says (cpp writes contiguous masks; _ops._like copies)."""
    scores = _t(*shape, seed=33).mT.contiguous().mT
    args = (scores, torch.tensor(0.0), torch.tensor(KEEP_ALL_TIES), 0)
    assert OPS.keep_mask(*args).stride() == scores.stride()
    torch.library.opcheck(OPS.keep_mask, args, test_utils=("test_faketensor",))


def test_a_bad_estimator_set_after_construction_fails_an_eval_forward(backend):
    """The Python kernels read the estimator in their backward only: the forward checks it (as cpp's)."""
    layer = bk.MaskedLinear(5, 4, density=0.5)
    layer.estimator = "bogus"
    with torch.no_grad(), pytest.raises(ValueError, match="estimator"):
        layer(torch.randn(2, 5))


def test_a_tensor_subclass_inside_a_list_sees_the_custom_op(backend):
    """_plain_eager looks inside list arguments (topk_select's scores)."""
    seen = Tagged.seen = []
    scores = _t(30, seed=34)
    bk._ops.topk_select([_t(4, seed=35), scores.as_subclass(Tagged)], 5, None)
    assert "bise_kernels.topk_select.default" in seen

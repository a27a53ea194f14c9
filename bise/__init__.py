"""BISE: unbiased subnetworks inside biased models, on top of bise_kernels.

    import bise
    data = bise.load_data("colored-digits")
    model = bise.train_vanilla(data, "simple-cnn")
    sub = bise.extract(model, data)            # a Subnetwork: .masks, .evaluate(), .export(), .finetune()
    bise.evaluate(model, data.test)            # METRICS: accuracy, aligned / conflicting / unbiased / worst group
    small = sub.export(data.train.inputs()[:64])

``bise.extract``, ``bise.evaluate``, ``bise.export`` and ``bise.finetune`` are functions; the
submodules of the same names are imported here first, so these names stay bound to the functions
(reach the modules with ``from bise.extract import ...`` or ``sys.modules``, never
``from bise import extract``). The losses are in ``bise.losses``.
"""

from __future__ import annotations

from bise_kernels import __version__  # one version for the distribution (pyproject.toml reads it there)

from . import _extra

try:
    from .data import load as load_data
    from .evaluate import evaluate
    from .export import export_subnetwork as export
    from .export import load_exported, save_exported
    from .extract import ExtractConfig, extract
    from .finetune import finetune
    from .gates import insert_gates
    from .health import check_vanilla
    from .models import build_model
    from .subnetwork import Subnetwork
    from .train import train_vanilla
except ImportError as exc:  # `pip install bise-kernels` without [bise]: one line naming the extra
    error = _extra.missing(exc)
    if error is None:
        raise
    _extra.exit_if_command(error)  # the bise command: one line and status 2, not a traceback
    raise error from None

__all__ = ["ExtractConfig", "Subnetwork", "build_model", "check_vanilla", "evaluate", "export", "extract", "finetune",
           "insert_gates", "load_data", "load_exported", "save_exported", "train_vanilla"]

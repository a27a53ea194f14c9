"""Argument checks shared by the bise Python API and the CLI: named errors before any work.

The natural types are accepted (Python or NumPy integers and floats, str or os.PathLike data
specs, an ExtractConfig or a dict of its fields); anything else raises a TypeError or ValueError
that names the argument and its value.
"""

from __future__ import annotations

import math
import numbers
import operator
import os
from typing import Optional

import torch
from torch import nn

from bise_kernels.nn.model import check_patterns


def as_int(name: str, value, low: int) -> int:
    """``value`` as a Python int >= ``low`` (NumPy integers accepted; bools and floats refused)."""
    if isinstance(value, (bool, float)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {low}, got {value!r}")
    value = operator.index(value)
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


MAX_SEED = 2 ** 63 - 1  # torch.manual_seed takes 64 bits; numpy, the data's generator, any size


def seed(value, name: str = "seed") -> int:
    """``value`` as a seed every generator of the workflow takes: a Python int in [0, 2**63 - 1]."""
    text = f"{name} must be an int >= 0 and <= 2**63 - 1, got {value!r}"
    if isinstance(value, (bool, float)) or not isinstance(value, numbers.Integral):
        raise TypeError(text)
    value = operator.index(value)
    if not 0 <= value <= MAX_SEED:
        raise ValueError(text)
    return value


def as_positive(name: str, value) -> float:
    """``value`` as a finite Python float > 0 (NumPy scalars accepted)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive number, got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return value


def patterns(name: str, value) -> Optional[tuple]:
    """A list or tuple of module-name patterns (fnmatch, over qualified names) or None, as a tuple.

    A str is refused, not taken as one pattern: it is a sequence of one-letter patterns. Patterns that
    match no module are refused where the model is known (:func:`bise.gates.insert_gates`)."""
    check_patterns(value, name)  # the kernels' mask_model takes include / exclude under the same rule
    return None if value is None else tuple(value)


def device(value) -> torch.device:
    """A usable torch device: ``cpu``, or ``cuda`` / ``cuda:N`` on a machine whose CUDA has device N."""
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {value!r}") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {value!r} (bise trains on cpu or cuda only)")
    if not torch.cuda.is_available():
        raise ValueError(f"device {value!r}: CUDA is not available on this machine (torch {torch.__version__})")
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise ValueError(f"device {value!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return dev


def extract_config(config):
    """An ExtractConfig from None, an ExtractConfig or a dict of its fields (unknown keys refused), validated.

    Integer and float fields given as NumPy scalars become Python numbers; ``device`` is checked."""
    import dataclasses

    from .extract import ExtractConfig

    if config is None:
        config = ExtractConfig()
    elif isinstance(config, dict):
        fields = {f.name for f in dataclasses.fields(ExtractConfig)}
        unknown = sorted(set(config) - fields)
        if unknown:
            raise ValueError(f"config has unknown keys {unknown}; ExtractConfig fields: {sorted(fields)}")
        config = ExtractConfig(**config)
    elif not isinstance(config, ExtractConfig):
        raise TypeError(f"config must be an ExtractConfig, a dict of its fields or None, got {type(config).__name__}")
    else:
        config = dataclasses.replace(config)
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        if isinstance(v, numbers.Integral) and not isinstance(v, (int, bool)):
            setattr(config, f.name, operator.index(v))
        elif isinstance(v, numbers.Real) and not isinstance(v, (int, float, bool)):
            setattr(config, f.name, float(v))
    config.device = str(device(config.device))  # a torch.device is kept as its name (the config stays JSON)
    return config.validate()


def module(model) -> None:
    """Refuse a ``model`` that is not an nn.Module (a Subnetwork is named: its module is ``.model``)."""
    if not isinstance(model, nn.Module):
        hint = ("; its model is sub.model (or call sub.evaluate / sub.export / sub.finetune)"
                if isinstance(getattr(model, "model", None), nn.Module) else "")
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}{hint}")


def model_fits(model: nn.Module, data) -> None:
    """Refuse a model whose classes or input shape differ from ``data``'s (its bise_spec, else one forward)."""
    module(model)
    dtypes = sorted({str(p.dtype) for p in model.parameters() if p.is_floating_point() and p.dtype != torch.float32})
    if dtypes:
        raise ValueError(f"the model's parameters are {', '.join(dtypes)}; bise feeds it float32 inputs (and "
                         "config amp=True for bf16 autocast): convert it with model.float()")
    spec = getattr(model, "bise_spec", None)
    if isinstance(spec, dict) and "input_shape" in spec:
        if tuple(spec["input_shape"]) != tuple(data.input_shape):
            raise ValueError(f"the model was built for {tuple(spec['input_shape'])} inputs, the data have "
                             f"{tuple(data.input_shape)}; build it with bise.build_model(..., input_shape=data.input_shape)")
        classes: Optional[int] = spec.get("num_classes")
    else:
        param = next(model.parameters(), None)
        x = data.train.inputs(torch.arange(min(2, len(data.train))))
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model(x.to(param.device if param is not None else "cpu"))
        except RuntimeError as exc:
            raise ValueError(f"the model does not accept the data's {tuple(data.input_shape)} inputs: "
                             f"{str(exc).splitlines()[0]}") from exc
        finally:
            model.train(was_training)
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"the model must return one tensor of class logits (N, {data.num_classes}), got "
                             f"{type(out).__name__}")
        classes = out.shape[-1] if out.dim() == 2 else None
    if classes != data.num_classes:
        raise ValueError(f"the model outputs {classes} class logits, the data have num_classes={data.num_classes}")


def dataset(data) -> None:
    """Refuse what is not a dataset (a spec string or path given where bise.load_data(spec) belongs)."""
    if isinstance(data, (str, os.PathLike)):
        raise TypeError(f"data must be a dataset, got the spec {str(data)!r}: load it with bise.load_data({str(data)!r})")
    missing = [a for a in ("train", "test", "num_classes", "num_bias_classes") if not hasattr(data, a)]
    if missing:
        raise TypeError(f"data must be a dataset from bise.load_data (train / val / test splits, num_classes, ...), "
                        f"got {type(data).__name__} (no {missing[0]!r})")


def same_bias_classes(data, label_free: bool, flag: str = "label_free=True") -> None:
    """BISE's |B| = |Y| assumption (a sample is aligned iff y == b) unless bias labels are pseudo labels;
    ``flag`` names the switch to the label-free variant in the message (the CLI's is --label-free)."""
    if label_free:
        return
    if getattr(data.train, "b", None) is None:
        raise ValueError(f"bias labels are missing from the train split; BISE needs the training set's bias "
                         f"labels (or use {flag} for pseudo labels from an identification model)")
    if data.num_bias_classes != data.num_classes:
        # bise.data infers both counts as max label + 1 over all splits: a top bias class with no sample anywhere
        kb, k = data.num_bias_classes, data.num_classes
        absent = f"class {kb} merely has" if kb == k - 1 else f"classes {kb}..{k - 1} merely have"
        fewer = f" (if bias {absent} no sample, give num_bias_classes={k} in the data spec)" if kb < k else ""
        raise ValueError(f"BISE assumes as many bias classes as target classes (|B| = |Y|, a sample is aligned iff "
                         f"y == b); this dataset has num_classes={k}, num_bias_classes={kb}{fewer}. Relabel the "
                         f"bias, or use {flag}")


def two_bias_rho(data, weighting: str, rho=None) -> None:
    """The two-bias weighting needs a pair rho (``rho``, else the data's): user data with two bias labels
    get their training split's aligned fractions unless one is 0 or 1 (no conflicting sample of a bias)."""
    if weighting == "two-bias" and rho is None and getattr(data, "rho", None) is None:
        raise ValueError(f"weighting 'two-bias' needs rho=(rho_left, rho_right), and the training split's aligned "
                         f"fractions {data.info.get('rho_realised')} cannot serve (one is 0 or 1): give rho_l= and "
                         "rho_r= in the data spec")


__all__ = ["MAX_SEED", "as_int", "as_positive", "dataset", "device", "extract_config", "model_fits", "module",
           "patterns", "same_bias_classes", "seed", "two_bias_rho"]

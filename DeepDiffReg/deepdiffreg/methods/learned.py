"""What a learned method adds to ``Method``: weights from the registry (or a file), and the training protocol that
``deepdiffreg train --method M`` drives (train/loop.py). How a learned network is *run* (network grid, cascade,
symmetric, refinement, free inverse) is nn/wrappers.py.

A learned method is declared in its own file like any method, and additionally:

    @register_method
    class MyNet(Trainable, LearnedMethod):
        @dataclass
        class Options(LearnedOptions):            # --<prefix>-model, --<prefix>-weights, then its own
            ...
        @dataclass
        class TrainOptions:                       # `deepdiffreg train --method my-net` flags (--<name>), saved
            ...                                   # in the weights' config; checked like Options
        network_keys = ("channels",)              # config keys that fix the layers (kept from an --init file)
        loss_terms = ("loss", "sim", "reg")       # columns of train_log.csv

        @classmethod
        def default_config(cls) -> dict: ...                       # the network + loss config (JSON-able)
        @classmethod
        def build_network(cls, config) -> nn.Module: ...           # from the config saved in a weights file
        @classmethod
        def training_loss(cls, net, batch, config, step) -> dict:  # {"loss": scalar to minimise, other terms}
        @classmethod
        def validation_disp(cls, net, moving, fixed, config) -> Tensor   # (B, 3, *grid) voxels, for val Dice

        def estimate(self, pair, device, progress):
            net, config, model = self.load_network(device)         # registry / --<prefix>-weights FILE
            ...                                                    # run it with nn/wrappers.py

Optional hooks with defaults: ``init_config`` (the network config an --init file gives a new run), ``init_network``
(load an --init weights object; e.g. seed a deeper cascade),
``prepare_for_training`` (freeze parts), ``model_card`` (manifest fields). The training loop owns data, schedule,
checkpoints/resume, EMA, validation, CSV/PNG logs and publishing, for every method.

``batch`` (train/datasets.py): {"fixed", "moving": (1, 1, D, H, W) float in [0, 1] on the training grid,
"fixed_labels", "moving_labels": (1, 1, D, H, W) int64 when the data has them, ...}, already on the device.
``"same_contrast"`` (bool, default True): False for pairs whose two images were rendered with independent
intensity tables (train/datasets.py ``contrast`` pairs) — a loss that matches intensities must leave them alone.
``"kind"`` names the kind of pair (real-image, same-head, zero-labelmap, contrast, synth, ...).
``step``: a ``TrainStep`` (the step index, the run's seed, a torch generator seeded for the run, the device).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..contrast import SAME_CONTRAST_MIN_RHO, foreground_threshold, rank_correlation
from ..errors import BadInput, RegistrationError
from ..io.weights import find_model, load_weights, verify_entry
from ..losses import LocalNCC
from .base import Method, PairOnGrid, all_methods, contrasts_of, option


@dataclass
class LearnedOptions:
    """Options every learned method has; a learned method's ``Options`` inherits them."""
    model: str | None = option(None, help="model id from `deepdiffreg models list` (default: the newest model of "
                                          "this method)")
    weights: str | None = option(None, help="a weights file to use instead of an installed model (e.g. a training "
                                            "run's best.pt); its sha256 goes into report.json")


@dataclass
class CascadeOptions:
    """The option of a method whose network is a recursive cascade: how many more passes of its last stage
    inference may make (``nn/wrappers.Deeper``, each checked by ``further_pass_helps``). A method's ``Options``
    inherits it and may redeclare the default (None: the method's choice, stated in its help)."""
    extra_passes: int | None = option(None, min=0, max=8,
                                      help="run the last cascade stage up to this many more times at inference, "
                                           "each pass on the image the earlier ones warped and kept only if it "
                                           "helps (0: the cascade as trained)")


PASS_NCC_WINDOW = 9       # voxels of the network grid: the local NCC² a further pass must raise


def pair_rank_correlation(pair: PairOnGrid) -> float | None:
    """The pipeline's contrast statistic of ``pair`` (``PairOnGrid.contrast``: smoothed, on the working grid), None
    when the pipeline made no check or found too little foreground to make one."""
    return None if pair.contrast is None else pair.contrast.get("rank_correlation")


def further_pass_helps(fixed: torch.Tensor, moving: torch.Tensor, before: torch.Tensor, after: torch.Tensor,
                       rho: float | None = None) -> tuple[bool, dict]:
    """The "do no harm" check of an extra cascade pass (``nn/wrappers.Deeper``'s ``accept``): (B, 1, D, H, W)
    normalised images on one grid — the pair as the cascade was given it, and moving warped without (``before``)
    and with (``after``) the pass.

    Kept only if (1) the pair looks like one contrast (``rho`` ≥ ``SAME_CONTRAST_MIN_RHO``: the pipeline's
    contrast statistic of the pair, ``pair_rank_correlation``; when there is none, ``contrast.rank_correlation`` of
    ``fixed`` and ``moving``, unsmoothed; the registered images are no test: a one-contrast model deforms a T2 until its
    ranks follow the T1's — contrast-15-16: −0.40 given, +0.47 after two passes): a further pass of such a model on
    two contrasts deepens its error; and (2) the pass raises the squared local NCC over the fixed image's
    foreground, a similarity the model was not trained on and that a smooth bias does not move: on a follow-up
    scan of the same subject a further pass fits noise and bias, and NCC² falls (same-1, docs/r2net.md).
    Returns (keep, facts)."""
    mask = (fixed > float(foreground_threshold(fixed.detach().float().cpu().numpy().ravel()))).to(fixed.dtype)
    source = "the pipeline's contrast check"
    if rho is None:
        rho, source = rank_correlation(fixed, moving), "unsmoothed, on the network grid"
    ncc = LocalNCC(fixed, PASS_NCC_WINDOW, mask=mask)
    a, b = float(ncc(before)), float(ncc(after))
    one_contrast = rho is not None and rho >= SAME_CONTRAST_MIN_RHO
    return one_contrast and b > a, {"rank_correlation": None if rho is None else round(rho, 4),
                                    "rank_correlation_from": source,
                                    "ncc2_before": round(a, 5), "ncc2_after": round(b, 5)}


class LearnedMethod(Method):
    """A method whose network comes from a weights file: ``load_network`` finds it (``model``/``weights``
    options), checks its hash, builds the network from the file's config (``build_network``) and loads it."""

    def __init__(self, options: Any = None, **kw: Any):
        super().__init__(options, **kw)
        model, weights = getattr(self.opts, "model", None), getattr(self.opts, "weights", None)
        if model and weights:
            raise BadInput(f"give {self.flag('model')} or {self.flag('weights')}, not both")
        if weights and not Path(weights).is_file():
            raise BadInput(f"{self.flag('weights')}: no such weights file: {weights}")

    def model_entry(self) -> dict[str, Any]:
        """The registry entry (or file entry) the ``model``/``weights`` options select; MissingWeights if none."""
        o = self.opts
        return find_model(getattr(o, "model", None), method=self.name, file=getattr(o, "weights", None))

    def contrasts(self) -> str:
        """The selected model's statement ("contrasts" in its manifest entry), else the method's declaration (also
        when no entry is found: a run without weights has been refused at the input gate already, so that is a
        network supplied another way, e.g. a test's)."""
        try:
            entry = self.model_entry()
        except RegistrationError:
            entry = None
        return contrasts_of(type(self), entry)

    def check_ready(self) -> None:
        """The weights exist, lie inside their model folder and match their sha256 (no unpickling)."""
        verify_entry(self.model_entry())

    def load_network(self, device: torch.device) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
        """(network in eval mode on ``device``, its config, {"id", "version", "sha256"} for report.json)."""
        entry = self.model_entry()
        obj = load_weights(entry)
        made_for = (obj.get("meta") or {}).get("method") or obj["config"].get("method")
        if made_for not in (None, self.name):
            raise BadInput(f"{entry['path']} holds weights of method {made_for!r}, not {self.name!r}")
        config = dict(obj["config"])
        net = self.build_network(config)
        net.load_state_dict(obj["state_dict"])
        net.to(device).eval()
        return net, config, {"id": entry["id"], "version": entry.get("version"), "sha256": entry["sha256"]}

    @classmethod
    def build_network(cls, config: dict[str, Any]) -> nn.Module:
        raise NotImplementedError


@dataclass(frozen=True)
class TrainStep:
    """What the loop tells ``training_loss`` about the step: ``index`` (0-based, before the update), the run's
    ``seed``, a torch ``generator`` (seeded with seed + the first step of this process) and the ``device``."""
    index: int
    seed: int
    generator: torch.Generator
    device: torch.device


class Trainable:
    """The training protocol (see the module docstring). Mix in before ``LearnedMethod``."""

    @dataclass
    class TrainOptions:
        pass

    network_keys: ClassVar[tuple[str, ...]] = ()
    loss_terms: ClassVar[tuple[str, ...]] = ("loss",)

    @classmethod
    def default_config(cls) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def build_network(cls, config: dict[str, Any]) -> nn.Module:
        raise NotImplementedError

    @classmethod
    def training_loss(cls, net: nn.Module, batch: dict[str, Any], config: dict[str, Any], step: TrainStep
                      ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @classmethod
    def validation_disp(cls, net: nn.Module, moving: torch.Tensor, fixed: torch.Tensor, config: dict[str, Any]
                        ) -> torch.Tensor:
        raise NotImplementedError

    # -- hooks with defaults -----------------------------------------------------------------------------------
    @classmethod
    def init_config(cls, weights: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
        """The network config a new run takes from an ``--init`` weights object (config, meta; ``given``: the run's
        own options); its ``network_keys`` then win over the flags. Default: the file's config as it is. A method
        that can start from another method's weights translates that file's config here (e.g. its U-Net's
        channels)."""
        return dict(weights["config"])

    @classmethod
    def init_network(cls, net: nn.Module, weights: dict[str, Any]) -> None:
        """Load an ``--init`` weights object (config + state_dict) into a freshly built ``net``."""
        net.load_state_dict(weights["state_dict"])

    @classmethod
    def prepare_for_training(cls, net: nn.Module) -> None:
        """Called once before the first step (e.g. freeze the stages that are not trained). A method whose hook
        takes a second parameter gets the run's config too: ``prepare_for_training(net, config)``."""

    @classmethod
    def model_card(cls, config: dict[str, Any]) -> dict[str, Any]:
        """Manifest fields of published weights: "input_grid", "modality" (and "title" for the card)."""
        return {"title": getattr(cls, "title", "") or getattr(cls, "name", ""),
                "input_grid": {"spacing_mm": config.get("spacing_mm")}, "modality": "not stated"}

    # -- training options: declared and checked like a method's Options --------------------------------------
    @classmethod
    def train_option_specs(cls):
        return _train_view(cls).option_specs()

    @classmethod
    def parse_train_options(cls, given: dict[str, Any]) -> Any:
        """Check ``given`` (name → raw value; missing: default) against ``TrainOptions``; one-line BadInput."""
        return _train_view(cls).parse_options(given)

    @classmethod
    def config_from(cls, train_options: Any) -> dict[str, Any]:
        """The config of a new run: ``default_config()`` with the training options' values (tuples as lists)."""
        vals = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(train_options).items()}
        return {**cls.default_config(), **vals, "method": cls.name}


_views: dict[type, type[Method]] = {}


def _train_view(cls) -> type[Method]:
    """A ``Method`` subclass (never registered) whose ``Options`` are ``cls.TrainOptions`` and whose flags are
    ``--<name>``: the training options get the same specs and checks as the method's own."""
    if cls not in _views:
        _views[cls] = type(f"{cls.__name__}Training", (Method,), {
            "name": cls.name, "Options": cls.TrainOptions,
            "flag": classmethod(lambda c, n: "--" + n.replace("_", "-")),
            "negative_flag": classmethod(lambda c, n: "--no-" + n.replace("_", "-"))})
    return _views[cls]


def is_trainable(cls: type) -> bool:
    """Whether a method class implements the training protocol (its own build/loss/validation, not the stubs)."""
    if not (isinstance(cls, type) and issubclass(cls, Trainable)):
        return False
    return all(getattr(cls, n).__func__ is not getattr(Trainable, n).__func__
               for n in ("default_config", "build_network", "training_loss", "validation_disp"))


def trainable_methods() -> dict[str, type]:
    """The discovered methods ``deepdiffreg train`` can train, by name."""
    return {n: c for n, c in all_methods().items() if is_trainable(c)}


def get_trainable(name: str) -> type:
    methods = trainable_methods()
    if name not in methods:
        raise BadInput(f"method {name!r} cannot be trained here; trainable: {', '.join(sorted(methods)) or 'none'}")
    return methods[name]

"""Resumable training loop for any learned method that implements the training protocol (methods/learned.py).

``train(TrainSettings)``: the method comes from ``settings.method`` (or the config's "method"); its
``default_config()`` with ``settings.model`` on top is the run's config (saved in every weights file, so a file
rebuilds its own network). Device auto (CUDA if available, else CPU with ``threads`` threads), batch 1, Adam on the
method's ``training_loss``. Every ``val_every`` steps: validation Dice / folding on the fixed pairs (the method's
``validation_disp``), a CSV row (train_log.csv; columns: the method's ``loss_terms``), a PNG plot (train_log.png),
``checkpoint.pt`` (model + optimiser + step + config; resumed automatically, with the run's own config) and
``best.pt`` (weights with the best validation Dice). ``--init FILE`` starts a new run from a weights file through
the method's ``init_network``. ``publish`` copies the best weights into models/ with a model card and a manifest
entry (sha256); the method recorded in the weights file is the manifest's.
"""
from __future__ import annotations

import csv
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..devices import resolve_device
from ..field import jacobian_det, warp
from ..io.weights import save_weights, upsert_entry
from ..methods.learned import TrainStep, get_trainable
from ..metrics import dice_per_label
from ..progress import dumps

VAL_FIELDS = ["val_dice", "val_dice_before", "val_fold_pct", "lr"]


@dataclass
class TrainSettings:
    out_dir: str
    steps: int = 1000
    lr: float = 1e-4
    seed: int = 0
    val_every: int = 100
    threads: int = 1
    device: str = "auto"
    method: str = ""                  # a trainable method's name ("": the one named by model["method"])
    model: dict[str, Any] = field(default_factory=dict)   # config on top of the method's default_config()
    max_seconds: float = 0.0          # stop (with a checkpoint) after this wall time; 0 = no limit
    init: str | None = None           # weights file to start a new run from (ignored when resuming)
    ema: float = 0.0                  # > 0: validate and save an exponential moving average of the weights
    data: dict[str, Any] = field(default_factory=dict)    # the training data and its mix, recorded in settings.json


def method_of(settings: TrainSettings):
    """The method class a run trains."""
    return get_trainable(settings.method or str(settings.model.get("method", "")))


def csv_fields(method) -> list[str]:
    return ["step", "seconds", *method.loss_terms, *VAL_FIELDS]


def _mean_dice(fixed_labels: torch.Tensor, moving_labels: torch.Tensor, labels: list[int]) -> float:
    d = dice_per_label(fixed_labels.cpu().numpy(), moving_labels.cpu().numpy(), labels)
    return float(np.mean(list(d.values())))


@torch.no_grad()
def evaluate(method, net, pairs: list[dict], config: dict, device: torch.device) -> dict[str, Any]:
    """Mean Dice over labels and pairs (before = identity on the affine-aligned pair, after = the method's
    validation field), and the % of voxels with det J ≤ 0 inside the fixed brain (fixed labels > 0)."""
    net.eval()
    before, after, folds, rows = [], [], [], []
    for p in pairs:
        f, m = p["fixed"].to(device), p["moving"].to(device)
        disp = method.validation_disp(net, m, f, config)
        wl = warp(p["moving_labels"].to(device), disp, mode="nearest")
        labels = sorted(set(torch.unique(p["fixed_labels"]).tolist()) & set(torch.unique(p["moving_labels"]).tolist()) - {0})
        d0 = _mean_dice(p["fixed_labels"], p["moving_labels"], labels)
        d1 = _mean_dice(p["fixed_labels"], wl, labels)
        det = jacobian_det(disp)[0]
        brain = p["fixed_labels"][0, 0].to(device) > 0
        fold = 100.0 * float(((det <= 0) & brain).sum()) / max(int(brain.sum()), 1)
        before.append(d0), after.append(d1), folds.append(fold)
        rows.append({"pair": p["name"], "dice_before": float(d0), "dice_after": float(d1), "fold_pct": fold})
    net.train()
    return {"val_dice": float(np.mean(after)), "val_dice_before": float(np.mean(before)),
            "val_fold_pct": float(np.mean(folds)), "pairs": rows}


def _plot(csv_path: Path, png_path: Path, terms: tuple[str, ...]) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return
    s = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    for t in terms:
        if t in rows[0]:
            ax[0].plot(s, [float(r[t]) for r in rows], label=t)
    ax[0].set_xlabel("step"), ax[0].legend(), ax[0].set_title("training loss (mean since last row)")
    ax[1].plot(s, [float(r["val_dice"]) for r in rows], label="after")
    ax[1].plot(s, [float(r["val_dice_before"]) for r in rows], "--", label="before (affine)")
    ax[1].set_xlabel("step"), ax[1].legend(), ax[1].set_title("validation Dice")
    fig.tight_layout()
    fig.savefig(png_path, dpi=80)
    plt.close(fig)


def _batch_to(p: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in p.items()}


def train(settings: TrainSettings, data, val_pairs: list[dict],
          log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Run (or resume) training. ``data.sample(step)`` gives a pair dict (fixed, moving, optional labels).
    Returns {"step", "best_val_dice", "out_dir", "method"}."""
    method = method_of(settings)
    torch.set_num_threads(max(1, settings.threads))
    device = resolve_device(settings.device)
    out = Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {**method.default_config(), **settings.model, "method": method.name}
    torch.manual_seed(settings.seed)
    net = method.build_network(config).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=settings.lr)
    ckpt, csv_path = out / "checkpoint.pt", out / "train_log.csv"
    step, best, state = 0, -1.0, {}
    if ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=True)
        # the run's own model (stages, channels, loss weights), whatever the CLI says; keys a checkpoint written
        # before they existed lacks (e.g. dice_labels) come from the settings, then the method's defaults
        config = {**method.default_config(), **settings.model, **state["config"], "method": method.name}
        net = method.build_network(config).to(device)
        opt = torch.optim.Adam(net.parameters(), lr=settings.lr)
        net.load_state_dict(state["state_dict"])
        opt.load_state_dict(state["optimizer"])
        step, best = int(state["step"]), float(state["best_val_dice"])
        for gparam in opt.param_groups:
            gparam["lr"] = settings.lr
        log(f"resumed from {ckpt} at step {step}")
    else:
        if settings.init:
            obj = torch.load(settings.init, map_location=device, weights_only=True)
            config = {**method.default_config(), **method.init_config(obj, settings.model),
                      **{k: v for k, v in settings.model.items() if k not in method.network_keys}, "method": method.name}
            net = method.build_network(config).to(device)
            method.init_network(net, obj)
            opt = torch.optim.Adam(net.parameters(), lr=settings.lr)
            log(f"initialised from {settings.init}")
        csv_path.write_text(",".join(csv_fields(method)) + "\n")
    _prepare_for_training(method, net, config)
    ema = _Ema(net, settings.ema, state.get("ema")) if settings.ema > 0 else None   # resumed with the run
    (out / "settings.json").write_text(dumps({**asdict(settings), "method": method.name, "model": config},
                                             indent=1))
    gen = torch.Generator(device=device).manual_seed(settings.seed + step)
    acc: dict[str, list[float]] = {}
    t0 = time.time()
    meta = {"method": method.name}
    net.train()
    while step < settings.steps:
        p = _batch_to(data.sample(step), device)
        meta["train_shape_dhw"] = list(p["fixed"].shape[2:])
        terms = method.training_loss(net, p, config, TrainStep(step, settings.seed, gen, device))
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        if ema is not None:
            ema.update(net)
        step += 1
        for k, v in terms.items():
            acc.setdefault(k, []).append(float(v.detach()))
        last = step == settings.steps or (settings.max_seconds and time.time() - t0 > settings.max_seconds)
        if step % settings.val_every == 0 or last:
            live = ema.swap_in(net) if ema is not None else None      # validate and save the averaged weights
            ev = evaluate(method, net, val_pairs, config, device) if val_pairs else \
                {"val_dice": float("nan"), "val_dice_before": float("nan"), "val_fold_pct": float("nan")}
            row = {"step": step, "seconds": round(time.time() - t0, 1),
                   **{k: round(float(np.mean(acc.get(k, [np.nan]))), 5) for k in method.loss_terms},
                   "val_dice": round(ev["val_dice"], 5), "val_dice_before": round(ev["val_dice_before"], 5),
                   "val_fold_pct": round(ev["val_fold_pct"], 5), "lr": settings.lr}
            with open(csv_path, "a", newline="") as fh:
                csv.DictWriter(fh, csv_fields(method)).writerow(row)
            acc = {}
            if val_pairs and ev["val_dice"] > best:
                best = ev["val_dice"]
                save_weights(out / "best.pt", config, net.state_dict(), {**meta, "step": step, "val": ev})
            elif not val_pairs:
                save_weights(out / "best.pt", config, net.state_dict(), {**meta, "step": step})
            save_weights(out / "last.pt", config, net.state_dict(), {**meta, "step": step})
            if live is not None:
                net.load_state_dict(live)
            tmp = out / "checkpoint.tmp.pt"
            torch.save({"state_dict": net.state_dict(), "optimizer": opt.state_dict(), "step": step,
                        "best_val_dice": best, "config": config,
                        **({"ema": ema.state} if ema is not None else {})}, tmp)
            tmp.replace(ckpt)
            _plot(csv_path, out / "train_log.png", method.loss_terms)
            log(dumps(row))   # strict JSON: a column the method does not log (NaN) is null
        if last:
            break
    return {"step": step, "best_val_dice": best, "out_dir": str(out), "method": method.name}


def _prepare_for_training(method, net, config: dict[str, Any]) -> None:
    """The method's ``prepare_for_training`` hook, with the run's config when the hook takes one
    (methods/learned.py)."""
    import inspect
    takes_config = len(inspect.signature(method.prepare_for_training).parameters) >= 2
    method.prepare_for_training(net, config) if takes_config else method.prepare_for_training(net)


class _Ema:
    """Exponential moving average of the weights (``decay`` per step): a late, flat learning curve is mostly
    step-to-step noise of batch-1 training, which the average removes. Validation and best/last.pt use it; the
    optimiser keeps training the live weights (in checkpoint.pt). While the curve still rises the average lags
    behind them (r11, docs/training.md), so compare both before publishing."""

    def __init__(self, net: torch.nn.Module, decay: float, state: dict | None = None):
        self.decay = float(decay)
        self.state = {k: v.detach().clone() for k, v in (state or net.state_dict()).items()}

    @torch.no_grad()
    def update(self, net: torch.nn.Module) -> None:
        for k, v in net.state_dict().items():
            if v.is_floating_point():
                self.state[k].mul_(self.decay).add_(v.detach(), alpha=1.0 - self.decay)
            else:
                self.state[k].copy_(v)

    def swap_in(self, net: torch.nn.Module) -> dict:
        """Load the averaged weights into ``net``; return a copy of the live ones to put back."""
        live = {k: v.detach().clone() for k, v in net.state_dict().items()}
        net.load_state_dict(self.state)
        return live


def publish(run_dir: Path, models_dir: Path, model_id: str, version: str, training: dict[str, Any],
            weights: str = "best.pt", extra_card: str = "", licence: str = "not stated",
            train_shape_dhw: list[int] | None = None) -> dict[str, Any]:
    """Copy run_dir/weights to models_dir/<model_id>.pt (meta filled in), write <model_id>.md and the manifest
    entry. The method is the one recorded in the weights file; its ``model_card(config)`` gives the input grid and
    the modality; ``licence``: of the weights and the data they were trained on; ``train_shape_dhw``: the training
    grid when the weights file does not record it (files written before it did)."""
    from ..methods.learned import get_trainable
    run_dir, models_dir = Path(run_dir), Path(models_dir)
    obj = torch.load(run_dir / weights, map_location="cpu", weights_only=True)
    config, meta = obj["config"], dict(obj.get("meta", {}))
    method = get_trainable(meta.get("method") or config.get("method", ""))
    # what the weights were trained as is their own config (a resumed run keeps its config whatever the flags of
    # the publishing command say); the flags only supply what the config does not hold (data mix, schedule)
    training = {**training, **{k: config[k] for k in training if k in config}}
    card_facts = method.model_card(config)
    input_grid = dict(card_facts.get("input_grid", {}))
    if meta.get("train_shape_dhw") or train_shape_dhw:
        input_grid["train_shape_dhw"] = list(meta.get("train_shape_dhw") or train_shape_dhw)
    entry = {"id": model_id, "method": method.name, "version": version, "file": f"{model_id}.pt",
             "input_grid": input_grid, "modality": card_facts.get("modality", "not stated"),
             "training": {**training, "steps": int(meta.get("step", 0)) + int(training.get("steps_before_init", 0)),
                          "steps_this_run": int(meta.get("step", 0))},
             "validation": {k: meta.get("val", {}).get(k) for k in ("val_dice", "val_dice_before", "val_fold_pct")},
             "licence": licence, "card": f"{model_id}.md"}
    if card_facts.get("deviation"):
        entry["deviation"] = card_facts["deviation"]
    meta.update({k: entry[k] for k in ("id", "method", "version", "licence")})
    sha = save_weights(models_dir / entry["file"], config, obj["state_dict"], meta)
    entry["sha256"] = sha
    n_params = sum(v.numel() for v in obj["state_dict"].values())
    card = [f"# {model_id} ({card_facts.get('title') or method.name})", "",
            f"- method: {method.name}, version {version}; {n_params:,} parameters; sha256 `{sha}`",
            f"- config: `{dumps(config)}`",
            f"- input grid: {entry['input_grid']}",
            f"- modality: {entry['modality']}",
            *([f"- deviation from the paper: {entry['deviation']}"] if entry.get("deviation") else []),
            f"- training: `{dumps(entry['training'])}`",
            f"- validation (fixed pairs, see docs/training.md): `{dumps(entry['validation'])}`",
            f"- licence: {entry['licence']}", "", extra_card]
    (models_dir / entry["card"]).write_text("\n".join(card) + "\n")
    upsert_entry(models_dir, entry)
    return entry

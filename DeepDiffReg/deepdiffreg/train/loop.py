"""Resumable training loop for VoxelMorph-diff (the learned-method template).

``train(TrainSettings)``: device auto (CUDA if available, else CPU with ``threads`` threads), batch 1, Adam,
one sampled velocity per step (K = 1). Every ``val_every`` steps: validation Dice / folding on the fixed pairs,
a CSV row (train_log.csv), a PNG plot (train_log.png), ``checkpoint.pt`` (model + optimiser + step; resumed
automatically) and ``best.pt`` (weights with the best validation Dice). ``publish`` copies the best weights into
models/ with a model card and a manifest entry (sha256).
"""
from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..field import jacobian_det, warp
from ..io.weights import save_weights, sha256_of, upsert_entry
from ..nn.vxm_model import DEFAULT_CONFIG, build_net, load_stages, predict_disp, stage_nets, training_step_loss

CSV_FIELDS = ["step", "seconds", "loss", "recon", "kl", "dice_loss", "val_dice", "val_dice_before",
              "val_fold_pct", "lr"]


@dataclass
class TrainSettings:
    out_dir: str
    steps: int = 1000
    lr: float = 1e-4
    seed: int = 0
    val_every: int = 100
    threads: int = 1
    device: str = "auto"
    model: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_CONFIG))
    dice_labels_per_step: int = 8
    max_seconds: float = 0.0          # stop (with a checkpoint) after this wall time; 0 = no limit
    init: str | None = None           # weights file to start a new run from (ignored when resuming)
    ema: float = 0.0                  # > 0: validate and save an exponential moving average of the weights


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def dice_per_label(a: torch.Tensor, b: torch.Tensor, labels=None) -> dict[int, float]:
    """Dice of integer label maps a, b (same shape) for the labels present in both (0 excluded)."""
    a, b = a.flatten(), b.flatten()
    if labels is None:
        labels = sorted(set(torch.unique(a).tolist()) & set(torch.unique(b).tolist()) - {0})
    out = {}
    for l in labels:
        x, y = a == l, b == l
        den = int(x.sum() + y.sum())
        if den:
            out[int(l)] = 2.0 * int((x & y).sum()) / den
    return out


@torch.no_grad()
def evaluate(net, pairs: list[dict], config: dict, device: torch.device) -> dict[str, Any]:
    """Mean Dice over labels and pairs (before = identity on the affine-aligned pair, after = μ warp), and the
    % of voxels with det J ≤ 0 inside the fixed brain (fixed labels > 0)."""
    net.eval()
    before, after, folds, rows = [], [], [], []
    for p in pairs:
        f, m = p["fixed"].to(device), p["moving"].to(device)
        disp = predict_disp(net, m, f, config["int_steps"])
        wl = warp(p["moving_labels"].to(device), disp, mode="nearest")
        labels = sorted(set(torch.unique(p["fixed_labels"]).tolist()) & set(torch.unique(p["moving_labels"]).tolist()) - {0})
        d0 = np.mean(list(dice_per_label(p["fixed_labels"], p["moving_labels"], labels).values()))
        d1 = np.mean(list(dice_per_label(p["fixed_labels"].to(device), wl, labels).values()))
        det = jacobian_det(disp)[0]
        brain = p["fixed_labels"][0, 0].to(device) > 0
        fold = 100.0 * float(((det <= 0) & brain).sum()) / max(int(brain.sum()), 1)
        before.append(d0), after.append(d1), folds.append(fold)
        rows.append({"pair": p["name"], "dice_before": float(d0), "dice_after": float(d1), "fold_pct": fold})
    net.train()
    return {"val_dice": float(np.mean(after)), "val_dice_before": float(np.mean(before)),
            "val_fold_pct": float(np.mean(folds)), "pairs": rows}


def _plot(csv_path: Path, png_path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = list(csv.DictReader(open(csv_path)))
    if not rows:
        return
    s = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].plot(s, [float(r["loss"]) for r in rows], label="loss")
    ax[0].plot(s, [float(r["recon"]) for r in rows], label="recon")
    ax[0].plot(s, [float(r["kl"]) for r in rows], label="KL")
    ax[0].set_xlabel("step"), ax[0].legend(), ax[0].set_title("training loss (mean since last row)")
    ax[1].plot(s, [float(r["val_dice"]) for r in rows], label="after")
    ax[1].plot(s, [float(r["val_dice_before"]) for r in rows], "--", label="before (affine)")
    ax[1].set_xlabel("step"), ax[1].legend(), ax[1].set_title("validation Dice")
    fig.tight_layout()
    fig.savefig(png_path, dpi=80)
    plt.close(fig)


def train(settings: TrainSettings, data, val_pairs: list[dict],
          log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Run (or resume) training. ``data.sample(step)`` gives a pair dict (fixed, moving, optional labels).
    Returns {"step", "best_val_dice", "out_dir"}."""
    torch.set_num_threads(max(1, settings.threads))
    device = pick_device(settings.device)
    out = Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = dict(DEFAULT_CONFIG, **settings.model)
    torch.manual_seed(settings.seed)
    net = build_net(config).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=settings.lr)
    ckpt, csv_path = out / "checkpoint.pt", out / "train_log.csv"
    step, best, state = 0, -1.0, {}
    if ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=True)
        config = dict(state["config"])          # the run's own model (stages, channels), whatever the CLI says
        net = build_net(config).to(device)
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
            config = dict(obj["config"], **{k: v for k, v in settings.model.items() if k not in ("enc", "dec")})
            net = build_net(config).to(device)
            load_stages(net, obj)
            opt = torch.optim.Adam(net.parameters(), lr=settings.lr)
            log(f"initialised from {settings.init}")
        csv_path.write_text(",".join(CSV_FIELDS) + "\n")
    for unet in stage_nets(net)[:-1]:            # a cascade trains its last stage only
        unet.requires_grad_(False)
    ema = _Ema(net, settings.ema, state.get("ema")) if settings.ema > 0 else None   # resumed with the run
    (out / "settings.json").write_text(json.dumps({**asdict(settings), "model": config}, indent=1))
    gen = torch.Generator(device=device).manual_seed(settings.seed + step)
    acc: dict[str, list[float]] = {}
    t0 = time.time()
    net.train()
    while step < settings.steps:
        p = data.sample(step)
        f, m = p["fixed"].to(device), p["moving"].to(device)
        fl, ml = p.get("fixed_labels"), p.get("moving_labels")
        labels = None
        if config.get("dice_weight", 0) > 0 and fl is not None:
            present = torch.unique(fl).tolist()
            present = [l for l in present if l != 0]
            rng = np.random.default_rng(settings.seed * 31 + step)
            labels = [int(x) for x in rng.choice(present, min(settings.dice_labels_per_step, len(present)),
                                                  replace=False)] if present else None
            fl, ml = fl.to(device), ml.to(device)
        terms = training_step_loss(net, m, f, config, gen, fl, ml, labels)
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
            ev = evaluate(net, val_pairs, config, device) if val_pairs else \
                {"val_dice": float("nan"), "val_dice_before": float("nan"), "val_fold_pct": float("nan")}
            row = {"step": step, "seconds": round(time.time() - t0, 1),
                   **{k: round(float(np.mean(acc.get(k, [np.nan]))), 5) for k in ("loss", "recon", "kl", "dice_loss")},
                   "val_dice": round(ev["val_dice"], 5), "val_dice_before": round(ev["val_dice_before"], 5),
                   "val_fold_pct": round(ev["val_fold_pct"], 5), "lr": settings.lr}
            with open(csv_path, "a", newline="") as fh:
                csv.DictWriter(fh, CSV_FIELDS).writerow(row)
            acc = {}
            if val_pairs and ev["val_dice"] > best:
                best = ev["val_dice"]
                save_weights(out / "best.pt", config, net.state_dict(),
                             {"method": "vxm-diff", "step": step, "val": ev})
            elif not val_pairs:
                save_weights(out / "best.pt", config, net.state_dict(), {"method": "vxm-diff", "step": step})
            save_weights(out / "last.pt", config, net.state_dict(), {"method": "vxm-diff", "step": step})
            if live is not None:
                net.load_state_dict(live)
            tmp = out / "checkpoint.tmp.pt"
            torch.save({"state_dict": net.state_dict(), "optimizer": opt.state_dict(), "step": step,
                        "best_val_dice": best, "config": config,
                        **({"ema": ema.state} if ema is not None else {})}, tmp)
            tmp.replace(ckpt)
            _plot(csv_path, out / "train_log.png")
            log(json.dumps(row))
        if last:
            break
    return {"step": step, "best_val_dice": best, "out_dir": str(out)}


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
            weights: str = "best.pt", extra_card: str = "") -> dict[str, Any]:
    """Copy run_dir/weights to models_dir/<model_id>.pt (meta filled in), write <model_id>.md and the manifest entry."""
    run_dir, models_dir = Path(run_dir), Path(models_dir)
    obj = torch.load(run_dir / weights, map_location="cpu", weights_only=True)
    config, meta = obj["config"], dict(obj.get("meta", {}))
    entry = {"id": model_id, "method": "vxm-diff", "version": version, "file": f"{model_id}.pt",
             "input_grid": {"spacing_mm": config.get("spacing_mm", 2.0), "size_multiple": 2 ** len(config["enc"]),
                            "orientation": "LPS-aligned array axes (the method reorients internally)",
                            "train_shape_dhw": [80, 96, 80]},
             "modality": "T1-weighted brain MRI, skull-stripped or whole head (mono-contrast pairs; also trained "
                         "on synthetic random-contrast label-map pairs)",
             "training": {**training, "steps": int(meta.get("step", 0)) + int(training.get("steps_before_init", 0)),
                          "steps_this_run": int(meta.get("step", 0))},
             "validation": {k: meta.get("val", {}).get(k) for k in ("val_dice", "val_dice_before", "val_fold_pct")},
             "licence": "Apache-2.0 (weights); trained on IXI (CC BY-SA 3.0, brain-development.org), DLMUSE "
                        "segmentations (LICENSE-SBIA) and SynthSeg label maps (Apache-2.0); see models/LICENSE.md",
             "card": f"{model_id}.md"}
    meta.update({k: entry[k] for k in ("id", "method", "version", "licence")})
    sha = save_weights(models_dir / entry["file"], config, obj["state_dict"], meta)
    entry["sha256"] = sha
    n_params = sum(v.numel() for v in obj["state_dict"].values())
    card = [f"# {model_id} (VoxelMorph-diff)", "",
            f"- method: vxm-diff, version {version}; {n_params:,} parameters; sha256 `{sha}`",
            f"- config: `{json.dumps(config)}`",
            f"- input grid: {entry['input_grid']}",
            f"- modality: {entry['modality']}",
            f"- training: `{json.dumps(entry['training'])}`",
            f"- validation (fixed pairs, see docs/training.md): `{json.dumps(entry['validation'])}`",
            f"- licence: {entry['licence']}", "", extra_card]
    (models_dir / entry["card"]).write_text("\n".join(card) + "\n")
    upsert_entry(models_dir, entry)
    return entry

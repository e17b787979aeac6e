"""A new learned method defined entirely in this one file — options (one named ``lr``), a trivial network, the
training protocol — trained with ``deepdiffreg train --method toy-svf``, published into a temporary model cache and
used by ``deepdiffreg register --method toy-svf``, with no edit to any other file (issue 10, "Done when").

The subprocesses load this file as a method plugin (``DEEPDIFFREG_PLUGINS=<this file>``, methods/__init__.py). The
class is registered only there (the module is then imported as ``deepdiffreg_plugin_*``), so the other tests of a
pytest session keep seeing the built-in methods only. CPU, tiny synthetic data, seconds.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from deepdiffreg.field import warp
from deepdiffreg.methods.base import Capabilities, FieldEstimate, option, register_method
from deepdiffreg.methods.learned import LearnedMethod, LearnedOptions, Trainable
from deepdiffreg.nn.wrappers import SVF, OnNetGrid, Refine, Symmetric

NAME = "toy-svf"


class ToyNet(nn.Module):
    """cat(moving, fixed) → two 3×3×3 convolutions on the ½ grid → a stationary velocity (B, 3, D/2, H/2, W/2) in
    ½-grid voxels. Starts at the identity (zero last layer)."""
    size_multiple = 2

    def __init__(self, channels: int = 8):
        super().__init__()
        self.a = nn.Conv3d(2, channels, 3, padding=1)
        self.b = nn.Conv3d(channels, 3, 3, padding=1)
        nn.init.zeros_(self.b.weight)
        nn.init.zeros_(self.b.bias)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool3d(torch.cat([moving, fixed], 1), 2)
        return self.b(F.leaky_relu(self.a(x), 0.2))


def _smoothness(v: torch.Tensor) -> torch.Tensor:
    return sum(((v.diff(dim=d)) ** 2).mean() for d in (2, 3, 4))


class ToySvf(Trainable, LearnedMethod):
    name = NAME
    title = "Toy SVF (plugin test)"
    description = "a two-layer SVF network defined in Testing/engine/test_method_plugin.py"
    caps = Capabilities(learned=True, inverse="exact", contrasts="same")

    @dataclass
    class Options(LearnedOptions):
        lr: float = option(0.05, min=0.0, max=1.0, help="Adam step of the test-time refinement (½-grid voxels)")
        refine_steps: int = option(0, min=0, max=1000, help="test-time refinement steps (0: off)")
        symmetric: bool = option(True, help="average with the swapped pair's inverse velocity")

    @dataclass
    class TrainOptions:
        channels: int = option(8, min=1, max=64, help="hidden channels")
        smooth: float = option(0.1, min=0.0, max=100.0, help="weight of the velocity smoothness term")

    network_keys = ("channels",)
    loss_terms = ("loss", "sim", "reg")

    @classmethod
    def default_config(cls) -> dict:
        return {"channels": 8, "smooth": 0.1, "int_steps": 4, "spacing_mm": 2.0}

    @classmethod
    def build_network(cls, config: dict) -> nn.Module:
        return ToyNet(int(config["channels"]))

    @classmethod
    def _loss(cls, d: SVF, moving, fixed, smooth: float) -> dict:
        sim = ((fixed - warp(moving, d.disp(fixed.shape[2:]))) ** 2).mean()
        reg = _smoothness(d.velocity)
        return {"loss": sim + smooth * reg, "sim": sim, "reg": reg}

    @classmethod
    def training_loss(cls, net, batch, config, step) -> dict:
        d = SVF(net(batch["moving"], batch["fixed"]), config["int_steps"])
        return cls._loss(d, batch["moving"], batch["fixed"], config["smooth"])

    @classmethod
    def validation_disp(cls, net, moving, fixed, config) -> torch.Tensor:
        return SVF(net(moving, fixed), config["int_steps"]).disp(fixed.shape[2:])

    def estimate(self, pair, device, progress) -> FieldEstimate:
        net, config, model = self.load_network(device)
        module = lambda m, f: SVF(net(m, f), config["int_steps"])          # noqa: E731
        if self.opts.symmetric:
            module = Symmetric(module)
        module = Refine(module, lambda d, m, f: self._loss(d, m, f, config["smooth"])["loss"],
                        self.opts.refine_steps, self.opts.lr)
        with torch.no_grad():
            res = OnNetGrid(module, multiple=net.size_multiple)(pair, device)
        progress(1.0, "done")
        return FieldEstimate(disp_vox=res.disp_vox().cpu(), inverse_disp_vox=res.inverse_disp_vox().cpu(),
                             info={**res.info, **res.deformation.info}, model=model)


if __name__.startswith("deepdiffreg_plugin_"):
    register_method(ToySvf)


# --- the test ---------------------------------------------------------------------------------------------------

def _write_pair(folder: Path) -> dict[str, str]:
    import SimpleITK as sitk
    from deepdiffreg.train.datasets import synthetic_training_data
    _, val, _ = synthetic_training_data(24, n_val=1)
    paths = {}
    for role in ("fixed", "moving"):
        img = sitk.GetImageFromArray(val[0][role][0, 0].numpy())
        img.SetSpacing((2.0, 2.0, 2.0))
        paths[role] = str(folder / f"{role}.nii.gz")
        sitk.WriteImage(img, paths[role])
    return paths


def _cli(env: dict, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deepdiffreg", *map(str, args)], capture_output=True, text=True,
                          encoding="utf-8", errors="replace", timeout=300, env={**os.environ, **env})


def test_a_method_from_one_file_trains_publishes_and_registers(tmp_path):
    models = tmp_path / "models"
    env = {"DEEPDIFFREG_PLUGINS": str(Path(__file__).resolve()), "DEEPDIFFREG_MODELS_DIR": str(models),
           "DEEPDIFFREG_BUNDLED_MODELS": str(tmp_path / "no-bundled-models"), "OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"
    r = _cli(env, "train", "--method", NAME, "--synthetic", 16, "--out", run, "--steps", 6, "--val-every", 3,
             "--lr", 1e-2, "--channels", 4, "--smooth", 0.5, "--threads", 1,
             "--publish", "toy-svf-test", "--models-dir", models, "--version", "0.0.1")
    assert r.returncode == 0, r.stderr[-3000:]
    header = (run / "train_log.csv").read_text().splitlines()[0].split(",")
    assert header[:5] == ["step", "seconds", "loss", "sim", "reg"] and "val_dice" in header
    entry = next(e for e in json.loads((models / "manifest.json").read_text())["models"] if e["id"] == "toy-svf-test")
    assert entry["method"] == NAME and entry["training"]["channels"] == 4 and entry["training"]["smooth"] == 0.5
    assert entry["input_grid"]["train_shape_dhw"] == [16, 16, 16]
    obj = torch.load(models / entry["file"], weights_only=True)
    assert obj["config"]["channels"] == 4 and obj["meta"]["method"] == NAME

    pair = _write_pair(tmp_path)
    out = tmp_path / "out"
    r = _cli(env, "register", "--method", NAME, "--fixed", pair["fixed"], "--moving", pair["moving"], "--out", out,
             "--no-align", "--toy-svf-lr", 0.2, "--toy-svf-refine-steps", 2,
             "--contrast-check", "warn")   # the tiny phantom pair, far apart, looks like two contrasts (ρ 0.15)
    assert r.returncode == 0, r.stderr[-3000:]
    for f in ("transform.h5", "inverse.h5", "jacobian.nii.gz", "warped.nii.gz", "report.json"):
        assert (out / f).exists(), f
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["sha256"] == entry["sha256"] and report["model"]["id"] == "toy-svf-test"
    assert report["method_options"]["lr"] == 0.2 and report["method_info"]["refine_steps"] == 2

    # the same one-file method appears everywhere the platform lists methods, with its own flags
    r = _cli(env, "methods", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    desc = next(m for m in json.loads(r.stdout) if m["name"] == NAME)
    assert desc["learned"] and desc["trainable"] and desc["models"][0]["id"] == "toy-svf-test"
    flags = {o["name"]: o["flag"] for o in desc["options"]}
    assert flags["lr"] == "--toy-svf-lr" and flags["refine_steps"] == "--toy-svf-refine-steps"
    r = _cli(env, "register", "--help")
    assert r.returncode == 0 and "--toy-svf-lr" in r.stdout and NAME in r.stdout
    r = _cli(env, "train", "--help")
    assert r.returncode == 0 and NAME in r.stdout
    # the Slicer panel's method list and its command line are built from that JSON
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "DeepDiffReg"))
    from DeepDiffRegLib import methods as panel_methods
    info = panel_methods.by_name(panel_methods.parse_methods_json(json.dumps([desc])), NAME)
    assert info is not None and info.learned
    assert panel_methods.option_args(info, {"lr": 0.3}) == ["--toy-svf-lr", "0.3"]
    # and the benchmark runs it as a row of its own (the quick phantom pair, with its installed weights)
    bench = tmp_path / "bench"
    r = _cli(env, "benchmark", "--quick", "--methods", NAME, "--work", bench / "work", "--out", bench / "b.md",
             "--threads", 1)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((bench / "b.json").read_text())["runs"]
    assert [row["method"] for row in rows] == [NAME] and rows[0]["status"] == "ok" and rows[0]["dice"]["after"]["mean"] > 0

"""AVSM as one method file (methods/avsm.py): the learned affine in normalised coordinates of the canonical network
grid becomes transform.h5's affine in LPS mm exactly (oblique, anisotropic, non-multiple-of-16 working grid); the
deformable part is composed after the affine (T(x) = A(x + u(x)), not x + u(A x)); advecting the vSVF map from zero
and applying the affine afterwards equals advecting from the affine map (spec B.3.4); the λ_ar schedule (Eq. 13);
mk-LNCC; two-stage training, publishing and `deepdiffreg register --method avsm` through the CLI with the initial
alignment off by default. CPU, tiny."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from affine_case import write_pair
from deepdiffreg import pipeline
from deepdiffreg.field import warp
from deepdiffreg.frames import Geometry
from deepdiffreg.methods import avsm as avsm_mod
from deepdiffreg.methods.avsm import (AVSM, AVSMNet, affine_after, lambda_ar, lps_from_normalised, mk_lncc,
                                      vsvf_deformable_step)
from deepdiffreg.nn.avsm import affine_disp_vox, vsvf_step
from deepdiffreg.nn.grid import NetGrid, to_canonical
from deepdiffreg.preprocess import working_grid
from synth import points_lps

# a known affine in normalised coordinates of the canonical grid (shear, anisotropic scale, translation)
A_N = np.array([[1.06, 0.05, -0.03], [-0.04, 0.95, 0.06], [0.02, -0.05, 1.03]])
B_N = np.array([0.05, -0.04, 0.03])
AMP = 0.7                                    # the stub momentum's amplitude (½-grid voxels)


class _KnownAffine(torch.nn.Module):
    """Stands in for the affine net: (Ã, b̃) = (A_N, B_N) on the first call of a multi-step run, then identity."""

    def __init__(self, A=A_N, b=B_N):
        super().__init__()
        self.calls, self.A, self.b = 0, A, b

    def forward(self, moving, fixed):
        n = fixed.shape[0]
        first = self.calls % 7 == 0
        self.calls += 1
        A = torch.tensor(self.A if first else np.eye(3), dtype=fixed.dtype).expand(n, 3, 3)
        b = torch.tensor(self.b if first else np.zeros(3), dtype=fixed.dtype).expand(n, 3)
        return A, b


class _KnownMomentum(torch.nn.Module):
    """A fixed smooth momentum on the ½ grid (½-grid voxel units), whatever the input."""

    def forward(self, moving, fixed):
        shape = [max(1, n // 2) for n in fixed.shape[2:]]
        z, y, x = torch.meshgrid(*[torch.linspace(-1, 1, n) for n in shape], indexing="ij")
        m = AMP * torch.stack([torch.sin(2 * y), torch.cos(2 * x), torch.sin(2 * z + x)], 0)[None]
        return m.to(fixed.dtype)


def _stub_network(monkeypatch, A=A_N, b=B_N):
    net = AVSMNet((2, 2, 2, 2, 2))
    net.affine = _KnownAffine(A, b)
    net.momentum = _KnownMomentum()
    cfg = {**AVSM.default_config(), "method": "avsm"}
    monkeypatch.setattr(AVSM, "load_network", lambda self, device: (net, cfg, {"id": "stub", "version": None,
                                                                                "sha256": "0"}))
    monkeypatch.setattr(AVSM, "check_ready", lambda self: None)
    return net


def _coordinate_image(geom: Geometry) -> torch.Tensor:
    """(1, 3, D, H, W) LPS coordinates of the working grid's voxel centres (an affine function of the index)."""
    p = points_lps(geom.reference_image())
    return torch.from_numpy(np.moveaxis(p, -1, 0).astype(np.float64))[None]


def _sample_normalised(img: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    """Sample a canonical (1, C, D, H, W) image at normalised points (N, 3) (component a along array axis a)."""
    g = pts.flip(-1).view(1, -1, 1, 1, 3).to(img.dtype)          # grid_sample wants (x=W, y=H, z=D)
    return F.grid_sample(img, g, mode="bilinear", align_corners=True, padding_mode="border").view(img.shape[1], -1).T


def _canonical_truth(geom: Geometry, pts_n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(LPS of the normalised points, LPS of A_N x + B_N) — through the arrays the network sees (to_canonical of the
    working grid's coordinates), not through the method's matrices."""
    grid = NetGrid.for_working_grid(geom, geom.shape_kji, 16)
    coords = to_canonical(_coordinate_image(geom), grid.src, grid.flip)
    x = torch.from_numpy(pts_n)
    y = torch.from_numpy(pts_n @ A_N.T + B_N)
    return _sample_normalised(coords, x).numpy(), _sample_normalised(coords, y).numpy()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("avsm_pair")
    return {**write_pair(d), "dir": d}


def _register(pair, monkeypatch, name: str, A=A_N, b=B_N, align=None, **opts):
    _stub_network(monkeypatch, A, b)
    out = Path(pair["dir"]) / name
    req = pipeline.RegisterRequest(pair["fixed"], pair["moving"], "avsm", str(out), device="cpu", align=align,
                                   method_options={"affine_steps": 7, **opts})
    report = pipeline.register(req)
    comp = sitk.CompositeTransform(sitk.ReadTransform(str(out / "transform.h5")))
    return report, comp


def test_working_grid_is_oblique_anisotropic_and_not_a_multiple_of_16(pair):
    geom = working_grid(pair["fixed_img"], 2.0)
    grid = NetGrid.for_working_grid(geom, geom.shape_kji, 16)
    assert not np.allclose(geom.direction, np.eye(3), atol=0.05)
    assert any(n % 16 for n in grid.shape) and grid.shape != grid.net_shape
    spacing = np.asarray(pair["fixed_img"].GetSpacing())
    assert spacing.max() / spacing.min() > 1.2


def test_normalised_affine_becomes_the_transform_files_affine(pair, monkeypatch):
    report, comp = _register(pair, monkeypatch, "affine_only", vsvf_steps=0)
    assert report["initial_alignment"]["mode"] == "none"          # the method's default: its own affine only
    aff = comp.GetNthTransform(0)
    assert aff.GetName() == "AffineTransform"
    geom = working_grid(pair["fixed_img"], 2.0)
    rng = np.random.default_rng(0)
    pts_n = rng.uniform(-0.8, 0.8, size=(40, 3))
    x_lps, y_lps = _canonical_truth(geom, pts_n)
    got = np.array([aff.TransformPoint(tuple(map(float, p))) for p in x_lps])
    np.testing.assert_allclose(got, y_lps, atol=1e-3)               # mm; float32 geometry in the NIfTI header
    # the whole transform is the affine (zero deformable part), and report.json carries the same matrix
    np.testing.assert_allclose([comp.TransformPoint(tuple(map(float, p))) for p in x_lps], y_lps, atol=1e-3)
    np.testing.assert_allclose(report["transform_geometry"]["method_affine_lps"],
                               report["method_info"]["affine_lps"], atol=1e-6)


def test_conversion_matrix_against_canonical_arrays_on_a_flipped_permuted_grid():
    """The matrix alone, on a grid whose direction permutes and flips every axis."""
    d = np.array([[0.0, 0.0, -1.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]) @ np.array(
        [[np.cos(0.2), -np.sin(0.2), 0], [np.sin(0.2), np.cos(0.2), 0], [0, 0, 1]])
    geom = Geometry((3.0, -7.0, 11.0), (1.7, 2.3, 0.9), tuple(d.ravel()), (13, 21, 9))
    grid = NetGrid.for_working_grid(geom, geom.shape_kji, 16)
    M = lps_from_normalised(grid, geom)
    pts_n = np.random.default_rng(1).uniform(-0.85, 0.85, size=(30, 3))   # A x + b stays inside
    x_lps, y_lps = _canonical_truth(geom, pts_n)
    np.testing.assert_allclose(pts_n @ M[:3, :3].T + M[:3, 3], x_lps, atol=1e-9)
    a = avsm_mod.affine_lps_from_normalised(A_N, B_N, grid, geom)
    np.testing.assert_allclose(x_lps @ a[:3, :3].T + a[:3, 3], y_lps, atol=1e-9)


def test_composition_order_affine_after_deformable(pair, monkeypatch):
    """T(x) = A(x + u(x)): the written transform equals the network-grid map Φ_aff ∘ (id + u) and not
    (id + u) ∘ Φ_aff."""
    # a strong affine, so that the two orders differ clearly
    A_c = np.array([[1.15, 0.10, 0.0], [-0.08, 0.9, 0.05], [0.0, 0.06, 1.1]])
    b_c = np.array([0.12, -0.1, 0.08])
    report, comp = _register(pair, monkeypatch, "affine_field", A=A_c, b=b_c, vsvf_steps=1)
    geom = working_grid(pair["fixed_img"], 2.0)
    grid = NetGrid.for_working_grid(geom, geom.shape_kji, 16)
    # the same network run, on the net grid, by hand
    f = torch.zeros((1, 1) + grid.net_shape)
    A = torch.tensor(A_c, dtype=torch.float32)[None]
    b = torch.tensor(b_c, dtype=torch.float32)[None]
    u, _, _ = vsvf_deformable_step(_KnownMomentum(), f, f, A, b, torch.zeros((1, 3) + grid.net_shape), 10)
    assert float(u.abs().max()) > 0.3                                # a deformable part worth testing
    right = affine_after(A, b, u)                                    # Φ_aff ∘ (id + u)
    wrong = affine_disp_vox(A, b, grid.net_shape)
    wrong = wrong + warp(u, wrong)                                   # (id + u) ∘ Φ_aff
    scale = torch.tensor([(n - 1) / 2.0 for n in grid.net_shape]).view(1, 3, 1, 1, 1)
    coords = to_canonical(_coordinate_image(geom), grid.src, grid.flip)
    idx = np.random.default_rng(2).integers(3, np.array(grid.net_shape) - 3, size=(30, 3))
    x_n = torch.from_numpy(np.array([[-1 + 2 * i / (n - 1) for i, n in zip(p, grid.net_shape)] for p in idx]))
    x_lps = _sample_normalised(coords, x_n).numpy()
    got = np.array([comp.TransformPoint(tuple(map(float, p))) for p in x_lps])
    for name, disp in (("right", right), ("wrong", wrong)):
        y_n = x_n + torch.stack([disp[0, :, i, j, k] / scale[0, :, 0, 0, 0] for i, j, k in idx]).double()
        y_lps = _sample_normalised(coords, y_n).numpy()
        err = np.abs(got - y_lps).max()
        if name == "right":
            assert err < 0.15, err                                   # mm (trilinear resampling net→working→fixed)
        else:
            assert err > 0.6, err                                    # (id + u) ∘ Φ_aff is caught


def test_advecting_from_zero_then_affine_equals_advecting_from_the_affine_map():
    shape = (16, 16, 16)
    torch.manual_seed(0)
    A = torch.tensor(A_N, dtype=torch.float64)[None]
    b = torch.tensor(B_N, dtype=torch.float64)[None]
    mom = lambda m, f: _KnownMomentum()(m, f).double()               # noqa: E731
    img = torch.rand((1, 1) + shape, dtype=torch.float64)
    u1, _, _ = vsvf_deformable_step(mom, img, img, A, b, torch.zeros((1, 3) + shape, dtype=torch.float64), 10)
    u2, _, _ = vsvf_deformable_step(mom, img, img, A, b, u1, 10)
    phi = affine_disp_vox(A, b, shape)                               # the spec's way: from the affine map
    phi1, _, _ = vsvf_step(mom, img, img, phi, 10)
    phi2, _, _ = vsvf_step(mom, img, img, phi1, 10)
    torch.testing.assert_close(affine_after(A, b, u2), phi2, atol=1e-9, rtol=0)


def test_lambda_ar_schedule_and_mk_lncc():
    cfg = {"epoch_steps": 10, "c_ar": 10.0, "k_ar": 4.0}
    got = [lambda_ar(10 * n, cfg) for n in (0, 5, 10, 15, 20, 30, 40)]
    np.testing.assert_allclose(got, [8.00, 5.34, 2.47, 0.86, 0.26, 0.022, 0.0018], rtol=0.02)
    x = torch.rand(1, 1, 32, 32, 32)
    assert float(mk_lncc(x, x)) < 1e-3
    assert float(mk_lncc(x, torch.rand(1, 1, 32, 32, 32))) > 0.5
    assert avsm_mod.mk_lncc_settings((80, 192, 192)) == [(20, 0.3, 2), (40, 0.7, 2)]


def test_each_stage_trains_only_its_own_network():
    from deepdiffreg.methods.learned import TrainStep
    torch.manual_seed(0)
    batch = {"fixed": torch.rand(1, 1, 16, 16, 16), "moving": torch.rand(1, 1, 16, 16, 16)}
    step = TrainStep(0, 0, torch.Generator(), torch.device("cpu"))
    for stage, trained, frozen in (("affine", "affine", "momentum"), ("vsvf", "momentum", "affine")):
        cfg = {**AVSM.default_config(), "stage": stage, "momentum_ch": [2, 2, 2, 2, 2], "affine_train_steps": 2,
               "affine_test_steps": 2, "time_steps": 2, "vsvf_steps": 1}
        net = AVSM.build_network(cfg)
        AVSM.prepare_for_training(net)
        terms = AVSM.training_loss(net, batch, cfg, step)
        assert all(torch.isfinite(v).all() for v in terms.values())
        terms["loss"].backward()
        assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in getattr(net, trained).parameters())
        assert all(p.grad is None for p in getattr(net, frozen).parameters())


def test_user_alignment_is_chained_before_the_methods_affine(pair, monkeypatch):
    from affine_case import a_init_matrix, use_known_alignment
    use_known_alignment(monkeypatch)
    report, comp = _register(pair, monkeypatch, "with_align", vsvf_steps=0, align="affine")
    assert report["initial_alignment"]["mode"] == "affine"
    m_method = np.asarray(report["transform_geometry"]["method_affine_lps"])
    np.testing.assert_allclose(report["transform_geometry"]["affine_lps"], a_init_matrix() @ m_method, atol=1e-6)


def test_refine_runs_on_the_last_momentum(pair, monkeypatch):
    report, _ = _register(pair, monkeypatch, "refined", vsvf_steps=2, refine=2)
    assert report["method_info"]["refine_steps"] == 2


def _cli(env: dict, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deepdiffreg", *map(str, args)], capture_output=True, text=True,
                          encoding="utf-8", errors="replace", timeout=300, env={**os.environ, **env})


def test_train_two_stages_publish_and_register_through_the_cli(tmp_path):
    models = tmp_path / "models"
    env = {"DEEPDIFFREG_MODELS_DIR": str(models), "DEEPDIFFREG_BUNDLED_MODELS": str(tmp_path / "none"),
           "OMP_NUM_THREADS": "1"}
    common = ("--synthetic", 16, "--steps", 2, "--val-every", 2, "--threads", 1, "--momentum-ch", 2, 2, 2, 2, 2)
    r = _cli(env, "train", "--method", "avsm", *common, "--out", tmp_path / "aff", "--stage", "affine",
             "--affine-train-steps", 2)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _cli(env, "train", "--method", "avsm", *common, "--out", tmp_path / "vsvf", "--stage", "vsvf",
             "--affine-test-steps", 2, "--time-steps", 3, "--init", tmp_path / "aff" / "best.pt",
             "--publish", "avsm-test", "--models-dir", models, "--version", "0.0.1")
    assert r.returncode == 0, r.stderr[-3000:]
    header = (tmp_path / "vsvf" / "train_log.csv").read_text().splitlines()[0].split(",")
    assert {"sim", "reg", "sym", "lambda_ar"} <= set(header)
    entry = next(e for e in json.loads((models / "manifest.json").read_text())["models"] if e["id"] == "avsm-test")
    assert entry["method"] == "avsm"

    d = tmp_path / "pair"
    d.mkdir()
    p = write_pair(d)
    out = tmp_path / "out"
    r = _cli(env, "register", "--method", "avsm", "--fixed", p["fixed"], "--moving", p["moving"], "--out", out,
             "--avsm-affine-steps", 2, "--avsm-time-steps", 3)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["initial_alignment"]["mode"] == "none"
    assert report["model"]["id"] == "avsm-test"
    comp = sitk.CompositeTransform(sitk.ReadTransform(str(out / "transform.h5")))
    assert [comp.GetNthTransform(n).GetName() for n in range(2)] == ["AffineTransform", "DisplacementFieldTransform"]
    aff = comp.GetNthTransform(0)
    m = np.asarray(report["method_info"]["affine_lps"])
    np.testing.assert_allclose(np.asarray(aff.GetMatrix()).reshape(3, 3), m[:3, :3], atol=1e-6)
    pt = np.array([1.0, 2.0, 3.0])
    np.testing.assert_allclose(aff.TransformPoint(tuple(pt)), m[:3, :3] @ pt + m[:3, 3], atol=1e-5)
    for f in ("inverse.h5", "warped.nii.gz", "jacobian.nii.gz"):
        assert (out / f).exists(), f

"""Result directories written by hand, following the result contract (conventions.md), for scene tests that
need something a real engine run does not give (a folded field) or must not depend on (exact known geometry).

Fixed grid: oblique (Rz 20 deg . Rx 10 deg), anisotropic spacing, offset origin, as in the slicer-core probes.
"""
from __future__ import annotations

import json
import os

import numpy as np
import SimpleITK as sitk
from vtkmodules.vtkCommonCore import vtkPoints, vtkFloatArray
from vtkmodules.vtkCommonDataModel import vtkCellArray, vtkPolyData
from vtkmodules.vtkIOLegacy import vtkPolyDataWriter


def rot(axis: str, deg: float) -> np.ndarray:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    if axis == "z":
        return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    return np.array([[1.0, 0, 0], [0, c, -s], [0, s, c]])


def make_image(size, spacing, origin, direction, values_fn=None, dtype=sitk.sitkFloat32) -> sitk.Image:
    img = sitk.Image([int(s) for s in size], dtype)
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(o) for o in origin])
    img.SetDirection([float(d) for d in np.asarray(direction).ravel()])
    if values_fn is not None:
        arr = values_fn(physical_points(img)).astype(np.float32)
        out = sitk.GetImageFromArray(arr)
        out.CopyInformation(img)
        return out
    return img


def physical_points(img: sitk.Image) -> np.ndarray:
    """(k, j, i, 3) LPS coordinates of every voxel."""
    size = img.GetSize()
    k, j, i = np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij")
    ijk = np.stack([i, j, k], -1).astype(float)
    D = np.array(img.GetDirection()).reshape(3, 3)
    return ijk * np.array(img.GetSpacing()) @ D.T + np.array(img.GetOrigin())


def pattern(p: np.ndarray) -> np.ndarray:
    """A smooth, asymmetric test image (blobs + ramps), values ~10..130."""
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    v = 60 + 0.8 * x - 0.5 * y + 0.3 * z
    v += 40 * np.exp(-((x - 5) ** 2 + (y + 3) ** 2 + (z - 2) ** 2) / 60.0)
    v += 25 * np.sin(x / 4.0) * np.cos(y / 5.0) + 10 * np.sin(z / 3.0)
    return v


def jacobian_det(disp_lps: np.ndarray, img: sitk.Image) -> np.ndarray:
    """det(I + grad u) on the grid of ``img``: index-frame derivatives mapped to physical ones (chain rule)."""
    A = np.array(img.GetDirection()).reshape(3, 3) @ np.diag(img.GetSpacing())   # d x_phys / d ijk
    Ainv = np.linalg.inv(A)
    g_k, g_j, g_i = (np.gradient(disp_lps, axis=a) for a in range(3))            # d u / d (k, j, i)
    du_dijk = np.stack([g_i, g_j, g_k], -1)                                      # (..., comp, ijk)
    grad = du_dijk @ Ainv                                                         # (..., comp, phys)
    return np.linalg.det(np.eye(3) + grad)


def write_grid_vtk(path: str, img: sitk.Image, disp_lps: np.ndarray, jac: np.ndarray, step: int = 4) -> int:
    """Grid lines in fixed LPS space, vertices moved by T, point scalar "jacobian"; header SPACE=LPS."""
    pts_lps = physical_points(img) + disp_lps
    nk, nj, ni = jac.shape
    points, lines, scal = vtkPoints(), vtkCellArray(), vtkFloatArray()
    scal.SetName("jacobian")
    idx = {}

    def pid(k, j, i):
        if (k, j, i) not in idx:
            idx[(k, j, i)] = points.InsertNextPoint(*pts_lps[k, j, i])
            scal.InsertNextValue(float(jac[k, j, i]))
        return idx[(k, j, i)]

    ks, js, is_ = range(0, nk, step), range(0, nj, step), range(0, ni, step)
    for k in ks:
        for j in js:
            ids = [pid(k, j, i) for i in range(ni)]
            lines.InsertNextCell(len(ids), ids)
    for k in ks:
        for i in is_:
            ids = [pid(k, j, i) for j in range(nj)]
            lines.InsertNextCell(len(ids), ids)
    for j in js:
        for i in is_:
            ids = [pid(k, j, i) for k in range(nk)]
            lines.InsertNextCell(len(ids), ids)
    pd = vtkPolyData()
    pd.SetPoints(points)
    pd.SetLines(lines)
    pd.GetPointData().AddArray(scal)
    w = vtkPolyDataWriter()
    w.SetHeader("DeepDiffReg deformation grid. SPACE=LPS")
    w.SetFileName(path)
    w.SetInputData(pd)
    w.Write()
    return lines.GetNumberOfCells()


# The hand-written result's affine part A (T(x) = A(x + u(x))): a small rotation about the fixed grid's centre and a
# translation, det A = 1, so the Jacobian stays det(I + grad u) and the grid moves by at most ~1.5 mm more than u.
SYNTH_ROTATION_DEG = 1.5
SYNTH_TRANSLATION = (0.6, -0.4, 0.5)


def synthetic_affine(centre) -> sitk.AffineTransform:
    a = sitk.AffineTransform(3)
    a.SetMatrix(rot("z", SYNTH_ROTATION_DEG).ravel().tolist())
    a.SetCenter([float(c) for c in centre])
    a.SetTranslation(SYNTH_TRANSLATION)
    return a


def write_result_dir(out_dir: str, fold: bool = False, method: str = "synthetic", composite: bool = True) -> dict:
    """Write fixed.nii.gz/moving.nii.gz next to ``out_dir`` and the full result contract inside it.

    composite: transform.h5 = one flat CompositeTransform [A, U] (T(x) = A(x + u(x))) and inverse.h5 = [W, A^-1],
    as the engine writes them; False: the older single DisplacementFieldTransform on the fixed grid (no affine),
    which Slicer loads as a grid transform node and which must keep loading.
    Returns the paths and the arrays a test needs as expectations.
    """
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.dirname(os.path.abspath(out_dir))
    Df = rot("z", 20) @ rot("x", 10)
    fixed0 = make_image((28, 26, 20), (1.5, 1.2, 2.0), (-20.0, -15.0, -10.0), Df)
    pts = physical_points(fixed0)
    c = pts.reshape(-1, 3).mean(0)
    r = pts - c
    # smooth field, up to ~3 mm, asymmetric in all three components
    u = np.stack([2.0 * np.sin(r[..., 1] / 8.0) + 0.5,
                  -1.5 * np.cos(r[..., 0] / 9.0) + 0.03 * r[..., 2],
                  1.2 * np.sin((r[..., 0] + r[..., 1]) / 10.0)], -1)
    if fold:  # a compressive bump with d u_x / d x = -2.5 at its centre: det J < 0 there
        g = np.exp(-(r ** 2).sum(-1) / (2 * 4.0 ** 2))
        u[..., 0] += -2.5 * r[..., 0] * g
    disp = sitk.GetImageFromArray(u.astype(np.float64), isVector=True)
    disp.CopyInformation(fixed0)
    A = synthetic_affine(c) if composite else sitk.AffineTransform(3)
    T = sitk.CompositeTransform(3)
    T.AddTransform(A)
    T.AddTransform(sitk.DisplacementFieldTransform(sitk.Image(disp)))
    Dm = rot("z", -15) @ rot("x", 5)
    moving = make_image((30, 28, 22), (1.3, 1.3, 1.8), (-22.0, -20.0, -14.0), Dm, pattern)
    a_lin, a_off = np.asarray(A.GetMatrix()).reshape(3, 3), np.asarray(A.GetTranslation()) + c - \
        np.asarray(A.GetMatrix()).reshape(3, 3) @ c
    fixed = make_image((28, 26, 20), (1.5, 1.2, 2.0), (-20.0, -15.0, -10.0), Df,
                       lambda p: pattern((p + u) @ a_lin.T + a_off))
    warped = sitk.Resample(moving, fixed, T, sitk.sitkLinear, 0.0)
    jac = jacobian_det(u, fixed).astype(np.float32)
    jac_img = sitk.GetImageFromArray(jac)
    jac_img.CopyInformation(fixed)

    inv_on_fixed = sitk.InvertDisplacementField(sitk.Image(disp), maximumNumberOfIterations=20,
                                                enforceBoundaryCondition=False)
    paths = {"fixed": os.path.join(base, os.path.basename(out_dir) + "_fixed.nii.gz"),
             "moving": os.path.join(base, os.path.basename(out_dir) + "_moving.nii.gz")}
    sitk.WriteImage(fixed, paths["fixed"])
    sitk.WriteImage(moving, paths["moving"])
    if composite:
        inv = sitk.CompositeTransform(3)
        inv.AddTransform(sitk.DisplacementFieldTransform(inv_on_fixed))   # w, in fixed space: applied second
        inv.AddTransform(A.GetInverse())                                   # A^-1 first
        sitk.WriteTransform(T, os.path.join(out_dir, "transform.h5"))
        sitk.WriteTransform(inv, os.path.join(out_dir, "inverse.h5"))
    else:
        inv_on_moving = sitk.Resample(inv_on_fixed, moving, sitk.Transform(), sitk.sitkLinear, 0.0,
                                      sitk.sitkVectorFloat64)
        sitk.WriteTransform(sitk.DisplacementFieldTransform(sitk.Image(disp)), os.path.join(out_dir, "transform.h5"))
        sitk.WriteTransform(sitk.DisplacementFieldTransform(inv_on_moving), os.path.join(out_dir, "inverse.h5"))
    sitk.WriteImage(jac_img, os.path.join(out_dir, "jacobian.nii.gz"))
    sitk.WriteImage(warped, os.path.join(out_dir, "warped.nii.gz"))
    moved = (physical_points(fixed) + u) @ a_lin.T + a_off            # grid vertices moved by the whole T
    n_lines = write_grid_vtk(os.path.join(out_dir, "grid.vtk"), fixed, moved - physical_points(fixed), jac)
    n_fold = int((jac <= 0).sum())
    report = {
        "method": method, "method_options": {"iterations": 0},
        "model": {"id": "synthetic-test", "version": "0.0.1", "sha256": "ab" * 32},
        "device": "cpu",
        "inputs": {"fixed": {"path": paths["fixed"], "geometry": {}}, "moving": {"path": paths["moving"], "geometry": {}}},
        "preprocessing": {}, "initial_alignment": {"kind": "none"},
        "timings_s": {"load": 0.1, "register": 1.0, "write": 0.2, "total": 1.3},
        "peak_memory_mb": {"cpu": 100.0, "gpu": None},
        "folds": {"percent_folded": 100.0 * n_fold / jac.size, "percent_folded_foreground": 0.0, "num_folded": n_fold,
                  "min_det": float(jac.min()), "max_det": float(jac.max()), "std_log_det": 0.1},
        "dice": {"before": {"mean": 0.5, "per_label": {"1": 0.4, "2": 0.6}},
                 "after": {"mean": 0.8, "per_label": {"1": 0.75, "2": 0.85}}},
        "tre_mm": {"before": {"mean": 4.0, "max": 6.0, "per_point": [2.0, 4.0, 6.0]},
                   "after": {"mean": 1.0, "max": 1.5, "per_point": [0.5, 1.0, 1.5]}},
        "files": {"transform": "transform.h5", "inverse": "inverse.h5", "jacobian": "jacobian.nii.gz",
                  "grid": "grid.vtk", "warped": "warped.nii.gz"},
        "transform_chain": ("transform.h5: CompositeTransform [A, U], T(x) = A(x + u(x)), fixed LPS point -> moving "
                            "LPS point; inverse.h5: [W, A^-1]" if composite else
                            "transform.h5: fixed LPS point -> moving LPS point (displacement field on the fixed grid)"),
    }
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    return {**paths, "out_dir": out_dir, "u": u, "jac": jac, "n_fold": n_fold, "grid_lines": n_lines,
            "affine": np.vstack([np.c_[a_lin, a_off], [0, 0, 0, 1]])}


def write_engine_inputs(out_dir: str) -> dict:
    """A small fixed/moving pair for a real ``deepdiffreg register`` run: 40x40x36 oblique fixed grid (1 mm),
    moving on a different grid (rotated, anisotropic), related by a known smooth displacement (< 2.5 mm).
    Blob-like anatomy so that NCC-based methods converge in a few dozen iterations."""
    os.makedirs(out_dir, exist_ok=True)
    D = rot("z", 20) @ rot("x", 10)
    fx = make_image((40, 40, 36), (1.0, 1.0, 1.0), (-20.0, -18.0, -16.0), D)
    pts = physical_points(fx)
    c = pts.reshape(-1, 3).mean(0)
    r = pts - c
    u = np.stack([2.0 * np.sin(r[..., 1] / 8.0), -1.5 * np.cos(r[..., 0] / 9.0),
                  1.2 * np.sin((r[..., 0] + r[..., 1]) / 10.0)], -1)

    def anatomy(p):
        x, y, z = p[..., 0] - c[0], p[..., 1] - c[1], p[..., 2] - c[2]
        return (100 * np.exp(-(x ** 2 / 150 + y ** 2 / 100 + z ** 2 / 120))
                + 30 * np.exp(-((x - 6) ** 2 + (y + 4) ** 2 + (z - 3) ** 2) / 20)
                + 20 * (np.abs(x) < 10) * (np.abs(y) < 6))

    fixed = make_image((40, 40, 36), (1.0, 1.0, 1.0), (-20.0, -18.0, -16.0), D, lambda p: anatomy(p + u))
    moving = make_image((42, 40, 38), (1.0, 1.1, 1.0), (-21.0, -22.0, -19.0), rot("z", -10), anatomy)
    paths = {"fixed": os.path.join(out_dir, "fixed.nii.gz"), "moving": os.path.join(out_dir, "moving.nii.gz")}
    sitk.WriteImage(fixed, paths["fixed"])
    sitk.WriteImage(moving, paths["moving"])
    return {**paths, "u": u}

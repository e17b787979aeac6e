"""Shared fixtures for the engine tests: a small synthetic registration pair written to disk once per session."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import SimpleITK as sitk

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from synth import blank, from_array, phantom, points_lps, run_cli, smooth_field_lps  # noqa: E402,F401  (run_cli: re-exported for tests that import it from conftest)


@pytest.fixture(scope="session")
def pair(tmp_path_factory):
    """Fixed phantom on an oblique anisotropic grid; moving = fixed deformed by a known smooth field.

    moving(T(x)) = fixed(x) with T(x) = x + u(x), so the ideal result transform (fixed → moving) is T.
    Returns a dict of file paths and the true field (LPS mm on the fixed grid).
    """
    d = tmp_path_factory.mktemp("pair")
    fixed = blank(size=(40, 44, 36), spacing=(1.5, 1.4, 1.6), origin=(-30.0, -31.0, -28.0))
    img_f, lab_f = phantom(points_lps(fixed), seed=0)
    moving = blank(size=(40, 44, 36), spacing=(1.5, 1.4, 1.6), origin=(-30.0, -31.0, -28.0))
    # Moving-space point y holds the fixed content at T⁻¹(y); sample labels of a phantom pushed by u.
    p_m = points_lps(moving)
    u_at_m = smooth_field_lps(p_m, amplitude=3.0)
    img_m, lab_m = phantom(p_m - u_at_m, seed=1)  # first-order inverse of x ↦ x + u(x); u is small and smooth
    paths = {}
    for name, arr, like in (("fixed", img_f, fixed), ("moving", img_m, moving)):
        paths[name] = str(d / f"{name}.nii.gz")
        sitk.WriteImage(from_array(arr, like), paths[name])
    for name, arr, like in (("fixed_seg", lab_f, fixed), ("moving_seg", lab_m, moving)):
        paths[name] = str(d / f"{name}.nii.gz")
        sitk.WriteImage(from_array(arr.astype(np.int16), like), paths[name])
    pts_f = np.array([[0.0, 0, 0], [6, 0, 0], [-6, 0, 0], [0, 14, -6], [10, -10, 5]])
    pts_m = pts_f + smooth_field_lps(pts_f[:, None, None, :], 3.0)[:, 0, 0, :]
    for name, pts in (("fixed_landmarks", pts_f), ("moving_landmarks", pts_m)):
        paths[name] = str(d / f"{name}.csv")
        with open(paths[name], "w") as fh:
            fh.write("Landmark,X,Y,Z\n" + "".join(f"{i},{x},{y},{z}\n" for i, (x, y, z) in enumerate(pts)))
    paths["dir"] = str(d)
    return paths

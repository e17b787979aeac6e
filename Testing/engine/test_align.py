"""Initial alignment (align.py): the same pair gives the same affine on every run, whatever SimpleITK's threads."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from deepdiffreg.align import initial_alignment

from synth import blank, from_array, phantom, points_lps


def _pair():
    fixed = blank(size=(56, 60, 48), spacing=(1.5, 1.5, 1.5), origin=(-42.0, -45.0, -36.0), direction=np.eye(3))
    img, _ = phantom(points_lps(fixed))
    moving_grid = blank(size=(56, 60, 48), spacing=(1.5, 1.5, 1.5), origin=(-40.0, -44.0, -37.0), direction=np.eye(3))
    # moving = fixed anatomy rotated 6° about z and shifted 3 mm: sample the phantom at the rotated points
    c, s = np.cos(np.radians(6)), np.sin(np.radians(6))
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    mimg, _ = phantom(points_lps(moving_grid) @ rot.T + np.array([3.0, 0.0, 0.0]), seed=1)
    return from_array(img, fixed), from_array(mimg, moving_grid)


def test_alignment_is_reproducible_with_several_threads():
    fixed, moving = _pair()
    n = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(2)
    try:
        runs = [initial_alignment(fixed, moving) for _ in range(3)]
        assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == 2     # restored after the registration
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(n)
    params = [np.r_[t.GetMatrix(), t.GetTranslation(), t.GetCenter()] for t in runs]
    for p in params[1:]:
        np.testing.assert_array_equal(p, params[0])
    # and it is the right affine: a fixed point maps where the moving anatomy is (moving = phantom(R·x + t))
    x = np.array([5.0, -8.0, 4.0])
    rot = np.array([[np.cos(np.radians(6)), -np.sin(np.radians(6)), 0], [np.sin(np.radians(6)), np.cos(np.radians(6)), 0],
                    [0, 0, 1.0]])
    want = np.linalg.solve(rot, x - np.array([3.0, 0.0, 0.0]))
    assert np.linalg.norm(np.asarray(runs[0].TransformPoint(x.tolist())) - want) < 1.0

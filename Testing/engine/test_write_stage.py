"""Pieces of the pipeline's write stage that were made cheaper must give the numbers the straightforward way gives."""
import numpy as np
import SimpleITK as sitk

from deepdiffreg.metrics import fold_stats
from deepdiffreg.pipeline import _fold_region
from deepdiffreg.preprocess import foreground_mask
from synth import blank, from_array, phantom, points_lps


def _head():
    img = blank(size=(40, 44, 36), spacing=(1.5, 1.4, 1.6), origin=(-30.0, -31.0, -28.0))
    return from_array(phantom(points_lps(img), seed=0)[0], img)


def test_fold_statistics_without_folds_need_no_foreground_mask():
    fixed = _head()
    det = np.random.default_rng(0).uniform(0.2, 3.0, fixed.GetSize()[::-1]).astype(np.float32)
    assert _fold_region(det, fixed, None) is None                      # the automatic mask is not computed
    mask = sitk.GetArrayFromImage(foreground_mask(fixed))
    assert fold_stats(det, None) == fold_stats(det, mask)               # and every number is the same without it


def test_fold_statistics_with_folds_use_the_automatic_foreground_or_the_users_mask():
    fixed = _head()
    det = np.ones(fixed.GetSize()[::-1], np.float32)
    det[20, 22, 18] = -0.5                                             # one fold inside the head, one outside
    det[0, 0, 0] = -0.1
    region = _fold_region(det, fixed, None)
    fg = sitk.GetArrayFromImage(region)
    assert np.array_equal(fg, sitk.GetArrayFromImage(foreground_mask(fixed)))
    assert fg[20, 22, 18] == 1 and fg[0, 0, 0] == 0
    stats = fold_stats(det, fg)
    assert stats["num_folded"] == 2 and np.isclose(stats["percent_folded_foreground"], 100.0 / fg.sum())
    user = sitk.Cast(fixed > 1e9, sitk.sitkUInt8) + 1                  # all ones
    assert _fold_region(det, fixed, user) is user

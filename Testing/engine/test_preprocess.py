"""Anti-aliased downsampling (preprocess.smooth_for_downsampling): block means + the remaining Gaussian give what the
full-resolution Gaussian gave, on every voxel of the coarse working grid, borders included."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from deepdiffreg.preprocess import resample, smooth_for_downsampling, working_grid

from synth import blank, from_array, phantom, points_lps


def _gaussian_reference(image: sitk.Image, target: float) -> sitk.Image:
    """The full-resolution Gaussian the block means stand in for (σ² = (target² − spacing²)/2.355²)."""
    sigma = [max((target ** 2 - s ** 2) ** 0.5 / 2.355, 0.01 * s) for s in image.GetSpacing()]
    return sitk.SmoothingRecursiveGaussian(image, sigma)


@pytest.mark.parametrize("target", [1.99, 3.0, 4.0])   # 1.99: a working grid's "2 mm" spans the box exactly
def test_block_mean_downsampling_matches_the_full_gaussian(target):
    # 1 mm oblique grid whose sizes are not multiples of 2, 3 or 4 (the padding path)
    fixed = blank(size=(61, 67, 53), spacing=(1.0, 1.0, 1.0), origin=(-30.0, -36.0, -24.0))
    img, _ = phantom(points_lps(fixed))
    image = from_array(img.astype(np.float32) + 50.0, fixed)   # background 50: a zero border would show
    geom = working_grid(image, target)
    fast = sitk.GetArrayFromImage(resample(smooth_for_downsampling(image, target), geom))
    ref = sitk.GetArrayFromImage(resample(_gaussian_reference(image, target), geom))
    span = float(img.max() - img.min())
    assert smooth_for_downsampling(image, target).GetSize() != image.GetSize()    # it did shrink first
    # every working-grid voxel is read from the image: no zero border from a block grid that stops short (the
    # border samples lie up to half a block outside the block centres, where the edge block's mean is read)
    border = np.zeros(ref.shape, bool)
    border[[0, -1]] = border[:, [0, -1]] = border[:, :, [0, -1]] = True
    assert ref.min() > 40 and (fast[border] > 0.5 * ref[border]).all()
    # the blur is the same to a few per cent of the intensity range (a box is not a Gaussian: the phantom's sharp
    # label edges differ most)
    assert np.abs(fast - ref).mean() < 0.01 * span and np.abs(fast - ref)[~border].max() < 0.1 * span

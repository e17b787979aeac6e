"""What "the numbers ITK's Resample gives, to float32 rounding" means in the tests of the written images.

The write stage samples the moving images at T(x) from float32 continuous indices (deepdiffreg.sampling), ITK's
Resample in double: linear values then differ by ~1e-5 voxel times the local gradient, and a nearest-neighbour
label can differ only where T(x) lies within ~1e-5 voxel of a half-integer, a tie between two voxels."""
import numpy as np
import SimpleITK as sitk


def on_fixed(t, fixed):
    """(K, J, I, 3) T(x) − x at the fixed voxels, LPS mm (pipeline.displacement_on_grid)."""
    from deepdiffreg.pipeline import displacement_on_grid
    return sitk.GetArrayFromImage(displacement_on_grid([t], fixed))


def near_tie(t, fixed, image, tol=1e-4):
    """(K, J, I) bool: fixed voxels whose T(x), in ``image``'s continuous index (float64), lies within ``tol`` of a
    half-integer on some axis — where nearest neighbour may pick either voxel from float32 positions."""
    from deepdiffreg.frames import Geometry
    fg, mg = Geometry.of(fixed), Geometry.of(image)
    k, j, i = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in fg.shape_kji), indexing="ij")
    m = fg.lps_from_ijk_matrix()
    y = np.stack([i, j, k], -1) @ m[:3, :3].T + m[:3, 3] + on_fixed(t, fixed)
    inv = np.linalg.inv(mg.lps_from_ijk_matrix())
    p = y @ inv[:3, :3].T + inv[:3, 3]
    return (np.abs(p - np.floor(p) - 0.5) < tol).any(axis=-1)


def assert_itk_numbers(got, want, t, fixed, image, interp):
    """``got`` is what sitk.Resample(image, fixed, t, interp) gave (``want``) to float32 rounding: linear values
    within 1e-5 of the image's largest magnitude, nearest-neighbour labels equal except at near-ties
    (``near_tie``), which must be rare."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    if interp == sitk.sitkLinear:
        scale = max(float(np.abs(sitk.GetArrayViewFromImage(image)).max()), 1.0)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale)
    else:
        differ = got != want
        if differ.any():
            assert not (differ & ~near_tie(t, fixed, image)).any() and differ.mean() < 1e-3

"""Pieces of the pipeline's write stage that were made cheaper must give the numbers the straightforward way gives."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from deepdiffreg.metrics import fold_stats
from deepdiffreg.pipeline import _FoldRegion
from deepdiffreg.preprocess import foreground_mask
from itk_numbers import assert_itk_numbers, on_fixed as _on_fixed
from synth import blank, from_array, phantom, points_lps


def _head():
    img = blank(size=(40, 44, 36), spacing=(1.5, 1.4, 1.6), origin=(-30.0, -31.0, -28.0))
    return from_array(phantom(points_lps(img), seed=0)[0], img)


def _fold_region(det, fixed, user_fg, spare_core=False):
    region = _FoldRegion(fixed, user_fg, spare_core)
    try:
        return region.for_det(det)
    finally:
        region.close()


@pytest.mark.parametrize("spare_core", [False, True])
def test_fold_statistics_without_folds_need_no_foreground_mask(spare_core):
    fixed = _head()
    det = np.random.default_rng(0).uniform(0.2, 3.0, fixed.GetSize()[::-1]).astype(np.float32)
    assert _fold_region(det, fixed, None, spare_core) is None           # no mask used (with no spare core: made)
    mask = sitk.GetArrayFromImage(foreground_mask(fixed))
    assert fold_stats(det, None) == fold_stats(det, mask)               # and every number is the same without it


@pytest.mark.parametrize("spare_core", [False, True])
def test_fold_statistics_with_folds_use_the_automatic_foreground_or_the_users_mask(spare_core):
    """The mask made beside the registration (a helper thread, ``spare_core``) is the one made when needed."""
    fixed = _head()
    det = np.ones(fixed.GetSize()[::-1], np.float32)
    det[20, 22, 18] = -0.5                                             # one fold inside the head, one outside
    det[0, 0, 0] = -0.1
    region = _fold_region(det, fixed, None, spare_core)
    fg = sitk.GetArrayFromImage(region)
    assert np.array_equal(fg, sitk.GetArrayFromImage(foreground_mask(fixed)))
    assert fg[20, 22, 18] == 1 and fg[0, 0, 0] == 0
    stats = fold_stats(det, fg)
    assert stats["num_folded"] == 2 and np.isclose(stats["percent_folded_foreground"], 100.0 / fg.sum())
    user = sitk.Cast(fixed > 1e9, sitk.sitkUInt8) + 1                  # all ones
    assert _fold_region(det, fixed, user, spare_core) is user


def test_fold_mask_thread_is_joined_when_the_run_fails():
    """A run that fails after the helper started (here: the method's estimate) leaves no thread behind."""
    import threading
    fixed = _head()
    region = _FoldRegion(fixed, None, spare_core=True)
    try:
        raise RuntimeError("the method failed")
    except RuntimeError:
        pass
    finally:
        region.close()
    assert not any(t.name == "deepdiffreg-fold-mask" for t in threading.enumerate())


# -- the field grid: --field-grid fixed is today's writer; working gives the same T at every fixed voxel ----------
def _compose_case():
    """A 2 mm working field (with an inverse and a map) on an oblique anisotropic 1–1.5 mm fixed grid, an affine
    initial alignment, and the pair — the inputs of compose_result."""
    import torch
    from deepdiffreg.frames import Geometry, vox_from_lps_disp
    from deepdiffreg.methods.base import FieldEstimate, Map
    from deepdiffreg.preprocess import working_grid
    from synth import smooth_field_lps
    fixed = blank(size=(34, 30, 26), spacing=(1.0, 1.2, 1.5))
    fixed = from_array(phantom(points_lps(fixed), seed=0)[0], fixed)
    moving = blank(size=(36, 32, 28), spacing=(1.1, 1.1, 1.3), origin=(-22.0, -16.0, -12.0))
    moving = from_array(phantom(points_lps(moving), seed=1)[0], moving)
    moving_seg = sitk.Cast(moving > 60, sitk.sitkUInt8)
    work = working_grid(fixed, 2.0)
    p = points_lps(work.reference_image())
    u = smooth_field_lps(p, amplitude=3.0)
    w = -0.9 * smooth_field_lps(p, amplitude=3.0)
    tensor = lambda a: torch.from_numpy(vox_from_lps_disp(a, work).astype(np.float32))[None]  # noqa: E731
    unc = torch.from_numpy(np.abs(u[..., 0]).astype(np.float32))[None, None]
    est = FieldEstimate(disp_vox=tensor(u), inverse_disp_vox=tensor(w), maps={"uncertainty": Map(unc, "mm")})
    align = sitk.AffineTransform(3)
    align.SetMatrix((1.03, 0.02, 0.0, -0.01, 0.98, 0.03, 0.0, 0.01, 1.01))
    align.SetTranslation((1.5, -2.0, 0.7))
    align.SetCenter((1.0, 2.0, -1.0))
    return est, work, align, fixed, moving, moving_seg, Geometry


def _old_compose(est, work, align, fixed, moving, moving_seg, Geometry):
    """What compose_result computed before the field grid was chosen for the field: the tapered working field
    resampled (float64, ITK) onto the padded fixed grid, the float64 Jacobian and the grid lines of that whole
    array, warped images through [A, U]."""
    import math
    import torch
    from deepdiffreg.compose import composite, padded_geometry, sample_field, taper_lengths_mm, tapered_field
    from deepdiffreg.frames import displacement_image, lps_from_vox_disp
    from deepdiffreg.io.result_writer import deformation_grid_lines
    from deepdiffreg.metrics import jacobian_det_lps
    fg = Geometry.of(fixed)
    u_w = lps_from_vox_disp(est.disp_vox.double()[0].numpy(), work)
    padded, pgeom, n = tapered_field(u_w, work, taper_lengths_mm(u_w, work))
    src = sitk.DisplacementFieldTransform(displacement_image(padded, pgeom))
    pad = tuple(math.ceil(k * hs / hf - 1e-9) + 1 for k, hs, hf in zip(n, work.spacing_ijk, fg.spacing_ijk))
    field = sample_field(src, padded_geometry(fg, pad))
    arr = sitk.GetArrayFromImage(field)
    pk, pj, pi = pad[::-1]
    inner = arr[pk:-pk, pj:-pj, pi:-pi]
    m = np.eye(4)
    m[:3, :3] = np.asarray(align.GetMatrix()).reshape(3, 3)
    m[:3, 3] = np.asarray(align.GetTranslation()) + np.asarray(align.GetCenter()) - m[:3, :3] @ align.GetCenter()
    det = jacobian_det_lps(inner, fg, dtype=torch.float64) * np.linalg.det(m[:3, :3])
    lines = deformation_grid_lines(inner, fg, det.astype(np.float32), affine_lps=m)
    size = field.GetSize()
    T = composite(align, sitk.DisplacementFieldTransform(field))       # takes the field's buffer
    return {"T": T, "field_size": size, "det": det, "grid": lines,
            "warped": sitk.GetArrayFromImage(sitk.Resample(moving, fixed, T, sitk.sitkLinear, 0.0, sitk.sitkFloat32)),
            "seg": sitk.GetArrayFromImage(sitk.Resample(moving_seg, fixed, T, sitk.sitkNearestNeighbor, 0))}


def test_field_grid_fixed_is_the_old_writer_and_working_the_same_T_at_every_fixed_voxel(tmp_path):
    from deepdiffreg.compose import compose_result
    from deepdiffreg.io.result_writer import AtomicResultDir, write_result
    case = _compose_case()
    est, work, align, fixed, moving, moving_seg, Geometry = case
    old = _old_compose(*case)
    got = {g: compose_result(est, work, align, fixed, moving, moving_seg, field_grid=g) for g in ("fixed", "working")}
    new = got["fixed"].data
    # --field-grid fixed: the old writer's field, Jacobian, grid and warped images (float32 precision)
    assert got["fixed"].chain["field_grid"]["size"] == list(old["field_size"])
    np.testing.assert_allclose(_on_fixed(new.transform, fixed), _on_fixed(old["T"], fixed), atol=1e-12)
    np.testing.assert_allclose(new.jacobian, old["det"], rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(new.grid.points, old["grid"].points, atol=1e-9)
    np.testing.assert_allclose(new.grid.values, old["grid"].values, rtol=2e-6, atol=2e-6)
    assert_itk_numbers(sitk.GetArrayFromImage(new.warped), old["warped"], old["T"], fixed, moving, sitk.sitkLinear)
    assert_itk_numbers(sitk.GetArrayFromImage(new.warped_seg), old["seg"], old["T"], fixed, moving_seg,
                        sitk.sitkNearestNeighbor)
    # --field-grid working: u stored on the padded working grid (no value resampled), the same T at every fixed
    # voxel, hence the same Jacobian, grid and warped images
    wk = got["working"].data
    chain = got["working"].chain
    assert chain["field_grid"]["spacing"] == list(work.spacing_ijk) and chain["field_grid_option"] == "working"
    assert np.prod(chain["field_grid"]["size"]) < np.prod(old["field_size"]) / 4
    np.testing.assert_allclose(_on_fixed(wk.transform, fixed), _on_fixed(old["T"], fixed), atol=1e-9)
    np.testing.assert_allclose(wk.jacobian, old["det"], rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(wk.grid.points, old["grid"].points, atol=1e-7)
    assert_itk_numbers(sitk.GetArrayFromImage(wk.warped), old["warped"], old["T"], fixed, moving, sitk.sitkLinear)
    assert_itk_numbers(sitk.GetArrayFromImage(wk.warped_seg), old["seg"], old["T"], fixed, moving_seg,
                        sitk.sitkNearestNeighbor)
    assert got["working"].folds == pytest.approx(got["fixed"].folds, rel=1e-5)
    # between the fixed voxels the two files differ by the second interpolation of the full-res one only
    rng = np.random.default_rng(0)
    idx = rng.uniform(0, np.asarray(fixed.GetSize()) - 1, (400, 3))
    pts = [fixed.TransformContinuousIndexToPhysicalPoint(p.tolist()) for p in idx]
    diff = [np.subtract(wk.transform.TransformPoint(p), new.transform.TransformPoint(p)) for p in pts]
    assert 0 < np.abs(diff).max() < 0.1
    # and the written transform file is that much smaller
    sizes = {}
    for g, c in got.items():
        out = tmp_path / g
        write_result(AtomicResultDir(str(out)), c.data, {"method": "test"})
        sizes[g] = (out / "transform.h5").stat().st_size
    assert sizes["working"] < sizes["fixed"] / 4


def _stored_field_case():
    """_compose_case's field as the written transform stores it (tapered, on the padded working grid): the
    displacement transform U, u at the fixed voxels as ITK reads it (FieldOnGrid), and the case's images."""
    from deepdiffreg.compose import FieldOnGrid, taper_lengths_mm, tapered_field
    from deepdiffreg.frames import displacement_image, lps_from_vox_disp
    est, work, align, fixed, moving, moving_seg, Geometry = _compose_case()
    fg = Geometry.of(fixed)
    u_w = lps_from_vox_disp(est.disp_vox.double()[0].numpy(), work)
    padded, pgeom, _ = tapered_field(u_w, work, taper_lengths_mm(u_w, work))
    U = sitk.DisplacementFieldTransform(displacement_image(padded, pgeom))
    field = FieldOnGrid(sitk.GetArrayViewFromImage(U.GetDisplacementField()), pgeom, fg)
    return U, field, align, fixed, moving, moving_seg, fg


def test_warp_images_give_what_resample_through_the_composite_gives():
    """The warped images are made from T − x computed once per voxel (compose.warp_images); they must be the
    numbers sitk.Resample through [A, U] gives, for float and integer images, linear and nearest neighbour, with
    the field read from the working grid (FieldOnGrid) or given on the fixed grid."""
    import torch
    from deepdiffreg.align import affine_matrix
    from deepdiffreg.compose import composite, warp_images
    from deepdiffreg.frames import Geometry
    U, field, align, fixed, moving, moving_seg, fg = _stored_field_case()
    T = composite(sitk.AffineTransform(align), U)
    images = [(moving, sitk.sitkLinear), (sitk.Cast(moving * 3.7, sitk.sitkInt16), sitk.sitkLinear),
              (sitk.Cast(moving, sitk.sitkFloat64), sitk.sitkLinear), (moving_seg, sitk.sitkNearestNeighbor),
              (sitk.Cast(moving * 0.2, sitk.sitkInt32), sitk.sitkNearestNeighbor)]
    on_fixed = np.stack([field.planes(k, k + 1, torch.float64)[0] for k in range(fg.shape_kji[0])])
    for disp in (field, on_fixed):
        got = warp_images(images, fg, disp, affine_matrix(align))
        for (image, interp), g in zip(images, got):
            want = sitk.Resample(image, fixed, T, interp, 0.0,
                                 sitk.sitkFloat32 if interp == sitk.sitkLinear else image.GetPixelID())
            assert g.GetPixelID() == want.GetPixelID() and Geometry.of(g) == fg
            assert_itk_numbers(sitk.GetArrayFromImage(g), sitk.GetArrayFromImage(want), T, fixed, image, interp)


def test_slab_warp_slabs_taken_in_order_may_be_sampled_in_any_order_on_any_thread():
    """SlabWarp.take (in order; overlapping slabs give each plane once) then sample (reversed here) gives the
    images warp_images gives; _ReadOnce, the Jacobian pass's reader, samples the slabs its helper has not started
    on the calling thread and gives the same images."""
    import threading
    import time

    from deepdiffreg.align import affine_matrix
    from deepdiffreg.compose import SlabWarp, _ReadOnce, warp_images
    U, field, align, fixed, moving, moving_seg, fg = _stored_field_case()
    images, m_a = [(moving, sitk.sitkLinear), (moving_seg, sitk.sitkNearestNeighbor)], affine_matrix(align)
    want = [sitk.GetArrayFromImage(g) for g in warp_images(images, fg, field, m_a)]
    n_k = fg.shape_kji[0]
    assert n_k >= 6
    bounds = [(0, 3), (1, 5), (5, n_k)]                 # overlapping slabs, as the Jacobian's halo reads them
    warp = SlabWarp(images, fg, m_a)
    parts = [warp.take(k0, field.planes(k0, k1)) for k0, k1 in bounds]
    assert [(k0, len(u)) for k0, u in parts] == [(0, 3), (3, 2), (5, n_k - 5)]
    with pytest.raises(ValueError, match="0 of"):
        warp.result()                                   # taken but not sampled
    for part in reversed(parts):
        warp.sample(*part)
    assert [np.array_equal(sitk.GetArrayFromImage(g), w) for g, w in zip(warp.result(), want)] == [True, True]

    threads = []
    slow = SlabWarp(images, fg, m_a)
    sample = slow.sample

    def slow_sample(k0, u):                            # the helper is slow: the caller must take over
        threads.append(threading.current_thread().name)
        if threading.current_thread() is not threading.main_thread():
            time.sleep(0.2)
        sample(k0, u)
    slow.sample = slow_sample
    read = _ReadOnce(field, slow)
    try:
        for k in range(n_k):
            read.planes(k, k + 1)
        got = read.warped()
    finally:
        read.close()
    assert [np.array_equal(sitk.GetArrayFromImage(g), w) for g, w in zip(got, want)] == [True, True]
    assert len(threads) == n_k and "MainThread" in threads and any(t.startswith("deepdiffreg-warp") for t in threads)


def test_itk_sampler_is_resample_at_the_border_outside_and_at_ties():
    """sampling.ItkSampler against sitk.Resample through affine transforms that put samples in the half-voxel
    margin around the image, beyond it, and exactly on half-integer positions (nearest neighbour: round half up),
    on an oblique anisotropic image, for linear and nearest neighbour, float and integer pixels."""
    import torch
    from deepdiffreg.frames import Geometry
    from deepdiffreg.sampling import ItkSampler
    rng = np.random.default_rng(5)
    image = sitk.GetImageFromArray(rng.random((9, 11, 13)).astype(np.float32) * 100)
    image.SetSpacing((1.0, 1.5, 2.0))
    image.SetOrigin((3.0, -2.0, 1.0))
    image.SetDirection(sitk.VersorTransform((0.2, 0.3, 0.9), 0.4).GetMatrix())
    labels = sitk.Cast(image * 0.3, sitk.sitkInt16)
    mg = Geometry.of(image)
    # the fixed grid: the image's own grid, one voxel larger on every side, shifted by half a voxel along i (ties)
    ref = sitk.Image([n + 2 for n in image.GetSize()], sitk.sitkFloat32)
    ref.SetSpacing(image.GetSpacing())
    ref.SetDirection(image.GetDirection())
    ref.SetOrigin(tuple(np.asarray(mg.origin_lps) + mg.direction @ (np.asarray(mg.spacing_ijk) * [-0.5, -1, -1])))
    fg = Geometry.of(ref)
    k, j, i = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in fg.shape_kji), indexing="ij")
    x = np.stack([i, j, k], -1) @ fg.lps_from_ijk_matrix()[:3, :3].T + fg.lps_from_ijk_matrix()[:3, 3]
    for scale in (1.0, 1.07):                            # the tie grid, and a slight zoom (margin, outside)
        t = sitk.AffineTransform(3)
        t.SetMatrix(tuple((np.eye(3) * scale).ravel()))
        t.SetCenter(tuple(float(c) for c in x.reshape(-1, 3).mean(0)))
        y = np.stack([np.asarray(t.TransformPoint(tuple(v))) for v in x.reshape(-1, 3)]).reshape(x.shape)
        inv = np.linalg.inv(mg.lps_from_ijk_matrix())
        p64 = y @ inv[:3, :3].T + inv[:3, 3]
        p = torch.from_numpy(p64.astype(np.float32))
        # on the buffer's edge (p = −0.5 or n − 0.5 exactly) inside or outside is decided by rounding, ITK's too
        edge = np.zeros(p64.shape[:3], bool)
        for a, n in enumerate(image.GetSize()):
            edge |= (np.abs(p64[..., a] + 0.5) < 1e-4) | (np.abs(p64[..., a] - (n - 0.5)) < 1e-4)
        assert (scale == 1.0) == edge.any()
        for img, interp in ((image, sitk.sitkLinear), (labels, sitk.sitkLinear), (labels, sitk.sitkNearestNeighbor)):
            want = sitk.GetArrayFromImage(sitk.Resample(img, ref, t, interp, 0.0, sitk.sitkFloat32
                                                        if interp == sitk.sitkLinear else img.GetPixelID()))
            got = ItkSampler(img, interp).sample(p)
            assert got.dtype == want.dtype
            if interp == sitk.sitkLinear:
                np.testing.assert_allclose(got[~edge], want[~edge], rtol=0, atol=1e-3)
            else:   # a position on a half-integer is a tie that rounding decides (ITK's double too)
                tie = edge | (np.abs(p64 - np.floor(p64) - 0.5) < 1e-4).any(axis=-1)
                assert scale != 1.0 or tie[~edge].any()          # the tie grid has ties
                assert np.array_equal(got[~tie], want[~tie])
        inside = ItkSampler(image, sitk.sitkLinear).inside(p).numpy()
        assert inside.any() and not inside.all()          # both sides of the margin were sampled
    # ties themselves, at exact float32 positions: round half up, and the margin's ends (−0.5 in, n − 0.5 out)
    n_i, n_j, n_k = image.GetSize()
    arr = sitk.GetArrayViewFromImage(labels)
    exact = torch.tensor([[2.5, 3.5, 1.5], [-0.5, 0.0, 0.0], [n_i - 0.5, 0.0, 0.0], [n_i - 0.51, n_j - 0.5001, 0.0]])
    got = ItkSampler(labels, sitk.sitkNearestNeighbor).sample(exact)
    assert got.tolist() == [arr[2, 4, 3], arr[0, 0, 0], 0, arr[0, n_j - 1, n_i - 1]]


@pytest.mark.parametrize("values, dtype", [
    ([0, 1, 2, 3, 4, 5], np.int16),                  # the joint bincount over raw values (a brain's labels)
    ([0, 1, 2, 3, 4, 5], np.uint8),
    ([-3, 0, 1, 2, 4, 5], np.int32),                 # negative values: the joint bins are offset
    ([0, 1, 2, 3, 4, 5000], np.int32),               # over _JOINT_SPAN: a lookup table over the labels
    ([0, 1, 2, 3, 4, 3_000_000], np.int64),          # over 2^20: a search
    ([0, 1, 2, 3, 4, 5], np.uint64),                 # not castable to intp: the lookup table
    ([0, 1, 2, 3, 4, 5], np.float32),                # float label maps: the lookup table (values truncated)
])
def test_dice_of_several_warped_segmentations_at_once_is_dice_of_each(values, dtype):
    """evaluate_transforms counts before / initial alignment / after in one pass over the fixed labels
    (metrics.dice_per_label_many); every label's Dice must be its definition, 2|A∩B| / (|A| + |B|), also for labels
    missing from a warped segmentation (0) and a label of the list absent from both (nan), whichever way the
    values are counted (joint bincount, lookup table, search)."""
    from deepdiffreg.metrics import dice_per_label, dice_per_label_many
    rng = np.random.default_rng(3)
    fixed = np.asarray(values)[rng.integers(0, len(values), (20, 22, 18))].astype(dtype)
    warped = [np.roll(fixed, s, axis=0) for s in (0, 1, 3)] + [np.zeros_like(fixed)]
    warped[2][:2] = 7                                # a value the fixed segmentation does not have
    labels = [v for v in values if v != 0] + [9]
    many = dice_per_label_many(fixed, warped, labels)
    for w, got in zip(warped, many):
        assert set(got) == set(labels) and set(dice_per_label(fixed, w, labels)) == set(labels)
        for lab in labels:                           # the definition, label by label
            a, b = fixed == lab, w == lab
            want = 2.0 * (a & b).sum() / (a.sum() + b.sum()) if a.sum() + b.sum() else float("nan")
            assert (np.isnan(got[lab]) and np.isnan(want)) or np.isclose(got[lab], want, rtol=0, atol=1e-12)
    assert many[0][values[3]] == 1.0 and many[3][values[3]] == 0.0 and np.isnan(many[0][9])
    assert all(0 < many[1][lab] < 1 for lab in labels[:-1])
    with pytest.raises(ValueError):
        dice_per_label_many(fixed, [fixed[:5]], labels)


def test_maps_on_the_fixed_grid_are_what_resample_gives():
    """compose.map_on_fixed reads a working-grid map as FieldOnGrid reads a field; it must give sitk.Resample's
    linear numbers (float32 rounding), on the oblique anisotropic case and on a working grid that does not span
    the fixed voxels (there it is Resample itself)."""
    from deepdiffreg.compose import map_on_fixed
    from deepdiffreg.preprocess import resample
    est, work, align, fixed, moving, moving_seg, Geometry = _compose_case()
    fg = Geometry.of(fixed)
    arr = np.random.default_rng(3).random(work.shape_kji).astype(np.float32) * 5
    want = lambda g: sitk.GetArrayFromImage(resample(g.apply_to(sitk.GetImageFromArray(arr)), fg))  # noqa: E731
    got = map_on_fixed(arr, work, fg)
    assert got.GetPixelID() == sitk.sitkFloat32 and Geometry.of(got) == fg
    np.testing.assert_allclose(sitk.GetArrayFromImage(got), want(work), rtol=0, atol=5e-6)
    shifted = Geometry((work.origin_lps[0] + 3.0,) + tuple(work.origin_lps[1:]), work.spacing_ijk,
                       work.direction_lps, work.size_ijk)        # fixed voxels beyond its first node: not covered
    np.testing.assert_array_equal(sitk.GetArrayFromImage(map_on_fixed(arr, shifted, fg)), want(shifted))


def test_field_on_grid_planes_are_itk_s_displacement_field_reading_also_outside_the_source():
    """FieldOnGrid.planes (gathers along i and j, one lerp of two source planes per target k-plane) against ITK's
    DisplacementFieldTransform at the target voxels, for a source grid that covers only part of the target: zero
    displacement outside it, which is ITK's reading when the field's outer layer is zero (the tapered field's;
    ITK clamps to the edge value up to half a voxel beyond the last node))."""
    import torch
    from deepdiffreg.compose import FieldOnGrid, sample_field
    from deepdiffreg.frames import Geometry, displacement_image
    fixed = blank(size=(34, 30, 26), spacing=(1.0, 1.2, 1.5))
    fg = Geometry.of(fixed)
    src = Geometry(tuple(np.asarray(fg.origin_lps) + fg.direction @ np.array([4.3, -3.1, 5.2])), (2.0, 1.9, 2.1),
                   fg.direction_lps, (12, 14, 9))
    u = np.random.default_rng(4).standard_normal(src.shape_kji + (3,))
    u[[0, -1]] = 0; u[:, [0, -1]] = 0; u[:, :, [0, -1]] = 0      # zero outer layer, as the tapered field has
    want = sitk.GetArrayFromImage(sample_field(sitk.DisplacementFieldTransform(displacement_image(u, src)), fg))
    read = FieldOnGrid(u, src, fg)
    assert not read.covers_target
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        got = np.concatenate([read.planes(k, min(k + 5, fg.shape_kji[0]), dtype) for k in range(0, fg.shape_kji[0], 5)])
        np.testing.assert_allclose(got, want, rtol=0, atol=tol)
    assert (want == 0).all(axis=-1).any() and not (want == 0).all()


_REUSE_PROBE = r"""
import json, resource, sys
import numpy as np
took = False
if sys.argv[1] == "keep":
    from deepdiffreg.cli import keep_freed_memory
    took = keep_freed_memory()
faults = []
for _ in range(3):               # five 20 MB arrays alive at once, then freed: a write stage's pattern
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    arrays = [np.ones(20 << 20, np.uint8) for _ in range(5)]
    del arrays
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(json.dumps({"took": took, "faults": faults}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_keep_freed_memory_lets_the_next_arrays_reuse_pages_instead_of_faulting_them_in_again():
    def probe(mode):
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        out = subprocess.run([sys.executable, "-c", _REUSE_PROBE, mode], capture_output=True, text=True, env=env,
                             check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])
    default, kept = probe("default"), probe("keep")
    if not kept["took"]:
        pytest.skip("not glibc: keep_freed_memory() is a no-op here")
    # 100 MB are 25,600 pages: with the heap kept, the second and third rounds find them all mapped already
    assert max(kept["faults"][1:]) < 100, kept
    # the default trims the heap on free (more than 2x its mmap threshold is free at its top) and faults them again
    assert min(default["faults"][1:]) > 10 * max(1, max(kept["faults"][1:])), (default, kept)


def test_keep_freed_memory_leaves_a_users_malloc_settings_alone(monkeypatch):
    from deepdiffreg.cli import keep_freed_memory
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert keep_freed_memory() is False


@pytest.mark.parametrize("size,direction,dtype", [
    ((40, 44, 36), (1, 0, 0, 0, 1, 0, 0, 0, 1), np.float32),
    ((300, 17, 5), (0, 0, -1, 1, 0, 0, 0, 1, 0), np.float32),      # a side over 255 (dim's high byte), oblique
    ((7, 9, 11), (1, 0, 0, 0, 1, 0, 0, 0, 1), np.uint8),
    ((1, 1, 1), (1, 0, 0, 0, 1, 0, 0, 0, 1), np.int16),
    ((130, 3, 2), (0, 1, 0, -1, 0, 0, 0, 0, 1), np.float64)])
def test_stored_block_maps_are_itks_nifti_bytes_in_a_gzip_stream(tmp_path, size, direction, dtype):
    """jacobian.nii.gz and uncertainty.nii.gz (``write_image(..., deflate=False)``): ITK's header of a 1x1x1 twin with
    the size patched in, then the voxels, as stored gzip blocks — byte for byte ITK's own .nii once decompressed
    (gzip checks the CRC and length), and read back by ITK with the same voxels and geometry. No file is left beside
    it."""
    import gzip
    from deepdiffreg.frames import Geometry
    from deepdiffreg.io.result_writer import write_image
    g = Geometry((1.5, -2.0, 3.25), (0.9, 1.1, 2.0), direction, size)
    a = (np.random.default_rng(0).random(size[::-1]) * 100).astype(dtype)
    img = g.apply_to(sitk.GetImageFromArray(a))
    write_image(img, str(tmp_path / "map.nii.gz"), deflate=False)
    sitk.WriteImage(img, str(tmp_path / "itk.nii"), useCompression=False)
    assert gzip.open(tmp_path / "map.nii.gz").read() == (tmp_path / "itk.nii").read_bytes()
    back = sitk.ReadImage(str(tmp_path / "map.nii.gz"))
    itk = sitk.ReadImage(str(tmp_path / "itk.nii"))          # NIfTI keeps float32 geometry: as ITK's file reads
    assert np.array_equal(sitk.GetArrayFromImage(back), a) and Geometry.of(back) == Geometry.of(itk)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["itk.nii", "map.nii.gz"]


def test_register_joins_the_fold_mask_helper_on_success_and_failure(tmp_path, monkeypatch):
    """pipeline.register with a spare core: the fold mask is made on the helper thread, beside the method; a run
    whose method fails leaves neither that thread nor a result folder behind."""
    import threading
    from affine_case import write_pair
    from deepdiffreg import pipeline
    paths = write_pair(tmp_path)
    made_on = []
    real_mask = pipeline.foreground_mask
    monkeypatch.setattr(pipeline, "spare_core", lambda: True)
    monkeypatch.setattr(pipeline, "foreground_mask",
                        lambda img: made_on.append(threading.current_thread().name) or real_mask(img))
    req = lambda out: pipeline.RegisterRequest(paths["fixed"], paths["moving"], "demons", str(out),  # noqa: E731
                                               device="cpu", align="none")
    real_estimate = pipeline._estimate

    def fail(*a, **k):
        raise RuntimeError("the method failed")
    monkeypatch.setattr(pipeline, "_estimate", fail)
    with pytest.raises(RuntimeError, match="the method failed"):
        pipeline.register(req(tmp_path / "failed"))
    assert not (tmp_path / "failed").exists()
    assert made_on == ["deepdiffreg-fold-mask"]
    assert not any(t.name == "deepdiffreg-fold-mask" for t in threading.enumerate())

    def folding(*a, **k):        # the method's field with one folded voxel: the mask is needed
        est = real_estimate(*a, **k)
        est.disp_vox[:, 0, 5, 5, 5] += 3.0
        est.disp_vox[:, 0, 6, 5, 5] -= 3.0
        return est
    monkeypatch.setattr(pipeline, "_estimate", folding)
    rep = pipeline.register(req(tmp_path / "ok"))
    assert rep["folds"]["num_folded"] > 0 and rep["folds"]["percent_folded_foreground"] is not None
    assert made_on == ["deepdiffreg-fold-mask"] * 2          # once per run, on the helper, never again in the write
    assert not any(t.name == "deepdiffreg-fold-mask" for t in threading.enumerate())


def test_threads_default_and_helpers_count_the_cores_this_process_may_use(monkeypatch):
    """--threads' default (cores − 1), the write stage's spare core and the batch plan read one count: the
    process's affinity mask (a container's or SLURM job's share), not the machine's os.cpu_count()."""
    import torch
    from deepdiffreg import cli, cores
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert cores.usable_cores() == 2 and cli.default_threads() == 1
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert cores.spare_core()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    assert cli.default_threads() == 1 and not cores.spare_core()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setenv("DEEPDIFFREG_CORES", "1")                         # a batch pair's share: no spare core
    assert cores.usable_cores() == 1 and cli.default_threads() == 1 and not cores.spare_core()
    monkeypatch.setenv("DEEPDIFFREG_CORES", "8")                         # never more than the mask
    assert cores.usable_cores() == 4
    monkeypatch.setenv("DEEPDIFFREG_CORES", "two")                       # not a count: ignored
    assert cores.usable_cores() == 4
    monkeypatch.delenv("DEEPDIFFREG_CORES")
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)      # macOS / Windows: the machine's count
    assert cores.usable_cores() == 64 and cli.default_threads() == 63


def _deferred_map_run(tmp_path, monkeypatch, fn, out="ok", fail_compose=False):
    """pipeline.register (demons on the affine case) whose estimate carries a map made by ``fn`` beside the write
    stage (base.Deferred, thread "deepdiffreg-testmap")."""
    from affine_case import write_pair
    from deepdiffreg import pipeline
    from deepdiffreg.methods.base import Deferred, Map
    paths = write_pair(tmp_path)
    real_estimate = pipeline._estimate

    def with_map(*a, **k):
        est = real_estimate(*a, **k)
        est.maps["testmap"] = Map(Deferred(fn, "testmap"), "mm", "a map made beside the write stage")
        return est
    monkeypatch.setattr(pipeline, "_estimate", with_map)
    if fail_compose:
        def broken(*a, **k):
            raise RuntimeError("composition failed")
        monkeypatch.setattr(pipeline, "compose_result", broken)
    return pipeline.register(pipeline.RegisterRequest(paths["fixed"], paths["moving"], "demons", str(tmp_path / out),
                                                      device="cpu", align="none"))


def _no_map_thread():
    import threading
    return not any(t.name.startswith("deepdiffreg-testmap") for t in threading.enumerate())


def test_a_map_made_beside_the_write_stage_is_written_and_timed(tmp_path, monkeypatch):
    """A method's map whose data is a Deferred: written like any map (here a constant on the working grid, so the
    file is that constant), its seconds and the wait for it in timings_s, its thread gone after the run."""
    import time
    import torch
    shape = {}

    def make(stop):
        time.sleep(0.3)
        return torch.full((1, 1) + shape["grid"], 2.5)
    from deepdiffreg import pipeline
    real = pipeline._working_pair

    def remember(*a, **k):
        pair, spacing, fg = real(*a, **k)
        shape["grid"] = tuple(pair.fixed.shape[2:])
        return pair, spacing, fg
    monkeypatch.setattr(pipeline, "_working_pair", remember)
    rep = _deferred_map_run(tmp_path, monkeypatch, make)
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "ok" / "testmap.nii.gz")))
    assert np.allclose(arr, 2.5) and rep["maps"]["testmap"]["unit"] == "mm"
    beside = rep["timings_s"]["maps_beside_write_parts"]
    assert beside["testmap"] >= 0.3 and 0 <= beside["testmap (waited for)"] <= beside["testmap"] + 0.05
    assert json.load(open(tmp_path / "ok" / "report.json"))["timings_s"]["maps_beside_write_parts"] == beside
    assert _no_map_thread()


def test_a_map_beside_the_write_stage_is_stopped_when_the_run_fails_and_its_error_fails_the_run(tmp_path, monkeypatch):
    """The write stage fails while the map is being made: the map's thread is told to stop and has ended when
    register raises, and no result folder is left; a map whose making fails fails the run (one error, no folder)."""
    import time
    from deepdiffreg.methods.base import Deferred
    seen = []

    def endless(stop):
        while not stop.wait(0.01):
            pass
        seen.append("stopped")
        raise Deferred.Stopped()
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="composition failed"):
        _deferred_map_run(tmp_path, monkeypatch, endless, out="failed", fail_compose=True)
    assert seen == ["stopped"] and _no_map_thread() and time.perf_counter() - t0 < 60
    assert not (tmp_path / "failed").exists()

    def broken(stop):
        raise ValueError("the map failed")
    monkeypatch.undo()                                   # the composition works again
    (tmp_path / "b").mkdir()
    with pytest.raises(ValueError, match="the map failed"):
        _deferred_map_run(tmp_path / "b", monkeypatch, broken, out="failed")
    assert _no_map_thread() and not (tmp_path / "b" / "failed").exists()

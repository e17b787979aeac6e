"""Field operations against SimpleITK on an oblique, anisotropic grid."""
import numpy as np
import SimpleITK as sitk
import torch

from deepdiffreg.field import compose, integrate_ss, invert_fixed_point, jacobian_det, resize_disp, warp
from deepdiffreg.frames import Geometry, displacement_image, lps_from_vox_disp, vox_from_lps_disp
from deepdiffreg.metrics import jacobian_det_lps

from synth import blank, from_array, points_lps, smooth_field_lps


def test_jacobian_matches_sitk_on_oblique_anisotropic_grid():
    img = blank()
    u = smooth_field_lps(points_lps(img))
    det = jacobian_det_lps(u, Geometry.of(img))
    # ITK's filter differentiates along the index axes and ignores the direction: feed it index-frame vectors.
    d = np.asarray(img.GetDirection()).reshape(3, 3)
    ref = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(
        from_array(u @ d, img, vector=True), True))
    inner = (slice(1, -1),) * 3
    assert np.abs(det[inner] - ref[inner]).max() < 1e-6
    assert det.min() > 0.5 and np.abs(det - 1).max() > 0.05  # a real, non-trivial field


def test_jacobian_slabs_and_float32_agree_with_one_float64_pass():
    """The pipeline's float32, slab-by-slab determinant is the float64 one up to float rounding, and slab edges
    (halo planes) leave no seam; the oblique, anisotropic grid keeps the frame conversion honest."""
    img = blank(size=(30, 28, 23))
    u = smooth_field_lps(points_lps(img), amplitude=4.0) + [12.0, -30.0, 7.0]   # an offset as large as an affine's
    geom = Geometry.of(img)
    whole = jacobian_det_lps(u, geom, slab=1000)
    assert np.abs(jacobian_det_lps(u, geom, slab=3) - whole).max() < 1e-13       # 23 planes: a partial last slab
    det32 = jacobian_det_lps(u, geom, dtype=torch.float32)
    assert det32.dtype == np.float32
    assert np.abs(det32 - whole).max() < 1e-5
    d = np.asarray(img.GetDirection()).reshape(3, 3)
    ref = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(from_array(u @ d, img, vector=True), True))
    inner = (slice(1, -1),) * 3
    assert np.abs(det32[inner] - ref[inner]).max() < 1e-5


def test_warp_matches_sitk_resample():
    img = blank()
    p = points_lps(img)
    moving = from_array((50 + 0.7 * p[..., 0] - 0.4 * p[..., 1] + 10 * np.sin(p[..., 2] / 5)).astype(np.float32), img)
    u = smooth_field_lps(p, amplitude=2.0)
    geom = Geometry.of(img)
    t = sitk.DisplacementFieldTransform(sitk.Cast(displacement_image(u, geom), sitk.sitkVectorFloat64))
    ref = sitk.GetArrayFromImage(sitk.Resample(moving, img, t, sitk.sitkLinear, 0.0))
    disp_vox = torch.from_numpy(vox_from_lps_disp(u, geom)).float()[None]
    out = warp(torch.from_numpy(sitk.GetArrayFromImage(moving))[None, None], disp_vox, padding="zeros")[0, 0].numpy()
    # compare where the sampled point is at least one voxel inside the moving image (borders pad differently)
    mapped = disp_vox[0].numpy() + np.stack(np.meshgrid(*[np.arange(n) for n in geom.shape_kji], indexing="ij"))
    inside = np.all([(mapped[a] > 1) & (mapped[a] < geom.shape_kji[a] - 2) for a in range(3)], axis=0)
    assert inside.mean() > 0.5
    assert np.abs(out - ref)[inside].max() < 1e-3


def test_voxel_lps_round_trip_and_axis_order():
    img = blank()
    geom = Geometry.of(img)
    vox = np.zeros((3,) + geom.shape_kji)
    vox[0] = 1.0  # one voxel along array axis 0 = index axis k
    lps = lps_from_vox_disp(vox, geom)
    expected = geom.direction[:, 2] * geom.spacing_ijk[2]
    assert np.allclose(lps[3, 4, 5], expected)
    assert np.allclose(vox_from_lps_disp(lps, geom), vox)


def test_scaling_and_squaring_inverse_and_fixed_point_inverse():
    torch.manual_seed(0)
    v = torch.nn.functional.interpolate(torch.randn(1, 3, 4, 4, 4) * 2.0, size=(24, 24, 24), mode="trilinear",
                                        align_corners=True) * 0.25  # up to ~1.5 voxels
    fwd, bwd = integrate_ss(v), integrate_ss(-v)
    err = compose(fwd, bwd)[..., 4:-4, 4:-4, 4:-4].abs().max()
    assert err < 0.1
    assert jacobian_det(fwd).min() > 0
    inv = invert_fixed_point(fwd, iterations=40)
    assert (inv - bwd)[..., 4:-4, 4:-4, 4:-4].abs().max() < 0.1


def test_resize_disp_keeps_physical_displacement():
    u = torch.ones(1, 3, 9, 9, 9)  # 1 voxel on a 9-voxel axis = 1/8 of the extent
    big = resize_disp(u, (17, 17, 17))
    assert torch.allclose(big, torch.full_like(big, 2.0))
    assert torch.allclose(resize_disp(big, (9, 9, 9)), u)


def test_warp_nearest_keeps_labels():
    lab = torch.randint(0, 5, (1, 1, 10, 10, 10), dtype=torch.int32)
    out = warp(lab, torch.full((1, 3, 10, 10, 10), 0.3), mode="nearest")
    assert out.dtype == torch.int32 and set(out.unique().tolist()) <= set(range(5))


def test_box_sum_matches_conv3d_both_paths_and_gradient():
    """field.filters.box_sum, shifted views (odd window ≤ SHIFTED_MAX_WINDOW) and cumulative sums (larger and even
    windows), against conv3d with a ones kernel and zero padding; its custom gradient against autograd's."""
    import torch.nn.functional as F
    from deepdiffreg.field.filters import SHIFTED_MAX_WINDOW, box_sum
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 2, 13, 11, 9, generator=g, dtype=torch.float64)
    for win in (3, 5, SHIFTED_MAX_WINDOW, SHIFTED_MAX_WINDOW + 2, 4):
        k = torch.ones(2, 1, win, win, win, dtype=torch.float64)
        if win % 2:
            ref = F.conv3d(x, k, padding=win // 2, groups=2)
        else:   # even: win/2 back, win/2 − 1 forward
            ref = F.conv3d(F.pad(x, [win // 2, win // 2 - 1] * 3), k, groups=2)
        assert torch.allclose(box_sum(x, win), ref, atol=1e-10), win
        xg = x.clone().requires_grad_(True)
        w = torch.rand(ref.shape, generator=g, dtype=torch.float64)
        (box_sum(xg, win) * w).sum().backward()
        xr = x.clone().requires_grad_(True)
        (F.conv3d(F.pad(xr, [win // 2, win // 2 - (win + 1) % 2] * 3), k, groups=2) * w).sum().backward()
        assert torch.allclose(xg.grad, xr.grad, atol=1e-10), win

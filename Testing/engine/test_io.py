"""Reading inputs: a DICOM series folder, landmark CSV variants, a user mask through the CLI."""
import json
import os

import numpy as np
import SimpleITK as sitk

from deepdiffreg.frames import Geometry
from deepdiffreg.io.images import read_image, read_landmarks
from deepdiffreg.io.result_writer import deformation_grid_lines, write_grid_vtk_lps, write_image
from synth import blank, from_array, points_lps, run_cli, smooth_field_lps


def _write_dicom_series(image: sitk.Image, folder: str) -> None:
    """One file per slice with the tags a scanner writes (position, orientation, spacing)."""
    os.makedirs(folder, exist_ok=True)
    img = sitk.Cast(sitk.RescaleIntensity(image, 0, 1000), sitk.sitkInt16)
    direction = img.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series_uid = "1.2.826.0.1.3680043.2.1125.1.123456"
    for k in range(img.GetDepth()):
        sl = img[:, :, k]
        for tag, value in (("0008|0060", "MR"), ("0020|000e", series_uid), ("0020|000d", series_uid + ".1"),
                           ("0020|0037", "\\".join(f"{v:.6f}" for v in (direction[0], direction[3], direction[6],
                                                                          direction[1], direction[4], direction[7]))),
                           ("0020|0032", "\\".join(f"{v:.6f}" for v in img.TransformIndexToPhysicalPoint((0, 0, k)))),
                           ("0020|0013", str(k + 1)), ("0018|0050", f"{img.GetSpacing()[2]:.6f}"),
                           ("0028|0030", f"{img.GetSpacing()[1]:.6f}\\{img.GetSpacing()[0]:.6f}")):
            sl.SetMetaData(tag, value)
        writer.SetFileName(os.path.join(folder, f"slice{k:03d}.dcm"))
        writer.Execute(sl)


def test_dicom_series_folder_reads_with_geometry(pair, tmp_path):
    fixed = sitk.ReadImage(pair["fixed"])
    axial = sitk.Image(fixed)
    axial.SetDirection(np.eye(3).ravel().tolist())  # plain axial slices
    folder = str(tmp_path / "dicom")
    _write_dicom_series(axial, folder)
    img = read_image(folder, "fixed image")
    assert img.GetSize() == axial.GetSize()
    assert np.allclose(img.GetSpacing(), axial.GetSpacing(), atol=1e-4)
    assert np.allclose(img.GetOrigin(), axial.GetOrigin(), atol=1e-3)


def test_landmark_csv_variants(tmp_path):
    a = tmp_path / "a.csv"
    a.write_text("Landmark,X,Y,Z\n1,1.5,2,3\n2,4,5,6\n")
    b = tmp_path / "b.csv"
    b.write_text("# points in LPS mm\n1.5,2,3\n4,5,6\n")
    c = tmp_path / "c.csv"
    c.write_text("x,y,z,label\n1.5,2,3,p1\n4,5,6,p2\n")
    for f in (a, b, c):
        assert np.allclose(read_landmarks(str(f), "landmarks"), [[1.5, 2, 3], [4, 5, 6]])


def test_fixed_mask_is_used_and_reported(pair, tmp_path):
    out = tmp_path / "masked"
    res = run_cli("register", "--fixed", pair["fixed"], "--moving", pair["moving"], "--fixed-mask", pair["fixed_seg"],
                  "--method", "nodeo", "--nodeo-iterations", "5", "--no-align", "--out", out)
    assert res.returncode == 0, res.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["preprocessing"]["fixed_mask"] == os.path.abspath(pair["fixed_seg"])
    assert report["preprocessing"]["foreground_for_fold_statistics"] == "the fixed mask"


def test_alignment_mask_prefers_user_mask_and_erodes_the_head(pair):
    from deepdiffreg.align import _foreground_2mm, alignment_mask
    fixed = sitk.ReadImage(pair["fixed"], sitk.sitkFloat32)
    seg = sitk.ReadImage(pair["fixed_seg"])
    assert alignment_mask(fixed, None, 0.0) == (None, "whole image")
    # the sample brain is not head-sized: the automatic choice is the whole image
    assert alignment_mask(fixed, None) == (None, "whole image (not a whole-head scan)")
    user, what = alignment_mask(fixed, seg, 8.0)
    assert what == "the fixed mask"
    assert np.array_equal(sitk.GetArrayFromImage(user), (sitk.GetArrayFromImage(seg) > 0).astype(np.uint8))
    # an explicit erosion works on the same ≤ 2 mm foreground copy as the automatic whole-head region
    eroded_img, what = alignment_mask(fixed, None, 4.0)
    assert what == "foreground eroded by 4 mm" and min(eroded_img.GetSpacing()) >= 2.0
    eroded = sitk.GetArrayFromImage(eroded_img)
    full = sitk.GetArrayFromImage(_foreground_2mm(fixed))
    assert 0 < eroded.sum() < full.sum() and not (eroded & ~full.astype(bool)).any()


def test_whole_head_scan_is_aligned_on_the_top_of_the_head():
    """A head-sized ellipsoid on a neck (LPS z up), stored with a rotated direction: the automatic alignment region
    is the top 150 mm of it eroded by 10 mm — no neck, no outer layer — in physical space."""
    from deepdiffreg.align import alignment_mask
    sp = 2.0
    # array (k, j, i) on a direction that maps index i → LPS y, j → LPS z, k → LPS x: "superior" is array axis 1;
    # the head lies inside the field of view (the erosion does not eat into a head cut by the image border)
    k, j, i = np.indices((140, 140, 110)).astype(float) * sp
    x_mm, y_mm, s_mm = k, i, j
    head = ((x_mm - 140) / 75) ** 2 + ((y_mm - 110) / 95) ** 2 + ((s_mm - 170) / 85) ** 2 <= 1   # top at 255 mm
    neck = ((x_mm - 140) ** 2 + (y_mm - 110) ** 2 <= 45 ** 2) & (s_mm < 170)
    img = sitk.GetImageFromArray(np.where(head | neck, 100.0, 0.0).astype(np.float32))
    img.SetSpacing((sp,) * 3)
    img.SetDirection((0, 0, 1, 1, 0, 0, 0, 1, 0))
    assert (head | neck).sum() * sp ** 3 / 1e6 > 2.5
    region, what = alignment_mask(img, None)
    assert what.startswith("whole-head scan")
    kept = sitk.GetArrayFromImage(sitk.Resample(region, img, sitk.Transform(), sitk.sitkNearestNeighbor)) > 0
    assert kept.any() and not kept[s_mm <= 255 - 150].any()       # nothing below the top 150 mm (the neck)
    assert kept[head & (s_mm > 255 - 140)].mean() > 0.5
    # the outer layer is dropped: 10 mm erosion of the automatic foreground, which itself adds a 2-voxel margin
    depth = -sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(
        sitk.Cast(sitk.GetImageFromArray((head | neck).astype(np.uint8)), sitk.sitkUInt8),
        insideIsPositive=False, squaredDistance=False, useImageSpacing=False)) * sp      # mm inside the skin (±1 voxel)
    assert depth[kept & (s_mm > 170)].min() >= 3.0     # voxel-centre distances; convex upper half (no filled corners)


def test_grid_vtk_reads_back_in_vtk_as_lps_polylines(tmp_path):
    """grid.vtk is written without vtk: VTK's own legacy reader (what Slicer uses) gets the same points, lines and
    point scalar back, and the header comment that makes Slicer read the coordinates as LPS."""
    from vtkmodules.util.numpy_support import vtk_to_numpy
    from vtkmodules.vtkIOLegacy import vtkPolyDataReader

    img = blank()
    u = smooth_field_lps(points_lps(img))
    scalar = np.random.default_rng(0).random(u.shape[:3]).astype(np.float32) + 0.5
    lines = deformation_grid_lines(u, Geometry.of(img), scalar, lines_per_axis=5)
    path = str(tmp_path / "grid.vtk")
    write_grid_vtk_lps(lines, path)
    r = vtkPolyDataReader()
    r.SetFileName(path)
    r.Update()
    poly = r.GetOutput()
    assert "SPACE=LPS" in r.GetHeader()
    assert np.allclose(vtk_to_numpy(poly.GetPoints().GetData()), lines.points, rtol=0, atol=1e-8)
    assert np.array_equal(np.diff(vtk_to_numpy(poly.GetLines().GetOffsetsArray())), lines.lengths)
    assert np.array_equal(vtk_to_numpy(poly.GetLines().GetConnectivityArray()), np.arange(len(lines.points)))
    scal = poly.GetPointData().GetScalars()
    assert scal.GetName() == "jacobian" and np.array_equal(vtk_to_numpy(scal), lines.values)
    # a vertex is its lattice point moved by T: the first vertex is voxel (0, 0, 0) + u there
    assert np.allclose(lines.points[0], points_lps(img)[0, 0, 0] + u[0, 0, 0])


def test_uncompressed_nii_gz_is_a_gzip_that_reads_back_exactly(tmp_path):
    img = from_array(np.random.default_rng(1).random((7, 8, 9)).astype(np.float32), blank(size=(9, 8, 7)))
    path = str(tmp_path / "map.nii.gz")
    write_image(img, path, deflate=False)
    with open(path, "rb") as fh:
        assert fh.read(2) == b"\x1f\x8b"                      # gzip, as the .nii.gz name promises
    assert os.listdir(tmp_path) == ["map.nii.gz"]              # the plain .nii on the way is gone
    back = sitk.ReadImage(path)
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(img))
    assert np.allclose(back.GetDirection(), img.GetDirection()) and np.allclose(back.GetOrigin(), img.GetOrigin())


def test_gzip_length_check_reads_the_trailer_and_still_counts_when_it_cannot_tell(tmp_path):
    """A whole .nii.gz is accepted from its gzip trailer (no decompression); a cut one is refused; one whose
    trailer does not give the header's length (a second gzip member appended) is decompressed and counted."""
    import gzip
    import pytest
    from deepdiffreg.errors import BadInput
    from deepdiffreg.io import images
    img = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(12, 13, 14)).astype(np.float32))
    whole = tmp_path / "whole.nii.gz"
    sitk.WriteImage(img, str(whole), useCompression=True)
    raw = whole.read_bytes()
    need = 352 + 12 * 13 * 14 * 4
    assert images._gzip_trailer_length(str(whole)) == need
    images._check_nifti(str(whole), "image")
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(BadInput, match="truncated"):
        images._check_nifti(str(cut), "image")
    two = tmp_path / "two.nii.gz"
    two.write_bytes(raw + gzip.compress(b"extra bytes after the image"))
    assert images._gzip_trailer_length(str(two)) != need
    images._check_nifti(str(two), "image")
    cut_two = tmp_path / "cut_two.nii.gz"
    cut_two.write_bytes(raw[: len(raw) // 3] + gzip.compress(b"x"))
    with pytest.raises(BadInput, match="truncated"):
        images._check_nifti(str(cut_two), "image")

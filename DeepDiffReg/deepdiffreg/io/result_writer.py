"""Writing a registration result directory exactly as the result contract says (README, "Result contract").

All files are written into a temporary sibling directory that is renamed into place only when complete, so a
failed or cancelled run never leaves a half-written result.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np
import SimpleITK as sitk

from ..errors import BadInput
from ..frames import Geometry

FILES = {"transform": "transform.h5", "inverse": "inverse.h5", "jacobian": "jacobian.nii.gz", "grid": "grid.vtk",
         "warped": "warped.nii.gz", "warped_seg": "warped_seg.nii.gz", "uncertainty": "uncertainty.nii.gz",
         "report": "report.json"}


class AtomicResultDir:
    """``with AtomicResultDir(out) as tmp:`` write into ``tmp``; on success it becomes ``out``, on error it is removed."""

    def __init__(self, out_dir: str, overwrite: bool = False):
        self.out_dir = os.path.abspath(out_dir)
        self.overwrite = overwrite
        self.tmp: str | None = None

    def check(self) -> None:
        if os.path.exists(self.out_dir) and not os.path.isdir(self.out_dir):
            raise BadInput(f"output path exists and is not a directory: {self.out_dir}")
        if os.path.isdir(self.out_dir) and os.listdir(self.out_dir) and not self.overwrite:
            raise BadInput(f"output directory is not empty: {self.out_dir} (use --overwrite to replace it)")
        parent = os.path.dirname(self.out_dir) or "."
        if not os.path.isdir(parent):
            try:
                os.makedirs(parent, exist_ok=True)
            except OSError as e:
                raise BadInput(f"cannot create output folder {parent}: {e.strerror}") from None

    def __enter__(self) -> str:
        self.check()
        parent = os.path.dirname(self.out_dir)
        self.tmp = tempfile.mkdtemp(prefix=os.path.basename(self.out_dir) + ".partial-", dir=parent)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = None
        if os.path.isdir(self.out_dir):
            old = self.out_dir + ".old-" + os.path.basename(self.tmp).rsplit("-", 1)[-1]
            os.replace(self.out_dir, old)
        os.replace(self.tmp, self.out_dir)
        if old:
            shutil.rmtree(old, ignore_errors=True)
        return False


def write_displacement_transform(disp_image: sitk.Image, path: str) -> None:
    """Write a float64 LPS displacement image as an ITK DisplacementFieldTransform (.h5).

    Never NIfTI intent 1006 (ITK and Slicer would read the LPS vectors as RAS)."""
    field = sitk.Cast(disp_image, sitk.sitkVectorFloat64)
    sitk.WriteTransform(sitk.DisplacementFieldTransform(sitk.Image(field)), path)


def write_scalar(array_kji: np.ndarray, geom: Geometry, path: str, pixel=np.float32) -> None:
    img = geom.apply_to(sitk.GetImageFromArray(np.ascontiguousarray(array_kji, dtype=pixel)))
    sitk.WriteImage(img, path, useCompression=True)


def deformation_grid_polydata(disp_lps: np.ndarray, geom: Geometry, scalar: np.ndarray,
                              lines_per_axis: int = 16, scalar_name: str = "jacobian"):
    """Lines of a regular lattice in fixed space, every vertex moved by T (x ↦ x + u(x)).

    Lines run along each index axis through every ``step``-th voxel of the other two axes; vertices sit on every
    ``max(1, step // 4)``-th voxel, so bends show. Returns vtkPolyData in LPS mm with the point array ``scalar_name``.
    """
    import vtk
    from vtk.util.numpy_support import numpy_to_vtk, numpy_to_vtkIdTypeArray

    shape = disp_lps.shape[:3]  # (K, J, I)
    steps = [max(1, int(round((n - 1) / max(lines_per_axis - 1, 1)))) for n in shape]
    m = geom.lps_from_ijk_matrix()
    pts, vals, cells = [], [], []
    n_pts = 0
    for axis in range(3):  # array axis the lines run along
        others = [a for a in range(3) if a != axis]
        res = max(1, steps[axis] // 4)
        along = np.arange(0, shape[axis], res)
        if along[-1] != shape[axis] - 1:
            along = np.append(along, shape[axis] - 1)
        for a in range(0, shape[others[0]], steps[others[0]]):
            for b in range(0, shape[others[1]], steps[others[1]]):
                idx = np.zeros((len(along), 3), dtype=int)
                idx[:, axis], idx[:, others[0]], idx[:, others[1]] = along, a, b
                kji = tuple(idx.T)
                ijk1 = np.c_[idx[:, ::-1], np.ones(len(idx))]
                p = (ijk1 @ m.T)[:, :3] + disp_lps[kji]
                pts.append(p)
                vals.append(scalar[kji])
                cells.append(np.r_[len(p), np.arange(n_pts, n_pts + len(p))])
                n_pts += len(p)
    points = vtk.vtkPoints()
    points.SetData(numpy_to_vtk(np.concatenate(pts).astype(np.float64), deep=True))
    lines = vtk.vtkCellArray()
    lines.ImportLegacyFormat(numpy_to_vtkIdTypeArray(np.concatenate(cells).astype(np.int64), deep=True))
    poly = vtk.vtkPolyData()
    poly.SetPoints(points)
    poly.SetLines(lines)
    arr = numpy_to_vtk(np.concatenate(vals).astype(np.float32), deep=True)
    arr.SetName(scalar_name)
    poly.GetPointData().SetScalars(arr)
    return poly


def write_polydata_lps(poly, path: str) -> None:
    """Legacy .vtk with the header Slicer reads as LPS coordinates."""
    import vtk
    w = vtk.vtkPolyDataWriter()
    w.SetFileName(path)
    w.SetHeader("3D Slicer output. SPACE=LPS")
    w.SetInputData(poly)
    if not w.Write():
        raise OSError(f"could not write {path}")


def write_report(report: dict, path: str) -> None:
    def default(o):
        if isinstance(o, (np.floating, np.integer)):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        raise TypeError(type(o))
    with open(path, "w") as fh:
        json.dump(report, fh, indent=2, default=default, allow_nan=True)

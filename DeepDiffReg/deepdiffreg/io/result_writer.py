"""Writing a registration result directory exactly as the result contract says (README, "Result contract").

``write_result`` writes every file of a result directory (``ResultData``, made by ``compose.compose_result``, plus
report.json). All files are written into a temporary sibling directory that is renamed into place only when
complete, so a failed or cancelled run never leaves a half-written result.
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable

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
    field = disp_image if disp_image.GetPixelID() == sitk.sitkVectorFloat64 else sitk.Cast(disp_image,
                                                                                           sitk.sitkVectorFloat64)
    # the transform takes its image's buffer: hand it a copy so the caller's image stays intact
    write_transform(sitk.DisplacementFieldTransform(sitk.Image(field)), path)


def write_transform(transform: sitk.Transform, path: str) -> None:
    """Write a transform that exists already (the pipeline's T and T⁻¹: flat CompositeTransforms of an affine and a
    float64 LPS displacement field) as it is, without copying a 1 mm brain's ~165 MB field.

    An .h5 holds one flat composite ("Composite Transform can only be 1st transform in a file"): a composite nested
    in another is refused here with a clear message rather than deep inside ITK."""
    if isinstance(transform, sitk.CompositeTransform):
        for n in range(transform.GetNumberOfTransforms()):
            if transform.GetNthTransform(n).GetName() == "CompositeTransform":
                raise ValueError("write_transform(): nested CompositeTransform; FlattenTransform() it first")
    sitk.WriteTransform(transform, path)


def write_scalar(array_kji: np.ndarray, geom: Geometry, path: str, pixel=np.float32, deflate: bool = True) -> None:
    """(K, J, I) array on ``geom`` → NIfTI at ``path`` (see ``write_image`` for ``deflate``)."""
    img = geom.apply_to(sitk.GetImageFromArray(np.ascontiguousarray(array_kji, dtype=pixel)))
    write_image(img, path, deflate)


def write_image(image: sitk.Image, path: str, deflate: bool = True) -> None:
    """Write ``image`` to a .nii.gz path; ``deflate=False`` writes a gzip stream of stored (uncompressed) blocks.

    Float maps of a registration (Jacobian determinant, uncertainty) are dense float32 noise to zlib: deflating a
    1 mm brain's map costs ~0.7 s for a 16 % smaller file (27.5 → 23.1 MB). Stored blocks keep the .nii.gz name
    and format every reader expects (ITK, Slicer, nibabel) at the cost of the larger file.
    """
    if deflate or not path.endswith(".nii.gz"):
        sitk.WriteImage(image, path, useCompression=deflate)
        return
    plain = path[:-3]                                   # write .nii beside it, wrap it as gzip level 0, remove it
    sitk.WriteImage(image, plain, useCompression=False)
    try:
        with open(plain, "rb") as src, gzip.open(path, "wb", compresslevel=0) as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
    finally:
        os.remove(plain)


@dataclass
class GridLines:
    """Polylines in LPS mm: ``points`` (N, 3) float64, ``lengths`` (L,) points per line (consecutive runs of
    ``points``), ``values`` (N,) float32 point scalar."""
    points: np.ndarray
    lengths: np.ndarray
    values: np.ndarray


def deformation_grid_lines(disp_lps: np.ndarray, geom: Geometry, scalar: np.ndarray,
                           lines_per_axis: int = 16, affine_lps: np.ndarray | None = None) -> GridLines:
    """Lines of a regular lattice in fixed space, every vertex moved by T (x ↦ A(x + u(x))).

    ``disp_lps``: (K, J, I, 3) LPS mm on ``geom``; ``scalar``: (K, J, I) value sampled at each vertex;
    ``affine_lps``: 4×4 homogeneous LPS matrix of A (None: identity).
    Lines run along each index axis through every ``step``-th voxel of the other two axes; vertices sit on every
    ``max(1, step // 4)``-th voxel, so bends show.
    """
    shape = disp_lps.shape[:3]  # (K, J, I)
    steps = [max(1, int(round((n - 1) / max(lines_per_axis - 1, 1)))) for n in shape]
    m = geom.lps_from_ijk_matrix()
    if affine_lps is not None:
        a_lin, a_off = np.asarray(affine_lps, float)[:3, :3], np.asarray(affine_lps, float)[:3, 3]
    pts, vals, lengths = [], [], []
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
                moved = (ijk1 @ m.T)[:, :3] + disp_lps[kji]
                pts.append(moved if affine_lps is None else moved @ a_lin.T + a_off)
                vals.append(scalar[kji])
                lengths.append(len(idx))
    return GridLines(np.concatenate(pts).astype(np.float64), np.asarray(lengths, dtype=np.int64),
                     np.concatenate(vals).astype(np.float32))


def _ascii_rows(values: np.ndarray, fmt: str, per_row: int) -> str:
    """Values as text, ``per_row`` to a line (legacy VTK readers take any whitespace; short lines stay readable)."""
    flat = values.ravel().tolist()
    rows = [" ".join([fmt] * len(flat[i:i + per_row])) % tuple(flat[i:i + per_row])
            for i in range(0, len(flat), per_row)]
    return "\n".join(rows) + "\n"


def write_grid_vtk_lps(lines: GridLines, path: str, scalar_name: str = "jacobian") -> None:
    """Legacy ASCII .vtk polydata (version 4.2, which every VTK reader takes) with the header comment Slicer reads
    as LPS coordinates (``SPACE=LPS``). Written without importing vtk (~0.5 s of import for one small file).

    Points keep 11 significant digits (as vtkPolyDataWriter writes doubles), the scalar 9 (float32 round trip).
    """
    n, n_lines = len(lines.points), len(lines.lengths)
    starts = np.concatenate([[0], np.cumsum(lines.lengths)[:-1]])
    cells = "\n".join(" ".join(map(str, [int(c)] + list(range(int(s), int(s) + int(c)))))
                       for s, c in zip(starts, lines.lengths)) + "\n"
    text = (f"# vtk DataFile Version 4.2\n3D Slicer output. SPACE=LPS\nASCII\nDATASET POLYDATA\n"
            f"POINTS {n} double\n" + _ascii_rows(lines.points, "%.11g", 9)
            + f"LINES {n_lines} {n_lines + n}\n" + cells
            + f"POINT_DATA {n}\nSCALARS {scalar_name} float 1\nLOOKUP_TABLE default\n"
            + _ascii_rows(lines.values, "%.9g", 9))
    with open(path, "w") as fh:
        fh.write(text)


@dataclass
class MapImage:
    """A named scalar map on the fixed grid (``<name>.nii.gz``), its unit and a one-line description."""
    image: sitk.Image
    unit: str
    description: str = ""


@dataclass
class ResultData:
    """Everything a result directory holds besides report.json, in memory (README, "The result contract").

    ``transform``/``inverse``: T and T⁻¹ as flat CompositeTransforms (compose.py says how they chain);
    ``jacobian``: (K, J, I) float32 det ∇T on ``fixed_geometry``; ``grid``: the deformation grid's lines;
    ``warped``/``warped_seg``: the moving image (segmentation) resampled onto the fixed grid through T;
    ``maps``: the method's extra maps, written as ``<name>.nii.gz``."""
    transform: sitk.Transform
    jacobian: np.ndarray
    fixed_geometry: Geometry
    grid: GridLines
    warped: sitk.Image
    inverse: sitk.Transform | None = None
    warped_seg: sitk.Image | None = None
    maps: dict[str, MapImage] = field(default_factory=dict)


def write_result(result_dir: AtomicResultDir, data: ResultData, report: dict[str, Any],
                 before_report: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Write every file of a result directory: the files of ``data``, then report.json (``report`` with its
    "files" and "maps" entries filled in here). ``before_report(report)`` runs when every other file is written,
    just before report.json (the pipeline adds its timings and peak memory there). The directory appears only when
    all of it is written. Returns ``report``."""
    files = report.setdefault("files", {})
    with result_dir as tmp:
        p = lambda key: os.path.join(tmp, FILES[key])  # noqa: E731
        write_transform(data.transform, p("transform"))
        files["transform"] = FILES["transform"]
        if data.inverse is not None:
            write_transform(data.inverse, p("inverse"))
            files["inverse"] = FILES["inverse"]
        write_scalar(data.jacobian, data.fixed_geometry, p("jacobian"), deflate=False)
        files["jacobian"] = FILES["jacobian"]
        sitk.WriteImage(data.warped, p("warped"), useCompression=True)
        files["warped"] = FILES["warped"]
        if data.warped_seg is not None:
            sitk.WriteImage(data.warped_seg, p("warped_seg"), useCompression=True)
            files["warped_seg"] = FILES["warped_seg"]
        for name, m in data.maps.items():
            fname = f"{name}.nii.gz"
            write_image(m.image, os.path.join(tmp, fname), deflate=False)
            files[name] = fname
            report.setdefault("maps", {})[name] = {"file": fname, "unit": m.unit, "description": m.description}
        write_grid_vtk_lps(data.grid, p("grid"))
        files["grid"] = FILES["grid"]
        if before_report is not None:
            before_report(report)
        write_report(report, p("report"))
    return report


def write_report(report: dict, path: str) -> None:
    def default(o):
        if isinstance(o, (np.floating, np.integer)):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        raise TypeError(type(o))
    with open(path, "w") as fh:
        json.dump(report, fh, indent=2, default=default, allow_nan=True)

"""Headless QA snapshot: what Slicer's slice views show after a registration, as one PNG.

Rows: fixed | moving before registration | moving under the result transform with the Jacobian overlay
(diverging, centred at 1) and the Transforms module's 2D deformation grid. Columns: axial, coronal, sagittal
through the same point. Slices come from ``vtkMRMLSliceLogic`` (window/level, colour maps, foreground blending
and the transform chain exactly as the slice views compute them; no OpenGL); the grid lines come from
``vtkSlicerTransformLogic.GetVisualization2d``, the polydata the slice view draws for a transform in grid mode.
The scene is built by ``scene.load_result``, the code the module itself uses.
"""
from __future__ import annotations

import numpy as np

import slicer
from vtkmodules.vtkCommonCore import vtkCollection
from vtkmodules.vtkCommonDataModel import vtkImageData, vtkPolyData
from vtkmodules.util.numpy_support import numpy_to_vtk, vtk_to_numpy

from . import scene as ddscene

ORIENTATIONS = ("Axial", "Coronal", "Sagittal")
GRID_COLOR = (255, 230, 0)
LABEL_H = 22


def _slice_logic(scene, app_logic, layout_name: str, size: int):
    sl = slicer.vtkMRMLSliceLogic()
    sl.SetMRMLScene(scene)
    sl.SetMRMLApplicationLogic(app_logic)
    sn = sl.AddSliceNode(layout_name)
    sn.SetDimensions(size, size, 1)
    return sl, sn


def render_slice(sl, sn, background, foreground=None, fg_opacity: float = 0.4, orientation: str = "Axial",
                 center_ras=None, fov_mm: float | None = None, grid_transform=None, grid_region=None) -> np.ndarray:
    """(H, W, 3) uint8 of one slice view; rows top to bottom as on screen."""
    sn.SetOrientation(orientation)
    cn = sl.GetSliceCompositeNode()
    cn.SetBackgroundVolumeID(background.GetID() if background is not None else None)
    cn.SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
    cn.SetForegroundOpacity(fg_opacity if foreground is not None else 0.0)
    w, h = sn.GetDimensions()[:2]
    sl.FitSliceToAll(w, h)
    if fov_mm:
        sn.SetFieldOfView(fov_mm, fov_mm * h / w, sn.GetFieldOfView()[2])
    if center_ras is not None:
        sn.JumpSliceByOffsetting(*center_ras)  # through the point; the field of view stays on the volume
    sn.UpdateMatrices()
    sl.UpdateImageData()
    producer = sl.GetImageDataConnection().GetProducer()
    producer.Update()
    img = producer.GetOutputDataObject(0)
    dims = img.GetDimensions()
    rgba = vtk_to_numpy(img.GetPointData().GetScalars()).reshape(dims[1], dims[0], -1)
    rgb = np.ascontiguousarray(rgba[::-1, :, :3]).astype(np.uint8)  # VTK rows are bottom-up
    if grid_transform is not None and grid_transform.GetDisplayNode() is not None:
        _draw_transform_grid(rgb, grid_transform, sn, grid_region)
    return rgb


def _draw_transform_grid(rgb: np.ndarray, transform_node, sn, region=None) -> int:
    """Rasterise the slice view's grid visualisation of ``transform_node`` into ``rgb`` (clipped to the voxel grid
    of the ``region`` volume when given); returns the number of pixels drawn."""
    pd = vtkPolyData()
    if not slicer.vtkSlicerTransformLogic.GetVisualization2d(pd, transform_node.GetDisplayNode(), sn):
        return 0
    if pd.GetNumberOfPoints() == 0:
        return 0
    pts = vtk_to_numpy(pd.GetPoints().GetData()).astype(float)
    xy_to_ras = ddscene.matrix_to_numpy(sn.GetXYToRAS())
    xy = (np.c_[pts, np.ones(len(pts))] @ np.linalg.inv(xy_to_ras).T)[:, :2]
    h, w = rgb.shape[:2]
    ras_to_ijk = dims_region = None
    if region is not None:
        ras_to_ijk = np.linalg.inv(ddscene.ijk_to_ras(region))
        dims_region = np.array(region.GetImageData().GetDimensions()) - 0.5
    lines = pd.GetLines()
    conn = vtk_to_numpy(lines.GetConnectivityArray())
    offs = vtk_to_numpy(lines.GetOffsetsArray())
    drawn = 0
    for c in range(len(offs) - 1):
        ids = conn[offs[c]:offs[c + 1]]
        for a, b in zip(ids[:-1], ids[1:]):
            p, q = xy[a], xy[b]
            n = int(np.ceil(np.abs(q - p).max())) + 1
            t = np.linspace(0.0, 1.0, n)[:, None]
            s = np.rint(p + t * (q - p)).astype(int)
            ok = (s[:, 0] >= 0) & (s[:, 0] < w) & (s[:, 1] >= 0) & (s[:, 1] < h)
            s = s[ok]
            if ras_to_ijk is not None and len(s):
                ras = np.c_[s, np.zeros(len(s)), np.ones(len(s))] @ xy_to_ras.T
                ijk = (ras @ ras_to_ijk.T)[:, :3]
                s = s[np.all((ijk >= -0.5) & (ijk <= dims_region), 1)]
            rgb[h - 1 - s[:, 1], s[:, 0]] = GRID_COLOR
            drawn += len(s)
    return drawn


def _text(label: str, height: int = LABEL_H) -> np.ndarray:
    """White text on black, (height, W, 3) uint8, rendered with FreeType (no OpenGL)."""
    try:
        import vtkmodules.vtkRenderingFreeType  # noqa: F401  (registers the FreeType text renderer)
        from vtkmodules.vtkRenderingCore import vtkTextProperty, vtkTextRenderer
    except ImportError:  # pragma: no cover
        return np.zeros((height, 1, 3), np.uint8)
    tp = vtkTextProperty()
    tp.SetFontSize(int(height * 0.62))
    tp.SetColor(1.0, 1.0, 1.0)
    tp.SetFontFamilyToArial()
    im = vtkImageData()
    if not vtkTextRenderer().RenderString(tp, label, im, [0, 0], 72):
        return np.zeros((height, 1, 3), np.uint8)
    d = im.GetDimensions()
    a = vtk_to_numpy(im.GetPointData().GetScalars()).reshape(d[1], d[0], 4)[::-1].astype(float)
    rgb = (a[..., :3] * (a[..., 3:] / 255.0)).astype(np.uint8)
    out = np.zeros((height, d[0] + 8, 3), np.uint8)
    hh = min(height, d[1])
    top = (height - hh) // 2
    out[top:top + hh, 4:4 + d[0]] = rgb[:hh]
    return out


def _with_label(img: np.ndarray, label: str) -> np.ndarray:
    bar = np.zeros((LABEL_H, img.shape[1], 3), np.uint8)
    t = _text(label)[:, :img.shape[1]]
    bar[:, :t.shape[1]] = t
    return np.concatenate([bar, img], 0)


def write_png(rgb: np.ndarray, path: str) -> None:
    from vtkmodules.vtkIOImage import vtkPNGWriter
    h, w = rgb.shape[:2]
    im = vtkImageData()
    im.SetDimensions(w, h, 1)
    im.GetPointData().SetScalars(numpy_to_vtk(np.ascontiguousarray(rgb[::-1]).reshape(-1, 3), deep=1))
    wr = vtkPNGWriter()
    wr.SetFileName(path)
    wr.SetInputData(im)
    wr.Write()


def qa_snapshot(scene, app_logic, fixed, moving, result: "ddscene.ResultNodes", path: str | None = None,
                size: int = 256, center_ras=None, jacobian_opacity: float = 0.35,
                grid_spacing_mm: float | None = None) -> np.ndarray:
    """Render the 3 x 3 QA panel from nodes already in ``scene`` (moving under ``result.transform``).

    The temporary slice nodes are removed again, and the moving volume's transform chain restored.
    Returns the RGB image; writes it to ``path`` when given.
    """
    if center_ras is None:
        b = ddscene.volume_ras_bounds(fixed)
        center_ras = ((b[0] + b[1]) / 2, (b[2] + b[3]) / 2, (b[4] + b[5]) / 2)
    b = ddscene.volume_ras_bounds(fixed)
    fov = float(max(b[1] - b[0], b[3] - b[2], b[5] - b[4])) * 1.05
    tdn = result.transform.GetDisplayNode()
    old_spacing = tdn.GetGridSpacingMm()
    tdn.SetGridSpacingMm(grid_spacing_mm or max(2.0, round(fov / 16.0)))
    # the moving volume's own transforms (kept under the result, scene.attach_to_moving) stay in both rows; only
    # the link from the top of that chain to the result is cut for "before"
    top, _ = ddscene.user_chain_top(moving)
    saved = top.GetParentTransformNode()
    created = []
    rows = []
    try:
        logics = []
        for i, o in enumerate(ORIENTATIONS):
            sl, sn = _slice_logic(scene, app_logic, f"DeepDiffRegQA{i}", size)
            logics.append((sl, sn))
            created += [sn, sl.GetSliceCompositeNode()]
        row_specs = [("fixed", fixed, None, None, False),
                     ("moving, before", moving, None, None, True),
                     ("moving registered + det J (blue<1<red) + grid", moving, result.jacobian,
                      result.transform, False)]
        for title, bg, fg, grid, unregistered in row_specs:
            top.SetAndObserveTransformNodeID(None if unregistered else result.transform.GetID())
            panels = [render_slice(sl, sn, bg, fg, jacobian_opacity, o, center_ras, fov, grid, fixed)
                      for (sl, sn), o in zip(logics, ORIENTATIONS)]
            row = np.concatenate([np.pad(p, ((0, 0), (0, 2), (0, 0))) for p in panels], 1)
            rows.append(_with_label(row, title))
    finally:
        top.SetAndObserveTransformNodeID(saved.GetID() if saved is not None else None)
        tdn.SetGridSpacingMm(old_spacing)
        for n in created:
            if n is not None and n.GetScene() is scene:
                scene.RemoveNode(n)
    out = np.concatenate(rows, 0)
    if path:
        write_png(out, path)
    return out


def qa_snapshot_from_files(result_dir: str, fixed_path: str, moving_path: str, png_path: str, size: int = 256,
                           center_ras=None) -> dict:
    """Build a private scene (no Slicer application needed), load inputs and results as the module does, write the
    PNG. Returns a few numbers about the image for checks."""
    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    colors = app_logic.GetColorLogic()
    colors.SetMRMLScene(scene)
    colors.AddDefaultColorNodes()
    app_logic.SetModuleLogic("Colors", colors)
    app_logic.SetSliceLogics(vtkCollection())
    app_logic.SetViewLogics(vtkCollection())
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene, True)
    logics = ddscene.Logics(scene, app_logic)
    fixed = logics.load_volume(fixed_path, "fixed")
    moving = logics.load_volume(moving_path, "moving")
    res = ddscene.load_result(scene, result_dir, fixed, moving, logics=logics)
    img = qa_snapshot(scene, app_logic, fixed, moving, res, png_path, size=size, center_ras=center_ras)
    grid_px = int(np.all(img == np.array(GRID_COLOR, np.uint8), -1).sum())
    info = {"shape": img.shape, "grid_pixels": grid_px, "path": png_path}
    scene.Clear(True)
    return info


def main(argv=None) -> int:
    """``PYTHONPATH=DeepDiffReg python -m DeepDiffRegLib.snapshot RESULT_DIR FIXED MOVING OUT.png [--size N]
    [--center R,A,S]``: the QA snapshot of a finished run, without Slicer."""
    import argparse
    ap = argparse.ArgumentParser(prog="python -m DeepDiffRegLib.snapshot", description=main.__doc__)
    ap.add_argument("result_dir")
    ap.add_argument("fixed")
    ap.add_argument("moving")
    ap.add_argument("png")
    ap.add_argument("--size", type=int, default=256, help="pixels per slice view")
    ap.add_argument("--center", help="R,A,S point the three views go through (default: centre of the fixed volume)")
    a = ap.parse_args(argv)
    center = tuple(float(v) for v in a.center.split(",")) if a.center else None
    info = qa_snapshot_from_files(a.result_dir, a.fixed, a.moving, a.png, size=a.size, center_ras=center)
    print(f"wrote {a.png}: {info['shape'][1]}x{info['shape'][0]} px")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

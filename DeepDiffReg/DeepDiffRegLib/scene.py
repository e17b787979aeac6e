"""Load a DeepDiffReg result directory into an MRML scene (Qt-free; the scene is an argument).

The result contract is in conventions.md: ``transform.h5`` is T (fixed point -> moving point, LPS): one ITK
composite of an affine A and a displacement field u on the (padded) working grid, T(x) = A(x + u(x)). Slicer loads
it as one transform node (a ``vtkMRMLTransformNode`` holding a general transform, not necessarily a
``vtkMRMLGridTransformNode``) whose TransformFromParent is T, so making it the moving volume's parent shows the
moving volume aligned to the fixed one; its grid part is interpolated linearly, as ITK does.

Which node for which object (measured in a real MRML scene, Testing/slicer/test_scene_synthetic.py): a node placed
under a transform node is moved by its *TransformToParent*, the inverse of TransformFromParent. So markups, models
and segmentations **drawn on the moving image go under the forward transform** (the same node as the moving volume)
to be shown in fixed space; objects **drawn on the fixed image go under the inverse** (``inverse.h5``,
T^-1(y) = A^-1(y) + w(A^-1(y))) to be shown in moving space. Outside Slicer (ITK, ``deepdiffreg apply --points``)
it is the other way round: T^-1 maps moving-space points to fixed space. Everything RAS lives here; the engine is LPS.

The same function runs inside Slicer (``slicer.mrmlScene``, the module logics) and in tests against a bare
``vtkMRMLScene`` from the ``slicer-core`` wheel.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import slicer
from vtkmodules.vtkCommonCore import vtkStringArray
from vtkmodules.vtkCommonMath import vtkMatrix4x4
from vtkmodules.util.numpy_support import vtk_to_numpy, numpy_to_vtk

from . import qa

RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0])
ATTRIBUTE_PREFIX = "DeepDiffReg."
JACOBIAN_COLOR_NODE_NAME = "DeepDiffReg Jacobian (diverging, centred at 1)"
JACOBIAN_RANGE = (0.0, 2.0)   # the colour map is symmetric about det J = 1 on this range
FOLD_SEGMENT_NAME = "Folds (det J <= 0)"
FOLD_COLOR = (1.0, 0.9, 0.0)  # yellow: stands out on the blue/red Jacobian map

# Node roles stored as attributes / references (SlicerElastix-style constants).
MOVING_REF = "spatialRegistrationMoving"
FIXED_REF = "spatialRegistrationFixed"
JACOBIAN_REF = "DeepDiffRegJacobian"
GRID_REF = "DeepDiffRegGrid"
INVERSE_REF = "DeepDiffRegInverse"
FOLDS_REF = "DeepDiffRegFolds"


@dataclass
class ResultNodes:
    """What ``load_result`` put in the scene (None where the file or the option was absent)."""

    result_dir: str
    report: dict[str, Any]
    transform: Any = None          # vtkMRMLTransformNode (affine + grid), FromParent = T (fixed -> moving): parent
                                   # of the moving volume and of anything drawn on the moving image
    inverse: Any = None            # vtkMRMLTransformNode (grid + affine), FromParent = T^-1: parent of objects
                                   # drawn on the fixed image, to show them in moving space
    jacobian: Any = None           # vtkMRMLScalarVolumeNode on the fixed grid
    grid: Any = None               # vtkMRMLModelNode (deformation grid, point scalar "jacobian")
    warped: Any = None             # vtkMRMLScalarVolumeNode, moving resampled onto the fixed grid
    warped_seg: Any = None         # vtkMRMLLabelMapVolumeNode
    uncertainty: Any = None        # vtkMRMLScalarVolumeNode (methods that estimate one)
    folds: Any = None              # vtkMRMLSegmentationNode with one segment, only when there are folds
    fold_summary: qa.FoldSummary | None = None
    folder_item: int = 0           # subject hierarchy folder holding the outputs
    attributes: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # e.g. how existing parent transforms were kept

    def nodes(self) -> list:
        return [n for n in (self.transform, self.inverse, self.jacobian, self.grid, self.warped, self.warped_seg,
                            self.uncertainty, self.folds) if n is not None]


class Logics:
    """The module logics that Slicer's own file readers use, bound to ``scene``.

    Inside Slicer pass the application's (``slicer.app.applicationLogic()``) so colours resolve; with slicer-core
    any ``vtkSlicerApplicationLogic`` on the scene will do (see Testing/slicer/conftest.py).
    """

    def __init__(self, scene, app_logic=None):
        self.scene = scene
        self.volumes = slicer.vtkSlicerVolumesLogic()
        self.volumes.SetMRMLScene(scene)
        self.transforms = slicer.vtkSlicerTransformLogic()
        self.transforms.SetMRMLScene(scene)
        self.models = slicer.vtkSlicerModelsLogic()
        self.models.SetMRMLScene(scene)
        if app_logic is not None:
            self.volumes.SetMRMLApplicationLogic(app_logic)
            self.models.SetMRMLApplicationLogic(app_logic)

    def load_volume(self, path: str, name: str, labelmap: bool = False):
        node = self.volumes.AddArchetypeVolume(path, name, 1 if labelmap else 0, vtkStringArray())
        if node is None:
            raise RuntimeError(f"could not load volume {path}")
        return node

    def load_transform(self, path: str):
        node = self.transforms.AddTransform(path, self.scene)
        if node is None:
            raise RuntimeError(f"could not load transform {path}")
        return node

    def load_model(self, path: str):
        # the file's SPACE=LPS header decides; LPS is also the argument (the engine writes LPS)
        node = self.models.AddModel(path, slicer.vtkMRMLStorageNode.CoordinateSystemLPS)
        if node is None:
            raise RuntimeError(f"could not load model {path}")
        return node


# -- small helpers ---------------------------------------------------------------------------------------------
def matrix_to_numpy(m: vtkMatrix4x4) -> np.ndarray:
    return np.array([[m.GetElement(i, j) for j in range(4)] for i in range(4)])


def ijk_to_ras(volume_node) -> np.ndarray:
    m = vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    return matrix_to_numpy(m)


def volume_array(volume_node) -> np.ndarray:
    """(k, j, i) copy of the voxels (first component), as slicer.util.arrayFromVolume without slicer.util."""
    im = volume_node.GetImageData()
    dims = im.GetDimensions()
    a = vtk_to_numpy(im.GetPointData().GetScalars())
    ncomp = im.GetNumberOfScalarComponents()
    a = a.reshape(dims[2], dims[1], dims[0], ncomp) if ncomp > 1 else a.reshape(dims[2], dims[1], dims[0])
    return a[..., 0].copy() if ncomp > 1 else a.copy()


def volume_ras_bounds(volume_node) -> np.ndarray:
    b = [0.0] * 6
    volume_node.GetRASBounds(b)
    return np.array(b)


def jacobian_color_node(scene):
    """A procedural diverging colour node centred at det J = 1 (blue = compression, white = 1, red = expansion).

    Slicer's file-based DivergingBlueRed table does not exist in slicer-core, and a procedural node behaves the
    same in both; it is created once per scene and reused.
    """
    node = scene.GetFirstNodeByName(JACOBIAN_COLOR_NODE_NAME)
    if node is not None:
        return node
    node = slicer.vtkMRMLProceduralColorNode()
    node.SetName(JACOBIAN_COLOR_NODE_NAME)
    node.SetAttribute("Category", "DeepDiffReg")
    node.SetHideFromEditors(False)
    lo, hi = JACOBIAN_RANGE
    ctf = node.GetColorTransferFunction()
    ctf.RemoveAllPoints()
    ctf.AddRGBPoint(lo, 0.23, 0.30, 0.75)          # det J = 0: strong compression, blue
    ctf.AddRGBPoint(0.5 * (lo + 1.0), 0.55, 0.69, 1.0)
    ctf.AddRGBPoint(1.0, 0.97, 0.97, 0.97)         # volume preserved: white
    ctf.AddRGBPoint(0.5 * (hi + 1.0), 0.96, 0.60, 0.48)
    ctf.AddRGBPoint(hi, 0.71, 0.02, 0.15)          # det J = 2: strong expansion, red
    ctf.SetClamping(True)
    scene.AddNode(node)
    return node


def set_attributes(node, attributes: dict[str, str]) -> None:
    for k, v in attributes.items():
        node.SetAttribute(ATTRIBUTE_PREFIX + k, v)


def provenance_attributes(report: dict[str, Any], result_dir: str) -> dict[str, str]:
    """Method, model id/version, weights sha256, device and timings: enough to say how a node was made."""
    model = report.get("model") or {}
    timings = report.get("timings_s") or {}
    return {
        "method": str(report.get("method", "")),
        "methodOptions": json.dumps(report.get("method_options") or {}, sort_keys=True),
        "modelId": str(model.get("id", "")) if model else "",
        "modelVersion": str(model.get("version", "")) if model else "",
        "weightsSha256": str(model.get("sha256", "")) if model else "",
        "device": str(report.get("device", "")),
        "timings": json.dumps(timings, sort_keys=True),
        "totalTimeS": f"{float(timings['total']):.3f}" if "total" in timings else "",
        "peakMemoryMb": json.dumps(report.get("peak_memory_mb") or {}, sort_keys=True),
        "resultDir": os.path.abspath(result_dir),
        "report": os.path.abspath(os.path.join(result_dir, "report.json")),
    }


def _adopt(target, loaded, scene):
    """Move the content of a freshly loaded node into a node the user selected, then drop the loaded node."""
    if target is None or target is loaded:
        return loaded
    if loaded.IsA("vtkMRMLTransformNode"):
        target.SetAndObserveTransformFromParent(loaded.GetTransformFromParent())
    elif loaded.IsA("vtkMRMLVolumeNode"):
        m = vtkMatrix4x4()
        loaded.GetIJKToRASMatrix(m)
        target.SetIJKToRASMatrix(m)
        target.SetAndObserveImageData(loaded.GetImageData())
        if target.GetDisplayNode() is None:
            target.CreateDefaultDisplayNodes()
    elif loaded.IsA("vtkMRMLModelNode"):
        target.SetAndObservePolyData(loaded.GetPolyData())
        if target.GetDisplayNode() is None:
            target.CreateDefaultDisplayNodes()
    else:  # pragma: no cover
        raise TypeError(f"cannot adopt {loaded.GetClassName()}")
    scene.RemoveNode(loaded)
    return target


def uncertainty_reliable(report: dict[str, Any]) -> bool:
    """Whether report.json declares the uncertainty map fit for QA (``method_info.uncertainty_qa.reliable``);
    a report that says nothing is not taken as QA."""
    qa = (report.get("method_info") or {}).get("uncertainty_qa") or {}
    return qa.get("reliable") is True


def _file(report: dict[str, Any], result_dir: str, key: str, default: str | None) -> str | None:
    name = (report.get("files") or {}).get(key, default)
    if not name:
        return None
    path = name if os.path.isabs(name) else os.path.join(result_dir, name)
    return path if os.path.exists(path) else None


# -- display setup ---------------------------------------------------------------------------------------------
def setup_jacobian_display(scene, jacobian_node) -> None:
    if jacobian_node.GetDisplayNode() is None:
        jacobian_node.CreateDefaultDisplayNodes()
    dn = jacobian_node.GetDisplayNode()
    dn.SetAndObserveColorNodeID(jacobian_color_node(scene).GetID())
    dn.AutoWindowLevelOff()
    dn.SetWindowLevelMinMax(*JACOBIAN_RANGE)
    dn.SetInterpolate(False)


def setup_grid_display(scene, grid_node) -> None:
    if grid_node.GetDisplayNode() is None:
        grid_node.CreateDefaultDisplayNodes()
    dn = grid_node.GetDisplayNode()
    dn.SetColor(1.0, 1.0, 0.0)
    dn.SetLineWidth(1.5)
    dn.SetVisibility2D(True)
    dn.SetVisibility3D(False)  # in the slice views only; a 3-D lattice hides everything else in the 3-D view
    pd = grid_node.GetPolyData()
    if pd is not None and pd.GetPointData().GetArray("jacobian") is not None:
        dn.SetActiveScalarName("jacobian")
        dn.SetActiveAttributeLocation(0)  # point data
        dn.SetAndObserveColorNodeID(jacobian_color_node(scene).GetID())
        dn.SetScalarRangeFlag(slicer.vtkMRMLDisplayNode.UseManualScalarRange)
        dn.SetScalarRange(*JACOBIAN_RANGE)
        dn.SetScalarVisibility(True)


def setup_transform_display(transform_node, region_node=None, visible: bool = False) -> None:
    """The Transforms module's own grid view of the field, over the fixed volume, ready to switch on."""
    if transform_node.GetDisplayNode() is None:
        transform_node.CreateDefaultDisplayNodes()
    dn = transform_node.GetDisplayNode()
    dn.SetVisualizationMode(slicer.vtkMRMLTransformDisplayNode.VIS_MODE_GRID)
    if region_node is not None:
        dn.SetAndObserveRegionNode(region_node)
    dn.SetGridSpacingMm(10.0)
    dn.SetVisibility2D(True)
    dn.SetVisibility(visible)


def grid_parts(transform_node) -> list:
    """The grid transforms (``vtkGridTransform`` and subclasses) inside a node's TransformFromParent: the node
    itself for a grid node, the concatenated pieces of a general (composite) transform."""
    t = transform_node.GetTransformFromParent()
    if t is None:
        return []
    from vtkmodules.vtkCommonCore import vtkCollection
    pieces = vtkCollection()
    slicer.vtkMRMLTransformNode.FlattenGeneralTransform(pieces, t)
    items = [pieces.GetItemAsObject(i) for i in range(pieces.GetNumberOfItems())] or [t]
    return [p for p in items if p is not None and p.IsA("vtkGridTransform")]


def set_linear_interpolation(transform_node) -> int:
    """Interpolate every grid part of the node linearly, as ITK's DisplacementFieldTransform does (Slicer's default
    is cubic: 0.02-0.3 mm off ITK on real fields, more near folds). Returns the number of grid parts set."""
    parts = grid_parts(transform_node)
    for g in parts:
        g.SetInterpolationModeToLinear()
    if parts:  # the node observes its transform: this tells slice views and dependent nodes to update
        transform_node.GetTransformFromParent().Modified()
    return len(parts)


# -- folds -----------------------------------------------------------------------------------------------------
def create_fold_segmentation(scene, jacobian_node, mask_kji: np.ndarray, name: str = "Folds"):
    """A segmentation node with one segment where ``mask_kji`` is 1, on the Jacobian's grid."""
    img = slicer.vtkOrientedImageData()
    dims = jacobian_node.GetImageData().GetDimensions()
    img.SetDimensions(dims)
    img.SetSpacing(1.0, 1.0, 1.0)
    img.SetOrigin(0.0, 0.0, 0.0)
    m = vtkMatrix4x4()
    jacobian_node.GetIJKToRASMatrix(m)
    img.SetImageToWorldMatrix(m)
    arr = np.ascontiguousarray(mask_kji.astype(np.uint8)).ravel()
    vtk_arr = numpy_to_vtk(arr, deep=1)
    img.GetPointData().SetScalars(vtk_arr)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    seg.SetReferenceImageGeometryParameterFromVolumeNode(jacobian_node)
    seg.CreateDefaultDisplayNodes()
    seg.AddSegmentFromBinaryLabelmapRepresentation(img, FOLD_SEGMENT_NAME, list(FOLD_COLOR))
    return seg


# -- subject hierarchy -----------------------------------------------------------------------------------------
def study_folder(scene, reference_node, folder_name: str) -> int:
    """A folder item under the reference volume's study (or at the scene root when it has none)."""
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    parent = sh.GetSceneItemID()
    if reference_node is not None:
        item = sh.GetItemByDataNode(reference_node)
        if item:
            p = sh.GetItemParent(item)
            if p:
                parent = p
    return sh.CreateFolderItem(parent, folder_name)


def place_in_folder(scene, folder_item: int, nodes) -> None:
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    for n in nodes:
        item = sh.GetItemByDataNode(n)
        if not item:
            item = sh.CreateItem(folder_item, n)
        else:
            sh.SetItemParent(item, folder_item)


# -- the entry point -------------------------------------------------------------------------------------------
def load_result(scene, result_dir: str, fixed_node=None, moving_node=None, *, logics: Logics | None = None,
                app_logic=None, apply_to_moving: bool = True, outputs: dict[str, Any] | None = None,
                load_warped: bool = True, load_grid: bool = True, load_inverse: bool = True,
                load_jacobian: bool = True, fold_segment: bool = True, linear_interpolation: bool = True,
                name_prefix: str | None = None, folder: bool = True) -> ResultNodes:
    """Load ``result_dir`` (written by ``deepdiffreg register``) into ``scene``.

    outputs: optional existing nodes to fill, keys "transform", "inverse", "jacobian", "grid", "warped"
    (the panel's output selectors); missing keys get new nodes.
    apply_to_moving: make the transform the moving volume's parent (moving shown aligned to fixed).
    linear_interpolation: interpolate the grid parts linearly as ITK does, so the scene shows what the engine
    computed (default); False keeps Slicer's cubic default.
    """
    outputs = outputs or {}
    logics = logics or Logics(scene, app_logic)
    report = qa.read_report(result_dir)
    attrs = provenance_attributes(report, result_dir)
    method = report.get("method", "deepdiffreg")
    moving_name = moving_node.GetName() if moving_node is not None else "moving"
    fixed_name = fixed_node.GetName() if fixed_node is not None else "fixed"
    prefix = name_prefix or f"{moving_name} to {fixed_name} ({method})"
    res = ResultNodes(result_dir=result_dir, report=report, attributes=attrs)

    tpath = _file(report, result_dir, "transform", "transform.h5")
    if tpath is None:
        raise FileNotFoundError(f"{result_dir}: no transform file (report.json 'files.transform')")
    t = _adopt(outputs.get("transform"), logics.load_transform(tpath), scene)
    if t is not outputs.get("transform"):
        t.SetName(f"{prefix} transform")
    res.transform = t
    if linear_interpolation:
        set_linear_interpolation(t)
    setup_transform_display(t, fixed_node, visible=False)
    if moving_node is not None:
        t.SetNodeReferenceID(MOVING_REF, moving_node.GetID())
    if fixed_node is not None:
        t.SetNodeReferenceID(FIXED_REF, fixed_node.GetID())

    if load_inverse:
        ipath = _file(report, result_dir, "inverse", "inverse.h5")
        if ipath is not None:
            inv = _adopt(outputs.get("inverse"), logics.load_transform(ipath), scene)
            if inv is not outputs.get("inverse"):
                inv.SetName(f"{prefix} inverse")
            if linear_interpolation:
                set_linear_interpolation(inv)
            if moving_node is not None:  # the inverse registers fixed onto moving: roles swap
                inv.SetNodeReferenceID(FIXED_REF, moving_node.GetID())
            if fixed_node is not None:
                inv.SetNodeReferenceID(MOVING_REF, fixed_node.GetID())
            t.SetNodeReferenceID(INVERSE_REF, inv.GetID())
            res.inverse = inv

    if load_jacobian:
        jpath = _file(report, result_dir, "jacobian", "jacobian.nii.gz")
        if jpath is not None:
            jac = _adopt(outputs.get("jacobian"), logics.load_volume(jpath, f"{prefix} Jacobian"), scene)
            setup_jacobian_display(scene, jac)
            res.jacobian = jac
            t.SetNodeReferenceID(JACOBIAN_REF, jac.GetID())
            res.fold_summary = qa.summarize_folds(volume_array(jac), ijk_to_ras(jac))
            if fold_segment and res.fold_summary.has_folds:
                res.folds = create_fold_segmentation(scene, jac, qa.fold_mask(volume_array(jac)), f"{prefix} folds")
                t.SetNodeReferenceID(FOLDS_REF, res.folds.GetID())

    if load_grid:
        gpath = _file(report, result_dir, "grid", "grid.vtk")
        if gpath is not None:
            g = _adopt(outputs.get("grid"), logics.load_model(gpath), scene)
            g.SetName(f"{prefix} grid")
            setup_grid_display(scene, g)
            res.grid = g
            t.SetNodeReferenceID(GRID_REF, g.GetID())

    if load_warped:
        wpath = _file(report, result_dir, "warped", "warped.nii.gz")
        if wpath is not None:
            res.warped = _adopt(outputs.get("warped"), logics.load_volume(wpath, f"{prefix} warped"), scene)
            if moving_node is not None and moving_node.GetDisplayNode() and res.warped.GetDisplayNode():
                md, wd = moving_node.GetDisplayNode(), res.warped.GetDisplayNode()
                wd.SetAutoWindowLevel(md.GetAutoWindowLevel())
                if not md.GetAutoWindowLevel():
                    wd.SetWindowLevel(md.GetWindow(), md.GetLevel())
        spath = _file(report, result_dir, "warped_seg", "warped_seg.nii.gz")
        if spath is not None:
            res.warped_seg = logics.load_volume(spath, f"{prefix} warped segmentation", labelmap=True)

    contrast_warning = (report.get("contrast_check") or {}).get("warning")
    if contrast_warning:
        res.warnings.append(contrast_warning)
    upath = _file(report, result_dir, "uncertainty", None)
    if upath is not None:
        reliable = uncertainty_reliable(report)
        res.uncertainty = logics.load_volume(upath, f"{prefix} uncertainty"
                                             + ("" if reliable else " (unreliable, not QA)"))
        res.uncertainty.SetAttribute("DeepDiffReg.uncertaintyReliable", "true" if reliable else "false")
        if not reliable:
            note = ((report.get("method_info") or {}).get("uncertainty_qa") or {}).get("note")
            res.warnings.append("the uncertainty map is not validated as QA" + (f": {note}" if note else ""))

    for n in res.nodes():
        set_attributes(n, attrs)

    if fixed_node is not None:
        place_under_fixed_parent(fixed_node, [n for n in res.nodes() if n is not t and n is not res.inverse], t)
    if apply_to_moving and moving_node is not None:
        res.warnings += attach_to_moving(moving_node, t, fixed_node)

    if folder:
        res.folder_item = study_folder(scene, fixed_node, f"DeepDiffReg {prefix}")
        place_in_folder(scene, res.folder_item, res.nodes())
    return res


def is_result_transform(node) -> bool:
    """A transform node written by a DeepDiffReg run (it carries the provenance attributes)."""
    return node is not None and node.GetAttribute(ATTRIBUTE_PREFIX + "method") is not None


def user_chain_top(node):
    """The highest node of ``node``'s parent-transform chain below any DeepDiffReg result transform: ``node``
    itself when it has no transform of the user's. Returns (top, what sits above it: a result transform or None).
    The inputs are exported through exactly this chain (``inputs.write_volume_in_world``)."""
    cur = node
    while True:
        parent = cur.GetParentTransformNode()
        if parent is None or is_result_transform(parent):
            return cur, parent
        cur = parent


def _ancestors(node) -> set:
    out, cur = set(), node.GetParentTransformNode() if node is not None else None
    while cur is not None:
        out.add(cur.GetID())
        cur = cur.GetParentTransformNode()
    return out


def attach_to_moving(moving_node, transform_node, fixed_node=None) -> list[str]:
    """Make the moving volume show aligned to the fixed one, keeping the user's own transforms.

    The engine registered the moving image *through* its parent transforms (world coordinates, see
    ``inputs.export_inputs``), so T belongs above them: the top of the user's chain observes T (a result
    transform of an earlier run there is replaced). A chain shared with the fixed volume cannot take T without
    moving the fixed volume too: then the moving volume's parent is replaced and a warning says so.
    """
    top, _ = user_chain_top(moving_node)
    if top is moving_node:
        moving_node.SetAndObserveTransformNodeID(transform_node.GetID())
        return []
    if fixed_node is not None and top.GetID() in _ancestors(fixed_node):
        moving_node.SetAndObserveTransformNodeID(transform_node.GetID())
        return [f"The moving and fixed volumes share the parent transform '{top.GetName()}'; the moving volume's "
                f"parent was replaced by the registration result."]
    top.SetAndObserveTransformNodeID(transform_node.GetID())
    return [f"The moving volume's own transform '{top.GetName()}' is kept: it now sits under the registration "
            f"result (the registration was computed on the moving volume as transformed)."]


def place_under_fixed_parent(fixed_node, nodes, transform_node) -> None:
    """Outputs on the fixed grid go where the fixed volume is shown: under the fixed volume's parent transform (the
    engine saw the fixed voxels in their own frame), and so does the result transform itself."""
    parent = fixed_node.GetParentTransformNode()
    if parent is None:
        return
    transform_node.SetAndObserveTransformNodeID(parent.GetID())
    for n in nodes:
        if n.IsA("vtkMRMLTransformableNode") and n is not transform_node:
            n.SetAndObserveTransformNodeID(parent.GetID())


def set_jacobian_overlay(scene, jacobian_node, on: bool = True, opacity: float = 0.4) -> int:
    """Show (or hide) the Jacobian map as the foreground layer of every slice view; returns the views changed."""
    n = 0
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        c = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        if on and jacobian_node is not None:
            c.SetForegroundVolumeID(jacobian_node.GetID())
            c.SetForegroundOpacity(opacity)
        elif jacobian_node is not None and c.GetForegroundVolumeID() == jacobian_node.GetID():
            c.SetForegroundVolumeID(None)
        n += 1
    return n


def set_grid_visible(grid_node, on: bool, in_3d: bool = False) -> None:
    """The deformation grid model in the slice views (and in 3-D only when asked)."""
    if grid_node is None or grid_node.GetDisplayNode() is None:
        return
    dn = grid_node.GetDisplayNode()
    dn.SetVisibility(on)
    dn.SetVisibility2D(on)
    dn.SetVisibility3D(on and in_3d)


def centre_on_worst_fold(result: ResultNodes, slice_nodes) -> tuple[float, float, float] | None:
    """Move each slice node (e.g. Red/Yellow/Green) so that it shows the smallest det J; returns the RAS point."""
    s = result.fold_summary
    if s is None or s.worst_ras is None:
        return None
    r, a, si = s.worst_ras
    for sn in slice_nodes:
        sn.JumpSliceByCentering(r, a, si)
    return s.worst_ras


def harden(scene, transform_node, nodes) -> list:
    """Put each node under ``transform_node`` and harden it (the Transforms module's Harden)."""
    tl = slicer.vtkSlicerTransformLogic()
    tl.SetMRMLScene(scene)
    done = []
    for n in nodes:
        n.SetAndObserveTransformNodeID(transform_node.GetID())
        if tl.hardenTransform(n):
            done.append(n)
    return done


def save_transform(transform_node, path: str) -> bool:
    """Write the node as ITK .h5 (or .tfm/.nrrd by extension) through a transform storage node."""
    sn = slicer.vtkMRMLTransformStorageNode()
    sn.SetFileName(path)
    return bool(sn.WriteData(transform_node))

"""Fixtures for the Slicer-side tests: a real vtkMRMLScene (slicer-core wheel), no Qt, no Slicer application.

slicer-core is required here: these tests FAIL (they do not skip) when ``import slicer`` does not work, so a
broken CI environment cannot pass silently. Install with ``pip install -e .[test]``.
"""
from __future__ import annotations

import functools
import os
import sys
import types

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
MODULE_DIR = os.path.join(REPO, "DeepDiffReg")          # holds DeepDiffReg.py, DeepDiffRegLib/ and deepdiffreg/
for p in (MODULE_DIR, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

try:
    import slicer  # noqa: E402  (the slicer-core wheel)
except ImportError as exc:  # pragma: no cover - a hard failure, on purpose
    raise ImportError("Testing/slicer needs the slicer-core wheel (pip install 'slicer-core==5.13.31053.0'); "
                      "these tests must not be skipped") from exc

from vtkmodules.vtkCommonCore import vtkCollection, vtkStringArray  # noqa: E402

F = np.diag([-1.0, -1.0, 1.0])  # RAS <-> LPS


class _CoreIOManager:
    """Just enough of qSlicerCoreIOManager for slicer.util.loadVolume/loadTransform/loadModel/saveNode."""

    def __init__(self, scene, app_logic):
        self.scene = scene
        self.volumes = slicer.vtkSlicerVolumesLogic(); self.volumes.SetMRMLScene(scene)
        self.volumes.SetMRMLApplicationLogic(app_logic)
        self.transforms = slicer.vtkSlicerTransformLogic(); self.transforms.SetMRMLScene(scene)
        self.models = slicer.vtkSlicerModelsLogic(); self.models.SetMRMLScene(scene)
        self.models.SetMRMLApplicationLogic(app_logic)

    def fileType(self, filename):
        return "VolumeFile"

    def loadNodes(self, filetype, props, loaded, messages):
        fn = props["fileName"]
        if filetype == "VolumeFile":
            name = props.get("name", os.path.basename(fn).split(".")[0])
            node = self.volumes.AddArchetypeVolume(fn, name, 1 if props.get("labelmap") else 0, vtkStringArray())
        elif filetype == "TransformFile":
            node = self.transforms.AddTransform(fn, self.scene)
        elif filetype == "ModelFile":
            node = self.models.AddModel(fn, slicer.vtkMRMLStorageNode.CoordinateSystemLPS)
        else:
            return False
        if node is None:
            return False
        loaded.AddItem(node)
        return True

    def fileWriterFileType(self, node):
        return "NoFile"

    def saveNodes(self, filetype, props, messages):
        node = self.scene.GetNodeByID(props["nodeID"])
        if not node.GetStorageNode():
            node.AddDefaultStorageNode()
        sn = node.GetStorageNode(); sn.SetFileName(props["fileName"])
        return bool(sn.WriteData(node))


@pytest.fixture
def mrml(monkeypatch):
    """A fresh scene + application logic (colours, volumes/transforms/models logic) per test, also exposed as
    slicer.mrmlScene / slicer.app so code written for Slicer runs unchanged."""
    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic(); app_logic.SetMRMLScene(scene)
    colors = app_logic.GetColorLogic(); colors.SetMRMLScene(scene); colors.AddDefaultColorNodes()
    app_logic.SetModuleLogic("Colors", colors)
    app_logic.SetSliceLogics(vtkCollection()); app_logic.SetViewLogics(vtkCollection())
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene, True)
    io = _CoreIOManager(scene, app_logic)
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(coreIOManager=lambda: io, applicationLogic=lambda: app_logic),
                        raising=False)
    yield types.SimpleNamespace(scene=scene, app_logic=app_logic, io=io)
    scene.Clear(True)


@pytest.fixture(scope="session")
def synthetic_result(tmp_path_factory):
    """A hand-written result directory (smooth field, no folds) on an oblique anisotropic fixed grid."""
    import synthetic
    return synthetic.write_result_dir(str(tmp_path_factory.mktemp("synth") / "result"))


@pytest.fixture(scope="session")
def folded_result(tmp_path_factory):
    """Like synthetic_result but the field folds (det J < 0) in a small region."""
    import synthetic
    return synthetic.write_result_dir(str(tmp_path_factory.mktemp("synth_fold") / "result"), fold=True)


def reslice_onto(ref_node, vol_node, background=-1.0) -> np.ndarray:
    """What a slice view shows: ``vol_node`` resampled onto ``ref_node``'s voxel grid through the transform chain
    world -> vol's parent (the chain vtkMRMLSliceLayerLogic uses), linear image interpolation. (k, j, i) array."""
    from vtkmodules.vtkCommonMath import vtkMatrix4x4
    from vtkmodules.vtkCommonTransforms import vtkGeneralTransform
    from vtkmodules.vtkImagingCore import vtkImageReslice
    from vtkmodules.util.numpy_support import vtk_to_numpy

    world_to_local = vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(None, vol_node.GetParentTransformNode(), world_to_local)
    ijk_to_ras, ras_to_ijk = vtkMatrix4x4(), vtkMatrix4x4()
    ref_node.GetIJKToRASMatrix(ijk_to_ras); vol_node.GetRASToIJKMatrix(ras_to_ijk)
    t = vtkGeneralTransform(); t.PostMultiply()
    t.Concatenate(ijk_to_ras); t.Concatenate(world_to_local); t.Concatenate(ras_to_ijk)
    r = vtkImageReslice(); r.SetInputData(vol_node.GetImageData()); r.SetResliceTransform(t)
    r.SetInterpolationModeToLinear(); r.SetBackgroundLevel(background)
    r.SetOutputSpacing(1, 1, 1); r.SetOutputOrigin(0, 0, 0); r.SetOutputExtent(ref_node.GetImageData().GetExtent())
    r.Update()
    o = r.GetOutput()
    return vtk_to_numpy(o.GetPointData().GetScalars()).reshape(tuple(reversed(o.GetDimensions()))).astype(float)


def interior_mask(fixed_img, moving_img, transform, margin=1.0) -> np.ndarray:
    """(k, j, i) mask of fixed voxels that are inside the field's grid (the fixed grid) and whose T-image lies inside
    the moving image with ``margin`` voxels to spare (so boundary handling does not enter the comparison)."""
    import SimpleITK as sitk  # noqa: F401
    from synthetic import physical_points
    pts = physical_points(fixed_img)
    size = np.array(fixed_img.GetSize())
    k, j, i = np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij")
    ijk = np.stack([i, j, k], -1)
    in_field = np.all((ijk >= margin) & (ijk <= size - 1 - margin), -1)
    mp = np.array([transform.TransformPoint(tuple(p)) for p in pts.reshape(-1, 3)]).reshape(pts.shape)
    Dm = np.array(moving_img.GetDirection()).reshape(3, 3)
    cidx = ((mp - np.array(moving_img.GetOrigin())) @ Dm) / np.array(moving_img.GetSpacing())
    in_moving = np.all((cidx >= margin) & (cidx <= np.array(moving_img.GetSize()) - 1 - margin), -1)
    return in_field & in_moving




@functools.lru_cache(maxsize=1)
def methods_json_text() -> str:
    """What ``deepdiffreg methods --json`` prints — the engine's own output, as the panel reads it."""
    import subprocess
    out = subprocess.run([sys.executable, "-m", "deepdiffreg", "methods", "--json"], capture_output=True, text=True,
                         timeout=120, check=True)
    return out.stdout


@pytest.fixture
def fixture_methods():
    from DeepDiffRegLib import methods as ddmethods
    return ddmethods.parse_methods_json(methods_json_text())

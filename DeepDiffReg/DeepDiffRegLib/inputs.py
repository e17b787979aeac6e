"""Inputs for a run: what is missing (the Register button's reason), and writing the selected nodes to files the
engine reads (volumes as NRRD, segmentations as matching label maps, landmarks as LPS CSV). Qt-free; the scene
comes from the nodes."""
from __future__ import annotations

import csv
import os

import numpy as np

import slicer
from vtkmodules.vtkCommonCore import vtkStringArray
from vtkmodules.vtkCommonDataModel import vtkImageData
from vtkmodules.vtkCommonMath import vtkMatrix4x4

from .scene import user_chain_top

RAS_TO_LPS = np.array([-1.0, -1.0, 1.0])


def missing_inputs(fixed, moving, fixed_seg=None, moving_seg=None, fixed_landmarks=None, moving_landmarks=None,
                   method: str | None = None, known_methods=None) -> list[str]:
    """Reasons why Register cannot run yet (empty when it can). One short sentence each."""
    reasons = []
    if fixed is None:
        reasons.append("Select a fixed volume.")
    if moving is None:
        reasons.append("Select a moving volume.")
    if fixed is not None and fixed is moving:
        reasons.append("Fixed and moving must be different volumes.")
    for v, role in ((fixed, "fixed"), (moving, "moving")):
        if v is not None and v.GetImageData() is None:
            reasons.append(f"The {role} volume has no image data.")
    if (fixed_seg is None) != (moving_seg is None):
        reasons.append("Select both segmentations (for Dice) or neither.")
    if fixed_seg is not None and moving_seg is not None and not common_segment_names(fixed_seg, moving_seg):
        reasons.append("The two segmentations share no segment name (Dice compares segments by name).")
    if (fixed_landmarks is None) != (moving_landmarks is None):
        reasons.append("Select both landmark lists (for TRE) or neither.")
    if fixed_landmarks is not None and moving_landmarks is not None:
        nf, nm = fixed_landmarks.GetNumberOfControlPoints(), moving_landmarks.GetNumberOfControlPoints()
        if nf != nm or nf == 0:
            reasons.append(f"Landmark lists must have the same, non-zero number of points ({nf} vs {nm}).")
    if known_methods is not None:  # the method is checked against the engine's list when one is given
        if not method:
            reasons.append("Choose a method.")
        elif method not in known_methods:
            reasons.append(f"Unknown method '{method}'.")
    return reasons


def write_volume(volume_node, path: str) -> str:
    """Write the voxels with their own geometry (parent transforms not applied; see ``write_volume_in_world``)."""
    sn = slicer.vtkMRMLVolumeArchetypeStorageNode()
    sn.SetFileName(path)
    sn.SetUseCompression(False)
    if not sn.WriteData(volume_node):
        raise RuntimeError(f"could not write {volume_node.GetName()} to {path}")
    return path


def write_volume_in_world(volume_node, path: str) -> str:
    """Write the volume as the user sees it: through its own parent transforms (hardened on a temporary clone;
    a linear chain only changes the geometry, a non-linear one resamples), but never through the result transform
    of an earlier DeepDiffReg run, which the new result replaces. Without a transform of the user's: the voxels
    as they are."""
    top, above = user_chain_top(volume_node)
    if top is volume_node:
        return write_volume(volume_node, path)
    scene = volume_node.GetScene()
    if above is not None:
        top.SetAndObserveTransformNodeID(None)
    clone = scene.AddNewNodeByClass(volume_node.GetClassName(), "__DeepDiffReg_export__")
    try:
        m = vtkMatrix4x4()
        volume_node.GetIJKToRASMatrix(m)
        clone.SetIJKToRASMatrix(m)
        img = vtkImageData()
        img.DeepCopy(volume_node.GetImageData())
        clone.SetAndObserveImageData(img)
        clone.SetAndObserveTransformNodeID(volume_node.GetParentTransformNode().GetID())
        logic = slicer.vtkSlicerTransformLogic()
        logic.SetMRMLScene(scene)
        if not logic.hardenTransform(clone):
            raise RuntimeError(f"could not apply the parent transform of {volume_node.GetName()}")
        return write_volume(clone, path)
    finally:
        for n in (clone.GetDisplayNode(), clone.GetStorageNode(), clone):
            if n is not None:
                scene.RemoveNode(n)
        if above is not None:
            top.SetAndObserveTransformNodeID(above.GetID())


def transform_warnings(fixed, moving) -> list[str]:
    """What the user should know about parent transforms before a run (shown on the panel, not blocking)."""
    out = []
    if fixed is not None:
        top, _ = user_chain_top(fixed)
        if top is not fixed:
            out.append(f"The fixed volume is under the transform '{fixed.GetParentTransformNode().GetName()}': the "
                       "registration uses its voxels in their own frame, and the results are placed under that "
                       "transform.")
    if moving is not None:
        top, _ = user_chain_top(moving)
        if top is not moving:
            out.append("The moving volume is registered as transformed by its parent transform, which is kept.")
    return out


def segment_names(seg_node) -> list[str]:
    s = seg_node.GetSegmentation()
    return [s.GetNthSegment(i).GetName() for i in range(s.GetNumberOfSegments())]


def common_segment_names(fixed_seg, moving_seg) -> list[str]:
    m = set(segment_names(moving_seg))
    return [n for n in segment_names(fixed_seg) if n in m]


def write_segmentation(seg_node, names: list[str], reference_volume, path: str) -> str:
    """A label map on ``reference_volume``'s grid where segment ``names[i]`` has label i + 1 (so the fixed and
    moving label maps agree by segment name)."""
    s = seg_node.GetSegmentation()
    ids = vtkStringArray()
    for n in names:
        ids.InsertNextValue(s.GetSegmentIdBySegmentName(n))
    scene = seg_node.GetScene()
    lm = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__DeepDiffReg_export__")
    try:
        if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(seg_node, ids, lm, reference_volume):
            raise RuntimeError(f"could not export {seg_node.GetName()} as a label map")
        write_volume(lm, path)
    finally:
        if lm.GetDisplayNode():
            scene.RemoveNode(lm.GetDisplayNode())
        scene.RemoveNode(lm)
    return path


def landmarks_lps(markups_node) -> np.ndarray:
    """(N, 3) world positions (parent transforms applied) in LPS mm."""
    pts = []
    for i in range(markups_node.GetNumberOfControlPoints()):
        p = [0.0, 0.0, 0.0]
        markups_node.GetNthControlPointPositionWorld(i, p)
        pts.append(np.array(p) * RAS_TO_LPS)
    return np.array(pts).reshape(-1, 3)


def write_landmarks(markups_node, path: str) -> str:
    """CSV with columns Landmark,X,Y,Z in LPS mm (the BraTS-Reg layout the engine reads)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Landmark", "X", "Y", "Z"])
        for i, p in enumerate(landmarks_lps(markups_node)):
            w.writerow([i + 1, f"{p[0]:.6f}", f"{p[1]:.6f}", f"{p[2]:.6f}"])
    return path


def export_inputs(work_dir: str, fixed, moving, fixed_seg=None, moving_seg=None, fixed_landmarks=None,
                  moving_landmarks=None, fixed_mask=None) -> dict[str, str]:
    """Write every selected input into ``work_dir``; returns the engine's argument values by name.

    The fixed volume is written in its own frame (the results are placed under its parent transform), the moving
    volume through its own parent transforms (``write_volume_in_world``). ``fixed_mask``: a segmentation (all
    its segments, on the fixed grid) or a label map / scalar volume (non-zero voxels) restricting the similarity.
    """
    os.makedirs(work_dir, exist_ok=True)
    files = {"fixed": write_volume(fixed, os.path.join(work_dir, "fixed.nrrd")),
             "moving": write_volume_in_world(moving, os.path.join(work_dir, "moving.nrrd"))}
    if fixed_mask is not None:
        path = os.path.join(work_dir, "fixed_mask.nrrd")
        if fixed_mask.IsA("vtkMRMLSegmentationNode"):
            files["fixed_mask"] = write_segmentation(fixed_mask, segment_names(fixed_mask), fixed, path)
        else:
            files["fixed_mask"] = write_volume(fixed_mask, path)
    if fixed_seg is not None and moving_seg is not None:
        names = common_segment_names(fixed_seg, moving_seg)
        files["fixed_seg"] = write_segmentation(fixed_seg, names, fixed, os.path.join(work_dir, "fixed_seg.nrrd"))
        files["moving_seg"] = write_segmentation(moving_seg, names, moving, os.path.join(work_dir, "moving_seg.nrrd"))
    if fixed_landmarks is not None and moving_landmarks is not None:
        files["fixed_landmarks"] = write_landmarks(fixed_landmarks, os.path.join(work_dir, "fixed_landmarks.csv"))
        files["moving_landmarks"] = write_landmarks(moving_landmarks, os.path.join(work_dir, "moving_landmarks.csv"))
    return files

"""Slicer-side helpers of the DeepDiffReg module.

Nothing here imports Qt or torch: process handling, scene loading of a result directory, fold QA, the headless
QA snapshot and dependency installation are plain Python + MRML (vtk) so that they run, and are tested, against a
real ``vtkMRMLScene`` from the ``slicer-core`` wheel without the Slicer application.
"""

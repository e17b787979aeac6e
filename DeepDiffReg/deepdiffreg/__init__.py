"""DeepDiffReg engine: diffeomorphic image registration with no Slicer import.

Frames used across the package (see docs/conventions in the README):
- array order (k, j, i) = numpy/SimpleITK array axes; torch tensors are (B, C, D, H, W) = (B, C, k, j, i);
- voxel displacements ``*_vox`` have channel c = displacement along array axis c (so channel 0 is along k);
- physical vectors ``*_lps`` are (x, y, z) in LPS millimetres, as ITK/SimpleITK use them.
"""
__version__ = "0.1.0"

"""Draws the module/extension icon (128x128 PNG) with numpy + VTK's PNG writer; run from the repository root:
``python Resources/make_icons.py``. Writes Resources/DeepDiffReg.png and DeepDiffReg/Resources/Icons/DeepDiffReg.png."""
import numpy as np
from vtkmodules.util.numpy_support import numpy_to_vtk
from vtkmodules.vtkCommonDataModel import vtkImageData
from vtkmodules.vtkIOImage import vtkPNGWriter

N = 128
yy, xx = np.mgrid[0:N, 0:N].astype(float)
img = np.zeros((N, N, 4), float)
# rounded square background, dark blue-grey gradient
r = 18.0
cx, cy = np.clip(xx, r, N - 1 - r), np.clip(yy, r, N - 1 - r)
inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= r ** 2
img[..., 0] = 0.10 + 0.08 * yy / N
img[..., 1] = 0.14 + 0.10 * yy / N
img[..., 2] = 0.28 + 0.18 * yy / N
img[..., 3] = inside
# a smooth diffeomorphic warp of a regular grid: x' = x + a sin(...)
u = 7.0 * np.sin(np.pi * yy / N) * np.sin(2 * np.pi * xx / N)
v = 7.0 * np.sin(np.pi * xx / N) * np.sin(2 * np.pi * yy / N)
gx, gy = xx - u, yy - v  # pull-back: the pixel shows the grid point it maps to
spacing = 16.0
dist = np.maximum(np.abs((gx - 8) % spacing - spacing / 2), np.abs((gy - 8) % spacing - spacing / 2))
line = np.clip(1.6 - np.abs(dist - spacing / 2), 0, 1)
# colour lines by local expansion (approximate det J): blue = compression, red = expansion
du_dx = np.gradient(u, axis=1); dv_dy = np.gradient(v, axis=0)
det = (1 - du_dx) * (1 - dv_dy)
t = np.clip((det - 0.75) / 0.5, 0, 1)[..., None]
col = (1 - t) * np.array([0.35, 0.62, 1.0]) + t * np.array([1.0, 0.45, 0.35])
col = np.where((np.abs(det - 1) < 0.04)[..., None], np.array([1.0, 0.92, 0.2]), col)
img[..., :3] = img[..., :3] * (1 - line[..., None]) + col * line[..., None]
out = (np.clip(img, 0, 1) * 255).astype(np.uint8)[::-1]  # VTK rows bottom-up
im = vtkImageData()
im.SetDimensions(N, N, 1)
im.GetPointData().SetScalars(numpy_to_vtk(np.ascontiguousarray(out).reshape(-1, 4), deep=1))
for path in ("Resources/DeepDiffReg.png", "DeepDiffReg/Resources/Icons/DeepDiffReg.png"):
    w = vtkPNGWriter(); w.SetFileName(path); w.SetInputData(im); w.Write()
    print("wrote", path)

"""Pure torch field operations (voxel units, (B, 3, D, H, W), channel c along array axis c)."""
from .grid import identity_vox
from .integrate import integrate_ss, invert_fixed_point
from .jacobian import jacobian_det, jacobian_det_slabs
from .resize import resize_disp, resize_image
from .unfold import unfold
from .warp import compose, warp

__all__ = ["identity_vox", "warp", "compose", "integrate_ss", "invert_fixed_point",
           "resize_disp", "resize_image", "jacobian_det", "jacobian_det_slabs", "unfold"]

from .kl import kl_laplacian
from .regularizers import gradient_l2, jacobian_penalty
from .similarity import LocalNCC, local_ncc, mse, ncc_loss

__all__ = ["kl_laplacian", "LocalNCC", "local_ncc", "ncc_loss", "mse", "gradient_l2", "jacobian_penalty"]

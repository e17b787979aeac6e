"""Classical reference: SimpleITK's symmetric diffeomorphic demons, multi-resolution (no learning, no torch).

Settings follow the classical-peers table of the project notes (shared docs, peers.md): histogram matching, 3 levels of 100/60/30 iterations,
σ 1.5 voxels for the field smoothing, symmetric forces. The field is converted to the shared voxel convention,
so it goes through the same writer, Jacobian and metrics as every other method.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch

from ..field import invert_fixed_point
from ..frames import vox_from_lps_disp
from .base import Capabilities, FieldEstimate, Method, PairOnGrid, option, register_method


@register_method
class Demons(Method):
    name = "demons"
    title = "Diffeomorphic demons (SimpleITK)"
    description = "Diffeomorphic demons (SimpleITK), classical reference; CPU only"
    # Peak memory (Testing/engine/measure_method_memory.py, 2026-12-02, 2-core AMD EPYC, 24 GB, load 2-6):
    # synth-15-16 (1 mm, 160x224x192), default settings, --spacing 1.5 / 2 / 3 mm (2.05M / 0.89M / 0.26M working
    # voxels): 1224 / 795 / 691 MB, the register process's VmHWM; test_memory_estimate's method that holds next to
    # nothing: 838 / 762 / 689 MB. Own part: the peak's slope between 1.5 and 2 mm (386 B per working voxel) minus
    # that method's (68 B): 318 B, declared 320 (at 2 and 3 mm its peak is the pipeline's own, 33 and 2 MB above the
    # other's).
    caps = Capabilities(learned=False, inverse="numerical", contrasts="same", spacing_mm=(("cpu", 2.0),),
                        reference=True,   # fast enough to run beside the learned methods on the validation pairs
                        bytes_per_working_voxel=320)

    @dataclass
    class Options:
        iterations: tuple[int, ...] = option((100, 60, 30), min=0, max=100_000,
                                             help="iterations per level, coarse to fine")
        sigma: float = option(1.5, min=0.0, max=100.0, help="field smoothing σ in voxels")

    def estimate(self, pair: PairOnGrid, device: torch.device, progress) -> FieldEstimate:
        geom = pair.geometry
        to_img = lambda t: geom.apply_to(sitk.GetImageFromArray(t.detach().cpu()[0, 0].numpy().astype(np.float32)))  # noqa: E731
        fixed, moving = to_img(pair.fixed), to_img(pair.moving)
        moving = sitk.HistogramMatching(moving, fixed, 256, 15, True)
        iters = list(self.opts.iterations)
        demons = sitk.DiffeomorphicDemonsRegistrationFilter()
        demons.SetSmoothDisplacementField(True)
        demons.SetStandardDeviations(self.opts.sigma)
        demons.SetUseGradientType(demons.Symmetric)
        total = sum(iters)
        done = [0]
        demons.AddCommand(sitk.sitkIterationEvent, lambda: (done.__setitem__(0, done[0] + 1),
                                                            progress(done[0] / total, f"demons iteration {done[0]}/{total}")))
        t0 = time.perf_counter()
        field = None
        n = len(iters)
        for level, it in enumerate(iters):
            shrink = 2 ** (n - 1 - level)
            f_l = sitk.Shrink(fixed, [shrink] * 3) if shrink > 1 else fixed
            m_l = sitk.Shrink(moving, [shrink] * 3) if shrink > 1 else moving
            if field is None:
                init = sitk.Image(f_l.GetSize(), sitk.sitkVectorFloat64)
                init.CopyInformation(f_l)
            else:
                init = sitk.Resample(field, f_l, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
            demons.SetNumberOfIterations(it)
            field = demons.Execute(f_l, m_l, init)
        field = sitk.Resample(field, fixed, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
        disp_lps = sitk.GetArrayFromImage(field)
        disp = torch.from_numpy(vox_from_lps_disp(disp_lps, geom)).float()[None]
        inverse = invert_fixed_point(disp, iterations=30)
        return FieldEstimate(disp, inverse, info={"iterations_per_level": iters, "sigma_vox": self.opts.sigma,
                                                  "optimisation_s": round(time.perf_counter() - t0, 2),
                                                  "inverse": "fixed-point inversion (30 iterations)"})

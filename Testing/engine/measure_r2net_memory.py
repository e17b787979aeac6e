"""Peak memory and time of R2Net vs VoxelMorph-diff on CPU (not a test; numbers in docs/r2net.md).

One measurement per fresh process (peak RSS from ``deepdiffreg.peak_memory``, VmHWM on Linux, is per process):

    python Testing/engine/measure_r2net_memory.py fwd r2net 128        # network forward pass, random input
    python Testing/engine/measure_r2net_memory.py fwd r2net-svf 128
    python Testing/engine/measure_r2net_memory.py fwd vxm 128          # VoxelMorph-diff as shipped (½-grid S&S)
    python Testing/engine/measure_r2net_memory.py fwd vxm-fullint 128  # μ upsampled, S&S at full resolution
    python Testing/engine/measure_r2net_memory.py fwd r2net-vxm 128    # R2Net on VoxelMorph-diff's U-Net
    python Testing/engine/measure_r2net_memory.py train r2net-vxm 128  # one training step (forward, MSE, backward)
    python Testing/engine/measure_r2net_memory.py train r2net-vxm-nockpt 128  # the same, LC blocks keep their graph
    python Testing/engine/measure_r2net_memory.py train-int lc 224     # the integrator alone: LC blocks (checkpointed;
        # lc-nockpt: not) or ss (scaling and squaring, 7 steps) of a random velocity, warp + MSE + backward
    python Testing/engine/measure_r2net_memory.py est 128 128 128      # R2Net estimate() incl. numerical inverse
    python Testing/engine/measure_r2net_memory.py est-ms 300 512 512   # MS-R2Net estimate() on that working grid
    python Testing/engine/measure_r2net_memory.py est-ms-ct models/r2net-brain-2mm.pt   # MS-R2Net, these weights,
        # on the benchmark's CT-sized phantom pair (ct-512, 512×512×300 at 0.8×0.8×1.5 mm) on its own grid;
        # also prints Dice of its organ labels before/after and the folded % (computed after the peak is read)

Prints one JSON line: base_rss_mb (peak before the measured work: interpreter, torch, network, inputs), peak_rss_mb,
delta_mb, bytes_per_voxel (delta / voxels) and seconds. Untrained weights (the architecture decides the memory).
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from deepdiffreg.peak_memory import peak_cpu_memory_mb


def rss_mb() -> float:
    return peak_cpu_memory_mb()


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    mode, rest = argv[0], argv[1:]
    if mode == "train-int":
        kind, n = rest[0], int(rest[1])
        m, f = torch.rand(1, 1, n, n, n), torch.rand(1, 1, n, n, n)
        v = (0.5 * torch.randn(1, 3, n, n, n)).requires_grad_(True)      # allocated before the base is read
        if kind.startswith("lc"):
            from deepdiffreg.nn.r2net import LCIntegrator
            net = LCIntegrator()
            net.set_checkpoint(not kind.endswith("-nockpt"))

            def run():
                return net(v)
        else:
            from deepdiffreg.field import integrate_ss
            net = torch.nn.Identity()                                    # nothing to train; .train() below

            def run():
                return integrate_ss(v, 7)
        voxels = n ** 3
    elif mode in ("fwd", "train"):
        kind, n = rest[0], int(rest[1])
        m, f = torch.rand(1, 1, n, n, n), torch.rand(1, 1, n, n, n)
        if kind.startswith("r2net"):
            from deepdiffreg.nn.r2net import R2Net
            if kind.startswith("r2net-vxm"):     # VoxelMorph-diff's U-Net as the velocity network (½-grid μ)
                from deepdiffreg.nn.unet import DEFAULT_DEC, DEFAULT_ENC
                net = R2Net(enc=DEFAULT_ENC, dec=DEFAULT_DEC, backbone="vxm").eval()
            else:
                net = R2Net(stationary="svf" in kind).eval()
            # "-nockpt": the LC blocks keep their intermediate fields for the backward pass (before 2026-12-07)
            net.integrator.set_checkpoint(not kind.endswith("-nockpt"))

            def run():
                return net(m, f)[0]
        else:
            from deepdiffreg.field import integrate_ss, resize_disp
            from deepdiffreg.nn.vxm_model import DEFAULT_CONFIG, build_net
            net = build_net(DEFAULT_CONFIG).eval()

            def run():
                mu, _ = net(m, f)
                if kind == "vxm-fullint":        # the paper's Table 2 comparison: S&S at full resolution
                    return integrate_ss(resize_disp(mu, (n, n, n)), 7)
                return resize_disp(integrate_ss(mu, 7), (n, n, n))
        voxels = n ** 3
    elif mode == "est-ms-ct":
        from deepdiffreg.methods.r2net import R2NetMethod
        pair, seg = _ct_pair()
        method = R2NetMethod(weights=rest[0], multiscale=True)
        voxels = pair.fixed.numel()
        est_info: dict = {}

        def run():
            est = method.estimate(pair, torch.device("cpu"), lambda fr, msg: None)
            est_info.update(unfold=est.info.get("unfold"), seconds=est.info.get("seconds"))
            return est.disp_vox
    else:
        from deepdiffreg.frames import Geometry
        from deepdiffreg.methods.base import PairOnGrid
        from deepdiffreg.methods.r2net import R2NetMethod
        d, h, w = map(int, rest[:3])
        cfg = {**R2NetMethod.default_config(), "method": R2NetMethod.name}
        tmp = Path(tempfile.mkdtemp()) / "r2net-untrained.pt"
        torch.save({"config": cfg, "state_dict": R2NetMethod.build_network(cfg).state_dict()}, tmp)
        geom = Geometry((0.0, 0.0, 0.0), (2.0, 2.0, 2.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), (w, h, d))
        pair = PairOnGrid(torch.rand(1, 1, d, h, w), torch.rand(1, 1, d, h, w), geom)
        method = R2NetMethod(weights=str(tmp), multiscale=(mode == "est-ms") or None)

        def run():
            return method.estimate(pair, torch.device("cpu"), lambda fr, msg: None).disp_vox
        voxels = d * h * w
    base = rss_mb()
    t0 = time.perf_counter()
    if mode in ("train", "train-int"):            # one training step's memory: forward, MSE, backward
        from deepdiffreg.field import warp
        net.train()
        u = run()
        loss = ((warp(m, u) - f) ** 2).mean()
        loss.backward()
        out = u.detach()
    else:
        with torch.no_grad():
            out = run()
    sec = time.perf_counter() - t0
    peak = rss_mb()
    result = {"mode": mode, "args": rest, "voxels": voxels, "out_shape": list(out.shape),
              "base_rss_mb": round(base, 1), "peak_rss_mb": round(peak, 1),
              "delta_mb": round(peak - base, 1), "bytes_per_voxel": round((peak - base) * 2 ** 20 / voxels),
              "seconds": round(sec, 2), "threads": torch.get_num_threads()}
    if mode == "est-ms-ct":
        result.update(_ct_accuracy(out, *seg, pair.geometry), method_info=est_info)
    print(json.dumps(result))


def _ct_pair():
    """The benchmark's ct-512 pair (benchmark/ct_pair.py, built in a temporary folder) as a PairOnGrid on the fixed
    image's own grid, intensities windowed to [0, 1] as the pipeline does; and the two label maps (numpy, k-j-i)."""
    import SimpleITK as sitk

    from deepdiffreg.benchmark.ct_pair import build_ct_pair
    from deepdiffreg.frames import Geometry
    from deepdiffreg.methods.base import PairOnGrid
    from deepdiffreg.preprocess import robust_normalise
    files = build_ct_pair(Path(tempfile.mkdtemp()))
    fixed = sitk.ReadImage(files["fixed"])
    geom = Geometry.of(fixed)
    img = {r: torch.from_numpy(robust_normalise(sitk.GetArrayFromImage(sitk.ReadImage(files[r])).astype("float32")))
           for r in ("fixed", "moving")}
    seg = tuple(sitk.GetArrayFromImage(sitk.ReadImage(files[r])) for r in ("fixed_seg", "moving_seg"))
    return PairOnGrid(img["fixed"][None, None], img["moving"][None, None], geom), seg


def _ct_accuracy(disp_vox: torch.Tensor, fixed_seg, moving_seg, geom) -> dict:
    """Mean Dice of the phantom's organs (labels 2–8) before and after, and % of voxels with det ≤ 0."""
    import numpy as np

    from deepdiffreg.field import jacobian_det, warp
    from deepdiffreg.metrics import dice_per_label
    labels = list(range(2, 9))
    with torch.no_grad():
        warped = warp(torch.from_numpy(moving_seg.astype(np.float32))[None, None], disp_vox, mode="nearest")
        det = jacobian_det(disp_vox)
    before = dice_per_label(fixed_seg, moving_seg, labels)
    after = dice_per_label(fixed_seg, warped[0, 0].numpy().astype(moving_seg.dtype), labels)
    return {"dice_before": round(float(np.mean(list(before.values()))), 4),
            "dice_after": round(float(np.mean(list(after.values()))), 4),
            "folded_pct": round(100.0 * float((det <= 0).float().mean()), 4)}


if __name__ == "__main__":
    main(sys.argv[1:])

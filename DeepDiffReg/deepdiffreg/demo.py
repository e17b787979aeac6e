"""``deepdiffreg demo``: generate the sample pair, register it, and say where everything is."""
from __future__ import annotations

import argparse
import os

from .console import make_reporter


def add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="register a generated sample pair and print where the outputs are")
    p.add_argument("--out", default="demo-output", help="folder for the sample data and the result (default demo-output)")
    p.add_argument("--method", default=None, help="registration method (default: the engine's default method)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .cli import default_threads, set_threads
    from .pipeline import RegisterRequest, register, summary_of
    from .sample_data import make_pair

    from .methods.base import default_method

    set_threads(default_threads())
    method = args.method or default_method()
    data_dir = os.path.join(args.out, "sample-data")
    print(f"Generating the sample pair (synthetic head phantom) in {data_dir} ...", flush=True)
    paths = make_pair(data_dir)
    result = os.path.join(args.out, "result")
    req = RegisterRequest(paths["fixed"], paths["moving"], method, result, device=args.device,
                          fixed_seg=paths["fixed_seg"], moving_seg=paths["moving_seg"], overwrite=True)
    report = register(req, make_reporter(getattr(args, "json_protocol", False)))
    s = summary_of(report)
    files = "\n".join(f"    {k:12s} {os.path.join(os.path.abspath(result), v)}" for k, v in report["files"].items())
    print(f"""
DeepDiffReg demo finished ({s['method']} on {s['device']}, {s['seconds']:.1f} s)
  folded voxels (det J <= 0): {s['percent_folded']:.4f} %   (min det J {s['min_det']:.3f})
  mean Dice over {report['dice']['after']['num_labels']} labels: {s['dice_before']:.3f} before -> {s['dice_initial_alignment']:.3f} after affine -> {s['dice_after']:.3f} after {s['method']}
  outputs:
{files}
  Load transform.h5 in 3D Slicer and set it as the parent transform of moving.nii.gz to see it aligned to fixed.nii.gz.""")
    return 0

"""``deepdiffreg evaluate``: fold statistics, Dice and TRE of any fixed → moving transform file.

Works for DeepDiffReg results and for other tools' transforms (ANTs, elastix, Slicer exports), as long as the file
is an ITK transform in the resampling direction (fixed point → moving point, LPS mm), so tools can be compared
with the same metric code.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import SimpleITK as sitk


def add_evaluate_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="folds, Dice and TRE of a fixed→moving transform file")
    p.add_argument("--transform", required=True, help="ITK transform file (.h5/.tfm/.txt), fixed → moving")
    p.add_argument("--fixed", required=True)
    p.add_argument("--moving", required=True)
    p.add_argument("--fixed-seg")
    p.add_argument("--moving-seg")
    p.add_argument("--fixed-landmarks")
    p.add_argument("--moving-landmarks")
    p.add_argument("--json", dest="json_out", help="also write the numbers to this JSON file")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .errors import BadInput
    from .frames import Geometry
    from .io import images
    from .metrics import fold_stats, jacobian_det_lps
    from .pipeline import displacement_on_grid, evaluate_transforms
    from .preprocess import foreground_mask

    fixed = images.read_image(args.fixed, "fixed image")
    moving = images.read_image(args.moving, "moving image")
    try:
        t = sitk.ReadTransform(args.transform)
    except RuntimeError:
        raise BadInput(f"cannot read transform {args.transform}") from None
    disp = sitk.GetArrayFromImage(displacement_on_grid([t], fixed))
    det = jacobian_det_lps(disp, Geometry.of(fixed))
    out = {"transform": args.transform, "folds": fold_stats(det, sitk.GetArrayFromImage(foreground_mask(fixed)))}
    fs = images.read_segmentation(args.fixed_seg, fixed, "fixed segmentation") if args.fixed_seg else None
    ms = images.read_segmentation(args.moving_seg, moving, "moving segmentation") if args.moving_seg else None
    fp = images.read_landmarks(args.fixed_landmarks, "fixed landmarks") if args.fixed_landmarks else None
    mp = images.read_landmarks(args.moving_landmarks, "moving landmarks") if args.moving_landmarks else None
    if fp is not None and mp is not None and len(fp) != len(mp):
        raise BadInput(f"landmark files have different lengths: {len(fp)} fixed vs {len(mp)} moving")
    out.update(evaluate_transforms({"identity": sitk.Transform(), "transform": t}, fixed, fs, ms, fp, mp))
    text = json.dumps(out, indent=2, default=lambda o: o.item() if isinstance(o, np.generic) else str(o))
    if args.json_out:
        with open(args.json_out, "w") as fh:
            fh.write(text)
    print(text)
    return 0

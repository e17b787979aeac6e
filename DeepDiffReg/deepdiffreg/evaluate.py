"""``deepdiffreg evaluate``: fold statistics, Dice and TRE of any fixed → moving transform file.

Works for DeepDiffReg results and for other tools' transforms (ANTs, elastix, Slicer exports), as long as the file
is an ITK transform in the resampling direction (fixed point → moving point, LPS mm), so tools can be compared
with the same metric code.
"""
from __future__ import annotations

import argparse

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
    import os
    import sys

    from .console import json_mode
    from .errors import BadInput
    from .frames import Geometry
    from .io import images
    from .metrics import fold_stats, jacobian_det_lps
    from .pipeline import displacement_on_grid, evaluate_transforms
    from .preprocess import foreground_mask
    from .progress import dumps, json_safe

    if args.json_out:   # refuse an unwritable --json before any work
        target = os.path.abspath(args.json_out)
        if os.path.isdir(target):
            raise BadInput(f"--json {args.json_out} is a folder; give a file name")
        if (os.path.exists(target) and not os.access(target, os.W_OK)) or not os.access(os.path.dirname(target),
                                                                                          os.W_OK | os.X_OK):
            raise BadInput(f"--json {args.json_out} is not writable")
    if (args.fixed_seg is None) != (args.moving_seg is None):
        raise BadInput("give both --fixed-seg and --moving-seg, or neither")
    if (args.fixed_landmarks is None) != (args.moving_landmarks is None):
        raise BadInput("give both --fixed-landmarks and --moving-landmarks, or neither")
    if not os.path.isfile(args.transform):
        raise BadInput(f"transform not found: {args.transform}")
    try:
        t = sitk.ReadTransform(args.transform)
    except RuntimeError:
        raise BadInput(f"cannot read transform {args.transform} (corrupt or not an ITK transform)") from None
    if t.GetDimension() != 3:
        raise BadInput(f"{args.transform} is a {t.GetDimension()}D transform; a 3D (fixed -> moving) transform is "
                       "needed")
    fixed = images.read_image(args.fixed, "fixed image")
    moving = images.read_image(args.moving, "moving image")
    fs = images.read_segmentation(args.fixed_seg, fixed, "fixed segmentation") if args.fixed_seg else None
    ms = images.read_segmentation(args.moving_seg, moving, "moving segmentation") if args.moving_seg else None
    fp = images.read_landmarks(args.fixed_landmarks, "fixed landmarks") if args.fixed_landmarks else None
    mp = images.read_landmarks(args.moving_landmarks, "moving landmarks") if args.moving_landmarks else None
    if fp is not None and mp is not None and len(fp) != len(mp):
        raise BadInput(f"landmark files have different lengths: {len(fp)} fixed vs {len(mp)} moving")
    disp = sitk.GetArrayFromImage(displacement_on_grid([t], fixed))
    det = jacobian_det_lps(disp, Geometry.of(fixed))
    out = {"transform": args.transform, "folds": fold_stats(det, sitk.GetArrayFromImage(foreground_mask(fixed)))}
    out.update(evaluate_transforms({"identity": sitk.Transform(), "transform": t}, fixed, fs, ms, fp, mp))
    out = json_safe(out)
    text = dumps(out, indent=2)
    if args.json_out:
        from .apply import _atomic_write

        def write(tmp):
            with open(tmp, "w") as fh:
                fh.write(text)
        _atomic_write(os.path.abspath(args.json_out), write)
    if json_mode():   # one protocol line: the numbers with "event": "result"
        print(dumps({"event": "result", **out}))
    else:
        print(text)
    sys.stdout.flush()
    return 0

"""``deepdiffreg apply``: use a result on other data — resample images/label maps, map landmark files.

Images defined on the moving image are pulled onto the fixed grid with transform.h5 (fixed → moving). Points
go the other way round: points on the fixed image map into moving space with transform.h5 (T), points on the
moving image map into fixed space with inverse.h5 (T⁻¹).
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import SimpleITK as sitk


def add_apply_parser(sub) -> None:
    p = sub.add_parser("apply", help="resample an image or map landmarks with a registration result")
    p.add_argument("--result", required=True, help="result directory of `deepdiffreg register`")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--image", help="image on the moving image's space, resampled onto the fixed grid")
    g.add_argument("--points", help="CSV of points (X,Y,Z LPS mm) to map")
    p.add_argument("--labels", action="store_true", help="the image is a label map (nearest-neighbour)")
    p.add_argument("--points-space", choices=["fixed", "moving"], default="moving",
                   help="space the points are defined in (default moving: mapped to fixed with inverse.h5)")
    p.add_argument("--out", required=True, help="output image or CSV")
    p.set_defaults(func=_cmd_apply)


def _cmd_apply(args: argparse.Namespace) -> int:
    import json

    from .errors import BadInput
    from .io.images import read_image, read_landmarks

    report_path = os.path.join(args.result, "report.json")
    if not os.path.isfile(report_path):
        raise BadInput(f"not a result directory (no report.json): {args.result}")
    with open(report_path) as fh:
        report = json.load(fh)
    files = report.get("files", {})
    if args.image:
        fixed = read_image(report["inputs"]["fixed"]["path"], "fixed image of the result")
        image = read_image(args.image, "image", pixel=sitk.sitkInt32 if args.labels else sitk.sitkFloat32)
        t = sitk.ReadTransform(os.path.join(args.result, files["transform"]))
        interp = sitk.sitkNearestNeighbor if args.labels else sitk.sitkLinear
        out = sitk.Resample(image, fixed, t, interp, 0, image.GetPixelID())
        sitk.WriteImage(out, args.out, useCompression=True)
        print(f"wrote {args.out} on the fixed grid {out.GetSize()}")
        return 0
    pts = read_landmarks(args.points, "points")
    key = "transform" if args.points_space == "fixed" else "inverse"
    if key not in files:
        raise BadInput(f"this result has no {key} transform (method without an inverse)")
    t = sitk.ReadTransform(os.path.join(args.result, files[key]))
    mapped = np.array([t.TransformPoint(tuple(float(c) for c in p)) for p in pts])
    with open(args.out, "w") as fh:
        fh.write("Landmark,X,Y,Z\n")
        for i, (x, y, z) in enumerate(mapped):
            fh.write(f"{i},{x:.6f},{y:.6f},{z:.6f}\n")
    target = "moving" if args.points_space == "fixed" else "fixed"
    print(f"wrote {len(mapped)} points in {target} space to {args.out}")
    return 0

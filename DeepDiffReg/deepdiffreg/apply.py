"""``deepdiffreg apply``: use a result on other data — resample images/label maps, map landmark files.

Images defined on the moving image are pulled onto the fixed grid with transform.h5 (fixed → moving). Points
go the other way round: points on the fixed image map into moving space with transform.h5 (T), points on the
moving image map into fixed space with inverse.h5 (T⁻¹).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

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
    p.add_argument("--out", required=True, help="output image or CSV (written atomically; an existing file is only "
                                                "replaced with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=_cmd_apply)


def _check_out(args: argparse.Namespace, inputs: list[str]) -> str:
    """--out must be a file path we may write: not a folder, not an input, not inside the result, no silent
    overwrite."""
    from .errors import BadInput
    from .io.result_writer import _is_within
    out = os.path.abspath(args.out)
    if os.path.isdir(out):
        raise BadInput(f"--out {args.out} is a folder; give a file name (e.g. on_fixed.nii.gz or points.csv)")
    for p in inputs:
        if p and os.path.exists(p) and os.path.realpath(p) == os.path.realpath(out):
            raise BadInput(f"--out {args.out} is an input of this command; choose another file name")
    if _is_within(out, args.result):
        raise BadInput(f"--out {args.out} lies inside the result folder {args.result}; write it elsewhere")
    if os.path.lexists(out) and not args.overwrite:
        raise BadInput(f"--out {args.out} exists already (use --overwrite to replace it)")
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        raise BadInput(f"--out {args.out}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BadInput(f"--out {args.out}: folder {parent} is not writable")
    return out


def _atomic_write(out: str, write, verify=None) -> None:
    """``write(tmp)`` into a hidden sibling of ``out`` (same extension), ``verify(tmp)``, then rename it into place;
    nothing is left on failure, and a full disk is said plainly."""
    from .errors import BadInput, RegistrationError
    from .io.result_writer import _no_space
    folder, name = os.path.split(out)
    tmp = os.path.join(folder, f".partial-{os.getpid()}-{name}")
    try:
        write(tmp)
        if verify is not None:
            verify(tmp)
        os.replace(tmp, out)
    except BaseException as e:
        full = _no_space(e if isinstance(e, (OSError, RuntimeError)) else RuntimeError(), folder)  # before removing
        if os.path.exists(tmp):
            os.remove(tmp)
        if full and isinstance(e, (OSError, RuntimeError, BadInput)):
            raise BadInput(f"no space left on the device while writing {out} (nothing was written)") from None
        if isinstance(e, RegistrationError):
            raise
        if isinstance(e, RuntimeError):
            raise BadInput(f"cannot write {out}: {str(e).strip().splitlines()[-1][:200]}") from None
        if isinstance(e, OSError):
            raise BadInput(f"cannot write {out}: {e.strerror or e}") from None
        raise


def _read_result(result: str) -> tuple[dict, dict]:
    from .errors import BadInput
    report_path = os.path.join(result, "report.json")
    if not os.path.isfile(report_path):
        raise BadInput(f"not a result directory (no report.json): {result}")
    try:
        with open(report_path) as fh:
            report = json.load(fh)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise BadInput(f"{report_path} is not readable JSON ({str(e).splitlines()[0][:120]}); is the result "
                       "complete?") from None
    files = report.get("files") if isinstance(report, dict) else None
    if not isinstance(files, dict) or "transform" not in files:
        raise BadInput(f"{report_path} does not list the result's files (no files.transform)")
    return report, files


def _read_transform(result: str, files: dict, key: str) -> sitk.Transform:
    from .errors import BadInput
    from .io.weights import inside
    path = inside(result, str(files.get(key, "")))
    if path is None:
        raise BadInput(f"report.json names the {key} file {files.get(key)!r}, which is not inside {result}")
    if not path.is_file():
        raise BadInput(f"the result's {key} file is missing: {path}")
    try:
        t = sitk.ReadTransform(str(path))
    except RuntimeError:
        raise BadInput(f"cannot read the result's {key} file {path} (corrupt or not an ITK transform)") from None
    if t.GetDimension() != 3:
        raise BadInput(f"{path} is a {t.GetDimension()}D transform; a 3D transform is needed")
    return t


def _cmd_apply(args: argparse.Namespace) -> int:
    from .console import json_mode
    from .errors import BadInput
    from .io.images import check_nifti_header, read_image, read_labels, read_landmarks
    from .progress import Reporter

    as_json = json_mode(getattr(args, "json_protocol", False))
    report, files = _read_result(args.result)
    out = _check_out(args, [args.image, args.points])
    if args.image:
        try:
            fixed_path = report["inputs"]["fixed"]["path"]
        except (KeyError, TypeError):
            raise BadInput(f"{args.result}/report.json does not name the fixed image (inputs.fixed.path)") from None
        fixed = read_image(fixed_path, "fixed image of the result")
        image = read_labels(args.image, "label map") if args.labels else read_image(args.image, "image")
        t = _read_transform(args.result, files, "transform")
        interp = sitk.sitkNearestNeighbor if args.labels else sitk.sitkLinear
        resampled = sitk.Resample(image, fixed, t, interp, 0, image.GetPixelID())

        def verify(tmp):   # a full disk can leave a short gzip without an error from the writer
            check_nifti_header(tmp, "written image")
            r = sitk.ImageFileReader()
            r.SetFileName(tmp)
            r.ReadImageInformation()
            if tuple(r.GetSize()) != tuple(resampled.GetSize()):
                raise BadInput(f"{out} did not write completely")

        _atomic_write(out, lambda tmp: sitk.WriteImage(resampled, tmp, useCompression=True), verify)
        print(f"wrote {args.out} on the fixed grid {resampled.GetSize()}")
        if as_json:
            Reporter(sys.stdout).result(out, os.path.join(os.path.abspath(args.result), "report.json"),
                                        {"kind": "labels" if args.labels else "image", "size": list(resampled.GetSize())})
        return 0
    pts = read_landmarks(args.points, "points")
    key = "transform" if args.points_space == "fixed" else "inverse"
    if key not in files:
        raise BadInput(f"this result has no {key} transform (method without an inverse)")
    t = _read_transform(args.result, files, key)
    mapped = np.array([t.TransformPoint(tuple(float(c) for c in p)) for p in pts])
    if not np.isfinite(mapped).all():
        raise BadInput("some points map to NaN/infinite coordinates (corrupt transform?)")
    text = "Landmark,X,Y,Z\n" + "".join(f"{i},{x:.6f},{y:.6f},{z:.6f}\n" for i, (x, y, z) in enumerate(mapped))

    def write(tmp):
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())

    _atomic_write(out, write)
    target = "moving" if args.points_space == "fixed" else "fixed"
    print(f"wrote {len(mapped)} points in {target} space to {args.out}")
    if as_json:
        Reporter(sys.stdout).result(out, os.path.join(os.path.abspath(args.result), "report.json"),
                                    {"kind": "points", "space": target, "num_points": int(len(mapped))})
    return 0

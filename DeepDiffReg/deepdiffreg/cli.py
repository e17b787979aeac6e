"""Command line: ``deepdiffreg register | methods | models | train | benchmark``.

Every expected failure ends with one line on stderr (``deepdiffreg: error: ...``), a JSON error line on stdout
and a distinct exit code (progress.ExitCode); no traceback unless --debug or DEEPDIFFREG_DEBUG=1.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from .errors import BadInput, Cancelled, OutOfMemory, RegistrationError
from .progress import ExitCode, Reporter


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line with the BAD_INPUT exit code."""

    def error(self, message):  # noqa: D401
        raise BadInput(f"{self.prog}: {message}")


def _cancel_handler(signum, frame):
    raise Cancelled(f"cancelled by {signal.Signals(signum).name}")


def _add_register(sub) -> None:
    from .methods.base import REGISTRY
    from .methods import load_all
    load_all()
    p = sub.add_parser("register", help="register a moving image to a fixed image",
                       description="Register MOVING to FIXED and write transform.h5 (fixed->moving, LPS mm on the fixed "
                                   "grid), inverse.h5, jacobian.nii.gz, grid.vtk, warped.nii.gz and report.json to OUT.")
    p.add_argument("--fixed", required=True, help="fixed image (any SimpleITK format, or a DICOM folder)")
    p.add_argument("--moving", required=True, help="moving image")
    p.add_argument("--method", default="nodeo", help=f"one of: {', '.join(sorted(REGISTRY))} (default nodeo)")
    p.add_argument("--out", required=True, help="result directory (created; must be empty unless --overwrite)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda")
    p.add_argument("--fixed-seg", help="fixed segmentation (label map on the fixed grid) for Dice")
    p.add_argument("--moving-seg", help="moving segmentation for Dice")
    p.add_argument("--fixed-landmarks", help="CSV of fixed landmarks (X,Y,Z in LPS mm) for TRE")
    p.add_argument("--moving-landmarks", help="CSV of corresponding moving landmarks")
    p.add_argument("--fixed-mask", help="region of interest on the fixed grid (non-zero voxels): similarity is "
                                        "measured inside it and fold statistics are reported for it")
    p.add_argument("--no-align", dest="align", action="store_const", const="none", default="affine",
                   help="skip the initial affine alignment (images already aligned)")
    p.add_argument("--align", dest="align", choices=["affine", "rigid", "none"], help="initial alignment (default affine)")
    p.add_argument("--align-erode-mm", type=float, default=None,
                   help="where the initial alignment is measured: 0 = the whole image; >0 = the head eroded by this "
                        "many mm. Default: automatic — whole-head scans (head-sized foreground, 2.5–10 L) use the top "
                        "150 mm of the head eroded by 10 mm, so neck and scalp do not pull the affine; anything else "
                        "the whole image")
    p.add_argument("--spacing", type=float, default=None, help="working-grid spacing in mm (default: the method's)")
    p.add_argument("--refine", type=int, default=None, help="test-time refinement steps for learned methods (default 0)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch and SimpleITK (default: cores - 1, at least 1, so the machine stays "
                        "responsive)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing result directory")
    for cls in REGISTRY.values():
        cls.add_arguments(p)
    p.set_defaults(func=_cmd_register)


def default_threads() -> int:
    """torch threads when the user gives none: cores − 1, at least 1. On a busy machine OpenMP threads that wait
    for a descheduled peer make every operation several times slower (measured 7× on 2 cores under load), and
    Slicer's GUI needs a core too."""
    return max(1, (os.cpu_count() or 2) - 1)


def set_threads(n: int) -> None:
    """Use ``n`` CPU threads in torch and in SimpleITK (whose filters default to every core)."""
    import SimpleITK as sitk
    import torch
    torch.set_num_threads(n)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(n)


def passive_openmp_waits() -> None:
    """Make idle OpenMP threads sleep instead of spinning (unless the user set OMP_WAIT_POLICY).

    libgomp's default is to spin for a while at every barrier. With as many threads as cores and any other load
    (Slicer, a training job), a spinning thread takes the core its descheduled peer needs: vxm-diff's inference on
    the 2-core box took 3.0–3.6 s with 2 threads instead of 0.7 s (the same with 1 thread, or 2 passive ones).
    Only takes effect before libgomp is loaded, i.e. before torch is imported.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _cmd_register(args) -> int:
    from .methods.base import get_method
    from .pipeline import RegisterRequest, register, summary_of

    set_threads(args.threads or default_threads())
    cls = get_method(args.method)
    options = cls.options_from_args(args)
    if args.refine is not None:
        if not cls.learned:
            raise BadInput(f"--refine applies to learned methods; {args.method} already optimises on the pair")
        options["refine"] = args.refine
    req = RegisterRequest(fixed=args.fixed, moving=args.moving, method=args.method, out_dir=args.out,
                          device=args.device, fixed_seg=args.fixed_seg, moving_seg=args.moving_seg,
                          fixed_landmarks=args.fixed_landmarks, moving_landmarks=args.moving_landmarks,
                          fixed_mask=args.fixed_mask, align_erode_mm=args.align_erode_mm,
                          align=args.align, spacing_mm=args.spacing, method_options=options, overwrite=args.overwrite)
    reporter = Reporter(sys.stdout)
    report = register(req, reporter)
    s = summary_of(report)
    out = os.path.abspath(args.out)
    reporter.result(out, os.path.join(out, "report.json"), s)
    lines = [f"Result: {out}", f"  {s['method']} on {s['device']}, {s['seconds']:.1f} s",
             f"  folded voxels (det <= 0): {s['percent_folded']:.4f} %  (min det {s['min_det']:.3f})"]
    if "dice_after" in s:
        lines.append(f"  Dice: {s['dice_before']:.3f} before -> {s['dice_initial_alignment']:.3f} after initial "
                     f"alignment -> {s['dice_after']:.3f} after {s['method']}")
    if "tre_after_mm" in s:
        lines.append(f"  TRE: {s['tre_before_mm']:.2f} mm before -> {s['tre_after_mm']:.2f} mm after")
    reporter.text("\n".join(lines))
    global _teardown_needed
    _teardown_needed = False  # the result directory is complete and closed: see run()
    return 0


def _add_methods(sub) -> None:
    p = sub.add_parser("methods", help="list registration methods and installed models")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_methods)


def _cmd_methods(args) -> int:
    from .methods import load_all
    from .methods.base import REGISTRY
    load_all()
    models = []
    try:
        from .io.weights import list_models
        models = list_models()
    except ImportError:
        pass
    rows = [{"name": c.name, "description": c.description, "learned": c.learned,
             "default_spacing_mm": c.default_spacing_mm, "has_inverse": c.has_inverse,
             "models": [m for m in models if m.get("method") == c.name]} for c in REGISTRY.values()]
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
    else:
        for r in rows:
            print(f"{r['name']:10s} {r['description']}")
            for m in r["models"]:
                print(f"{'':10s}   model {m.get('id')} v{m.get('version')} ({m.get('status', 'installed')})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="deepdiffreg", description="Diffeomorphic image registration (engine of the DeepDiffReg "
                                                     "Slicer extension).")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_register(sub)
    _add_methods(sub)
    import importlib
    for modname, fn in ((".train.cli", "add_train_parser"), (".train.cli", "add_models_parser"),
                        (".benchmark", "add_benchmark_parser"), (".evaluate", "add_evaluate_parser"),
                        (".demo", "add_demo_parser"), (".apply", "add_apply_parser"), (".batch", "add_batch_parser")):
        try:
            module = importlib.import_module(modname, __package__)
        except ModuleNotFoundError as e:  # only a subcommand module left out of this build is optional
            if e.name != f"{__package__}{modname}":
                raise
            continue
        getattr(module, fn)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # never die on a console that cannot show a character
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError):
            pass
    passive_openmp_waits()
    signal.signal(signal.SIGTERM, _cancel_handler)
    signal.signal(signal.SIGINT, _cancel_handler)
    debug = os.environ.get("DEEPDIFFREG_DEBUG") == "1" or "--debug" in (argv if argv is not None else sys.argv[1:])
    reporter = Reporter(sys.stdout)
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except BrokenPipeError:  # the reader went away (e.g. `| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return int(ExitCode.ERROR)
    except RegistrationError as e:
        code, msg = e.code, str(e)
    except MemoryError:
        code, msg = ExitCode.OUT_OF_MEMORY, "out of CPU memory; retry with a coarser --spacing"
    except Exception as e:  # noqa: BLE001 — the last line of defence: one line, not a traceback
        import torch
        if isinstance(e, torch.OutOfMemoryError):
            code, msg = OutOfMemory.code, "out of GPU memory; retry with --device cpu or a coarser --spacing"
        else:
            if debug:
                raise
            code, msg = ExitCode.ERROR, f"internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if debug and code != ExitCode.CANCELLED:
        import traceback
        traceback.print_exc()
    msg = " ".join(msg.split())
    reporter.error(code, msg)
    print(f"deepdiffreg: error: {msg}", file=sys.stderr)
    return int(code)


# A command clears this when everything it wrote is closed and nothing of it needs the interpreter's teardown.
_teardown_needed = True


def run() -> None:
    """Entry point of the ``deepdiffreg`` script and of ``python -m deepdiffreg`` (the Slicer module's command).

    Runs ``main()``. After a successful ``register`` (result directory complete, files closed and renamed into
    place) it flushes stdout/stderr and ends the process with ``os._exit``: the interpreter's teardown with torch
    loaded (torch's operator-library finalizers) takes ~0.4 s, 5 % of a 1 mm registration on the 2-core CPU. Every
    other command and every failure exits normally (training's data-loader workers, for one, are cleaned up there).
    """
    code = main()
    if not _teardown_needed:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe: nothing more can reach the reader anyway
                pass
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()

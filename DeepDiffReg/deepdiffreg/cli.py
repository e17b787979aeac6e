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

from .console import LibraryOutput, close_bars, json_mode, make_reporter
from .errors import BadInput, Cancelled, OutOfMemory, RegistrationError
from .progress import ExitCode, Reporter


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line with the BAD_INPUT exit code."""

    def error(self, message):  # noqa: D401
        raise BadInput(f"{self.prog}: {message}")


def _cancel_handler(signum, frame):
    # Later signals are ignored: a second SIGTERM while the first one's cleanup runs (removing the partial folder)
    # must not interrupt it, and the run still ends with the CANCELLED exit code. SIG_IGN, not a Python handler:
    # the interpreter resets Python handlers to the default at teardown (~0.4 s with torch loaded), where a second
    # SIGTERM would kill the process with -15.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    raise Cancelled(f"cancelled by {signal.Signals(signum).name}")


def _add_register(sub) -> None:
    from .method_args import add_method_arguments
    from .methods.base import all_methods, default_method
    methods = all_methods()
    p = sub.add_parser("register", help="register a moving image to a fixed image",
                       description="Register MOVING to FIXED and write transform.h5 (fixed->moving, LPS mm on the fixed "
                                   "grid), inverse.h5, jacobian.nii.gz, grid.vtk, warped.nii.gz and report.json to OUT.")
    p.add_argument("--fixed", required=True, help="fixed image (any SimpleITK format, or a DICOM folder)")
    p.add_argument("--moving", required=True, help="moving image")
    p.add_argument("--method", default=default_method(),
                   help=f"one of: {', '.join(sorted(methods))} (default {default_method()}; see `deepdiffreg methods`)")
    p.add_argument("--out", required=True, help="result directory (created; must be empty unless --overwrite)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda")
    p.add_argument("--fixed-seg", help="fixed segmentation (label map on the fixed grid) for Dice")
    p.add_argument("--moving-seg", help="moving segmentation for Dice")
    p.add_argument("--fixed-landmarks", help="CSV of fixed landmarks (X,Y,Z in LPS mm) for TRE")
    p.add_argument("--moving-landmarks", help="CSV of corresponding moving landmarks")
    p.add_argument("--fixed-mask", help="region of interest on the fixed grid (non-zero voxels): similarity is "
                                        "measured inside it and fold statistics are reported for it")
    p.add_argument("--no-align", dest="align", action="store_const", const="none", default=None,
                   help="skip the initial affine alignment (images already aligned)")
    p.add_argument("--follow-up", action="store_true",
                   help="the two images are scans of one patient (e.g. a follow-up of a baseline): methods that "
                        "declare a follow-up refinement (`deepdiffreg methods`: *_follow_up_refine) refine their "
                        "prediction on the pair, since a network trained on different subjects adds deformation "
                        "that one patient's scans do not have")
    p.add_argument("--align", dest="align", choices=["affine", "rigid", "none"],
                   help="initial alignment (default: the method's; affine for methods without their own)")
    p.add_argument("--align-erode-mm", type=float, default=None,
                   help="where the initial alignment is measured: 0 = the whole image; >0 = the head eroded by this "
                        "many mm. Default: automatic — whole-head scans (head-sized foreground, 2.5–10 L) use the top "
                        "150 mm of the head eroded by 10 mm, so neck and scalp do not pull the affine; anything else "
                        "the whole image")
    p.add_argument("--spacing", type=float, default=None, help="working-grid spacing in mm (default: the method's)")
    p.add_argument("--spacing-scale", type=float, default=None, metavar="F",
                   help="the method's default working spacing for this image times F (0.75: finer, 1.5: coarser; "
                        "rounded to 0.25 mm); not with --spacing")
    p.add_argument("--field-grid", choices=["working", "fixed"], default="working",
                   help="grid of the displacement stored in transform.h5 / inverse.h5: 'working' (default) the "
                        "method's own grid, padded (small file, the same T at every fixed voxel); 'fixed' the fixed "
                        "image's full-resolution grid, padded (float64: ~190 MB for a 1 mm brain)")
    p.add_argument("--contrast-check", choices=["error", "warn", "off"], default="error",
                   help="a method that handles one contrast, on images that look like two (rank correlation of "
                        "their intensities after the initial alignment below 0.2, e.g. T1 to T2): 'error' (default) "
                        "refuse before it runs; 'warn' run it and record the warning in report.json; 'off' no check")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch and SimpleITK (default: the cores this process may use - 1, at "
                        "least 1, so the machine stays responsive); besides them one helper thread at a time "
                        "overlaps parts of the write stage (the warped images, the files) and, when a core is left, "
                        "makes the fold mask during the registration and a method's map beside the write stage "
                        "(vxm-diff's uncertainty)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing result directory")
    add_method_arguments(p)
    p.set_defaults(func=_cmd_register)


def default_threads() -> int:
    """torch threads when the user gives none: cores − 1, at least 1. On a busy machine OpenMP threads that wait
    for a descheduled peer make every operation several times slower (measured 7× on 2 cores under load), and
    Slicer's GUI needs a core too. Cores: the process's share (``cores.usable_cores``), as everywhere else."""
    from .cores import usable_cores
    return max(1, usable_cores() - 1)


def set_threads(n: int) -> None:
    """Use ``n`` CPU threads in torch and in SimpleITK (whose filters default to every core)."""
    if not isinstance(n, int) or n < 1:
        raise BadInput(f"--threads must be a whole number >= 1, got {n!r}")
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


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep freed memory for the next allocation instead of handing it back to the kernel.

    A registration allocates and frees many arrays of 5–30 MB (the network's activations, the write stage's slabs,
    images of the fixed grid). By default glibc serves each one above its (dynamic) mmap threshold from fresh
    pages and trims the heap's top on free, so every such array is page-faulted in again; on this project's 2-core
    VM a fresh page costs ~10 µs (27 MB: 68 ms to fill fresh, 1 ms to fill again). Here: arrays up to 32 MB
    (glibc's maximum mmap threshold) come from the heap, the heap is never trimmed and grows 64 MB at a time.
    Measured on a 1 mm brain (vxm-diff, ``--threads 1``, 5 runs interleaved): 234–263 k minor page faults → 172–180 k,
    kernel time 0.77–1.09 → 0.44–0.57 s, the write stage 1.55–2.25 → 1.23–1.39 s (docs/speed-1mm.md). The process
    keeps its high-water mark until it exits, which a ``register`` child does; so ``run()`` (the
    process's entry point) sets it, not ``main()``. Returns whether it took effect
    (Linux with glibc only; a no-op elsewhere or when the user set any MALLOC_*_ variable)."""
    if not sys.platform.startswith("linux") or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):      # musl and other C libraries: nothing to set
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 2 ** 31 - 1), (_M_TOP_PAD, 64 << 20)))


def _cmd_register(args) -> int:
    from .method_args import method_options_from_args
    from .methods.base import get_method
    from .pipeline import RegisterRequest, register, summary_of

    cls = get_method(args.method)
    options = method_options_from_args(args, cls)
    cls.parse_options(options)   # every option checked before a thread is set or a file is read
    set_threads(default_threads() if args.threads is None else args.threads)
    req = RegisterRequest(fixed=args.fixed, moving=args.moving, method=args.method, out_dir=args.out,
                          device=args.device, fixed_seg=args.fixed_seg, moving_seg=args.moving_seg,
                          fixed_landmarks=args.fixed_landmarks, moving_landmarks=args.moving_landmarks,
                          fixed_mask=args.fixed_mask, align_erode_mm=args.align_erode_mm,
                          align=args.align, follow_up=args.follow_up, spacing_mm=args.spacing,
                          spacing_scale=args.spacing_scale,
                          method_options=options, overwrite=args.overwrite, field_grid=args.field_grid,
                          contrast_check=args.contrast_check)
    reporter = make_reporter(getattr(args, "json_protocol", False))
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
    if s.get("warning"):
        lines.append(f"  warning: {s['warning']}")
    reporter.text("\n".join(lines))
    global _teardown_needed
    _teardown_needed = False  # the result directory is complete and closed: see run()
    return 0


def _add_methods(sub) -> None:
    p = sub.add_parser("methods", help="list registration methods and installed models")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_methods)


CONTRAST_TEXT = {"same": "one contrast only (both images must look alike, e.g. T1 to T1)",
                 "different": "also different contrasts (e.g. T1 to T2)"}


def _cmd_methods(args) -> int:
    from .io.weights import list_models
    from .methods.base import all_methods, contrasts_of
    models = list_models()
    rows = []
    for _, c in sorted(all_methods().items()):
        mine = [{**m, "contrasts": contrasts_of(c, m), "contrasts_from": "model" if "contrasts" in m else "method"}
                for m in models if m.get("method") == c.name]
        # what a run gets: the first installed model's statement for a learned method, else the declaration
        rows.append({**c.describe(), "contrasts": mine[0]["contrasts"] if mine else c.caps.contrasts,
                     "models": mine})
    if args.json:
        print(json.dumps(rows, indent=2, default=str, allow_nan=False))
    else:
        for r in rows:
            print(f"{r['name']:10s} {r['description']}{'  (default)' if r['default'] else ''}")
            print(f"{'':10s}   contrasts: {CONTRAST_TEXT[r['contrasts']]}")
            if r["caps"]["uncertainty"]:
                print(f"{'':10s}   uncertainty map: "
                      + ("validated as QA" if r["caps"]["uncertainty_qa"] else
                         "not validated as QA (it does not follow the registration error closely; see "
                         "docs/benchmarks.md)"))
            follow_up = next((o for o in r["options"] if o["name"] == "follow_up_refine"), None)
            if follow_up is not None:      # what `register --follow-up` does for this method (RefineOptions)
                print(f"{'':10s}   follow-up scans (--follow-up): "
                      + (f"{follow_up['default']} refinement steps ({follow_up['flag']})" if follow_up["default"]
                         else f"nothing by default ({follow_up['flag']} N to refine)"))
            for m in r["models"]:
                print(f"{'':10s}   model {m.get('id')} v{m.get('version')} ({m.get('status', 'installed')}), "
                      f"contrasts: {m['contrasts']}"
                      + ("" if m["contrasts_from"] == "model" else " (the model states none: the method's declaration)"))
            if r["learned"] and not r["models"]:
                print(f"{'':10s}   no trained model installed (`deepdiffreg train --method {r['name']}` or "
                      f"`deepdiffreg models import`)")
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
                        (".demo", "add_demo_parser"), (".apply", "add_apply_parser"), (".batch", "add_batch_parser"),
                        (".warm", "add_parser")):
        try:
            module = importlib.import_module(modname, __package__)
        except ModuleNotFoundError as e:  # only a subcommand module left out of this build is optional
            if e.name != f"{__package__}{modname}":
                raise
            continue
        getattr(module, fn)(sub)
    for name, p in sub.choices.items():  # `<command> --json`: JSON lines on stdout even in a terminal
        if "--json" not in p._option_string_actions:
            p.add_argument("--json", dest="json_protocol", action="store_true",
                           help="print the JSON-lines protocol (progress, result, error) instead of the progress bar; "
                                "automatic when stdout is not a terminal")
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
    argv = sys.argv[1:] if argv is None else list(argv)
    as_json = json_mode("--json" in argv)
    lib = LibraryOutput(enabled=not debug)
    try:
        with lib:
            if argv[:1] == ["warm"]:     # a spare engine: imports now, its command comes later (warm.py)
                from .warm import wait_for_request
                argv = wait_for_request(argv[1:], Reporter(sys.stdout), build_parser)
                if argv is None:
                    return 0             # nobody asked: nothing was written
                debug = debug or "--debug" in argv
                as_json = json_mode("--json" in argv)
            args = build_parser().parse_args(argv)
            as_json = json_mode(getattr(args, "json_protocol", False) or getattr(args, "json", False) is True)
            code = int(args.func(args) or 0)
        note = lib.summary()
        if note:
            if as_json:
                Reporter(sys.stdout).info(note, lines=(lib.lines + lib.warnings)[:20])
            else:
                print(f"note: {note}")
        return code
    except BrokenPipeError:  # the reader went away (e.g. `| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return int(ExitCode.ERROR)
    except RegistrationError as e:
        code, msg = e.code, str(e)
    except MemoryError:
        code, msg = ExitCode.OUT_OF_MEMORY, "out of CPU memory; retry with a coarser --spacing"
    except Exception as e:  # noqa: BLE001 — the last line of defence: one line, not a traceback
        from .compat import is_out_of_memory
        if is_out_of_memory(e):
            code, msg = OutOfMemory.code, "out of GPU memory; retry with --device cpu or a coarser --spacing"
        else:
            if debug:
                raise
            code, msg = ExitCode.ERROR, f"internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if debug and code != ExitCode.CANCELLED:
        import traceback
        traceback.print_exc()
    msg = " ".join(msg.split())
    if code == ExitCode.ERROR and any("no space left" in ln.lower() for ln in lib.lines):
        msg = f"no space left on the device ({msg})"
    elif code == ExitCode.ERROR and lib.summary():   # an internal error: what the libraries said may explain it
        msg = f"{msg} ({lib.summary()})"
    close_bars()   # a failed run's progress bar must not share its line with the error
    if as_json:
        if lib.lines or lib.warnings:
            Reporter(sys.stdout).info("library output", lines=(lib.lines + lib.warnings)[:20])
        Reporter(sys.stdout).error(code, msg)
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
    keep_freed_memory()    # a process-wide malloc setting: the process's entry point, not main() (in-process callers)
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

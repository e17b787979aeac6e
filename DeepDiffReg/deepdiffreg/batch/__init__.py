"""``deepdiffreg batch``: register a cohort on Dask — every pair its own ``deepdiffreg register`` process.

    deepdiffreg batch --pairs pairs.csv --out OUT [-- REGISTER ARGUMENTS]
    deepdiffreg batch --atlas atlas.nii.gz --moving 'cohort/*.nii.gz' --out OUT [-- REGISTER ARGUMENTS]

Everything after ``--`` goes unchanged to each pair's ``register`` (method, method options, --spacing, --device,
...). Results land in ``OUT/<id>/`` (the usual result contract), the QA summary in ``OUT/summary.{csv,json,md}``
and ``OUT/qa_montage.png``. See docs/batch.md. Dask is imported only when the command runs, so ``register`` and
the rest of the engine work without it (``pip install deepdiffreg[batch]``).
"""
from __future__ import annotations

import argparse

from ..errors import BadInput, RegistrationError
from ..progress import ExitCode


def add_batch_parser(sub) -> None:
    p = sub.add_parser(
        "batch", help="register many pairs (a cohort) on a Dask cluster, resumable, with a QA summary",
        description="Register every pair of a pairs CSV, or one atlas against many moving images, each pair as its own "
                    "`deepdiffreg register` process on a Dask worker. Arguments after -- go to every register "
                    "unchanged. Pairs whose result is up to date are skipped; failed pairs are retried and recorded; "
                    "Ctrl-C stops every pair and keeps only complete results.",
        epilog="example: deepdiffreg batch --atlas atlas.nii.gz --moving 'cohort/*.nii.gz' --out OUT -- --spacing 3")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pairs", metavar="CSV", help="pairs CSV: columns fixed, moving and optionally id, fixed_seg, "
                                                    "moving_seg, fixed_landmarks, moving_landmarks, fixed_mask "
                                                    "(relative paths: from the CSV's folder)")
    src.add_argument("--atlas", metavar="FIXED", help="one fixed image for all pairs (atlas-to-cohort)")
    p.add_argument("--moving", nargs="+", metavar="IMAGE", help="with --atlas: moving images and/or glob patterns")
    p.add_argument("--out", required=True, help="output folder: OUT/<id>/ per pair, plus the summary files")
    p.add_argument("--scheduler", default="local",
                   help="'local' (default): a Dask cluster on this machine; or the address of a running scheduler, "
                        "e.g. tcp://HOST:8786 (workers must have deepdiffreg installed and see the same files)")
    p.add_argument("--workers", type=int, default=None,
                   help="local: pairs at once (default: one per GPU, or cores / --threads-per-pair limited by free "
                        "memory / --memory-per-pair)")
    p.add_argument("--threads-per-pair", type=int, default=None,
                   help="CPU threads of each register (default: the worker's share of the cores; a --threads after "
                        "-- wins)")
    p.add_argument("--memory-per-pair", type=float, default=4.0, metavar="GB",
                   help="local sizing: memory one pair may need (default 4 GB)")
    p.add_argument("--gpus", default="auto", help="local: 'auto' (all visible GPUs, one worker each), 'none', or ids "
                                                  "like 0,1")
    p.add_argument("--retries", type=int, default=2,
                   help="extra attempts for a failed pair (default 2; bad input and missing weights are not retried)")
    p.add_argument("--fold-threshold", type=float, default=0.01, metavar="PCT",
                   help="flag pairs with more than PCT %% folded voxels in the foreground (default 0.01)")
    p.add_argument("--montage", type=int, default=24, metavar="N",
                   help="pairs in qa_montage.png, worst first (default 24; 0: none)")
    p.add_argument("--dry-run", action="store_true", help="list which pairs would run and why; run nothing")
    p.add_argument("--json", action="store_true", help="JSON lines on stdout instead of a progress bar")
    p.add_argument("register_args", nargs=argparse.REMAINDER, metavar="-- REGISTER_ARGS",
                   help="after --: arguments for every pair's register (method, its options, --spacing, ...)")
    p.set_defaults(func=_cmd_batch)


def _cmd_batch(args) -> int:
    from .console import Console
    from .pairs import atlas_pairs, read_pairs_csv
    from .request import parse_register_args

    try:
        import distributed  # noqa: F401
    except ImportError:
        raise RegistrationError("deepdiffreg batch needs Dask: pip install 'deepdiffreg[batch]' (dask[distributed])",
                                ExitCode.ERROR) from None
    register_args = list(args.register_args)
    if register_args[:1] == ["--"]:
        register_args = register_args[1:]
    for name in ("workers", "threads_per_pair", "retries", "montage"):
        v = getattr(args, name)
        if v is not None and (v < 0 or (v == 0 and name in ("workers", "threads_per_pair"))):
            raise BadInput(f"--{name.replace('_', '-')} must be {'at least 1' if name in ('workers', 'threads_per_pair') else '0 or more'}")
    if args.atlas:
        if not args.moving:
            raise BadInput("--atlas needs --moving IMAGE|GLOB ...")
        pairs = atlas_pairs(args.atlas, args.moving, exclude_under=args.out)
    else:
        if args.moving:
            raise BadInput("--moving goes with --atlas; with --pairs the CSV names the moving images")
        pairs = read_pairs_csv(args.pairs)
    req = parse_register_args(register_args)
    if getattr(req.namespace, "fixed_mask", None) and any("fixed_mask" in p.inputs for p in pairs):
        raise BadInput("a fixed mask is given both after -- and in the pairs CSV; give one")
    from .runner import BatchOptions, run_batch
    opts = BatchOptions(out=args.out, scheduler=args.scheduler, workers=args.workers,
                        threads_per_pair=args.threads_per_pair, memory_per_pair_gb=args.memory_per_pair,
                        gpus=args.gpus, retries=args.retries, fold_threshold_pct=args.fold_threshold,
                        montage_max=args.montage, dry_run=args.dry_run)
    return run_batch(pairs, req, opts, Console(as_json=args.json))

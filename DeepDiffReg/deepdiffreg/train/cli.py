"""`deepdiffreg train` and `deepdiffreg models` (list / import / delete). The main cli.py calls
``add_train_parser(subparsers)`` and ``add_models_parser(subparsers)``; each sets ``func=handler(args) -> int``.
Also runnable alone: ``python -m deepdiffreg.train.cli train ...``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..progress import dumps

DEFAULT_CACHE = Path.home() / ".cache" / "deepdiffreg" / "train-v2"


# the flags of `train` itself; a method's training option with one of these names cannot be given on the CLI
_OPT = "train_option:"
REAL_DATA_LICENCE = ("Apache-2.0 (weights); trained on IXI (CC BY-SA 3.0, brain-development.org), DLMUSE "
                     "segmentations (LICENSE-SBIA) and SynthSeg label maps (Apache-2.0); see models/LICENSE.md")
SYNTH_DATA_LICENCE = "Apache-2.0 (weights); trained on generated phantom label maps (deepdiffreg/sample_data.py)"


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    from ..methods.learned import trainable_methods
    methods = trainable_methods()
    p = subparsers.add_parser("train", help="train a learned method (resumable; logs CSV + PNG; publishes to models/)")
    p.add_argument("--method", default=None, choices=sorted(methods),
                   help="the method to train (the discovered methods that implement the training protocol, "
                        "methods/learned.py); default: the method of the run being resumed or of --init's weights")
    p.add_argument("--out", required=True, help="run folder (checkpoint.pt, train_log.csv/png, best.pt); "
                                                "an existing run folder is resumed")
    p.add_argument("--steps", type=int, default=20000, help="total steps (resume continues up to this)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-every", type=int, default=200)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (leave cores to others)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--max-hours", type=float, default=0.0, help="stop with a checkpoint after this long")
    p.add_argument("--cache", default=str(DEFAULT_CACHE), help="preprocessed data cache (built on first use)")
    p.add_argument("--data", default=None, help="data root (default: ../shared/data beside the checkout)")
    p.add_argument("--synthetic", type=int, default=None, metavar="N",
                   help="train on generated phantom label-map pairs on an N³ grid instead of the data cache (smoke "
                        "tests, CI; no shared data needed)")
    p.add_argument("--real-prob", type=float, default=0.6, help="fraction of real IXI pairs (rest: synthetic)")
    p.add_argument("--head-prob", type=float, default=0.5,
                   help="fraction of real pairs shown whole-head (not skull-stripped), as the pipeline may feed them")
    p.add_argument("--real-affine", type=float, default=2.0,
                   help="scale of the random residual affine on real moving images (1: ±3°, ±3 %% scale, ±1.5 vox)")
    p.add_argument("--same-prob", type=float, default=0.0,
                   help="fraction of same-subject pairs: one real scan or rendered label map, two small random "
                        "deformations (the moving one also a small rigid motion), independent bias and noise")
    p.add_argument("--zero-prob", type=float, default=0.0,
                   help="fraction of zero-deformation pairs (the same anatomy twice, independent bias and noise)")
    p.add_argument("--contrast-prob", type=float, default=0.0,
                   help="fraction of label-map pairs whose two images get independent random intensity tables, "
                        "blur, bias and noise (contrast-agnostic training; no intensity-matching loss on them); the "
                        "rest after --real-prob, --same-prob, --zero-prob, --contrast-prob: label-map pairs of one "
                        "shared contrast")
    p.add_argument("--same-std-vox", type=float, default=1.0,
                   help="largest std (voxels) of the velocity noise of the same-subject deformations")
    p.add_argument("--init", default=None, help="start a new run from these weights (a best.pt/last.pt/models file)")
    p.add_argument("--init-steps", type=int, default=0, help="steps already behind --init (recorded in the manifest)")
    p.add_argument("--ema", type=float, default=0.0,
                   help="validate and save an exponential moving average of the weights with this decay per step "
                        "(e.g. 0.999; 0 = off)")
    p.add_argument("--publish", default=None, metavar="MODEL_ID",
                   help="after training, copy best.pt into --models-dir as MODEL_ID (manifest + card)")
    p.add_argument("--models-dir", default=None, help="default: the bundled models/ folder")
    p.add_argument("--version", default="0.1.0")
    _add_training_options(p, methods)
    p.set_defaults(func=run_train)
    return p


def _add_training_options(p: argparse.ArgumentParser, methods: dict) -> None:
    """Each trainable method's ``TrainOptions`` as flags --<name> (one argument group per method). A name two
    methods share is one flag, checked against the method chosen; a name that is a flag of `train` itself is left
    out (``run_train`` then says so if that method is chosen)."""
    own = {a.dest for a in p._actions}
    seen: dict[str, str] = {}
    for mname, cls in sorted(methods.items()):
        g = None
        for spec in cls.train_option_specs():
            if spec.name in own:
                continue
            kind = "bool" if spec.kind == "bool" else "value"
            if spec.name in seen:
                if seen[spec.name] != kind:
                    raise ValueError(f"training option {spec.name!r} is a switch in one method and takes a value in "
                                     f"another ({mname})")
                continue
            seen[spec.name] = kind
            g = g or p.add_argument_group(f"{mname} training options (with --method {mname})")
            flag, dest = "--" + spec.name.replace("_", "-"), _OPT + spec.name
            default = " ".join(map(str, spec.default)) if spec.kind == "int_list" else spec.default
            h = spec.help + (f" ({'|'.join(map(str, spec.choices))})" if spec.choices else "")
            h = f"{h} (default {default})".replace("%", "%%")
            if spec.kind == "bool":
                g.add_argument(flag, dest=dest, action="store_const", const=True, default=argparse.SUPPRESS, help=h)
                g.add_argument("--no-" + spec.name.replace("_", "-"), dest=dest, action="store_const", const=False,
                               default=argparse.SUPPRESS, help=f"turn {flag} off")
            else:
                g.add_argument(flag, dest=dest, default=argparse.SUPPRESS, help=h, metavar=spec.name.upper(),
                               nargs="+" if spec.kind == "int_list" else None)


def training_options_from_args(args, cls) -> object:
    """The chosen method's ``TrainOptions`` from the parsed flags (defaults for those not given), checked once."""
    from ..errors import BadInput
    given = {k[len(_OPT):]: v for k, v in vars(args).items() if k.startswith(_OPT)}
    names = {s.name: s for s in cls.train_option_specs()}
    for k, v in given.items():
        if k not in names:
            raise BadInput(f"--{k.replace('_', '-')} is not a training option of method {cls.name}")
        if names[k].kind == "int_list":                   # --enc 16,32,32,32 or --enc 16 32 32 32
            given[k] = [x for item in v for x in str(item).split(",") if x]
    hidden = sorted(set(names) & {a for a in vars(args) if not a.startswith(_OPT)})
    if hidden:
        raise BadInput(f"method {cls.name}: training option(s) {', '.join(hidden)} clash with flags of `train`; "
                       f"rename them in the method's TrainOptions")
    return cls.parse_train_options(given)


def _method_of_run(out: Path, init: str | None) -> str:
    """The method recorded in a run folder's weights (resuming) or in the --init weights file."""
    import torch

    from ..errors import BadInput
    for f in [out / "last.pt", out / "checkpoint.pt"] + ([Path(init)] if init else []):
        if f.is_file():
            obj = torch.load(f, map_location="cpu", weights_only=True)
            name = (obj.get("meta") or {}).get("method") or (obj.get("config") or {}).get("method")
            if name:
                return name
    raise BadInput("say which method to train: --method NAME (no run to resume in --out, no --init weights)")


def _mix_from_args(args) -> dict[str, float]:
    """The pair-kind probabilities of the training mix (datasets.MixedPairs), checked: each in [0, 1], together at
    most 1 (the rest are shared-contrast label-map pairs). ``--synthetic`` has no real pairs (--real-prob unused)."""
    from ..errors import BadInput
    mix = {"real_prob": 0.0 if args.synthetic else args.real_prob, "same_prob": args.same_prob,
           "zero_prob": args.zero_prob,
           "contrast_prob": args.contrast_prob}
    for k, v in mix.items():
        if not 0.0 <= v <= 1.0:
            raise BadInput(f"--{k.replace('_', '-')} must lie in [0, 1], got {v:g}")
    if sum(mix.values()) > 1.0 + 1e-9:
        raise BadInput(f"--real-prob + --same-prob + --zero-prob + --contrast-prob = {sum(mix.values()):g} > 1")
    if not 0.0 <= args.same_std_vox <= 10.0:
        raise BadInput(f"--same-std-vox must lie in [0, 10], got {args.same_std_vox:g}")
    return {**mix, "same_std_vox": args.same_std_vox}


def run_train(args) -> int:
    import dataclasses

    from ..io.weights import bundled_dir
    from ..methods.learned import get_trainable
    from .loop import TrainSettings, publish, train

    cls = get_trainable(args.method or _method_of_run(Path(args.out), args.init))
    topts = training_options_from_args(args, cls)
    mix = _mix_from_args(args)
    if args.synthetic:
        from .datasets import synthetic_training_data
        data, val, desc = synthetic_training_data(args.synthetic, seed=args.seed,
                                                  **{k: v for k, v in mix.items() if k != "real_prob"})
        licence = SYNTH_DATA_LICENCE
    else:
        from .datasets import MixedPairs, training_sets, validation_pairs
        from .real_data import SHARED, prepare_cache
        data_root = Path(args.data) if args.data else SHARED
        cache = prepare_cache(Path(args.cache), data_root / "ixi", data_root / "labelmaps",
                              log=lambda s: print(s, file=sys.stderr))
        real, maps = training_sets(cache)
        data = MixedPairs(real, maps, seed=args.seed, head_prob=args.head_prob, real_affine=args.real_affine, **mix)
        val = validation_pairs(cache)
        desc = (f"{len(real)} IXI T1 (affine-aligned; skull-stripped and whole head) + {len(maps)} SynthSeg label "
                f"maps (synthetic contrasts); validation: 10 held-out IXI subjects, label maps 15/16")
        licence = REAL_DATA_LICENCE
    settings = TrainSettings(out_dir=args.out, steps=args.steps, lr=args.lr, seed=args.seed,
                             val_every=args.val_every, threads=args.threads, device=args.device, method=cls.name,
                             model=cls.config_from(topts), max_seconds=args.max_hours * 3600, init=args.init,
                             ema=args.ema, data={"description": desc, **mix, **({} if args.synthetic else {
                                 "head_prob": args.head_prob, "real_affine": args.real_affine})})
    print(f"training {cls.name} on {desc}; {len(val)} validation pairs", file=sys.stderr)
    res = train(settings, data, val, log=lambda s: print(s, flush=True))
    if args.publish:
        training = {"data": desc, **({} if args.synthetic else {"real_prob": args.real_prob,
                                                                 "head_prob": args.head_prob,
                                                                 "real_affine": args.real_affine}),
                    **{k: v for k, v in mix.items() if k != "real_prob"},
                    **{k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(topts).items()},
                    "ema": args.ema, "lr": args.lr, "seed": args.seed,
                    "init": Path(args.init).name if args.init else None, "steps_before_init": args.init_steps}
        entry = publish(Path(args.out), Path(args.models_dir) if args.models_dir else bundled_dir(), args.publish,
                        args.version, training, licence=licence,
                        train_shape_dhw=list(data.sample(0)["fixed"].shape[2:]))
        print(dumps(entry))
    print(dumps(res))
    return 0


def add_models_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("models", help="list, import or delete model weights")
    sub = p.add_subparsers(dest="models_cmd", required=True)
    ls = sub.add_parser("list", help="bundled and user models")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=run_models_list)
    imp = sub.add_parser("import", help="copy a weights file into the user cache")
    imp.add_argument("file")
    imp.add_argument("--id", default=None)
    imp.set_defaults(func=run_models_import)
    de = sub.add_parser("delete", help="remove a user-imported model")
    de.add_argument("id")
    de.set_defaults(func=run_models_delete)
    return p


def run_models_list(args) -> int:
    from ..io.weights import bundled_dir, list_models, user_dir
    models = list_models()
    if getattr(args, "json", False):
        print(dumps(models, indent=1))
        return 0
    print(f"bundled: {bundled_dir()}\nuser:    {user_dir()}")
    for m in models:
        print(f"{m['id']:<28} {m.get('method', '?'):<10} {m.get('version', '?'):<8} {m['source']:<8} "
              f"{str(m.get('sha256', ''))[:12]}  {m['path']}")
    if not models:
        print("(no models)")
    return 0


def _models_result(**what) -> None:
    """The JSON result line of `models import/delete` (JSON mode: --json, DEEPDIFFREG_JSON=1 or a non-terminal)."""
    from ..console import json_mode
    if json_mode(getattr(what.pop("args", None), "json_protocol", False)):
        print(dumps({"event": "result", **what}), flush=True)


def run_models_import(args) -> int:
    from ..io.weights import import_weights
    e = import_weights(Path(args.file), args.id)
    print(f"imported {e['id']} ({e['method']}) sha256 {e['sha256'][:12]}")
    _models_result(args=args, action="import", model=e)
    return 0


def run_models_delete(args) -> int:
    from ..io.weights import delete_model
    path = delete_model(args.id)
    print(f"deleted {args.id} ({path})")
    _models_result(args=args, action="delete", id=args.id, file=str(path))
    return 0


def main(argv=None) -> int:
    from ..errors import RegistrationError
    parser = argparse.ArgumentParser(prog="deepdiffreg")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    add_models_parser(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except RegistrationError as e:
        print(f"error: {e}", file=sys.stderr)
        return int(e.code)


if __name__ == "__main__":
    sys.exit(main())

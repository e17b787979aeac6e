"""`deepdiffreg train` and `deepdiffreg models` (list / import / delete). The main cli.py calls
``add_train_parser(subparsers)`` and ``add_models_parser(subparsers)``; each sets ``func=handler(args) -> int``.
Also runnable alone: ``python -m deepdiffreg.train.cli train ...``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_CACHE = Path.home() / ".cache" / "deepdiffreg" / "train-v2"


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="train a learned method (resumable; logs CSV + PNG; publishes to models/)")
    p.add_argument("--method", default="vxm-diff", choices=["vxm-diff"])
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
    p.add_argument("--real-prob", type=float, default=0.6, help="fraction of real IXI pairs (rest: synthetic)")
    p.add_argument("--head-prob", type=float, default=0.5,
                   help="fraction of real pairs shown whole-head (not skull-stripped), as the pipeline may feed them")
    p.add_argument("--real-affine", type=float, default=2.0,
                   help="scale of the random residual affine on real moving images (1: ±3°, ±3 %% scale, ±1.5 vox)")
    p.add_argument("--init", default=None, help="start a new run from these weights (a best.pt/last.pt/models file)")
    p.add_argument("--init-steps", type=int, default=0, help="steps already behind --init (recorded in the manifest)")
    p.add_argument("--image-sigma", type=float, default=0.02)
    p.add_argument("--prior-lambda", type=float, default=20.0)
    p.add_argument("--dice-weight", type=float, default=0.0, help="optional semi-supervised Dice term weight")
    p.add_argument("--dice-labels", type=int, default=8, help="labels drawn per step for the Dice term")
    p.add_argument("--dice-grid", choices=("full", "half"), default="full",
                   help="grid of the Dice term: the image grid, or the velocity's ½ grid with 2×2×2-averaged "
                        "one-hot labels (the Dice warp is then 8× cheaper: ~0.9 → ~0.55 s per CPU step)")
    p.add_argument("--ema", type=float, default=0.0,
                   help="validate and save an exponential moving average of the weights with this decay per step "
                        "(e.g. 0.999; 0 = off)")
    p.add_argument("--stages", type=int, default=1,
                   help="networks in a recursive cascade (φ1∘φ2∘…); with --init from a model with fewer stages, the "
                        "earlier stages are that model (frozen) and the last one is fine-tuned on what they leave")
    p.add_argument("--enc", default="16,32,32,32")
    p.add_argument("--dec", default="32,32,32,32,16")
    p.add_argument("--publish", default=None, metavar="MODEL_ID",
                   help="after training, copy best.pt into --models-dir as MODEL_ID (manifest + card)")
    p.add_argument("--models-dir", default=None, help="default: the bundled models/ folder")
    p.add_argument("--version", default="0.1.0")
    p.set_defaults(func=run_train)
    return p


def run_train(args) -> int:
    from ..io.weights import bundled_dir
    from ..nn.vxm_model import DEFAULT_CONFIG
    from .datasets import MixedPairs, training_sets, validation_pairs
    from .loop import TrainSettings, publish, train
    from .real_data import SHARED, prepare_cache

    data_root = Path(args.data) if args.data else SHARED
    cache = prepare_cache(Path(args.cache), data_root / "ixi", data_root / "labelmaps",
                          log=lambda s: print(s, file=sys.stderr))
    real, maps = training_sets(cache)
    data = MixedPairs(real, maps, seed=args.seed, real_prob=args.real_prob, head_prob=args.head_prob,
                      real_affine=args.real_affine)
    val = validation_pairs(cache)
    model = dict(DEFAULT_CONFIG, image_sigma=args.image_sigma, prior_lambda=args.prior_lambda,
                 dice_weight=args.dice_weight, dice_grid=args.dice_grid, stages=args.stages, enc=[int(x) for x in args.enc.split(",")],
                 dec=[int(x) for x in args.dec.split(",")])
    settings = TrainSettings(out_dir=args.out, steps=args.steps, lr=args.lr, seed=args.seed,
                             val_every=args.val_every, threads=args.threads, device=args.device, model=model,
                             max_seconds=args.max_hours * 3600, init=args.init,
                             dice_labels_per_step=args.dice_labels, ema=args.ema)
    print(f"training on {len(real)} IXI subjects + {len(maps)} label maps; {len(val)} validation pairs",
          file=sys.stderr)
    res = train(settings, data, val, log=lambda s: print(s, flush=True))
    if args.publish:
        entry = publish(Path(args.out), Path(args.models_dir) if args.models_dir else bundled_dir(), args.publish,
                        args.version, {"data": f"{len(real)} IXI T1 (affine-aligned; skull-stripped and whole "
                                               f"head) + {len(maps)} SynthSeg label maps (synthetic contrasts); "
                                               f"validation: 10 held-out IXI subjects, label maps 15/16",
                                       "real_prob": args.real_prob, "head_prob": args.head_prob, "real_affine": args.real_affine,
                                       "dice_weight": args.dice_weight, "dice_grid": args.dice_grid,
                                       "dice_labels": args.dice_labels, "ema": args.ema, "stages": args.stages, "lr": args.lr, "seed": args.seed,
                                       "init": Path(args.init).name if args.init else None,
                                       "steps_before_init": args.init_steps})
        print(json.dumps(entry))
    print(json.dumps(res))
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
        print(json.dumps(models, indent=1))
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
    from ..progress import dumps
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

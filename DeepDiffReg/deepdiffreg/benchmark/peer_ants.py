"""Child process of the benchmark's ``ants-syn`` peer (run by path, no deepdiffreg import):

    python peer_ants.py --fixed F --moving M --out DIR --threads N --seed S

``ants.registration(fixed, moving, type_of_transform="SyN")`` with antspyx's defaults on the raw pair; writes
DIR/transform.h5 (the composite fixed → moving transform, affine + SyN field, as ITK reads it), DIR/warped.nii.gz
and DIR/peer.json (stage timings, version, threads)."""
import argparse
import json
import os
import shutil
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    for a in ("--fixed", "--moving", "--out"):
        ap.add_argument(a, required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args()
    t0 = time.perf_counter()
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)   # before ITK is loaded
    try:
        import ants
    except ImportError as e:
        print(f"deepdiffreg: error: antspyx is not installed ({e})", file=sys.stderr)
        return 2
    seed = None
    if args.seed is not None:   # seeds the affine stage's random sampling (antsRegistration --random-seed)
        try:
            import ants.config
            ants.config.set_ants_deterministic(True, args.seed)
            seed = args.seed
        except (ImportError, AttributeError):   # an antspyx without it: unseeded, and peer.json says so
            pass
        os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)  # it sets 1; keep ours
    t_import = time.perf_counter()
    fixed, moving = ants.image_read(args.fixed), ants.image_read(args.moving)
    t_load = time.perf_counter()
    prefix = os.path.join(args.out, "ants_")
    reg = ants.registration(fixed, moving, type_of_transform="SyN", outprefix=prefix, write_composite_transform=True)
    t_reg = time.perf_counter()
    shutil.move(reg["fwdtransforms"], os.path.join(args.out, "transform.h5"))
    shutil.move(reg["invtransforms"], os.path.join(args.out, "inverse.h5"))
    ants.image_write(reg["warpedmovout"], os.path.join(args.out, "warped.nii.gz"))
    t_write = time.perf_counter()
    info = {"peer": "ants-syn", "version": f"antspyx {ants.__version__}", "threads": args.threads, "seed": seed,
            "files": {"transform": "transform.h5", "inverse": "inverse.h5", "warped": "warped.nii.gz"},
            "timings_s": {"import": round(t_import - t0, 3), "load": round(t_load - t_import, 3),
                          "register": round(t_reg - t_load, 3), "write": round(t_write - t_reg, 3),
                          "total": round(t_write - t_import, 3)}}
    with open(os.path.join(args.out, "peer.json"), "w") as fh:
        json.dump(info, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``deepdiffreg benchmark``: the subcommand's flags and the run from pairs to the written markdown + JSON."""
from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..errors import BadInput
from ..progress import dumps, json_safe
from . import analysis, peers as peers_mod, validation
from .ct_pair import is_ct_pair
from .pairs import ALL_PAIRS, QUICK_PAIR, build_pairs, check_pair_names, missing_data, public_view
from .render import _header_for, render_markdown
from .rows import MethodRow, all_rows, default_rows, missing_weights, parse_rows
from .runner import machine_info, run_method, run_peer


def add_benchmark_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "benchmark", help="run methods and classical peers on benchmark pairs and write docs/benchmarks.md + .json",
        description="Run registration methods (as `deepdiffreg register` child processes, one after another) and "
                    "classical peers (ANTs SyN, each in its own child process) on benchmark pairs, and write a "
                    "markdown table (Dice, TRE, folds, time and its ratio to ANTs SyN's, stage profile, memory, "
                    "machine) and a JSON of all numbers beside it.")
    p.add_argument("--data", default=None,
                   help="shared data folder with ixi/, labelmaps/, brats-reg/ (default ../shared/data)")
    p.add_argument("--methods", nargs="+", default=None, metavar="METHOD[+VARIANT]",
                   help="rows to run: method names and NAME+VARIANT (a variant of `deepdiffreg methods --json`). "
                        "Default: every method with its default options plus the variants it marks for the "
                        "benchmark; with --quick the methods that need no weights")
    p.add_argument("--peers", nargs="+", default=None, metavar="PEER",
                   help=f"classical peers to run on the same pairs: {', '.join(peers_mod.PEERS)}, or none. Default: "
                        f"every installed peer (none with --quick); a named peer must be installed "
                        f"(pip install 'deepdiffreg[bench]')")
    p.add_argument("--pairs", nargs="+", default=None,
                   help=f"pairs to run (default: {' '.join(ALL_PAIRS)}; with --quick: {QUICK_PAIR})")
    p.add_argument("--out", default=None,
                   help="markdown output (default docs/benchmarks.md; with --quick WORK/benchmarks.md); the JSON "
                        "goes beside it with the suffix .json")
    p.add_argument("--work", default=None,
                   help="work folder for built pairs and result folders (kept; default: a temporary folder that "
                        "is removed at the end)")
    p.add_argument("--threads", type=int, default=None,
                   help="passed to every register run and given to every peer (default: the engine's, cores − 1)")
    p.add_argument("--quick", action="store_true",
                   help="tiny self-contained benchmark on a generated phantom pair with few iterations (for tests)")
    p.add_argument("--validation-cache", default=None,
                   help="training cache holding the fixed validation pairs of the learned methods (default "
                        "~/.cache/deepdiffreg/train-v2, built by `deepdiffreg train`); each learned method in "
                        "--methods is also compared with the classical reference on those pairs in the same run")
    p.add_argument("--render-only", action="store_true",
                   help="run nothing: rewrite the markdown --out from the JSON beside it (e.g. after editing the "
                        "hand-written header above the marker line)")
    p.set_defaults(func=cmd_benchmark)


def _default_data() -> Path | None:
    for cand in (Path("../shared/data"), Path(__file__).resolve().parents[4] / "shared" / "data"):
        if cand.is_dir():
            return cand
    return None


def _render_only(args) -> int:
    out = Path(args.out or Path("docs") / "benchmarks.md")
    src = out.with_suffix(".json")
    if not src.exists():
        raise BadInput(f"--render-only needs {src} (written by a benchmark run)")
    result = json_safe(json.loads(src.read_text()))   # a JSON written before strict output may hold NaN
    src.write_text(dumps(result, indent=1) + "\n")
    out.write_text(render_markdown(result, _header_for(out, bool(result["settings"].get("quick")))))
    print(f"wrote {out} from {src}")
    return 0


def _print_row(row: dict[str, Any]) -> None:
    name, label = row["pair"], row["method"]
    if row["status"] == "ok":
        print(f"  {name:12s} {label:16s} Dice {_fmt(analysis._get(row, 'dice', 'after', 'mean'))} "
              f"TRE {_fmt(analysis._get(row, 'tre_mm', 'after', 'mean'), '{:.2f}')} "
              f"folded {row['folds']['percent_folded']:.4f} % {row['wall_s']:.1f} s", flush=True)
    else:
        print(f"  {name:12s} {label:16s} {row['status'].upper()}: {row.get('error') or row.get('reason')}", flush=True)


def _fmt(v, fmt="{:.3f}") -> str:
    return "—" if v is None else fmt.format(v)


def cmd_benchmark(args) -> int:
    t_start = time.perf_counter()
    if args.render_only:
        return _render_only(args)
    rows: list[MethodRow] = parse_rows(args.methods) if args.methods else default_rows(args.quick)
    peers, notes = peers_mod.select(args.peers, args.quick)
    pair_names = list(args.pairs or ([QUICK_PAIR] if args.quick else ALL_PAIRS))
    check_pair_names(pair_names)
    data = None
    if any(p != QUICK_PAIR and not is_ct_pair(p) for p in pair_names):   # generated pairs need no data
        data = Path(args.data) if args.data else _default_data()
        if data is None or not data.is_dir():
            raise BadInput(f"data folder not found: {args.data or '../shared/data'} (give --data, or use --quick)")
        missing = missing_data(pair_names, data)
        if missing:
            raise BadInput(f"data folder {data} lacks {', '.join(f + '/' for f in missing)}")
    if args.threads is not None and args.threads < 1:
        raise BadInput("--threads must be ≥ 1")
    from ..cli import default_threads
    peer_threads = args.threads or default_threads()
    tmp_work = args.work is None
    work = Path(tempfile.mkdtemp(prefix="deepdiffreg-benchmark-")) if tmp_work else Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else (work / "benchmarks.md" if args.quick else Path("docs") / "benchmarks.md")
    if tmp_work and out.resolve().is_relative_to(work.resolve()):
        tmp_work = False          # the output lives in the work folder: keep it
    header = _header_for(out, args.quick)
    machine = machine_info()
    labels = [r.label for r in rows] + [p.name for p in peers]
    print(f"benchmark: {len(pair_names)} pair(s) × {len(rows)} method row(s) + {len(peers)} peer(s); "
          f"work folder {work}", flush=True)
    runs: list[dict[str, Any]] = []
    try:
        pairs = build_pairs(pair_names, data, work)
        skip: dict[str, str] = {}
        for r in rows:
            why = missing_weights(r)
            if why:
                skip[r.label] = why
                note = f"{r.method} rows skipped: {_portable(why)}"
                if note not in notes:
                    notes.append(note)
        for name, pair in pairs.items():
            for r in rows:
                if r.label in skip:
                    runs.append({"pair": name, "method": r.label, "kind": "method", "method_name": r.method,
                                 "status": "skipped", "reason": skip[r.label]})
                else:
                    res_dir = work / "results" / name / r.label.replace("+", "_")
                    res_dir.parent.mkdir(parents=True, exist_ok=True)
                    runs.append(run_method(pair, r, res_dir, args.threads, args.quick))
                _print_row(runs[-1])
            for p in peers:
                runs.append(run_peer(pair, p, work / "results" / name / f"peer-{p.name}", peer_threads))
                _print_row(runs[-1])
        reference = peers_mod.REFERENCE if any(p.name == peers_mod.REFERENCE for p in peers) else None
        if reference:
            analysis.add_ratios(runs, reference)
        comparisons = []
        if not args.quick:
            for r in rows:
                if r.variant is None and r.cls.caps.learned and r.label not in skip:
                    v = validation.compare(r.cls, args.validation_cache, args.threads)
                    if "skipped" in v:
                        notes.append(f"validation-pair comparison of {r.method} skipped: {v['skipped']}")
                    else:
                        comparisons.append(v)
        machine["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
        result = {"date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                  "command": "deepdiffreg benchmark " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["benchmark"]
                                                                 else sys.argv[1:]),
                  "machine": machine,
                  "settings": {"methods": [r.label for r in rows], "peers": [p.name for p in peers],
                               "pairs": pair_names, "threads": args.threads, "quick": args.quick,
                               "reference": reference, "peer_threads": peer_threads if peers else None,
                               "method_args": {r.label: r.register_args(args.quick) for r in rows},
                               "peer_calls": {p.name: p.call for p in peers}},
                  "notes": notes,
                  "pairs": {k: public_view(v) for k, v in pairs.items()},
                  "runs": runs, "summary": analysis.summarise(runs, labels, reference),
                  **({"validation": comparisons} if comparisons else {}),
                  "total_s": round(time.perf_counter() - t_start, 1)}
        out.parent.mkdir(parents=True, exist_ok=True)
        result = json_safe(result)    # strict JSON: an undefined number (a correlation of a constant map) is null
        out.write_text(render_markdown(result, header))
        out.with_suffix(".json").write_text(dumps(result, indent=1) + "\n")
        print(f"wrote {out} and {out.with_suffix('.json')}", flush=True)
    finally:
        if tmp_work:
            shutil.rmtree(work, ignore_errors=True)
    failed = [r for r in runs if r["status"] == "failed"]
    return 1 if failed else 0


__all__ = ["add_benchmark_parser", "cmd_benchmark", "all_rows"]


def _portable(text: str) -> str:
    """``text`` with this checkout's models folder and the home folder written as ``models/`` and ``~``: the notes
    go into the committed docs/benchmarks.md, which should not name the clone a run was made from."""
    from ..io.weights import bundled_dir
    return text.replace(str(bundled_dir()), "models/").replace(str(Path.home()), "~")

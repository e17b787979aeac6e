"""``deepdiffreg warm --request FILE``: an engine process started before its command is known.

Every engine command pays for its imports first (torch, SimpleITK, numpy, the methods: ~1.3-1.8 s on the project's
2-core CPU, a fifth of a 1 mm registration), on the critical path. A caller that knows a command will come — the
Slicer panel, between opening the module and pressing Register — starts ``warm`` instead: it imports everything,
prints one JSON line ``{"event": "info", "message": "ready", ...}`` and waits for FILE to appear. FILE holds
``{"argv": ["register", "--fixed", ...]}``, the arguments after ``deepdiffreg``, written whole (the caller writes a
temporary file and renames it). The process then runs that one command exactly as ``deepdiffreg ARGV...`` would
(same checks, output, exit code) and ends; it never reads FILE again and never deletes it (the caller's).

Without a request it ends by itself after ``--idle-timeout`` seconds (exit 0, nothing written); SIGTERM while it
waits ends it as a cancel (exit code 4); the parent watchdog (``DEEPDIFFREG_WATCH_PID``) applies as to any run.
"""
from __future__ import annotations

import importlib
import json
import os
import time

from .errors import BadInput

IDLE_TIMEOUT_S = 1800.0   # a spare engine left unused this long goes away (its imports hold ~300 MB)
POLL_S = 0.05             # how often FILE is looked for: the delay a request may wait before it runs


def add_parser(sub) -> None:
    """``warm`` in the CLI's parser (``deepdiffreg --help``, and ``wait_for_request`` reads its arguments with it);
    the command runs from ``wait_for_request``, before the main parser (it must come first on the command line)."""
    p = sub.add_parser("warm", help="import the engine now and run one command given later in a file (for "
                                    "programs such as the Slicer panel)",
                       description=__doc__.split("\n\n")[1])
    p.add_argument("--request", required=True, help="the file to wait for: {\"argv\": [command, args...]}")
    p.add_argument("--idle-timeout", type=float, default=IDLE_TIMEOUT_S,
                   help=f"seconds to wait for the request before ending (default {IDLE_TIMEOUT_S:g})")
    p.set_defaults(func=_misplaced)


def _misplaced(args) -> int:
    raise BadInput("'warm' must be the first argument (deepdiffreg warm --request FILE)")


def wait_for_request(argv: list[str], reporter, build_parser) -> list[str] | None:
    """The arguments of ``warm`` → the command's argv, once FILE appears (None: the idle timeout passed). Imports
    the engine first — the pipeline, and ``build_parser()`` (the CLI's: every method and subcommand) — and reports
    ``ready``. A request that is not ``{"argv": [str, ...]}`` naming a command other than ``warm`` is a BadInput."""
    t0 = time.perf_counter()
    args = build_parser().parse_args(["warm", *argv])   # every method module and subcommand, and warm's arguments
    if not args.idle_timeout > 0:
        raise BadInput(f"--idle-timeout must be > 0, got {args.idle_timeout}")
    importlib.import_module(".pipeline", __package__)   # torch, SimpleITK, numpy and the write stage
    reporter.info("ready", ready=True, import_s=round(time.perf_counter() - t0, 3), pid=os.getpid())
    deadline = time.monotonic() + args.idle_timeout
    while not os.path.exists(args.request):
        if time.monotonic() > deadline:
            return None
        time.sleep(POLL_S)
    try:
        with open(args.request, encoding="utf-8") as f:
            request = json.load(f)
    except (OSError, ValueError) as e:
        raise BadInput(f"warm: cannot read the request {args.request}: {e}") from None
    command = request.get("argv") if isinstance(request, dict) else None
    if not (isinstance(command, list) and command and all(isinstance(a, str) for a in command)):
        raise BadInput(f"warm: the request {args.request} must be {{\"argv\": [command, args...]}}")
    if command[0] == "warm":
        raise BadInput("warm: the request cannot be another 'warm'")
    return command

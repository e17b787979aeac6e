"""python -m deepdiffreg register ... --out DIR  (stand-in; see __init__.py).

``warm --request FILE`` (a spare engine): says ready, waits for FILE, then runs its command as below.
FAKE_ENGINE_MODE: ok (copy $FAKE_ENGINE_RESULT to DIR), sleep (progress, then wait to be cancelled), fail (bad
input), oom (GPU out of memory). The argv is written to $FAKE_ENGINE_ARGV when set."""
import json
import os
import shutil
import sys
import time


def emit(obj):
    print(json.dumps(obj), flush=True)


argv = sys.argv[1:]
if argv[:1] == ["warm"]:   # a spare engine (engine warm.py): ready, then the request file's command
    request = argv[argv.index("--request") + 1]
    idle = float(argv[argv.index("--idle-timeout") + 1]) if "--idle-timeout" in argv else 1800.0
    emit({"event": "info", "stage": "", "message": "ready", "ready": True, "pid": os.getpid()})
    end = time.monotonic() + min(idle, 120.0)     # a test that failed before its cleanup leaves nothing for long
    while not os.path.exists(request):
        if time.monotonic() > end:
            sys.exit(0)
        time.sleep(0.02)
    with open(request) as f:
        argv = json.load(f)["argv"]
    argv.append("--served-by-spare")          # lets a test tell a spare's run from a cold one
if os.environ.get("FAKE_ENGINE_ARGV"):
    with open(os.environ["FAKE_ENGINE_ARGV"], "w") as f:
        json.dump(argv, f)
mode = os.environ.get("FAKE_ENGINE_MODE", "ok")
out = argv[argv.index("--out") + 1] if "--out" in argv else None
device = argv[argv.index("--device") + 1] if "--device" in argv else "cpu"
emit({"event": "progress", "stage": "load", "progress": 0.02, "message": "loading", "elapsed_s": 0.0})
emit({"event": "info", "stage": "load", "message": "device", "device": "cuda:0" if mode == "oom" else "cpu"})
if mode == "ok":
    emit({"event": "progress", "stage": "register", "progress": 0.5, "message": "working", "elapsed_s": 0.1})
    shutil.copytree(os.environ["FAKE_ENGINE_RESULT"], out, dirs_exist_ok=True)
    emit({"event": "progress", "stage": "write", "progress": 1.0, "message": "written", "elapsed_s": 0.2})
    emit({"event": "result", "out_dir": out, "report": os.path.join(out, "report.json"), "summary": {"device": "cpu"}})
    sys.exit(0)
if mode == "sleep":
    emit({"event": "progress", "stage": "register", "progress": 0.3, "message": "working", "elapsed_s": 0.1})
    time.sleep(300)
    sys.exit(0)
if mode == "fail":
    print("some free text before the error", flush=True)
    emit({"event": "error", "code": "BAD_INPUT", "exit_code": 2, "message": "fixed image is 2-D; need a 3-D volume"})
    sys.exit(2)
if mode == "oom":
    emit({"event": "error", "code": "OUT_OF_MEMORY", "exit_code": 3, "message": "out of GPU memory"})
    sys.exit(3)
sys.exit(1)

"""A stand-in for the engine CLI in process-runner tests: speaks the progress protocol, can spawn a grandchild
(like the PythonSlicer launcher does) and can fail. Usage: python child_fake_engine.py MODE"""
import json
import subprocess
import sys
import time


def emit(obj):
    print(json.dumps(obj), flush=True)


mode = sys.argv[1]
if mode == "ok":
    print("free text that the runner must ignore", flush=True)
    for i, st in enumerate(("load", "align", "register", "write")):
        emit({"event": "progress", "stage": st, "progress": (i + 1) / 4, "message": st, "elapsed_s": 0.01 * i})
    emit({"event": "info", "stage": "load", "message": "device", "device": "cpu"})
    emit({"event": "result", "out_dir": "/nowhere", "report": "/nowhere/report.json", "summary": {"device": "cpu"}})
    sys.exit(0)
elif mode == "fail":
    print("Traceback-like free text line 1", flush=True)
    print("the last words before dying", flush=True)
    emit({"event": "error", "code": "BAD_INPUT", "exit_code": 2, "message": "fixed image is 2-D; need a 3-D volume"})
    sys.exit(2)
elif mode == "oom":
    emit({"event": "info", "message": "device", "device": "cuda:0"})
    emit({"event": "error", "code": "OUT_OF_MEMORY", "exit_code": 3, "message": "CUDA out of memory"})
    sys.exit(3)
elif mode == "tree":
    # a grandchild that ignores SIGTERM, so that only a tree kill with escalation ends it
    gc = subprocess.Popen([sys.executable, "-c",
                           "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"])
    emit({"event": "info", "message": "grandchild", "pid": gc.pid})
    emit({"event": "progress", "stage": "register", "progress": 0.1, "message": "working", "elapsed_s": 0.1})
    time.sleep(300)

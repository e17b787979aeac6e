"""The extension as installed: build the install tree with the extension's own CMake files (a stand-in Slicer
config that lays files out as slicerMacroBuildScriptedModule does, fake_slicer/) and run the engine from there
only — its bundled learned model must be found and must register a pair (issue 14 item 1)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import HERE, REPO
from DeepDiffRegLib import methods as ddmethods, process as ddprocess

SCRIPTED = os.path.join("lib", "Slicer-5.10", "qt-scripted-modules")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    cmake = shutil.which("cmake")
    assert cmake, "cmake is needed to build the installed layout (apt-get install cmake)"
    base = tmp_path_factory.mktemp("installed")
    build, prefix = base / "build", base / "ext"
    r = subprocess.run([cmake, "-S", REPO, "-B", str(build), f"-DSlicer_DIR={os.path.join(HERE, 'fake_slicer')}",
                        "-DBUILD_TESTING=OFF"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = subprocess.run([cmake, "--install", str(build), "--prefix", str(prefix)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return prefix / SCRIPTED


def _env(module_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEEPDIFFREG_")}
    env["DEEPDIFFREG_MODELS_DIR"] = str(tmp_path / "empty-user-cache")  # only the installed bundle counts
    return ddprocess.child_environment(str(module_dir), env, device="cpu")


def test_installed_tree_holds_module_engine_ui_and_models(installed):
    for rel in ("DeepDiffReg.py", "DeepDiffRegLib/process.py", "DeepDiffRegLib/controller.py",
                "deepdiffreg/__main__.py", "deepdiffreg/watchdog.py", "deepdiffreg/io/weights.py",
                "Resources/UI/DeepDiffReg.ui", "Resources/Icons/DeepDiffReg.png", "Resources/models/manifest.json"):
        assert (installed / rel).is_file(), rel
    manifest = json.loads((installed / "Resources/models/manifest.json").read_text())
    for m in manifest["models"]:
        assert (installed / "Resources/models" / m["file"]).is_file(), m["file"]


def test_installed_engine_lists_and_runs_the_bundled_learned_model(installed, tmp_path):
    import synthetic
    env = _env(installed, tmp_path)
    cwd = str(tmp_path)  # nothing of the repository on the path or in the working directory
    r = subprocess.run([sys.executable, "-c", "import deepdiffreg, deepdiffreg.io.weights as w; "
                        "print(deepdiffreg.__file__); print(w.bundled_dir())"],
                       env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    pkg_file, bundled = r.stdout.split()
    assert pkg_file.startswith(str(installed)), pkg_file
    assert os.path.samefile(bundled, installed / "Resources" / "models")
    r = subprocess.run(ddmethods.methods_command(sys.executable), env=env, cwd=cwd, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    # the learned methods with bundled weights (a method may be registered before its weights are committed)
    learned = [m for m in ddmethods.parse_methods_json(r.stdout) if m.learned and m.models]
    assert learned and learned[0].models, r.stdout[-2000:]
    method = learned[0]
    assert all(str(m["path"]).startswith(str(installed)) for m in method.models)
    inputs = synthetic.write_engine_inputs(str(tmp_path / "inputs"))
    out = str(tmp_path / "result")
    cmd = ddprocess.register_command(sys.executable, inputs["fixed"], inputs["moving"], out, method=method.name,
                                     device="cpu")
    run = ddprocess.EngineProcess(cmd, env=env, cwd=cwd).start()
    st = run.wait(timeout=600)
    assert st.ok, f"{st.error_text()}\n{run.log_tail(30)}"
    report = json.loads(open(os.path.join(out, "report.json")).read())
    assert report["model"]["id"] == method.models[0]["id"]
    assert os.path.exists(os.path.join(out, "transform.h5"))

"""The run controller (DeepDiffRegLib/controller.py) driven with real child processes: every path ends in a final
state with its message kept, nothing is left running, the temporary folder goes (issue 14 items 3 and 6;
issue 10 item 6)."""
from __future__ import annotations

import os
import sys
import time

import psutil
import pytest

from conftest import HERE, MODULE_DIR
from DeepDiffRegLib import controller as ddcontroller, install as ddinstall, methods as ddmethods
from DeepDiffRegLib import process as ddprocess, scene as ddscene
from DeepDiffRegLib.states import ProcessingState

FAKE_ENGINE = os.path.join(HERE, "fake_engine")
NOTHING_TO_INSTALL = lambda: ddinstall.Plan(torch=False)  # noqa: E731


def _gone(pid):
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class Harness:
    """A controller whose exports are prepared files and whose import records what it was given."""

    def __init__(self, tmp_path, mode="ok", result_dir=None, plan=NOTHING_TO_INSTALL, fake=True, env_extra=None,
                 confirm=None, export=None, importer=None, spare=False):
        self.tmp = tmp_path
        self.imported, self.logs, self.changes = [], [], []
        self.argv_file = str(tmp_path / "argv.json")
        self.mode, self.result_dir, self.fake = mode, result_dir, fake
        self.env_extra = env_extra or {}
        self.ctl = ddcontroller.RunController(
            sys.executable, self.env, str(tmp_path / "work"), export or self.export, importer or self.import_,
            confirm_install=confirm, plan=plan, on_log=self.logs.append,
            on_change=lambda c: self.changes.append(c.state), cancel_grace_s=1.0, spare_engine=spare)
        os.makedirs(tmp_path / "work", exist_ok=True)

    def env(self, device):
        base = dict(os.environ, **self.env_extra)
        if self.fake:
            base["PYTHONPATH"] = FAKE_ENGINE
            base.update(FAKE_ENGINE_MODE=self.mode, FAKE_ENGINE_RESULT=self.result_dir or "",
                        FAKE_ENGINE_ARGV=self.argv_file, FAKE_ENGINE_DEVICE=device)   # one environment per device
            return base
        return ddprocess.child_environment(MODULE_DIR, base, device)

    def export(self, folder, request):
        os.makedirs(folder, exist_ok=True)
        return {"fixed": os.path.join(folder, "fixed.nrrd"), "moving": os.path.join(folder, "moving.nrrd")}

    def import_(self, out_dir, request):
        self.imported.append(out_dir)
        return {"out_dir": out_dir, "files": sorted(os.listdir(out_dir))}

    def work_dirs(self):
        return os.listdir(self.tmp / "work")


def _request(methods, name="nodeo", **kw):
    return ddcontroller.RunRequest(method=ddmethods.by_name(methods, name), device="cpu", **kw)


def test_success_imports_keeps_message_and_removes_the_work_folder(tmp_path, fixture_methods, synthetic_result):
    h = Harness(tmp_path, "ok", synthetic_result["out_dir"])
    assert h.ctl.start(_request(fixture_methods))
    assert h.ctl.wait(timeout=60) is ProcessingState.COMPLETED
    assert h.ctl.message.startswith("Done in") and "cpu" in h.ctl.message
    assert h.imported and "transform.h5" in h.ctl.result["files"]
    assert ProcessingState.RUNNING in h.changes and ProcessingState.IMPORTING in h.changes
    assert h.work_dirs() == []  # inputs and the engine's result folder are gone
    h.ctl.poll()
    assert h.ctl.state is ProcessingState.COMPLETED and h.ctl.message.startswith("Done in")  # the status stays


def test_keep_temporary_files(tmp_path, fixture_methods, synthetic_result):
    h = Harness(tmp_path, "ok", synthetic_result["out_dir"])
    h.ctl.run(_request(fixture_methods, keep_temporary_files=True), timeout=60)
    assert len(h.work_dirs()) == 1 and any("kept in" in line for line in h.logs)


def test_engine_failure_and_gpu_out_of_memory(tmp_path, fixture_methods):
    h = Harness(tmp_path, "fail")
    h.ctl.start(_request(fixture_methods))
    assert h.ctl.wait(timeout=60) is ProcessingState.FAILED
    assert "fixed image is 2-D" in h.ctl.message and "free text" in h.ctl.details
    assert not h.imported and h.work_dirs() == [] and not h.ctl.offer_cpu_retry
    h = Harness(tmp_path, "oom")
    h.ctl.start(_request(fixture_methods))
    assert h.ctl.wait(timeout=60) is ProcessingState.FAILED and h.ctl.offer_cpu_retry


@pytest.mark.parametrize("how", ["cancel", "scene_closed"])
def test_cancel_and_scene_close_end_the_child_and_never_import(tmp_path, fixture_methods, how):
    h = Harness(tmp_path, "sleep")
    h.ctl.start(_request(fixture_methods))
    deadline = time.monotonic() + 30
    while h.ctl.stage != "register":
        assert time.monotonic() < deadline, h.logs
        h.ctl.poll(); time.sleep(0.05)
    pid = h.ctl._run.pid
    getattr(h.ctl, how)()
    assert h.ctl.state is ProcessingState.CANCEL_REQUESTED
    assert h.ctl.wait(timeout=30) is ProcessingState.CANCELLED
    assert ("scene was closed" in h.ctl.message) == (how == "scene_closed")
    assert not h.imported and h.work_dirs() == []
    deadline = time.monotonic() + 5
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(pid)


def test_blocking_run_timeout_cancels_the_child(tmp_path, fixture_methods):
    h = Harness(tmp_path, "sleep")
    with pytest.raises(TimeoutError):
        h.ctl.run(_request(fixture_methods), timeout=2)
    assert h.ctl.state is ProcessingState.CANCELLED and _gone(h.ctl._run.pid) and h.work_dirs() == []


def test_failures_before_the_engine_starts_end_failed(tmp_path, fixture_methods, synthetic_result):
    # a bad option value: nothing is written or started
    h = Harness(tmp_path)
    assert not h.ctl.start(_request(fixture_methods, options={"iterations": -5}))
    assert h.ctl.state is ProcessingState.FAILED and "Invalid option" in h.ctl.message and h.work_dirs() == []
    # the export fails (e.g. a node without image data): the work folder of the failed start goes too
    def bad_export(folder, request):
        raise RuntimeError("could not write fixed")
    h = Harness(tmp_path, export=bad_export)
    assert not h.ctl.start(_request(fixture_methods))
    assert h.ctl.state is ProcessingState.FAILED and "could not write fixed" in h.ctl.message
    assert h.work_dirs() == []
    # the import fails: FAILED, not stuck in IMPORTING
    def bad_import(out_dir, request):
        raise AttributeError("'NoneType' object has no attribute 'fixedVolume'")
    h = Harness(tmp_path, "ok", synthetic_result["out_dir"], importer=bad_import)
    h.ctl.start(_request(fixture_methods))
    assert h.ctl.wait(timeout=60) is ProcessingState.FAILED and "could not be loaded" in h.ctl.message
    # an installed torch older than the requirement: told where to fix it, no install attempted
    h = Harness(tmp_path, plan=lambda: ddinstall.Plan(torch=False, torch_version="2.0.1", torch_too_old=True))
    assert not h.ctl.start(_request(fixture_methods))
    assert h.ctl.state is ProcessingState.FAILED and "PyTorch Utils" in h.ctl.message and "2.0.1" in h.ctl.message
    # the user declines the torch install
    h = Harness(tmp_path, plan=lambda: ddinstall.Plan(torch=True), confirm=lambda msg, details: False)
    assert not h.ctl.start(_request(fixture_methods))
    assert h.ctl.state is ProcessingState.FAILED and "needs PyTorch" in h.ctl.message


OFFLINE = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def test_torch_install_without_network_fails_with_a_message(tmp_path, fixture_methods):
    """A real pip child with no package index (an offline site): the panel ends FAILED, not stuck in STARTING."""
    asked = []
    h = Harness(tmp_path, plan=lambda: ddinstall.Plan(torch=True), env_extra=OFFLINE,
                confirm=lambda msg, details: asked.append(msg) or True)
    assert h.ctl.start(_request(fixture_methods))
    assert h.ctl.state is ProcessingState.INSTALLING
    assert h.ctl.wait(timeout=120) is ProcessingState.FAILED
    assert "Could not download PyTorch" in h.ctl.message and h.ctl.details
    assert "1-3 GB" in asked[0] and h.work_dirs() == [] and not h.imported


def test_optional_psutil_install_failure_does_not_block_registration(tmp_path, fixture_methods, synthetic_result):
    asked = []
    h = Harness(tmp_path, "ok", synthetic_result["out_dir"], env_extra=OFFLINE,
                plan=lambda: ddinstall.Plan(torch=False, optional=["psutil>=99"]),  # not installed here
                confirm=lambda msg, details: asked.append(msg) or True)
    h.ctl.start(_request(fixture_methods))
    assert h.ctl.wait(timeout=120) is ProcessingState.COMPLETED, h.ctl.message
    assert any("continuing without it" in line for line in h.logs)
    assert "GB" not in asked[0]  # the 1-3 GB warning is only for torch
    h.ctl.start(_request(fixture_methods))  # the next run does not ask again (an offline site)
    assert h.ctl.wait(timeout=60) is ProcessingState.COMPLETED and len(asked) == 1


def test_command_has_only_declared_options_that_changed(tmp_path, fixture_methods, synthetic_result):
    nodeo, demons, vxm = (ddmethods.by_name(fixture_methods, n) for n in ("nodeo", "demons", "vxm-diff"))
    files = {"fixed": "f.nrrd", "moving": "m.nrrd", "fixed_mask": "mask.nrrd"}

    def method_words(req):
        cmd = ddcontroller.build_register_command("py", req, files, "out")
        generic = {"--fixed", "--moving", "--method", "--out", "--device", "--spacing", "--spacing-scale",
                   "--no-align", "--overwrite", "--fixed-mask", "--field-grid", "--contrast-check", "--follow-up"}
        flags = {w for w in cmd if w.startswith("--")} - generic
        declared = {o.flag for o in req.method.options} | {o.negative_flag for o in req.method.options
                                                            if o.negative_flag}
        assert flags <= declared, flags - declared
        return cmd

    cmd = method_words(ddcontroller.RunRequest(nodeo, options={"iterations": 30, "lr": 0.005}))
    assert cmd[cmd.index("--nodeo-iterations") + 1] == "30" and "--nodeo-lr" not in cmd  # default: not passed
    assert "--spacing" not in cmd and "--spacing-scale" not in cmd and cmd[cmd.index("--fixed-mask") + 1] == "mask.nrrd"
    assert cmd[cmd.index("--field-grid") + 1] == "working"   # the panel's default
    assert "--contrast-check" not in cmd                      # the engine's default: a contrast mismatch is refused
    assert "--follow-up" not in cmd                           # the panel's "Same patient (follow-up)" unticked
    assert "--follow-up" in method_words(ddcontroller.RunRequest(vxm, follow_up=True))
    cmd = method_words(ddcontroller.RunRequest(vxm, contrast_check="warn"))
    assert cmd[cmd.index("--contrast-check") + 1] == "warn"  # Advanced: "Run on different contrasts"
    cmd = method_words(ddcontroller.RunRequest(nodeo, preset="fast", field_grid="fixed"))
    # a factor of the spacing the engine chooses for the image (NODEO: 3 mm, or 1.5 mm for a fine image), not 4.5 mm
    assert cmd[cmd.index("--spacing-scale") + 1] == "1.5" and "--spacing" not in cmd
    assert cmd[cmd.index("--field-grid") + 1] == "fixed"     # Advanced: the full-resolution field
    fast = nodeo.variants["fast"]["iterations"]       # and the method's own "fast" variant
    assert cmd[cmd.index("--nodeo-iterations") + 1] == str(fast)
    cmd = method_words(ddcontroller.RunRequest(nodeo, preset="fast", spacing_mm=2.0))
    assert cmd[cmd.index("--spacing") + 1] == "2"    # the user's spacing wins over the preset
    assert "--spacing-scale" not in cmd
    cmd = method_words(ddcontroller.RunRequest(nodeo, preset="accurate"))
    assert cmd[cmd.index("--spacing-scale") + 1] == "0.75"
    cmd = method_words(ddcontroller.RunRequest(vxm, preset="variant:refine"))
    assert cmd[cmd.index("--vxm-refine") + 1] == str(vxm.variants["refine"]["refine"])
    cmd = method_words(ddcontroller.RunRequest(vxm, preset="variant:refine",
                                               options={"refine": 0, "symmetric": False, "uncertainty": "sampled"}))
    assert "--vxm-refine" not in cmd and "--vxm-no-symmetric" in cmd
    assert cmd[cmd.index("--vxm-uncertainty") + 1] == "sampled"
    cmd = method_words(ddcontroller.RunRequest(demons, options={"iterations": "50 20"}))
    i = cmd.index("--demons-iterations")
    assert cmd[i + 1:i + 3] == ["50", "20"]
    # an option another method declares (a stale value from the panel) is dropped, never passed
    cmd = method_words(ddcontroller.RunRequest(demons, options={"refine": 5}))
    assert "--vxm-refine" not in cmd and "5" not in cmd
    with pytest.raises(KeyError):
        ddmethods.option_args(demons, {"refine": 5})
    with pytest.raises(ValueError):
        ddcontroller.build_register_command("py", ddcontroller.RunRequest(vxm, options={"uncertainty": "x"}),
                                            files, "o")
    # and what the child received is exactly that command
    h = Harness(tmp_path, "ok", synthetic_result["out_dir"])
    h.ctl.run(ddcontroller.RunRequest(nodeo, device="cpu", options={"iterations": 7}), timeout=60)
    import json
    argv = json.load(open(h.argv_file))
    assert argv[argv.index("--nodeo-iterations") + 1] == "7" and argv[0] == "register"


@pytest.mark.parametrize("spare", [False, True])
def test_real_engine_run_through_the_controller_into_a_scene(tmp_path, mrml, fixture_methods, spare):
    """The real engine (NODEO, a few dozen iterations on a tiny pair), started and imported by the controller —
    as a new process, or handed to a spare engine (`deepdiffreg warm`) that was started and ready before."""
    import synthetic
    inputs = synthetic.write_engine_inputs(str(tmp_path / "inputs"))
    lg = ddscene.Logics(mrml.scene, mrml.app_logic)
    fixed, moving = lg.load_volume(inputs["fixed"], "fixed"), lg.load_volume(inputs["moving"], "moving")

    def export(folder, request):
        from DeepDiffRegLib import inputs as ddinputs
        return ddinputs.export_inputs(folder, fixed, moving)

    def import_(out_dir, request):
        return ddscene.load_result(mrml.scene, out_dir, fixed, moving, logics=lg)

    h = Harness(tmp_path, fake=False, export=export, importer=import_, spare=spare)
    try:
        if spare:
            assert h.ctl.prepare_spare("cpu")
            _wait_ready(h.ctl._spare, timeout=120)
        # --nodeo-iterations/--nodeo-ncc-window-mm: test-speed tuning for the 40 mm phantom, passed verbatim
        req = ddcontroller.RunRequest(ddmethods.by_name(fixture_methods, "nodeo"), device="cpu", spacing_mm=2.0,
                                      extra_args=["--nodeo-iterations", "30", "--nodeo-ncc-window-mm", "15"])
        res = h.ctl.run(req, timeout=300)
        assert h.ctl.state is ProcessingState.COMPLETED and h.ctl.device == "cpu"
        assert moving.GetParentTransformNode() is res.transform and res.jacobian is not None
        assert any("spare engine" in line for line in h.logs) == spare
    finally:
        h.ctl.shutdown()
    assert h.work_dirs() == []


def test_install_only_request(tmp_path):
    h = Harness(tmp_path, plan=lambda: ddinstall.Plan(torch=False, optional=["psutil>=99"]), env_extra=OFFLINE)
    assert h.ctl.start(ddcontroller.RunRequest(method=None))
    assert h.ctl.wait(timeout=120) is ProcessingState.COMPLETED and "installed" in h.ctl.message
    assert h.work_dirs() == []
    h = Harness(tmp_path)  # nothing to install: completes at once
    h.ctl.start(ddcontroller.RunRequest(method=None))
    assert h.ctl.wait(timeout=10) is ProcessingState.COMPLETED


def test_bool_option_without_a_negative_flag_cannot_be_turned_off(fixture_methods):
    spec = ddmethods.OptionSpec(name="flip", flag="--x-flip", type="bool", default=True)
    with pytest.raises(ValueError):
        spec.args(False)
    assert spec.args(True) == ["--x-flip"]


@pytest.fixture
def spare_harness(tmp_path):
    """Harness(..., spare=True) makers; every controller made is shut down after the test, passed or failed (no
    spare engine is left behind)."""
    made = []

    def make(*args, **kw):
        h = Harness(tmp_path, *args, spare=True, **kw)
        made.append(h)
        return h
    yield make
    for h in made:
        h.ctl.shutdown()


def _wait_ready(spare, timeout=60):
    deadline = time.monotonic() + timeout
    while not spare.ready:
        assert time.monotonic() < deadline, spare.process.log_tail()
        time.sleep(0.05)


def test_a_spare_engine_runs_the_next_command_and_another_waits_after_it(tmp_path, fixture_methods, synthetic_result,
                                                                         spare_harness):
    """prepare_spare starts `deepdiffreg warm`; Register hands it the command a cold start would have run (the
    same argv), the run completes as before, a new spare waits for the next run, and shutdown leaves no child and
    no folder."""
    import json
    cold = Harness(tmp_path / "cold", "ok", synthetic_result["out_dir"])
    os.makedirs(tmp_path / "cold", exist_ok=True)
    cold.ctl.run(_request(fixture_methods))
    cold_argv = json.load(open(cold.argv_file))
    assert "--served-by-spare" not in cold_argv and cold.ctl._spare is None     # spare_engine off: none

    h = spare_harness("ok", synthetic_result["out_dir"])
    assert h.ctl.prepare_spare("cpu")
    first = h.ctl._spare
    _wait_ready(first)
    assert h.ctl.prepare_spare("cpu") and h.ctl._spare is first            # one for this environment is waiting
    res = h.ctl.run(_request(fixture_methods), timeout=60)
    argv = json.load(open(h.argv_file))
    def names(args):                      # the runs' temporary folders differ; every other word is the same
        return [os.path.basename(a) if os.sep in a else a for a in args]
    assert argv[-1] == "--served-by-spare" and names(argv[:-1]) == names(cold_argv)
    assert h.ctl.state is ProcessingState.COMPLETED and "transform.h5" in res["files"]
    assert any("spare engine" in line for line in h.logs)
    assert _gone(first.process.pid) and not os.path.exists(first.folder)
    second = h.ctl._spare
    assert second is not None and second.process.pid != first.process.pid and second.matches(sys.executable,
                                                                                             h.env("cpu"))
    assert [d for d in h.work_dirs() if not d.startswith("DeepDiffReg-spare-")] == []
    h.ctl.shutdown()
    assert h.ctl._spare is None and h.work_dirs() == []
    deadline = time.monotonic() + 10
    while not _gone(second.process.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(second.process.pid)


def test_a_spare_for_another_device_is_ended_and_the_run_starts_cold(tmp_path, fixture_methods, synthetic_result,
                                                                     spare_harness):
    import json
    h = spare_harness("ok", synthetic_result["out_dir"])
    h.ctl.prepare_spare("auto")
    spare = h.ctl._spare
    assert not spare.matches(sys.executable, h.env("cpu")) and spare.matches(sys.executable, h.env("auto"))
    h.ctl.run(_request(fixture_methods), timeout=60)                  # device "cpu"
    assert "--served-by-spare" not in json.load(open(h.argv_file))
    deadline = time.monotonic() + 10                                   # ended on a worker thread
    while (not _gone(spare.process.pid) or os.path.exists(spare.folder)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(spare.process.pid) and not os.path.exists(spare.folder)
    h.ctl.shutdown()
    assert h.work_dirs() == []


def test_cancelling_a_run_of_the_spare_engine_ends_it(tmp_path, fixture_methods, spare_harness):
    h = spare_harness("sleep")
    h.ctl.prepare_spare("cpu")
    spare = h.ctl._spare
    _wait_ready(spare)
    h.ctl.start(_request(fixture_methods))
    deadline = time.monotonic() + 30
    while h.ctl.stage != "register":
        assert time.monotonic() < deadline, h.logs
        h.ctl.poll(); time.sleep(0.05)
    assert h.ctl._run is spare.process
    h.ctl.cancel()
    assert h.ctl.wait(timeout=30) is ProcessingState.CANCELLED and not h.imported
    deadline = time.monotonic() + 5
    while not _gone(spare.process.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(spare.process.pid)
    h.ctl.shutdown()
    assert h.work_dirs() == []

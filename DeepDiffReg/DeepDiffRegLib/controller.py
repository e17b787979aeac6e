"""The run lifecycle of the panel, Qt-free: options -> dependencies -> inputs -> engine -> import -> final state.

``RunController`` is what the widget drives (``start`` on Register, ``poll`` from a QTimer, ``cancel`` on Cancel,
``scene_closed`` on the scene's StartCloseEvent) and what the tests drive with real child processes. Its promise:
**no call raises and every path ends in COMPLETED, FAILED or CANCELLED with a message that stays** (the panel
shows it until the next run), and the run's temporary folder is removed on every path unless the user keeps it.

Dependencies are installed by child processes too (``install.install_steps``): a network failure is a failed step,
not an exception in the GUI thread; an optional package that fails to install is only logged.

Scene access is the caller's: ``export_inputs(dir, request) -> {engine argument name: file}`` writes the inputs,
``import_results(result_dir, request) -> result`` loads them. Both run on the caller's thread (inside ``start`` and
``poll``), never on the reader threads.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from . import install as ddinstall
from . import methods as ddmethods
from . import process as ddprocess
from .states import ProcessingState

log = logging.getLogger("DeepDiffReg")


@dataclass
class RunRequest:
    method: ddmethods.MethodInfo | None                     # None: only install the dependencies
    device: str = "auto"
    preset: str = ddmethods.DEFAULT_PRESET
    options: dict[str, Any] = field(default_factory=dict)   # Advanced values the user set, by option name
    spacing_mm: float | None = None                         # user's working spacing; None/0 = the preset's
    align: bool = True
    follow_up: bool = False                                 # --follow-up: the two volumes are one patient's
    field_grid: str = "working"                             # where transform.h5 keeps u: "working" | "fixed"
    contrast_check: str = "error"                           # --contrast-check: "error" | "warn" | "off"
    keep_temporary_files: bool = False
    extra_args: Sequence[str] = ()                          # appended verbatim (scripts, tests)
    context: Any = None                                     # what export/import need (the parameter node)

    def with_device(self, device: str) -> "RunRequest":
        return dataclasses.replace(self, device=device)


def build_register_command(python: str, request: RunRequest, files: dict[str, str], out_dir: str) -> list[str]:
    """The engine command for ``request`` with its exported ``files``: generic options, then the method's own
    declared options that differ from their defaults (preset variant values overridden by the user's)."""
    m = request.method
    method_args = ddmethods.option_args(m, ddmethods.effective_options(m, request.preset, request.options))
    spacing = request.spacing_mm or None
    scale = None if spacing else ddmethods.preset_spacing_scale(m, request.preset)
    return ddprocess.register_command(
        python, files["fixed"], files["moving"], out_dir, method=m.name, device=request.device,
        fixed_seg=files.get("fixed_seg"), moving_seg=files.get("moving_seg"),
        fixed_landmarks=files.get("fixed_landmarks"), moving_landmarks=files.get("moving_landmarks"),
        fixed_mask=files.get("fixed_mask"), spacing_mm=spacing, spacing_scale=scale, align=request.align,
        follow_up=request.follow_up,
        method_args=method_args, field_grid=request.field_grid, contrast_check=request.contrast_check,
        extra=request.extra_args)


class RunController:
    def __init__(self, python: str, environment: Callable[[str], dict[str, str]], work_root: str | None,
                 export_inputs: Callable[[str, RunRequest], dict[str, str]],
                 import_results: Callable[[str, RunRequest], Any],
                 confirm_install: Callable[[str, str], bool] | None = None,
                 plan: Callable[[], ddinstall.Plan] = ddinstall.plan,
                 on_log: Callable[[str], None] | None = None,
                 on_change: Callable[["RunController"], None] | None = None,
                 cancel_grace_s: float = 3.0, spare_engine: bool = False):
        self.python = python
        self._environment = environment
        self.work_root = work_root
        self._export = export_inputs
        self._import = import_results
        self._confirm = confirm_install
        self._plan = plan
        self._on_log = on_log
        self._on_change = on_change
        self.cancel_grace_s = cancel_grace_s
        # a spare engine (process.SpareEngine) takes the next run's imports off its critical path
        self.spare_engine = spare_engine
        self._spare: ddprocess.SpareEngine | None = None
        self._served: ddprocess.SpareEngine | None = None   # the spare running the current run
        self.state = ProcessingState.IDLE
        self._optional_tried = False   # optional packages are offered (and tried) once per session
        self._reset()

    def _reset(self) -> None:
        self.message = ""
        self.details = ""              # log tail for an error dialog
        self.stage, self.progress, self.device = "", 0.0, None
        self.result: Any = None
        self.request: RunRequest | None = None
        self.command: list[str] | None = None
        self.status: ddprocess.RunStatus | None = None
        self.offer_cpu_retry = False
        self.restart_required = False
        self.work_dir: str | None = None
        self.out_dir: str | None = None
        self._run: ddprocess.EngineProcess | None = None
        self._steps: list[ddinstall.Step] = []
        self._step: ddinstall.Step | None = None
        self._step_run: ddprocess.EngineProcess | None = None
        self._discard = False
        self._t0 = 0.0

    # -- state -----------------------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self.state.busy

    def elapsed(self) -> float:
        return time.monotonic() - self._t0 if self._t0 else 0.0

    def _set(self, state: ProcessingState, message: str | None = None) -> None:
        self.state = state
        if message is not None:
            self.message = message
        self._notify()

    def _notify(self) -> None:
        if self._on_change:
            try:
                self._on_change(self)
            except Exception:  # noqa: BLE001 - a display error must not break the run's bookkeeping
                log.exception("DeepDiffReg: state display failed")

    def _log(self, text: str) -> None:
        if self._on_log:
            try:
                self._on_log(text)
            except Exception:  # noqa: BLE001
                log.exception("DeepDiffReg: log display failed")

    # -- start -----------------------------------------------------------------------------------------------
    def start(self, request: RunRequest) -> bool:
        """Begin a run; False (and a message) when it could not. Never raises."""
        if self.busy:
            return False
        self._reset()
        self.request = request
        self._t0 = time.monotonic()
        self._set(ProcessingState.STARTING, ProcessingState.STARTING.label)
        try:
            # options first: a bad value fails before anything is installed or written
            if request.method is not None:
                ddmethods.option_args(request.method, ddmethods.effective_options(request.method, request.preset,
                                                                                   request.options))
            steps = self._install_steps()
            if steps is None:
                return False
            self.work_dir = tempfile.mkdtemp(prefix="DeepDiffReg-", dir=self.work_root)
            if steps:
                self._close_spare()          # it imported the packages as they were before this install
            self._steps = steps
            if steps or request.method is None:
                self._set(ProcessingState.INSTALLING, ProcessingState.INSTALLING.label)
                self._next_step()
            else:
                self._launch()
        except (ValueError, KeyError) as e:
            self._fail(f"Invalid option: {e}")
        except ddinstall.InstallError as e:
            self.restart_required = e.restart_required
            self._fail(str(e))
        except Exception as e:  # noqa: BLE001 - shown to the user; the traceback goes to the log
            log.exception("DeepDiffReg: could not start")
            self._fail(f"Could not start the registration: {type(e).__name__}: {e}")
        return self.state.busy

    def _install_steps(self) -> list[ddinstall.Step] | None:
        p = self._plan()
        if p.torch_too_old:
            raise ddinstall.InstallError(ddinstall.torch_too_old_message(p.torch_version or "?"))
        if self._optional_tried and p.optional:  # declined or failed before: do not ask at every run
            p = dataclasses.replace(p, optional=[])
        if p.empty:
            return []
        if p.optional:
            self._optional_tried = True
        if self._confirm is not None and not self._confirm(p.confirmation_text(), p.describe()):
            if p.torch:
                self._fail("Registration needs PyTorch. Press Register again to install it, or install it from "
                           "the 'PyTorch Utils' module.")
                return None
            self._log("Optional packages not installed (declined): " + ", ".join(p.optional))
            p = dataclasses.replace(p, optional=[])
        return ddinstall.install_steps(p, self.python)

    def _next_step(self) -> None:
        if not self._steps:
            self._step = self._step_run = None
            if self.request.method is None:
                self._finish(ProcessingState.COMPLETED, "The Python packages are installed.")
                return
            self._set(ProcessingState.STARTING, "Writing the inputs...")
            self._launch()
            return
        self._step = self._steps.pop(0)
        self.stage = self._step.label
        self._log(f"$ {' '.join(self._step.command)}")
        self._step_run = ddprocess.EngineProcess(self._step.command, env=self._environment("auto"),
                                                 on_text=self._log).start()
        self._set(ProcessingState.INSTALLING, self._step.label + "...")

    def _launch(self) -> None:
        assert self.request is not None and self.work_dir is not None
        files = self._export(os.path.join(self.work_dir, "inputs"), self.request)
        self.out_dir = os.path.join(self.work_dir, "result")
        self.command = build_register_command(self.python, self.request, files, self.out_dir)
        self._log("$ " + " ".join(self.command))
        env = self._environment(self.request.device)
        spare, self._spare = self._spare, None
        if spare is not None and spare.matches(self.python, env):
            self._log(f"(run by the spare engine started {spare.process.elapsed():.0f} s ago, "
                      f"{'ready' if spare.ready else 'still importing'})")
            self._served = spare
            self._run = spare.hand_over(self.command, on_text=self._log)
        else:
            if spare is not None:
                self._close_spare(spare)     # another device's environment, or gone
            self._run = ddprocess.EngineProcess(self.command, env=env, on_text=self._log).start()
        self._set(ProcessingState.RUNNING, ProcessingState.RUNNING.label)

    # -- poll ------------------------------------------------------------------------------------------------
    def poll(self) -> ProcessingState:
        """Advance the run (call from a timer). Never raises."""
        try:
            if self._step_run is not None and self.state in (ProcessingState.INSTALLING,
                                                             ProcessingState.CANCEL_REQUESTED):
                self._poll_step()
            elif self._run is not None and self.state in (ProcessingState.RUNNING, ProcessingState.CANCEL_REQUESTED):
                self._poll_run()
        except ddinstall.InstallError as e:
            self.restart_required = e.restart_required
            self._fail(str(e))
        except Exception as e:  # noqa: BLE001
            log.exception("DeepDiffReg: run failed")
            self._fail(f"The registration failed: {type(e).__name__}: {e}")
        return self.state

    def _poll_step(self) -> None:
        st = self._step_run.poll()
        if not st.finished:
            return
        step, run = self._step, self._step_run
        if st.cancelled or self._discard:
            self._finish(ProcessingState.CANCELLED, self._cancel_text())
            return
        if st.returncode != 0:
            if step.required:
                self.details = run.log_tail(40)
                self.restart_required = step.label.startswith("Checking")
                self._fail(step.failure_message or f"{step.label} failed (exit code {st.returncode}).")
                return
            self._log(f"{step.label} failed (exit code {st.returncode}); continuing without it.")
        self._next_step()

    def _poll_run(self) -> None:
        st = self._run.poll()
        self.status = st
        self.stage, self.progress = st.stage, st.progress
        self.device = st.device or self.device
        if not st.finished:
            self._notify()
            return
        if self._discard:
            self._finish(ProcessingState.CANCELLED, self._cancel_text())
        elif st.ok:
            self._set(ProcessingState.IMPORTING, ProcessingState.IMPORTING.label)
            try:
                self.result = self._import(st.result["out_dir"], self.request)
            except Exception as e:  # noqa: BLE001
                log.exception("DeepDiffReg: import failed")
                self.details = self._run.log_tail(40)
                self._fail(f"The registration finished but its results could not be loaded: "
                           f"{type(e).__name__}: {e}")
                return
            self._finish(ProcessingState.COMPLETED,
                         f"Done in {self._run.elapsed():.0f} s on {self.device or 'unknown device'}.")
        elif st.cancelled:
            self._finish(ProcessingState.CANCELLED, self._cancel_text())
        else:
            self.offer_cpu_retry = st.offer_cpu_retry
            self.details = self._run.log_tail(40)
            self._fail(st.error_text())

    def _cancel_text(self) -> str:
        if self._discard:
            return "The scene was closed, so the registration was cancelled."
        return f"Cancelled after {self.elapsed():.0f} s."

    # -- cancel / scene close --------------------------------------------------------------------------------
    def cancel(self) -> None:
        """Stop the running child (tree kill after a grace period, on a worker thread); the next ``poll`` ends
        the run as CANCELLED."""
        proc = self._step_run if self.state is ProcessingState.INSTALLING else self._run
        if self.state not in (ProcessingState.INSTALLING, ProcessingState.RUNNING) or proc is None:
            return
        self._set(ProcessingState.CANCEL_REQUESTED, ProcessingState.CANCEL_REQUESTED.label)
        proc.status.cancelled = True
        threading.Thread(target=proc.cancel, kwargs={"grace_s": self.cancel_grace_s}, daemon=True,
                         name="DeepDiffReg-cancel").start()

    def scene_closed(self) -> None:
        """The scene the inputs came from is going away: cancel, and never import into the next scene."""
        if self.busy:
            self._discard = True
            self.cancel()

    # -- the end ---------------------------------------------------------------------------------------------
    def _fail(self, message: str) -> None:
        for proc in (self._step_run, self._run):
            if proc is not None and proc.running:
                proc.cancel(grace_s=self.cancel_grace_s)
        self._finish(ProcessingState.FAILED, message)

    def _finish(self, state: ProcessingState, message: str) -> None:
        self._cleanup()
        if self._served is not None:
            self._served.close()             # its run is over: only its folder is left
            self._served = None
        self._set(state, message)
        if self._run is not None and self.request is not None:   # the engine runs here: ready one for the next
            self.prepare_spare(self.request.device)

    # -- the spare engine ------------------------------------------------------------------------------------
    def prepare_spare(self, device: str = "auto") -> bool:
        """Start a spare engine for the next run on ``device`` (``spare_engine`` on, no run going), unless one
        for that environment is waiting already. Never raises; True when one is waiting."""
        if not self.spare_engine or self.busy:
            return False
        try:
            env = self._environment(device)
            if self._spare is not None and self._spare.matches(self.python, env):
                return True
            self._close_spare()
            folder = tempfile.mkdtemp(prefix="DeepDiffReg-spare-", dir=self.work_root)
            self._spare = ddprocess.SpareEngine(self.python, env, folder).start()
            return True
        except Exception:  # noqa: BLE001 - a spare is an optimisation: the next run starts cold instead
            log.exception("DeepDiffReg: could not start a spare engine")
            self._close_spare()
            return False

    def _close_spare(self, spare: ddprocess.SpareEngine | None = None, wait: bool = False) -> None:
        """End ``spare`` (default: the waiting one) on a worker thread — its exit takes ~0.5 s with torch loaded,
        which the panel must not wait for — or here with ``wait``."""
        if spare is None:
            spare, self._spare = self._spare, None
        if spare is None:
            return
        if wait:
            spare.close()
        else:
            threading.Thread(target=spare.close, daemon=True, name="DeepDiffReg-spare-close").start()

    def shutdown(self) -> None:
        """The panel goes away: cancel a run and end the spare engine, waiting for it (no child is left behind;
        the engine's watchdog ends one whose Slicer exits first)."""
        if self.busy:
            self.cancel()
        self._close_spare(wait=True)

    def _cleanup(self) -> None:
        if not self.work_dir:
            return
        if self.request is not None and self.request.keep_temporary_files:
            self._log(f"Temporary files kept in {self.work_dir}")
            return
        shutil.rmtree(self.work_dir, ignore_errors=True)

    # -- blocking use (scripts, tests, Logic.register) -------------------------------------------------------
    def wait(self, timeout: float | None = None, interval: float = 0.05) -> ProcessingState:
        """Poll until the run ends. On ``timeout`` the child is cancelled (and waited for) and TimeoutError is
        raised, so no engine is left running."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.busy:
            self.poll()
            if not self.busy:
                break
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                end = time.monotonic() + self.cancel_grace_s + 10
                while self.busy and time.monotonic() < end:
                    self.poll()
                    time.sleep(interval)
                raise TimeoutError(f"the registration did not finish within {timeout} s; it was cancelled")
            time.sleep(interval)
        return self.state

    def run(self, request: RunRequest, timeout: float | None = None) -> Any:
        """Start, wait, and return the imported result; RuntimeError with the message when it did not complete."""
        self.start(request)
        state = self.wait(timeout)
        if state is not ProcessingState.COMPLETED:
            raise RuntimeError(self.message + (f"\n{self.details}" if self.details else ""))
        return self.result

"""DeepDiffReg: diffeomorphic deep image registration for 3D Slicer (module, widget, logic, test).

This file stays thin: behaviour lives in DeepDiffRegLib/ (Qt-free, tested against a real MRML scene) and the
engine in deepdiffreg/ (run in a child process). Nothing heavy is imported here: torch is only ever imported by the
child process, and DeepDiffRegLib is imported inside functions.
"""
import logging
import os
import shutil
import tempfile
import threading
import time
from typing import Annotated

import ctk
import qt
import slicer
import vtk
from slicer import (vtkMRMLMarkupsFiducialNode, vtkMRMLModelNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode,
                    vtkMRMLTransformNode)
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))


class DeepDiffReg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "DeepDiffReg"
        self.parent.categories = ["Registration"]
        self.parent.dependencies = []
        self.parent.contributors = ["DeepDiffReg developers"]
        self.parent.helpText = (
            "Diffeomorphic deformable registration of a moving volume to a fixed volume (NODEO and learned methods). "
            "The result is a displacement-field transform that Transforms, Segment Editor, Crop Volume and Markups "
            "use as is, with a Jacobian map, fold QA and Dice/TRE when segmentations or landmarks are given. "
            "See <a href='https://github.com/deepdiffreg/DeepDiffReg/blob/main/docs/slicer-module.md'>the module "
            "documentation</a>.")
        self.parent.acknowledgementText = "Registration runs in a child process; PyTorch comes from the PyTorch extension."


# -- parameters ------------------------------------------------------------------------------------------------
@parameterNodeWrapper
class DeepDiffRegParameterNode:
    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    fixedSegmentation: vtkMRMLSegmentationNode
    movingSegmentation: vtkMRMLSegmentationNode
    fixedLandmarks: vtkMRMLMarkupsFiducialNode
    movingLandmarks: vtkMRMLMarkupsFiducialNode
    method: str = "nodeo"                      # engine method name (stored by name; never rename)
    preset: Annotated[str, Choice(["fast", "balanced", "accurate"])] = "balanced"
    device: Annotated[str, Choice(["auto", "cuda", "cpu"])] = "auto"
    refineSteps: Annotated[int, WithinRange(0, 1000)] = 0           # learned methods: test-time refinement
    nodeoIterations: Annotated[int, WithinRange(0, 10000)] = 0      # 0 = the preset's / method's default
    workingSpacingMm: Annotated[float, WithinRange(0.0, 10.0)] = 0.0  # 0 = the preset's / method's default
    initialAlignment: bool = True
    keepTemporaryFiles: bool = False
    outputTransform: vtkMRMLTransformNode
    outputInverse: vtkMRMLTransformNode
    outputJacobian: vtkMRMLScalarVolumeNode
    outputGrid: vtkMRMLModelNode
    outputWarped: vtkMRMLScalarVolumeNode


# -- widget ----------------------------------------------------------------------------------------------------
class DeepDiffRegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    POLL_MS = 200

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._guiObserver = None
        self._run = None          # DeepDiffRegLib.process.EngineProcess of the current run
        self._runInfo = None      # dict: work dir, out dir, options of the current run
        self._result = None       # DeepDiffRegLib.scene.ResultNodes of the last import
        self._state = None
        self._methods = []

    def setup(self):
        from DeepDiffRegLib import methods as ddmethods
        from DeepDiffRegLib.states import ProcessingState
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DeepDiffReg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = DeepDiffRegLogic()

        self._methods = list(ddmethods.STATIC_METHODS)
        self._fillMethods()
        for key, p in ddmethods.PRESETS.items():
            self.ui.presetComboBox.addItem(p["label"], key)
        for label, key in (("Automatic (GPU if available)", "auto"), ("GPU (CUDA)", "cuda"), ("CPU", "cpu")):
            self.ui.deviceComboBox.addItem(label, key)
        self.ui.methodComboBox.currentIndexChanged.connect(self._onComboChanged)
        self.ui.presetComboBox.currentIndexChanged.connect(self._onComboChanged)
        self.ui.deviceComboBox.currentIndexChanged.connect(self._onComboChanged)
        self.ui.registerButton.connect("clicked(bool)", self.onRegisterButton)
        self.ui.centreWorstFoldButton.connect("clicked(bool)", self.onCentreWorstFold)
        self.ui.showTransformGridCheckBox.connect("toggled(bool)", self.onShowTransformGrid)
        self.ui.saveTransformButton.connect("clicked(bool)", self.onSaveTransform)
        self.ui.hardenButton.connect("clicked(bool)", self.onHarden)
        self.ui.refreshMethodsButton.connect("clicked(bool)", self.onRefreshMethods)

        self._timer = qt.QTimer()
        self._timer.setInterval(self.POLL_MS)
        self._timer.timeout.connect(self._poll)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()
        self._setState(ProcessingState.IDLE)

    def cleanup(self):
        self.removeObservers()
        if self._run is not None and self._run.running:
            self._run.cancel()
        self._timer.stop()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._guiObserver)
            self._guiObserver = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.fixedVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.fixedVolume = first

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._guiObserver)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._guiObserver = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._syncCombosFromParameters()
            self._checkCanApply()

    # -- combos (method/preset/device carry an item key, so they are synced by hand) ---------------------------
    def _fillMethods(self):
        self.ui.methodComboBox.blockSignals(True)
        self.ui.methodComboBox.clear()
        for m in self._methods:
            self.ui.methodComboBox.addItem(m.name, m.name)
        self.ui.methodComboBox.blockSignals(False)

    def _syncCombosFromParameters(self):
        p = self._parameterNode
        for combo, value in ((self.ui.methodComboBox, p.method), (self.ui.presetComboBox, p.preset),
                             (self.ui.deviceComboBox, p.device)):
            i = combo.findData(value)
            if i >= 0 and combo.currentIndex != i:
                combo.setCurrentIndex(i)
        self._updateMethodInfo()

    def _onComboChanged(self, _index=None):
        if not self._parameterNode:
            return
        self._parameterNode.method = self.ui.methodComboBox.currentData or "nodeo"
        self._parameterNode.preset = self.ui.presetComboBox.currentData or "balanced"
        self._parameterNode.device = self.ui.deviceComboBox.currentData or "auto"
        self._updateMethodInfo()

    def _updateMethodInfo(self):
        from DeepDiffRegLib import methods as ddmethods
        m = ddmethods.by_name(self._methods, self.ui.methodComboBox.currentData or "")
        self.ui.methodDescriptionLabel.text = m.description if m else ""
        self.ui.modelLabel.text = m.model_text if m else ""
        self.ui.refineStepsSpinBox.enabled = bool(m and m.learned)
        self.ui.nodeoIterationsSpinBox.enabled = bool(m and m.name == "nodeo")

    def onRefreshMethods(self):
        from DeepDiffRegLib import methods as ddmethods, process as ddprocess
        with slicer.util.tryWithErrorDisplay("Could not list the engine's methods.", waitCursor=True):
            env = ddprocess.child_environment(MODULE_DIR, slicer.util.startupEnvironment())
            self._methods = ddmethods.refresh_from_engine(ddprocess.default_python(), env)
            self._fillMethods()
            self._syncCombosFromParameters()

    # -- Register / Cancel ---------------------------------------------------------------------------------------
    def _checkCanApply(self, caller=None, event=None):
        from DeepDiffRegLib import inputs as ddinputs
        if self._state is not None and self._state.busy:
            return
        p = self._parameterNode
        if p is None:
            return
        reasons = ddinputs.missing_inputs(p.fixedVolume, p.movingVolume, p.fixedSegmentation, p.movingSegmentation,
                                          p.fixedLandmarks, p.movingLandmarks, p.method,
                                          [m.name for m in self._methods])
        self.ui.registerButton.enabled = not reasons
        self.ui.registerButton.toolTip = "\n".join(reasons) if reasons else "Register the moving volume to the fixed one."
        self.ui.statusLabel.text = " ".join(reasons) if reasons else "Ready."

    def _setState(self, state, message=None):
        from DeepDiffRegLib.states import ProcessingState
        self._state = state
        self.ui.registerButton.text = state.button_text
        self.ui.registerButton.enabled = state is not ProcessingState.CANCEL_REQUESTED
        self.ui.statusLabel.text = message or state.label
        self.ui.progressBar.visible = state.busy
        for w in (self.ui.inputsCollapsibleButton, self.ui.methodCollapsibleButton, self.ui.outputsCollapsibleButton,
                  self.ui.advancedCollapsibleButton):
            w.enabled = not state.busy
        if not state.busy:
            self._checkCanApply()

    def onRegisterButton(self):
        if self._state is not None and self._state.busy:
            self.onCancel()
        else:
            self.startRun()

    def startRun(self, device=None):
        from DeepDiffRegLib.states import ProcessingState
        from DeepDiffRegLib import install as ddinstall
        p = self._parameterNode
        self.ui.logTextEdit.clear()
        self._setState(ProcessingState.STARTING)
        slicer.app.processEvents()
        try:
            ddinstall.ensure_dependencies(
                lambda msg, details: slicer.util.confirmOkCancelDisplay(msg, detailedText=details),
                python=self.logic.python(), env=self.logic.environment(device or p.device))
        except ddinstall.InstallError as e:
            self._setState(ProcessingState.FAILED, str(e))
            slicer.util.errorDisplay(str(e))
            if e.restart_required and slicer.util.confirmYesNoDisplay("Restart Slicer now?"):
                slicer.util.restart()
            return
        try:
            self._run, self._runInfo = self.logic.start(p, device=device, onText=self._appendLog)
        except Exception as e:  # noqa: BLE001 - shown to the user with the traceback in the log
            logging.exception("DeepDiffReg: could not start")
            self._setState(ProcessingState.FAILED, f"Could not start: {e}")
            slicer.util.errorDisplay(f"Could not start the registration: {e}")
            return
        self._appendLog("$ " + " ".join(self._run.command))
        self.ui.progressBar.value = 0
        self._setState(ProcessingState.RUNNING)
        self._timer.start()

    def onCancel(self):
        from DeepDiffRegLib.states import ProcessingState
        if self._run is None:
            return
        self._setState(ProcessingState.CANCEL_REQUESTED)
        threading.Thread(target=self._run.cancel, daemon=True).start()  # may wait for the grace period; no Qt

    def _appendLog(self, text):
        self.ui.logTextEdit.appendPlainText(text)

    def _poll(self):
        from DeepDiffRegLib.states import ProcessingState, stage_label
        st = self._run.poll()
        if not st.finished:
            self.ui.progressBar.value = int(round(100 * st.progress))
            dev = f" on {st.device}" if st.device else ""
            self.ui.progressBar.setFormat(f"{stage_label(st.stage)} %p% - {self._run.elapsed():.0f} s{dev}")
            self.ui.deviceUsedLabel.text = st.device or "(not reported yet)"
            return
        self._timer.stop()
        info = self._runInfo
        try:
            if st.ok:
                self._setState(ProcessingState.IMPORTING)
                slicer.app.processEvents()
                self._result = self.logic.importResults(st.result["out_dir"], self._parameterNode)
                self._showResults()
                self._setState(ProcessingState.COMPLETED,
                               f"Done in {self._run.elapsed():.0f} s on {st.device or '?'}.")
            elif st.cancelled:
                self._setState(ProcessingState.CANCELLED)
            else:
                self._setState(ProcessingState.FAILED, st.error_text())
                if st.offer_cpu_retry and slicer.util.confirmYesNoDisplay(st.error_text() + "\n\nRetry on the CPU?"):
                    self.logic.cleanup(info)
                    self.startRun(device="cpu")
                    return
                slicer.util.errorDisplay(st.error_text(), detailedText=self._run.log_tail(40))
        finally:
            if self._run is not None and not self._run.running:
                self.logic.cleanup(info)

    # -- results / QA / export -------------------------------------------------------------------------------
    def _showResults(self):
        from DeepDiffRegLib import qa
        r = self._result
        self.ui.foldLabel.text = r.fold_summary.text() if r.fold_summary else "No Jacobian."
        self.ui.centreWorstFoldButton.enabled = bool(r.fold_summary and r.fold_summary.has_folds)
        self.ui.summaryLabel.text = "\n".join(qa.report_summary_lines(r.report))
        rows = qa.metrics_table(r.report)
        t = self.ui.metricsTable
        t.setRowCount(len(rows))
        for i, row in enumerate(rows):
            for j, v in enumerate(row):
                t.setItem(i, j, qt.QTableWidgetItem(v))
        t.visible = bool(rows)
        self.ui.resultsCollapsibleButton.collapsed = False
        p = self._parameterNode
        slicer.util.setSliceViewerLayers(background=p.movingVolume, foreground=p.fixedVolume, foregroundOpacity=0.5)

    def onCentreWorstFold(self):
        from DeepDiffRegLib import scene as ddscene
        if self._result is None:
            return
        names = slicer.app.layoutManager().sliceViewNames()
        ddscene.centre_on_worst_fold(self._result, [slicer.app.layoutManager().sliceWidget(n).mrmlSliceNode()
                                                    for n in names])

    def onShowTransformGrid(self, on):
        if self._result is not None and self._result.transform.GetDisplayNode():
            self._result.transform.GetDisplayNode().SetVisibility(on)

    def onSaveTransform(self):
        from DeepDiffRegLib import scene as ddscene
        if self._result is None:
            return
        path = qt.QFileDialog.getSaveFileName(None, "Save transform", self._result.transform.GetName() + ".h5",
                                              "ITK transform (*.h5 *.tfm)")
        if path:
            with slicer.util.tryWithErrorDisplay("Could not save the transform."):
                if not ddscene.save_transform(self._result.transform, path):
                    raise RuntimeError(path)

    def onHarden(self):
        from DeepDiffRegLib import scene as ddscene
        if self._result is None:
            return
        nodes = self.ui.hardenNodesComboBox.checkedNodes()
        with slicer.util.tryWithErrorDisplay("Could not harden the transform.", waitCursor=True):
            done = ddscene.harden(slicer.mrmlScene, self._result.transform, nodes)
            self.ui.statusLabel.text = f"Hardened on {len(done)} node(s)."


# -- logic -----------------------------------------------------------------------------------------------------
class DeepDiffRegLogic(ScriptedLoadableModuleLogic):
    """Callable without the widget (scripts, tests): ``register(...)`` blocks, ``start(...)`` does not."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return DeepDiffRegParameterNode(super().getParameterNode())

    @staticmethod
    def python():
        from DeepDiffRegLib import process as ddprocess
        return ddprocess.default_python()

    @staticmethod
    def environment(device="auto"):
        from DeepDiffRegLib import process as ddprocess
        return ddprocess.child_environment(MODULE_DIR, slicer.util.startupEnvironment(), device)

    def start(self, p, device=None, onText=None, onEvent=None):
        """Export inputs to a temporary folder and start the engine. Returns (EngineProcess, run info)."""
        from DeepDiffRegLib import inputs as ddinputs, methods as ddmethods, process as ddprocess
        device = device or p.device
        preset = ddmethods.PRESETS.get(p.preset, ddmethods.PRESETS[ddmethods.DEFAULT_PRESET])
        work = tempfile.mkdtemp(prefix="DeepDiffReg-", dir=slicer.app.temporaryPath)
        files = ddinputs.export_inputs(os.path.join(work, "inputs"), p.fixedVolume, p.movingVolume,
                                       p.fixedSegmentation, p.movingSegmentation, p.fixedLandmarks,
                                       p.movingLandmarks)
        out = os.path.join(work, "result")
        cmd = ddprocess.register_command(
            self.python(), files["fixed"], files["moving"], out, method=p.method, device=device,
            fixed_seg=files.get("fixed_seg"), moving_seg=files.get("moving_seg"),
            fixed_landmarks=files.get("fixed_landmarks"), moving_landmarks=files.get("moving_landmarks"),
            iterations=p.nodeoIterations or preset["iterations"] or None,
            spacing_mm=p.workingSpacingMm or preset["spacing_mm"] or None,
            refine=p.refineSteps or preset["refine"] or None, align=p.initialAlignment)
        run = ddprocess.EngineProcess(cmd, env=self.environment(device), on_text=onText, on_event=onEvent).start()
        logging.info("DeepDiffReg: started %s", " ".join(cmd))
        return run, {"work_dir": work, "out_dir": out, "keep": p.keepTemporaryFiles, "started": time.time()}

    def importResults(self, out_dir, p):
        from DeepDiffRegLib import scene as ddscene
        outputs = {k: getattr(p, a) for k, a in (("transform", "outputTransform"), ("inverse", "outputInverse"),
                                                  ("jacobian", "outputJacobian"), ("grid", "outputGrid"),
                                                  ("warped", "outputWarped")) if getattr(p, a) is not None}
        res = ddscene.load_result(slicer.mrmlScene, out_dir, p.fixedVolume, p.movingVolume,
                                  app_logic=slicer.app.applicationLogic(), outputs=outputs)
        # remember the nodes in the selectors so that the next run reuses them
        p.outputTransform, p.outputJacobian = res.transform, res.jacobian
        if res.inverse is not None:
            p.outputInverse = res.inverse
        if res.grid is not None:
            p.outputGrid = res.grid
        if res.warped is not None:
            p.outputWarped = res.warped
        # the loaded nodes are in the scene now; their files live in the (temporary) result folder
        for n in res.nodes():
            sn = n.GetStorageNode()
            if sn is not None:
                n.SetAndObserveStorageNodeID(None)
                slicer.mrmlScene.RemoveNode(sn)
        return res

    @staticmethod
    def cleanup(info):
        """Remove the temporary inputs and results unless the user keeps them."""
        if info and not info.get("keep"):
            shutil.rmtree(info["work_dir"], ignore_errors=True)
        elif info:
            logging.info("DeepDiffReg: temporary files kept in %s", info["work_dir"])

    def register(self, p, device=None, timeout_s=3600):
        """Blocking run + import (scripts, tests). Returns ResultNodes; raises RuntimeError on failure."""
        run, info = self.start(p, device=device)
        try:
            st = run.wait(timeout=timeout_s)
            if not st.ok:
                raise RuntimeError(f"{st.error_text()}\n{run.log_tail(20)}")
            return self.importResults(st.result["out_dir"], p)
        finally:
            self.cleanup(info)


# -- test ------------------------------------------------------------------------------------------------------
class DeepDiffRegTest(ScriptedLoadableModuleTest):
    """Runs in Slicer (Reload and Test / ctest). The end-to-end registration of MRBrainTumor1/2 downloads sample
    data and takes minutes on a CPU, so it is opt-in: set DEEPDIFFREG_TEST_REGISTER=1 (as the anchors' testLogic)."""

    runRegistration = os.environ.get("DEEPDIFFREG_TEST_REGISTER") == "1"

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_ModuleLoads()
        if self.runRegistration:
            self.setUp()
            self.test_RegisterSampleData()
        else:
            self.delayDisplay("Skipping the end-to-end registration (set DEEPDIFFREG_TEST_REGISTER=1 to run it)")

    def test_ModuleLoads(self):
        logic = DeepDiffRegLogic()
        p = logic.getParameterNode()
        self.assertEqual(p.method, "nodeo")
        from DeepDiffRegLib import inputs as ddinputs
        self.assertTrue(ddinputs.missing_inputs(None, None))

    def test_RegisterSampleData(self):
        import numpy as np
        import SampleData
        self.delayDisplay("Downloading MRBrainTumor1/2")
        fixed = SampleData.downloadSample("MRBrainTumor1")
        moving = SampleData.downloadSample("MRBrainTumor2")
        logic = DeepDiffRegLogic()
        p = logic.getParameterNode()
        p.fixedVolume, p.movingVolume = fixed, moving
        p.preset, p.device = "fast", "auto"
        self.delayDisplay("Registering (a few minutes on a CPU)")
        res = logic.register(p)
        self.assertIs(moving.GetParentTransformNode(), res.transform)
        self.assertTrue(res.transform.IsA("vtkMRMLGridTransformNode"))
        self.assertIsNotNone(res.jacobian)
        self.assertTrue(res.transform.GetAttribute("DeepDiffReg.device"))

        def resampled(node):
            out = slicer.modules.volumes.logic().CloneVolume(slicer.mrmlScene, fixed, "tmp")
            params = {"inputVolume": node.GetID(), "referenceVolume": fixed.GetID(), "outputVolume": out.GetID(),
                      "interpolationType": "linear"}
            if node.GetParentTransformNode():
                params["transformationFile"] = node.GetParentTransformNode().GetID()
            slicer.cli.runSync(slicer.modules.resamplescalarvectordwivolume, None, params)
            return slicer.util.arrayFromVolume(out).astype(float)

        f = slicer.util.arrayFromVolume(fixed).astype(float)
        after = resampled(moving)
        moving.SetAndObserveTransformNodeID(None)
        before = resampled(moving)
        mask = f > np.percentile(f, 60)
        cc_before = np.corrcoef(f[mask], before[mask])[0, 1]
        cc_after = np.corrcoef(f[mask], after[mask])[0, 1]
        self.delayDisplay(f"correlation with fixed: before {cc_before:.3f}, after {cc_after:.3f}")
        self.assertGreater(cc_after, cc_before + 0.05)
        self.delayDisplay("Test passed")

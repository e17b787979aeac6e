"""DeepDiffReg: diffeomorphic deep image registration for 3D Slicer (module, widget, logic, test).

This file stays thin: behaviour lives in DeepDiffRegLib/ (Qt-free, tested against a real MRML scene) and the
engine in deepdiffreg/ (run in a child process). Nothing heavy is imported here: torch is only ever imported by the
child process, and DeepDiffRegLib is imported inside functions.
"""
import json
import logging
import os
from typing import Annotated, Union

import ctk
import qt
import slicer
import vtk
from slicer import (vtkMRMLLabelMapVolumeNode, vtkMRMLMarkupsFiducialNode, vtkMRMLModelNode,
                    vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTransformNode)
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
        self.parent.contributors = ["DeepDiffReg developers (DeepDiffReg project)"]
        self.parent.helpText = (
            "Diffeomorphic deformable registration of a moving volume to a fixed volume (optimisation-based and "
            "learned methods; the list comes from the installed engine). "
            "The result is a displacement-field transform that Transforms, Segment Editor, Crop Volume and Markups "
            "use as is, with a Jacobian map, fold QA and Dice/TRE when segmentations or landmarks are given. "
            "See <a href='https://github.com/deepdiffreg/SlicerDeepDiffReg/blob/main/docs/slicer-module.md'>the module "
            "documentation</a>.")
        self.parent.acknowledgementText = "Registration runs in a child process; PyTorch comes from the PyTorch extension."
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """The engine's synthetic head phantom pair in the Sample Data module (made locally on first use)."""
    try:
        import SampleData
        from DeepDiffRegLib import sampledata as ddsample
    except ImportError:
        return
    folder = os.path.join(slicer.app.cachePath, "DeepDiffReg", "sample")
    paths = ddsample.sample_paths(folder)
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="Registration", sampleName=ddsample.SAMPLE_NAME,
        thumbnailFileName=os.path.join(MODULE_DIR, "Resources", "Icons", "DeepDiffReg.png"),
        uris=["file:///" + paths["fixed"].replace(os.sep, "/"), "file:///" + paths["moving"].replace(os.sep, "/")],
        fileNames=[os.path.basename(paths["fixed"]), os.path.basename(paths["moving"])],
        nodeNames=[ddsample.NODE_NAMES["fixed"], ddsample.NODE_NAMES["moving"]],
        customDownloader=loadSamplePair)


def loadSamplePair(source=None):
    """Make the phantom pair (a few seconds, no download) and load it; returns the fixed and moving nodes."""
    from DeepDiffRegLib import sampledata as ddsample
    folder = os.path.join(slicer.app.cachePath, "DeepDiffReg", "sample")
    with slicer.util.tryWithErrorDisplay("Could not make the DeepDiffReg sample pair.", waitCursor=True):
        paths = ddsample.ensure_sample_pair(folder, DeepDiffRegLogic.python(), DeepDiffRegLogic.environment("cpu"))
        fixed = slicer.util.loadVolume(paths["fixed"], {"name": ddsample.NODE_NAMES["fixed"]})
        moving = slicer.util.loadVolume(paths["moving"], {"name": ddsample.NODE_NAMES["moving"]})
        return [fixed, moving]
    return []


# -- parameters ------------------------------------------------------------------------------------------------
@parameterNodeWrapper
class DeepDiffRegParameterNode:
    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    fixedSegmentation: vtkMRMLSegmentationNode
    movingSegmentation: vtkMRMLSegmentationNode
    fixedLandmarks: vtkMRMLMarkupsFiducialNode
    movingLandmarks: vtkMRMLMarkupsFiducialNode
    fixedMask: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode]  # region of interest on the fixed image
    method: str = ""                           # engine method name ("" = the engine's default; never rename)
    preset: str = "balanced"                   # a spacing preset or "variant:<name>" of the method
    device: Annotated[str, Choice(["auto", "cuda", "cpu"])] = "auto"
    methodOptions: str = "{}"                  # JSON {method name: {option name: value the user set}}
    workingSpacingMm: Annotated[float, WithinRange(0.0, 10.0)] = 0.0  # 0 = the preset's / method's default
    initialAlignment: bool = True
    fieldGrid: Annotated[str, Choice(["working", "fixed"])] = "working"  # transform.h5's field grid (--field-grid)
    keepTemporaryFiles: bool = False
    allowContrastMismatch: bool = False        # --contrast-check warn instead of error (not remembered: per run)
    followUp: bool = False                     # --follow-up: the volumes are one patient's (not remembered: per pair)
    outputTransform: vtkMRMLTransformNode
    outputInverse: vtkMRMLTransformNode
    outputJacobian: vtkMRMLScalarVolumeNode
    outputGrid: vtkMRMLModelNode
    outputWarped: vtkMRMLScalarVolumeNode


# the Advanced "Field grid" choices: (label, engine --field-grid value); the trade-off is in the combo's tooltip
FIELD_GRID_CHOICES = (("Working grid (default, smaller)", "working"), ("Fixed image grid (full resolution)", "fixed"))

SETTINGS_PREFIX = "DeepDiffReg/"
REMEMBERED = ("method", "preset", "device", "methodOptions", "workingSpacingMm", "initialAlignment",
              "fieldGrid", "keepTemporaryFiles")


def user_options(p) -> dict:
    try:
        value = json.loads(p.methodOptions or "{}")
    except ValueError:
        value = {}
    return value if isinstance(value, dict) else {}


# -- widget ----------------------------------------------------------------------------------------------------
class DeepDiffRegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Thin: the run lifecycle is DeepDiffRegLib.controller.RunController; this class maps it onto widgets."""

    POLL_MS = 200

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.controller = None
        self._parameterNode = None
        self._guiObserver = None
        self._result = None       # DeepDiffRegLib.scene.ResultNodes of the last import
        self._methods = []        # DeepDiffRegLib.methods.MethodInfo, from `deepdiffreg methods --json`
        self._methodsError = ""
        self._listing = None      # BackgroundCommand listing the methods
        self._modelCommand = None  # BackgroundCommand importing/deleting a model
        self._optionWidgets = {}
        self._lastState = None
        self._keptFolder = None

    def setup(self):
        from DeepDiffRegLib import models as ddmodels
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DeepDiffReg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = DeepDiffRegLogic()
        # a spare engine imports torch and the engine while the user picks the volumes (~1.5 s of every run on a
        # 2-core CPU; ~300 MB while it waits); setting DeepDiffReg/spareEngine = false turns it off
        self.controller = self.logic.makeController(
            confirm=lambda msg, details: slicer.util.confirmOkCancelDisplay(msg, detailedText=details),
            on_log=self._appendLog, on_change=self._render, spare_engine=self._setting("spareEngine", True))

        for label, key in (("Automatic (GPU if available)", "auto"), ("GPU (CUDA)", "cuda"), ("CPU", "cpu")):
            self.ui.deviceComboBox.addItem(label, key)
        for label, key in FIELD_GRID_CHOICES:
            self.ui.fieldGridComboBox.addItem(label, key)
        self.ui.modelsTable.setHorizontalHeaderLabels(list(ddmodels.COLUMNS))
        self.ui.methodComboBox.currentIndexChanged.connect(self._onMethodChanged)
        self.ui.presetComboBox.currentIndexChanged.connect(self._onPresetChanged)
        self.ui.deviceComboBox.currentIndexChanged.connect(self._onDeviceChanged)
        self.ui.fieldGridComboBox.currentIndexChanged.connect(self._onFieldGridChanged)
        self.ui.registerButton.connect("clicked(bool)", self.onRegisterButton)
        self.ui.centreWorstFoldButton.connect("clicked(bool)", self.onCentreWorstFold)
        self.ui.showTransformGridCheckBox.connect("toggled(bool)", self.onShowTransformGrid)
        self.ui.showJacobianCheckBox.connect("toggled(bool)", self.onShowJacobian)
        self.ui.showGridCheckBox.connect("toggled(bool)", self.onShowGrid)
        self.ui.openResultFolderButton.connect("clicked(bool)", self.onOpenResultFolder)
        self.ui.saveTransformButton.connect("clicked(bool)", self.onSaveTransform)
        self.ui.hardenButton.connect("clicked(bool)", self.onHarden)
        self.ui.refreshMethodsButton.connect("clicked(bool)", self.onRefreshMethods)
        self.ui.resetOptionsButton.connect("clicked(bool)", self.onResetOptions)
        self.ui.importModelButton.connect("clicked(bool)", self.onImportModel)
        self.ui.deleteModelButton.connect("clicked(bool)", self.onDeleteModel)
        self.ui.modelLicenceButton.connect("clicked(bool)", self.onModelLicence)
        self.ui.openModelsFolderButton.connect("clicked(bool)", self.onOpenModelsFolder)
        for name in ("showJacobianCheckBox", "showGridCheckBox"):
            getattr(self.ui, name).checked = self._setting(name, True)

        self._timer = qt.QTimer()
        self._timer.setInterval(self.POLL_MS)
        self._timer.timeout.connect(self._poll)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self._methods = self._rememberedMethods()
        self.initializeParameterNode()
        self._fillMethods()
        self._render(self.controller)
        self.onRefreshMethods()  # in the background: the panel stays usable

    def cleanup(self):
        self.removeObservers()
        if self.controller is not None:
            self.controller.shutdown()       # cancels a run and ends the spare engine
        for cmd in (self._listing, self._modelCommand):
            if cmd is not None:
                cmd.cancel()
        self._timer.stop()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        self._saveSettings()
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._guiObserver)
            self._guiObserver = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event):
        if self.controller is not None:
            self.controller.scene_closed()  # cancels a run; its results never go into the next scene
        self._result = None
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    # -- parameter node and remembered settings ------------------------------------------------------------
    @staticmethod
    def _setting(name, default):
        value = qt.QSettings().value(SETTINGS_PREFIX + name)
        if value is None:
            return default
        if isinstance(default, bool):
            return str(value).lower() in ("true", "1")
        try:
            return type(default)(value)
        except (TypeError, ValueError):
            return default

    def _saveSettings(self):
        p = self._parameterNode
        if p is None:
            return
        s = qt.QSettings()
        for name in REMEMBERED:
            s.setValue(SETTINGS_PREFIX + name, getattr(p, name))
        for name in ("showJacobianCheckBox", "showGridCheckBox"):
            s.setValue(SETTINGS_PREFIX + name, getattr(self.ui, name).checked)

    def initializeParameterNode(self):
        p = self.logic.getParameterNode()
        if not p.method:  # a fresh parameter node: start from what this user chose last time
            for name in REMEMBERED:
                try:
                    setattr(p, name, self._setting(name, getattr(p, name)))
                except Exception:  # noqa: BLE001 - a stale setting (e.g. an old choice) is ignored
                    pass
        self.setParameterNode(p)
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

    # -- methods (from the engine), presets and advanced options -------------------------------------------
    def _rememberedMethods(self):
        from DeepDiffRegLib import methods as ddmethods
        try:
            return ddmethods.parse_methods_json(self._setting("methodsJson", "") or "[]")
        except (ValueError, KeyError):
            return []

    def onRefreshMethods(self):
        from DeepDiffRegLib import methods as ddmethods, process as ddprocess
        if self._listing is not None and self._listing.poll() is None:
            return
        self.ui.refreshMethodsButton.enabled = False
        self._listing = ddprocess.BackgroundCommand(ddmethods.methods_command(self.logic.python()),
                                                    env=self.logic.environment(), timeout_s=120).start()
        self._timer.start()

    def _pollListing(self):
        from DeepDiffRegLib import methods as ddmethods
        done = self._listing.poll()
        if done is None:
            return
        self._listing = None
        self.ui.refreshMethodsButton.enabled = True
        code, out, err = done
        try:
            if code != 0:
                raise ValueError((err or out).strip().splitlines()[-1] if (err or out).strip() else f"exit {code}")
            methods = ddmethods.parse_methods_json(out)
        except (ValueError, KeyError, IndexError) as e:
            self._methodsError = str(e)
            self._appendLog(f"Could not list the engine's methods: {e}")
            self._checkCanApply()
            return
        self._methodsError = ""
        self._methods = methods
        qt.QSettings().setValue(SETTINGS_PREFIX + "methodsJson", out)
        self._fillMethods()
        self._checkCanApply()
        self._prepareSpare()                 # the engine runs here: have one ready for Register

    def _prepareSpare(self):
        if self._methods and self._parameterNode is not None:
            self.controller.prepare_spare(self._parameterNode.device or "auto")

    def _fillMethods(self):
        from DeepDiffRegLib import methods as ddmethods, models as ddmodels
        combo = self.ui.methodComboBox
        combo.blockSignals(True)
        combo.clear()
        for m in self._methods:
            combo.addItem(m.title, m.name)
            combo.setItemData(combo.count - 1, m.description, qt.Qt.ToolTipRole)
        combo.blockSignals(False)
        p = self._parameterNode
        if p is not None and not ddmethods.by_name(self._methods, p.method):
            default = ddmethods.default_method(self._methods)
            if default is not None:
                p.method = default.name
        rows = ddmodels.model_rows(self._methods)
        t = self.ui.modelsTable
        t.setRowCount(len(rows))
        for i, row in enumerate(rows):
            for j, v in enumerate(row["cells"]):
                t.setItem(i, j, qt.QTableWidgetItem(v))
        self._modelRows = rows
        self._syncCombosFromParameters()

    def _currentMethod(self):
        from DeepDiffRegLib import methods as ddmethods
        return ddmethods.by_name(self._methods, self._parameterNode.method if self._parameterNode else None)

    def _syncCombosFromParameters(self):
        from DeepDiffRegLib import methods as ddmethods
        p = self._parameterNode
        if p is None:
            return
        i = self.ui.methodComboBox.findData(p.method)
        if i >= 0 and self.ui.methodComboBox.currentIndex != i:
            self.ui.methodComboBox.blockSignals(True)
            self.ui.methodComboBox.setCurrentIndex(i)
            self.ui.methodComboBox.blockSignals(False)
        m = self._currentMethod()
        combo = self.ui.presetComboBox
        combo.blockSignals(True)
        combo.clear()
        for key, label in ddmethods.presets_for(m):
            combo.addItem(label, key)
        j = combo.findData(p.preset)
        combo.setCurrentIndex(j if j >= 0 else max(0, combo.findData(ddmethods.DEFAULT_PRESET)))
        combo.blockSignals(False)
        k = self.ui.deviceComboBox.findData(p.device)
        if k >= 0:
            self.ui.deviceComboBox.setCurrentIndex(k)
        k = self.ui.fieldGridComboBox.findData(p.fieldGrid)
        if k >= 0:
            self.ui.fieldGridComboBox.setCurrentIndex(k)
        self.ui.methodDescriptionLabel.text = m.facts_text if m else ""
        self.ui.modelLabel.text = m.model_text if m else ""
        self._buildOptionWidgets(m)

    def _onMethodChanged(self, _index=None):
        if self._parameterNode is not None:
            self._parameterNode.method = self.ui.methodComboBox.currentData or ""
            self._syncCombosFromParameters()

    def _onPresetChanged(self, _index=None):
        if self._parameterNode is not None:
            self._parameterNode.preset = self.ui.presetComboBox.currentData or "balanced"
            self._buildOptionWidgets(self._currentMethod())

    def _onDeviceChanged(self, _index=None):
        if self._parameterNode is not None:
            self._parameterNode.device = self.ui.deviceComboBox.currentData or "auto"
            self._prepareSpare()             # a spare is started for one device's environment

    def _onFieldGridChanged(self, _index=None):
        if self._parameterNode is not None:
            self._parameterNode.fieldGrid = self.ui.fieldGridComboBox.currentData or "working"

    def _buildOptionWidgets(self, m):
        """One widget per option the method declares; showing the preset's variant value or the default."""
        from DeepDiffRegLib import methods as ddmethods
        layout = self.ui.methodOptionsWidget.layout()
        while layout.rowCount() > 0:
            layout.removeRow(0)
        self._optionWidgets = {}
        if m is None or self._parameterNode is None:
            return
        values = {**ddmethods.preset_options(m, self._parameterNode.preset),
                  **user_options(self._parameterNode).get(m.name, {})}
        for o in m.options:
            value = values.get(o.name, o.default)
            if o.type == "int":
                w = qt.QSpinBox()
                w.setRange(int(o.min if o.min is not None else -2 ** 31), int(o.max if o.max is not None else 2 ** 31 - 1))
                w.value = int(value or 0)
                w.valueChanged.connect(lambda v, o=o: self._setOption(o, v))
            elif o.type == "float":
                w = qt.QDoubleSpinBox()
                w.decimals = 6
                w.setRange(float(o.min if o.min is not None else -1e9), float(o.max if o.max is not None else 1e9))
                w.value = float(value or 0.0)
                w.valueChanged.connect(lambda v, o=o: self._setOption(o, v))
            elif o.type == "bool":
                w = qt.QCheckBox()
                w.checked = bool(value)
                w.toggled.connect(lambda v, o=o: self._setOption(o, v))
            elif o.type == "choice":
                w = qt.QComboBox()
                for c in o.choices:
                    w.addItem(str(c), c)
                w.setCurrentIndex(max(0, w.findData(value)))
                w.currentIndexChanged.connect(lambda i, o=o, w=w: self._setOption(o, w.itemData(i)))
            else:  # str, int_list
                w = qt.QLineEdit()
                w.text = " ".join(str(v) for v in value) if isinstance(value, list) else ("" if value is None else str(value))
                w.editingFinished.connect(lambda o=o, w=w: self._setOption(o, w.text or None))
            w.toolTip = o.help + (f" (default {o.default})" if o.default is not None else "")
            layout.addRow(o.label + ":", w)
            self._optionWidgets[o.name] = w

    def _setOption(self, spec, value):
        from DeepDiffRegLib import methods as ddmethods
        p, m = self._parameterNode, self._currentMethod()
        if p is None or m is None:
            return
        opts = user_options(p)
        mine = dict(opts.get(m.name, {}))
        try:
            value = spec.coerce(value)
        except ValueError as e:
            self.ui.statusLabel.text = str(e)
            return
        base = ddmethods.preset_options(m, p.preset).get(spec.name, spec.default)  # what runs if untouched
        if value == (spec.coerce(base) if base is not None else None):
            mine.pop(spec.name, None)
        else:
            mine[spec.name] = value
        opts[m.name] = mine
        p.methodOptions = json.dumps(opts, sort_keys=True)

    def onResetOptions(self):
        p, m = self._parameterNode, self._currentMethod()
        if p is not None and m is not None:
            opts = user_options(p)
            opts.pop(m.name, None)
            p.methodOptions = json.dumps(opts, sort_keys=True)
            self._buildOptionWidgets(m)

    # -- Register / Cancel ---------------------------------------------------------------------------------
    def _needsInstallOnly(self):
        return not self._methods and not self.logic.plan().empty

    def _checkCanApply(self, caller=None, event=None):
        from DeepDiffRegLib import inputs as ddinputs
        if self.controller is None or self.controller.busy:
            return
        p = self._parameterNode
        if p is None:
            return
        warnings = ddinputs.transform_warnings(p.fixedVolume, p.movingVolume)
        self.ui.transformWarningLabel.text = "\n".join(warnings)
        self.ui.transformWarningLabel.visible = bool(warnings)
        if self._needsInstallOnly():
            self.ui.registerButton.text = "Install PyTorch"
            self.ui.registerButton.enabled = True
            self.ui.registerButton.toolTip = "PyTorch is not installed yet; the methods are listed once it is."
            self.ui.statusLabel.text = self.controller.message or "Press Install PyTorch to set up the engine."
            return
        self.ui.registerButton.text = "Register"
        if not self._methods:
            reasons = ["The engine has not listed its methods yet" + (f" ({self._methodsError})"
                                                                      if self._methodsError else "") +
                       "; press Refresh."]
        else:
            reasons = ddinputs.missing_inputs(p.fixedVolume, p.movingVolume, p.fixedSegmentation,
                                              p.movingSegmentation, p.fixedLandmarks, p.movingLandmarks, p.method,
                                              [m.name for m in self._methods])
        self.ui.registerButton.enabled = not reasons
        self.ui.registerButton.toolTip = "\n".join(reasons) if reasons else "Register the moving volume to the fixed one."
        # the last run's message (Done in 42 s / the error / Cancelled) stays until the inputs need attention
        self.ui.statusLabel.text = " ".join(reasons) if reasons else (self.controller.message or "Ready.")

    def _render(self, c):
        from DeepDiffRegLib.states import ProcessingState, stage_label
        busy = c.busy
        self.ui.registerButton.text = c.state.button_text
        self.ui.registerButton.enabled = c.state is not ProcessingState.CANCEL_REQUESTED
        self.ui.progressBar.visible = busy
        if busy:
            self.ui.statusLabel.text = c.message
            self.ui.progressBar.value = int(round(100 * c.progress))
            dev = f" on {c.device}" if c.device else ""
            self.ui.progressBar.setFormat(f"{stage_label(c.stage)} %p% - {c.elapsed():.0f} s{dev}")
            self.ui.deviceUsedLabel.text = c.device or "(not reported yet)"
        for w in (self.ui.inputsCollapsibleButton, self.ui.methodCollapsibleButton, self.ui.outputsCollapsibleButton,
                  self.ui.advancedCollapsibleButton, self.ui.modelsCollapsibleButton):
            w.enabled = not busy
        if not busy:
            self._checkCanApply()

    def onRegisterButton(self):
        if self.controller.busy:
            self.controller.cancel()
            return
        self.ui.logTextEdit.clear()
        self._saveSettings()
        try:
            if self._needsInstallOnly():
                request = self.logic.installRequest()
            else:
                request = self.logic.request(self._parameterNode, self._currentMethod())
        except ValueError as e:
            self.ui.statusLabel.text = f"Cannot register: {e}"
            return
        self._startRequest(request)

    def _startRequest(self, request):
        self._lastState = None
        self.controller.start(request)
        self._timer.start()
        self._poll()

    def _appendLog(self, text):
        self.ui.logTextEdit.appendPlainText(text)

    def _poll(self):
        try:
            self._pollOnce()
        except Exception:  # noqa: BLE001 - a display error must never stop the timer's bookkeeping
            logging.exception("DeepDiffReg: panel update failed")

    def _pollOnce(self):
        if self._listing is not None:
            self._pollListing()
        if self._modelCommand is not None:
            self._pollModelCommand()
        c = self.controller
        c.poll()
        if c.busy or self._listing is not None or self._modelCommand is not None:
            self._render(c)
        else:
            self._timer.stop()
        if c.state.final and self._lastState is not c.state and c.request is not None:
            self._lastState = c.state
            self._render(c)
            self._finished(c)
        elif c.busy:
            self._lastState = None

    def _finished(self, c):
        """Once per run: show results or say what went wrong (the status line keeps the message)."""
        from DeepDiffRegLib.states import ProcessingState
        self._keptFolder = c.work_dir if (c.request and c.request.keep_temporary_files) else None
        self.ui.openResultFolderButton.enabled = bool(self._keptFolder and os.path.isdir(self._keptFolder))
        if c.state is ProcessingState.COMPLETED:
            if c.request.method is None:  # the install-only run: now the engine can list its methods
                self.onRefreshMethods()
                return
            self._result = c.result
            self._showResults()
            for w in self._result.warnings:
                self._appendLog(w)
        elif c.state is ProcessingState.FAILED:
            if c.offer_cpu_retry and slicer.util.confirmYesNoDisplay(c.message + "\n\nRetry on the CPU?"):
                self._startRequest(c.request.with_device("cpu"))
                return
            slicer.util.errorDisplay(c.message, detailedText=c.details or None)
            if c.restart_required and slicer.util.confirmYesNoDisplay("Restart Slicer now?"):
                slicer.util.restart()

    # -- results / QA / export -----------------------------------------------------------------------------
    def _showResults(self):
        from DeepDiffRegLib import qa
        r = self._result
        self.ui.foldLabel.text = r.fold_summary.text() if r.fold_summary else "No Jacobian."
        self.ui.centreWorstFoldButton.enabled = bool(r.fold_summary and r.fold_summary.has_folds)
        self.ui.summaryLabel.text = "\n".join(qa.report_summary_lines(r.report) + list(r.warnings))
        rows = qa.metrics_table(r.report)
        t = self.ui.metricsTable
        t.setRowCount(len(rows))
        for i, row in enumerate(rows):
            for j, v in enumerate(row):
                t.setItem(i, j, qt.QTableWidgetItem(v))
        t.visible = bool(rows)
        self.ui.resultsCollapsibleButton.collapsed = False
        self.onShowJacobian(self.ui.showJacobianCheckBox.checked)
        self.onShowGrid(self.ui.showGridCheckBox.checked)

    def onShowJacobian(self, on):
        from DeepDiffRegLib import scene as ddscene
        p = self._parameterNode
        if self._result is None or p is None:
            return
        if on and self._result.jacobian is not None:
            slicer.util.setSliceViewerLayers(background=p.movingVolume)
            ddscene.set_jacobian_overlay(slicer.mrmlScene, self._result.jacobian, True)
        else:
            ddscene.set_jacobian_overlay(slicer.mrmlScene, self._result.jacobian, False)
            slicer.util.setSliceViewerLayers(background=p.movingVolume, foreground=p.fixedVolume,
                                             foregroundOpacity=0.5)

    def onShowGrid(self, on):
        from DeepDiffRegLib import scene as ddscene
        if self._result is not None:
            ddscene.set_grid_visible(self._result.grid, on)

    def onOpenResultFolder(self):
        if self._keptFolder and os.path.isdir(self._keptFolder):
            qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(self._keptFolder))

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

    # -- models --------------------------------------------------------------------------------------------
    def _selectedModel(self):
        rows = getattr(self, "_modelRows", [])
        i = self.ui.modelsTable.currentRow()
        return rows[i] if 0 <= i < len(rows) else None

    def _runModelCommand(self, command, what):
        from DeepDiffRegLib import process as ddprocess
        if self._modelCommand is not None:
            return
        self._appendLog("$ " + " ".join(command))
        self._modelCommand = ddprocess.BackgroundCommand(command, env=self.logic.environment(), timeout_s=300).start()
        self._modelWhat = what
        self.ui.modelsCollapsibleButton.enabled = False
        self._timer.start()

    def _pollModelCommand(self):
        done = self._modelCommand.poll()
        if done is None:
            return
        self._modelCommand = None
        self.ui.modelsCollapsibleButton.enabled = True
        code, out, err = done
        self._appendLog((out + err).strip())
        if code != 0:
            slicer.util.errorDisplay(f"Could not {self._modelWhat}.", detailedText=(err or out).strip())
        self.onRefreshMethods()

    def onImportModel(self):
        from DeepDiffRegLib import models as ddmodels
        path = qt.QFileDialog.getOpenFileName(None, "Import DeepDiffReg weights", "", "Weights (*.pt *.pth)")
        if path:
            self._runModelCommand(ddmodels.import_command(self.logic.python(), path), "import the weights")

    def onDeleteModel(self):
        from DeepDiffRegLib import models as ddmodels
        row = self._selectedModel()
        if row is None:
            return
        if not row["deletable"]:
            slicer.util.infoDisplay("Models bundled with the extension cannot be deleted.")
            return
        if slicer.util.confirmOkCancelDisplay(f"Delete the model {row['id']} ({row['path']})?"):
            self._runModelCommand(ddmodels.delete_command(self.logic.python(), row["id"]), "delete the model")

    def onModelLicence(self):
        row = self._selectedModel()
        if row is not None:
            card = os.path.join(os.path.dirname(row["path"]), row["card"]) if row["card"] else ""
            slicer.util.infoDisplay(f"{row['id']}: {row['cells'][4]}", detailedText=f"Model card: {card}" if card else None)

    def onOpenModelsFolder(self):
        from DeepDiffRegLib import models as ddmodels
        folder = ddmodels.user_models_dir(self.logic.environment())
        os.makedirs(folder, exist_ok=True)
        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(folder))


# -- logic -----------------------------------------------------------------------------------------------------
class DeepDiffRegLogic(ScriptedLoadableModuleLogic):
    """Callable without the widget (scripts, tests): ``register(p)`` blocks; the widget drives the same
    ``RunController`` with a timer."""

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

    @staticmethod
    def plan():
        from DeepDiffRegLib import install as ddinstall
        return ddinstall.plan()

    def makeController(self, confirm=None, on_log=None, on_change=None, spare_engine=False):
        from DeepDiffRegLib import controller as ddcontroller
        return ddcontroller.RunController(self.python(), self.environment, slicer.app.temporaryPath,
                                          self.exportInputs, self.importResults, confirm_install=confirm,
                                          on_log=on_log, on_change=on_change, spare_engine=spare_engine)

    @staticmethod
    def installRequest():
        from DeepDiffRegLib import controller as ddcontroller
        return ddcontroller.RunRequest(method=None)

    @staticmethod
    def request(p, method):
        from DeepDiffRegLib import controller as ddcontroller
        if method is None:
            raise ValueError(f"unknown method {p.method!r}")
        return ddcontroller.RunRequest(method=method, device=p.device, preset=p.preset,
                                       options=dict(user_options(p).get(method.name, {})),
                                       spacing_mm=p.workingSpacingMm or None, align=p.initialAlignment,
                                       follow_up=bool(p.followUp),
                                       field_grid=p.fieldGrid or "working",
                                       contrast_check="warn" if p.allowContrastMismatch else "error",
                                       keep_temporary_files=p.keepTemporaryFiles, context=p)

    @staticmethod
    def exportInputs(folder, request):
        from DeepDiffRegLib import inputs as ddinputs
        p = request.context
        return ddinputs.export_inputs(folder, p.fixedVolume, p.movingVolume, p.fixedSegmentation,
                                      p.movingSegmentation, p.fixedLandmarks, p.movingLandmarks, p.fixedMask)

    def importResults(self, out_dir, request):
        from DeepDiffRegLib import scene as ddscene
        p = request.context
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

    def methods(self, timeout_s=120):
        """The engine's method list (blocking; scripts)."""
        from DeepDiffRegLib import methods as ddmethods, process as ddprocess
        code, out, err = ddprocess.BackgroundCommand(ddmethods.methods_command(self.python()),
                                                     env=self.environment()).start().wait(timeout_s)
        if code != 0:
            raise RuntimeError(f"could not list the engine's methods: {(err or out).strip()}")
        return ddmethods.parse_methods_json(out)

    def register(self, p, device=None, timeout_s=3600):
        """Blocking run + import (scripts, tests). Returns ResultNodes; raises RuntimeError on failure and
        TimeoutError (with the engine stopped) after ``timeout_s``."""
        from DeepDiffRegLib import methods as ddmethods
        methods = self.methods()
        method = ddmethods.by_name(methods, p.method) or (None if p.method else ddmethods.default_method(methods))
        request = self.request(p, method)
        if device:
            request = request.with_device(device)
        return self.makeController().run(request, timeout=timeout_s)


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
        self.assertEqual(p.preset, "balanced")
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
        self.assertTrue(res.transform.IsA("vtkMRMLTransformNode"))
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

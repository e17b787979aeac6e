"""DeepDiffReg.py's Logic (what the widget and scripts call) on a real MRML scene with real child processes; Qt
and the scripted-module base classes are stubbed, the parameter node is a plain object with the same fields."""
from __future__ import annotations

import importlib
import json
import os
import sys
import types

import pytest
import SimpleITK as sitk
import slicer

from conftest import HERE, MODULE_DIR
from DeepDiffRegLib import methods as ddmethods, models as ddmodels
from DeepDiffRegLib import process as ddprocess, sampledata as ddsample, scene as ddscene


@pytest.fixture
def module(monkeypatch):
    qt, ctk = types.ModuleType("qt"), types.ModuleType("ctk")
    slm, pnw = types.ModuleType("slicer.ScriptedLoadableModule"), types.ModuleType("slicer.parameterNodeWrapper")
    for c in ("ScriptedLoadableModule", "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleTest",
              "ScriptedLoadableModuleWidget"):
        setattr(slm, c, type(c, (), {"__init__": lambda self, *a: None}))
    pnw.parameterNodeWrapper = lambda cls: cls
    pnw.Choice = pnw.WithinRange = lambda *a, **k: None
    for name, mod in (("qt", qt), ("ctk", ctk), ("slicer.ScriptedLoadableModule", slm),
                      ("slicer.parameterNodeWrapper", pnw)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.delitem(sys.modules, "DeepDiffReg", raising=False)
    return importlib.import_module("DeepDiffReg")


def _params(fixed, moving, **kw):
    p = types.SimpleNamespace(fixedVolume=fixed, movingVolume=moving, fixedSegmentation=None, movingSegmentation=None,
                              fixedLandmarks=None, movingLandmarks=None, fixedMask=None, method="", preset="balanced",
                              device="cpu", methodOptions="{}", workingSpacingMm=0.0, initialAlignment=True,
                              fieldGrid="working", keepTemporaryFiles=False, allowContrastMismatch=False, followUp=False,
                              outputTransform=None, outputInverse=None,
                              outputJacobian=None, outputGrid=None, outputWarped=None)
    for k, v in kw.items():
        setattr(p, k, v)
    return p


def test_logic_request_and_a_run_through_export_and_import(module, mrml, synthetic_result, tmp_path, monkeypatch,
                                                           fixture_methods):
    monkeypatch.setattr(slicer.app, "temporaryPath", str(tmp_path), raising=False)
    lg = ddscene.Logics(mrml.scene, mrml.app_logic)
    fixed = lg.load_volume(synthetic_result["fixed"], "fixed")
    moving = lg.load_volume(synthetic_result["moving"], "moving")
    mask = mrml.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "mask")
    from vtkmodules.vtkCommonMath import vtkMatrix4x4
    m = vtkMatrix4x4(); fixed.GetIJKToRASMatrix(m); mask.SetIJKToRASMatrix(m)
    mask.SetAndObserveImageData(fixed.GetImageData())
    method = ddmethods.by_name(fixture_methods, "vxm-diff")
    p = _params(fixed, moving, method="vxm-diff", preset="variant:refine", fixedMask=mask, fieldGrid="fixed",
                allowContrastMismatch=True, followUp=True,
                methodOptions=json.dumps({"vxm-diff": {"symmetric": False}, "nodeo": {"iterations": 3}}))
    logic = module.DeepDiffRegLogic()
    req = logic.request(p, method)
    assert req.options == {"symmetric": False} and req.device == "cpu" and req.context is p
    argv_file = str(tmp_path / "argv.json")

    def env(device):  # the stand-in engine (fake_engine/) copies the synthetic result
        return dict(os.environ, PYTHONPATH=os.path.join(HERE, "fake_engine"), FAKE_ENGINE_MODE="ok",
                    FAKE_ENGINE_RESULT=synthetic_result["out_dir"], FAKE_ENGINE_ARGV=argv_file)
    monkeypatch.setattr(module.DeepDiffRegLogic, "environment", staticmethod(env))
    c = logic.makeController()
    res = c.run(req, timeout=60)
    argv = json.load(open(argv_file))
    assert argv[argv.index("--vxm-refine") + 1] == "50" and "--vxm-no-symmetric" in argv
    assert argv[argv.index("--field-grid") + 1] == "fixed"      # Advanced's field grid reaches the engine
    assert argv[argv.index("--contrast-check") + 1] == "warn"   # and "Run on different contrasts"
    assert "--follow-up" in argv                               # and "Same patient (follow-up)"
    assert "--nodeo-iterations" not in argv and "--fixed-mask" in argv
    assert moving.GetParentTransformNode() is res.transform and p.outputTransform is res.transform
    assert all(n.GetStorageNode() is None for n in res.nodes())  # no link to the deleted temporary files
    assert os.listdir(tmp_path) == ["argv.json"]  # the work folder is gone
    # a second run fills the same output nodes
    res2 = logic.makeController().run(logic.request(p, method), timeout=60)
    assert res2.transform is res.transform


def test_model_import_list_delete_through_the_engine_cli(tmp_path):
    env = ddprocess.child_environment(MODULE_DIR, dict(os.environ, DEEPDIFFREG_MODELS_DIR=str(tmp_path / "cache")))
    src = os.path.join(os.path.dirname(os.path.dirname(HERE)), "models", "vxm-diff-brain-2mm.pt")
    code, out, err = ddprocess.BackgroundCommand(ddmodels.import_command(sys.executable, src), env=env).start().wait(120)
    assert code == 0, err
    code, out, err = ddprocess.BackgroundCommand(ddmethods.methods_command(sys.executable), env=env).start().wait(120)
    rows = ddmodels.model_rows(ddmethods.parse_methods_json(out))
    user = [r for r in rows if r["deletable"]]
    assert len(user) == 1 and os.path.dirname(user[0]["path"]) == str(tmp_path / "cache")
    assert [r for r in rows if not r["deletable"]]  # the bundled one stays and cannot be deleted
    assert ddmodels.user_models_dir(env) == str(tmp_path / "cache")
    code, out, err = ddprocess.BackgroundCommand(ddmodels.delete_command(sys.executable, user[0]["id"]),
                                                 env=env).start().wait(120)
    assert code == 0 and not os.path.exists(user[0]["path"])
    r = ddprocess.BackgroundCommand(["/nonexistent/python", "-V"]).start().wait(10)
    assert r[0] == -1 and "No such file" in r[2]  # a start failure is reported, not raised


def test_sample_pair_is_made_locally(tmp_path):
    env = ddprocess.child_environment(MODULE_DIR, dict(os.environ))
    paths = ddsample.ensure_sample_pair(str(tmp_path / "sample"), sys.executable, env)
    for k in ("fixed", "moving"):
        img = sitk.ReadImage(paths[k])
        assert img.GetDimension() == 3 and min(img.GetSize()) > 40
    assert ddsample.ensure_sample_pair(str(tmp_path / "sample"), "/nonexistent/python") == paths  # cached

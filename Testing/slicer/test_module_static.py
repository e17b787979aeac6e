"""Static checks of the module file, the .ui and the build files, plus the Qt-free input/install helpers."""
from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import slicer

from conftest import MODULE_DIR, REPO

MODULE_FILE = os.path.join(MODULE_DIR, "DeepDiffReg.py")
UI_FILE = os.path.join(MODULE_DIR, "Resources", "UI", "DeepDiffReg.ui")
ALLOWED_TOP_LEVEL = {"logging", "os", "shutil", "tempfile", "threading", "time", "typing", "json", "enum",
                     "slicer", "vtk", "qt", "ctk", "numpy"}
HEAVY = {"torch", "torchvision", "SimpleITK", "scipy", "monai", "deepdiffreg", "DeepDiffRegLib", "matplotlib",
         "itk", "nibabel", "requests"}


def _tree(path):
    with open(path, encoding="utf-8") as f:
        return ast.parse(f.read(), path)


def _imported(node) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name.split(".")[0] for a in node.names]
    if isinstance(node, ast.ImportFrom):
        return [(node.module or "").split(".")[0]]
    return []


def test_module_file_has_only_light_imports_and_no_code_at_file_scope():
    tree = _tree(MODULE_FILE)
    top = [m for n in tree.body for m in _imported(n)]
    assert set(top) <= ALLOWED_TOP_LEVEL, set(top) - ALLOWED_TOP_LEVEL
    for n in tree.body:  # only docstring, imports, constants, classes, functions
        ok = isinstance(n, (ast.Import, ast.ImportFrom, ast.ClassDef, ast.FunctionDef)) or (
            isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)) or (
            isinstance(n, ast.Assign) and all(isinstance(t, ast.Name) and t.id.isupper() for t in n.targets))
        assert ok, f"code at file scope, line {n.lineno}: {ast.dump(n)[:80]}"
    # torch is imported nowhere on the Slicer side, not even inside functions
    lib = os.path.join(MODULE_DIR, "DeepDiffRegLib")
    for path in [MODULE_FILE] + [os.path.join(lib, f) for f in os.listdir(lib) if f.endswith(".py")]:
        names = {m for n in ast.walk(_tree(path)) for m in _imported(n)}
        assert not names & {"torch", "torchvision", "monai"}, (path, names)
    # DeepDiffRegLib never imports Qt
    for f in os.listdir(lib):
        if f.endswith(".py"):
            names = {m for n in ast.walk(_tree(os.path.join(lib, f))) for m in _imported(n)}
            assert not names & {"qt", "ctk", "PythonQt"}, (f, names)
    # the progress protocol the Slicer side imports from the engine has no third-party import
    prog = os.path.join(MODULE_DIR, "deepdiffreg", "progress.py")
    assert {m for n in ast.walk(_tree(prog)) for m in _imported(n)} <= {"__future__", "enum", "json", "sys", "time",
                                                                         "typing"}


STUB_IMPORT = r'''
import sys, types
sys.path.insert(0, sys.argv[1])
qt = types.ModuleType("qt"); ctk = types.ModuleType("ctk")
sys.modules.update(qt=qt, ctk=ctk)
import slicer
for name in ("ScriptedLoadableModule", "parameterNodeWrapper"):
    m = types.ModuleType("slicer." + name); sys.modules["slicer." + name] = m; setattr(slicer, name, m)
slm = sys.modules["slicer.ScriptedLoadableModule"]
for c in ("ScriptedLoadableModule", "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleTest", "ScriptedLoadableModuleWidget"):
    setattr(slm, c, type(c, (), {}))
pnw = sys.modules["slicer.parameterNodeWrapper"]
pnw.parameterNodeWrapper = lambda cls: cls
pnw.Choice = pnw.WithinRange = lambda *a, **k: ("annotation", a)
import slicer.util
slicer.util.VTKObservationMixin = type("VTKObservationMixin", (), {})
before = set(sys.modules)
import DeepDiffReg
new = set(sys.modules) - before
heavy = sorted(m for m in new if m.split(".")[0] in {"torch", "SimpleITK", "deepdiffreg", "DeepDiffRegLib", "scipy", "matplotlib"})
print("HEAVY", heavy)
print("CLASSES", sorted(n for n in dir(DeepDiffReg) if n.startswith("DeepDiffReg")))
'''


def test_module_imports_without_slicer_app_and_pulls_in_nothing_heavy():
    """Import DeepDiffReg.py for real in a fresh interpreter (Qt and the scripted-module base classes stubbed):
    the load itself must import nothing heavy."""
    r = subprocess.run([sys.executable, "-c", STUB_IMPORT, MODULE_DIR], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "HEAVY []" in r.stdout, r.stdout
    for cls in ("DeepDiffReg", "DeepDiffRegWidget", "DeepDiffRegLogic", "DeepDiffRegTest", "DeepDiffRegParameterNode"):
        assert f"'{cls}'" in r.stdout


def test_module_file_is_valid_python_without_slicer():
    with open(MODULE_FILE, encoding="utf-8") as f:
        compile(f.read(), MODULE_FILE, "exec")  # syntax only: no import of slicer/qt happens


def test_ui_matches_widget_and_parameter_node():
    root = ET.parse(UI_FILE).getroot()
    assert root.find("widget").get("class") == "qMRMLWidget"
    names = {w.get("name") for w in root.iter("widget")}
    used = set(re.findall(r"self\.ui\.(\w+)", open(MODULE_FILE, encoding="utf-8").read()))
    assert used <= names, used - names
    collapsibles = [w for w in root.iter("widget") if w.get("class") == "ctkCollapsibleButton"]
    assert len(collapsibles) >= 5
    adv = next(w for w in collapsibles if w.get("name") == "advancedCollapsibleButton")
    assert adv.find("property[@name='collapsed']/bool").text == "true"  # advanced options start collapsed
    params = {p.find("string").text for p in root.iter("property") if p.get("name") == "SlicerParameterName"}
    cls = next(n for n in _tree(MODULE_FILE).body if isinstance(n, ast.ClassDef) and n.name == "DeepDiffRegParameterNode")
    fields = {s.target.id for s in cls.body if isinstance(s, ast.AnnAssign)}
    assert params <= fields, params - fields
    assert {"fixedVolume", "movingVolume", "fixedMask", "outputTransform", "outputJacobian", "outputGrid",
            "outputWarped", "outputInverse", "workingSpacingMm"} <= params
    # method options are built from the engine's declaration, not written into the panel
    assert {"refineSteps", "nodeoIterations"}.isdisjoint(params | fields)
    assert "methodOptionsLayout" in {lay.get("name") for lay in root.iter("layout")}
    tips = " ".join(p.find("string").text or "" for p in root.iter("property") if p.get("name") == "toolTip")
    assert "drawn on the FIXED image under this node" in tips  # the inverse's use in Slicer (issue 14 item 4)
    # Advanced offers --field-grid (working default, fixed = full resolution), its trade-off in the tooltip with
    # the numbers of docs/field-grid.md, and the choices are the engine's
    field_combo = next(w for w in adv.iter("widget") if w.get("name") == "fieldGridComboBox")
    tip = field_combo.find("property[@name='toolTip']/string").text
    doc = open(os.path.join(REPO, "docs", "field-grid.md"), encoding="utf-8").read()
    for number in ("24 MB", "193 MB", "0.014", "0.149"):
        assert number in tip and number in doc, number
    assert "--field-grid" in tip and "memory" in tip
    assert "fieldGrid" in fields
    choices = next(n for n in ast.walk(_tree(MODULE_FILE)) if isinstance(n, ast.Assign)
                   and getattr(n.targets[0], "id", "") == "FIELD_GRID_CHOICES")
    from deepdiffreg.compose import FIELD_GRIDS
    values = [e.elts[1].value for e in choices.value.elts]
    assert values[0] == "working" and sorted(values) == sorted(FIELD_GRIDS)


def test_build_files_and_icons():
    top = open(os.path.join(REPO, "CMakeLists.txt")).read()
    assert 'set(EXTENSION_CATEGORY "Registration")' in top and 'set(EXTENSION_DEPENDS "PyTorch")' in top
    assert "EXTENSION_ICONURL" in top and "EXTENSION_SCREENSHOTURLS" in top and "add_subdirectory(DeepDiffReg)" in top
    mod = open(os.path.join(MODULE_DIR, "CMakeLists.txt")).read()
    for s in ("slicerMacroBuildScriptedModule", "WITH_GENERIC_TESTS", "slicer_add_python_unittest",
              "${MODULE_NAME}Lib/*.py", "deepdiffreg/*.py", "Resources/UI/${MODULE_NAME}.ui",
              "Resources/Icons/${MODULE_NAME}.png"):
        assert s in mod, s
    from vtkmodules.vtkIOImage import vtkPNGReader
    for p in ("Resources/DeepDiffReg.png", "DeepDiffReg/Resources/Icons/DeepDiffReg.png"):
        r = vtkPNGReader(); r.SetFileName(os.path.join(REPO, p)); r.Update()
        assert r.GetOutput().GetDimensions()[:2] == (128, 128), p


def test_install_plan_checks_torch_version_and_never_touches_simpleitk():
    from DeepDiffRegLib import install
    p = install.plan(lambda name: None)
    assert p.torch and any(r.startswith("psutil") for r in p.optional) and not p.torch_too_old
    steps = install.install_steps(p, "PythonSlicer")
    words = [w for s in steps for w in s.command]
    assert not any(re.match(r"(?i)(simpleitk|numpy|vtk)\b", w) for w in words)
    assert [s.required for s in steps if "psutil" in " ".join(s.command)] == [False]  # psutil is best effort
    assert all(s.command[0] == "PythonSlicer" for s in steps)  # child processes: nothing imported into Slicer
    assert install.plan(lambda name: {"torch": "2.13.0+cpu", "psutil": "7.0.0"}.get(name)).empty
    assert not install.plan(lambda name: {"torch": "2.13.0", "psutil": "5.0.0"}.get(name)).empty  # too old
    old = install.plan(lambda name: {"torch": "2.0.1", "psutil": "7.0.0"}.get(name))
    assert old.torch_too_old and not old.torch and not old.empty
    try:
        install.install_steps(old, "py")
        raise AssertionError("an old torch must not be silently kept or replaced")
    except install.InstallError as e:
        assert "2.0.1" in str(e) and "PyTorch Utils" in str(e)
    assert "GB" in install.plan(lambda name: None).confirmation_text()
    assert "GB" not in install.plan(lambda name: {"torch": "2.13.0"}.get(name)).confirmation_text()
    assert install.check_torch_numpy(sys.executable) is None  # this venv: torch + numpy load together
    # PyTorchUtils' installTorch/torchInstalled import torch into Slicer: the module never calls them
    src = open(os.path.join(MODULE_DIR, "DeepDiffRegLib", "install.py")).read()
    assert "installTorch(" not in src and "torchInstalled(" not in src and "import PyTorchUtils" not in src


def test_methods_json_parsing_and_no_method_names_on_the_slicer_side(fixture_methods):
    from DeepDiffRegLib import methods
    names = [m.name for m in fixture_methods]
    from deepdiffreg.methods.base import all_methods
    real = sorted(n for n in all_methods() if not n.startswith("_"))   # test modules may register "_" methods
    assert sorted(names) == real and methods.default_method(fixture_methods).default
    learned = [m for m in fixture_methods if m.learned and m.models][0]   # a learned method with bundled weights
    for m in fixture_methods:                                             # (one without: a method being trained)
        if m.learned and not m.models:
            assert m.model_text.startswith("model: not installed")
    assert learned.model_text.startswith("model ") and learned.variants and learned.caps
    optim = [m for m in fixture_methods if not m.learned][0]
    assert optim.model_text.startswith("no trained weights") and optim.options and optim.title != optim.name
    assert [k for k, _ in methods.presets_for(learned)][-1].startswith(methods.VARIANT_PREFIX)
    try:
        methods.parse_methods_json("not json")
        raise AssertionError("bad JSON must raise")
    except ValueError:
        pass
    assert not hasattr(methods, "STATIC_METHODS")  # no static copy of the engine's registry
    # no method name literal in the Slicer-side code (issue 10 items 1 and 6): the fixture's and the engine's
    from deepdiffreg.methods import load_all
    from deepdiffreg.methods.base import REGISTRY
    load_all()
    lib = os.path.join(MODULE_DIR, "DeepDiffRegLib")
    for path in [MODULE_FILE] + [os.path.join(lib, f) for f in os.listdir(lib) if f.endswith(".py")]:
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for name in set(names) | set(REGISTRY):
                    assert not re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", node.value, re.I), \
                        (path, node.lineno, node.value[:80])


def test_missing_inputs_and_landmark_export(mrml, tmp_path):
    from DeepDiffRegLib import inputs
    sc = mrml.scene
    f = sc.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "f")
    m = sc.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "m")
    assert inputs.missing_inputs(None, None) == ["Select a fixed volume.", "Select a moving volume."]
    assert "different volumes" in " ".join(inputs.missing_inputs(f, f))
    assert "no image data" in " ".join(inputs.missing_inputs(f, m))
    lf = sc.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "lf")
    lm = sc.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "lm")
    lf.AddControlPoint(10.0, 20.0, 30.0); lf.AddControlPoint(-1.0, 2.0, -3.0); lm.AddControlPoint(0.0, 0.0, 0.0)
    r = " ".join(inputs.missing_inputs(f, m, fixed_landmarks=lf))
    assert "both landmark lists" in r
    assert "same, non-zero number" in " ".join(inputs.missing_inputs(f, m, fixed_landmarks=lf, moving_landmarks=lm))
    p = inputs.write_landmarks(lf, str(tmp_path / "lf.csv"))
    lines = open(p).read().splitlines()
    assert lines[0] == "Landmark,X,Y,Z"
    np.testing.assert_allclose([float(v) for v in lines[1].split(",")[1:]], [-10.0, -20.0, 30.0])  # RAS -> LPS


def test_segmentation_export_matches_labels_by_name(mrml, synthetic_result, tmp_path):
    import SimpleITK as sitk
    from DeepDiffRegLib import inputs, scene as ddscene
    lg = ddscene.Logics(mrml.scene, mrml.app_logic)
    fixed, moving = lg.load_volume(synthetic_result["fixed"], "f"), lg.load_volume(synthetic_result["moving"], "m")

    def seg_from(vol, boxes):
        seg = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        for name, sl in boxes:
            arr = np.zeros(ddscene.volume_array(vol).shape, np.uint8); arr[sl] = 1
            ddscene_seg = ddscene.create_fold_segmentation(mrml.scene, vol, arr, "tmp")
            s = ddscene_seg.GetSegmentation().GetNthSegment(0); s.SetName(name)
            seg.GetSegmentation().AddSegment(s)
            mrml.scene.RemoveNode(ddscene_seg)
        return seg

    a, b = np.s_[2:8, 3:9, 4:10], np.s_[10:14, 10:14, 10:14]
    fs = seg_from(fixed, [("tumour", a), ("ventricle", b)])
    ms = seg_from(moving, [("ventricle", b), ("other", a), ("tumour", a)])
    assert inputs.common_segment_names(fs, ms) == ["tumour", "ventricle"]
    files = inputs.export_inputs(str(tmp_path), fixed, moving, fs, ms)
    fl = sitk.GetArrayFromImage(sitk.ReadImage(files["fixed_seg"]))
    ml = sitk.GetArrayFromImage(sitk.ReadImage(files["moving_seg"]))
    assert fl.shape == ddscene.volume_array(fixed).shape and ml.shape == ddscene.volume_array(moving).shape
    assert (fl[a] == 1).all() and (fl[b] == 2).all() and (ml[b] == 2).all() and (ml[a] == 1).all()
    assert set(np.unique(ml)) == {0, 1, 2}  # "other" is not exported


# Restated from Slicer's Schemas/slicer-extension-catalog-entry-schema-v1.0.2.json (draft-07): required keys,
# additionalProperties false, and each property's type / enum / range.
CATALOG_SCHEMA_V102 = {
    "required": {"$schema", "category", "scm_url"},
    "types": {"$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
              "build_dependencies": list, "dicom_support_rule": str, "build_subdirectory": str, "enabled": bool,
              "tier": int},
    "enums": {"scm_type": {"git", "local"}},
}


def test_extensions_index_checks():
    """LICENSE at the root, a catalog entry valid against schema v1.0.2 and consistent with the CMake metadata,
    contributors as 'Name (Affiliation)', a repository name with 'Slicer', icon/screenshot URLs that resolve
    inside this repository (issue 14 item 7)."""
    assert "Apache License" in open(os.path.join(REPO, "LICENSE")).read()[:200]
    entry_path = os.path.join(REPO, "Resources", "ExtensionsIndex", "DeepDiffReg.json")
    entry = json.load(open(entry_path))
    schema = CATALOG_SCHEMA_V102
    assert schema["required"] <= set(entry), schema["required"] - set(entry)
    assert set(entry) <= set(schema["types"]), set(entry) - set(schema["types"])  # additionalProperties false
    for k, v in entry.items():
        assert isinstance(v, schema["types"][k]) and not (schema["types"][k] is int and isinstance(v, bool)), k
        if k in schema["enums"]:
            assert v in schema["enums"][k], (k, v)
    assert all(isinstance(d, str) for d in entry["build_dependencies"]) and 1 <= entry.get("tier", 1) <= 5
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.2.json#")
    top = open(os.path.join(REPO, "CMakeLists.txt")).read()
    meta = dict(re.findall(r'set\((EXTENSION_\w+) "([^"]*)"\)', top))
    assert entry["category"] == meta["EXTENSION_CATEGORY"] == "Registration"
    assert entry["build_dependencies"] == meta["EXTENSION_DEPENDS"].split() == ["PyTorch"]
    repo_name = entry["scm_url"].rstrip("/").removesuffix(".git").split("/")[-1]
    assert "Slicer" in repo_name
    for c in meta["EXTENSION_CONTRIBUTORS"].split(","):
        assert re.fullmatch(r"\s*[^()]+ \([^()]+\)\s*", c), c
    for key in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        for url in meta[key].split():
            assert f"/{repo_name}/" in url and "/main/" in url, url
            assert os.path.isfile(os.path.join(REPO, url.split("/main/", 1)[1])), url
    assert repo_name in meta["EXTENSION_HOMEPAGE"]


def test_panel_shows_contrasts_and_whether_the_uncertainty_map_is_qa(fixture_methods):
    """Under the method list the panel shows each method's description, whether it handles different contrasts
    (from `methods --json`: what a run gets) and, for a method with an uncertainty map, whether that map is
    validated as QA — an unvalidated one is called unreliable."""
    from deepdiffreg.methods.base import all_methods, contrasts_of
    engine = all_methods()
    assert {m.contrasts for m in fixture_methods} == {"same", "different"}   # the registry has both kinds
    for m in fixture_methods:
        cls = engine[m.name]
        assert m.contrasts == contrasts_of(cls, m.models[0] if m.models else None)
        text = m.facts_text
        assert text.startswith(m.description) and m.contrast_text in text
        assert ("different" in m.contrast_text) == (m.contrasts == "different")
        if cls.caps.uncertainty:
            assert m.uncertainty_text in text
            assert ("unreliable" in m.uncertainty_text) == (not cls.caps.uncertainty_qa)
        else:
            assert m.uncertainty_text is None
    src = open(os.path.join(MODULE_DIR, "DeepDiffReg.py")).read()
    assert "methodDescriptionLabel.text = m.facts_text" in src

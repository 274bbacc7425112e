"""One import name, a documented API that changes no process state, the layers' import graph,
the scikit-learn contract of every detector."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from conftest import CLEAN, ROOT

import poisonguard
from poisonguard.detectors import DETECTORS


def test_wheel_installs_exactly_one_top_level_import_name(tmp):
    target = tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(ROOT)], check=True, capture_output=True)
    top = {p.name.split(".")[0] for p in target.iterdir()
           if not p.name.endswith((".dist-info", ".egg-info")) and p.name not in ("bin", "__pycache__")}
    assert top == {"poisonguard"}
    assert (target / "poisonguard" / "detectors" / "spectre.py").is_file()
    assert (target / "poisonguard" / "templates" / "report.html.j2").is_file()
    out = subprocess.run([sys.executable, "-c", "import poisonguard, poisonguard.detectors; print(poisonguard.__version__)"],
                         cwd=tmp, env={**os.environ, "PYTHONPATH": str(target)}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == poisonguard.__version__ != "0+unknown"
    commit = subprocess.run([sys.executable, "-c", "from poisonguard.run.facets import code_commit; print(code_commit())"],
                            cwd=tmp, env={**os.environ, "PYTHONPATH": str(target)}, capture_output=True, text=True)
    assert commit.stdout.strip() == "None", commit.stderr  # an installed copy is not a checkout of poisonguard


def test_api_functions_are_not_shadowed_by_modules():
    import importlib

    for name in ("api", "orchestrator", "engines.memory", "core.screening"):
        importlib.import_module(f"poisonguard.{name}")
    assert callable(poisonguard.scan) and callable(poisonguard.screen)
    assert poisonguard.Spectre is DETECTORS["spectre"]


def test_version_and_python_m(tmp):
    out = subprocess.run([sys.executable, "-m", "poisonguard", "--version"], capture_output=True, text=True, cwd=tmp)
    assert out.returncode == 0 and out.stdout.strip() == f"poisonguard {poisonguard.__version__}"


def _readme_api_example() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- api-example -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README has no API example block"
    return match.group(1)


def test_readme_api_example_runs_and_changes_no_process_state(tmp, capfd):
    import logging

    umask = os.umask(0o022)
    os.umask(umask)
    cwd, handlers = os.getcwd(), list(logging.getLogger().handlers)
    os.chdir(ROOT)
    try:
        namespace: dict = {}
        code = _readme_api_example().replace('"runs/api"', repr(str(tmp / "run")))
        exec(compile(code, "README.md", "exec"), namespace)
    finally:
        os.chdir(cwd)
    assert namespace["result"].exit_code == 0 and namespace["result"].counts["in"] == 1797
    assert namespace["findings"].rows.shape[0] == 1797
    assert namespace["findings"].quarantined["quarantined"].all()
    now = os.umask(0o022)
    os.umask(now)
    assert now == umask and os.getcwd() == cwd and logging.getLogger().handlers == handlers
    out, err = capfd.readouterr()
    assert "[poisonguard]" not in out + err and not err.strip()


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT)
    if rel.parts[0] == "detectors":
        return "poisonguard.detectors." + ".".join(rel.with_suffix("").parts[1:])
    return "poisonguard." + ".".join(rel.with_suffix("").parts[1:])


def test_import_graph_follows_the_layers():
    modules = {_module(p): _imports(p) for folder in ("pipelines", "detectors") for p in (ROOT / folder).rglob("*.py")}
    for name, imports in modules.items():
        if name not in ("poisonguard.cli", "poisonguard.api", "poisonguard.orchestrator"):
            assert not {"poisonguard.engines.beam", "poisonguard.orchestrator"} & imports, name
        if name not in ("poisonguard.cli", "poisonguard.api"):
            assert "poisonguard.orchestrator" not in imports or name == "poisonguard.orchestrator", name
        if name.startswith(("poisonguard.core", "poisonguard.detectors")):
            assert not any(i.startswith(("apache_beam", "poisonguard.engines", "poisonguard.run")) for i in imports), name
        if name.startswith("poisonguard.detectors"):
            assert all(not i.startswith("poisonguard.") or i.startswith("poisonguard.detectors") for i in imports), name
    assert len((ROOT / "pipelines" / "orchestrator.py").read_text().splitlines()) <= 140


@pytest.mark.parametrize("name", list(DETECTORS))
def test_detectors_follow_the_scikit_learn_contract(name):
    cls = DETECTORS[name]
    det = cls(min_separation=7.5, random_state=3)
    copy = clone(det)
    assert copy.get_params(deep=True) == det.get_params(deep=True) and copy is not det
    assert copy.set_params(min_separation=6.0).min_separation == 6.0
    x = np.random.default_rng(0).normal(size=(200, 4)).astype(np.float32)
    y = np.repeat([0, 1], 100)
    for call in (lambda d: d.score_samples(x, y), lambda d: d.flag(x, y)):
        with pytest.raises(NotFittedError):
            call(cls())
    fitted = cls().fit(x, y)
    assert fitted.n_features_in_ == 4 and hasattr(fitted, "decisions_")
    assert fitted.score_samples(x, y).shape == (200,) and fitted.flag(x, y).dtype == bool
    with pytest.raises(ValueError, match="min_separation"):
        cls(min_separation="x").fit(x, y)
    with pytest.raises(ValueError, match="max_share"):
        cls(max_share=1.5).fit(x, y)


def test_provenance_records_poisonguards_own_version_and_checkout_commit(tmp):
    from poisonguard.run.facets import code_commit, run_facets

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert code_commit() == (head or None)
    facet = run_facets(poisonguard.Config(), None)["poisonguard_code"]
    assert facet == {"version": poisonguard.__version__, "git_commit": head or None}
    other = tmp / "users-repo"
    other.mkdir()
    subprocess.run(["git", "init", "-q", str(other)], check=True)
    out = subprocess.run([sys.executable, "-c", "from poisonguard.run.facets import code_commit; print(code_commit())"],
                         cwd=other, capture_output=True, text=True)
    assert out.stdout.strip() == (head or "None")  # the user's own repository is never recorded


def test_the_example_config_loads_and_lists_every_key():
    """configs/example.yaml is the reference the README points to: it must load, and name every
    config key (nested ones included) with its default."""
    import yaml

    from poisonguard.config import Config, load_config

    path = Path(__file__).resolve().parents[1] / "configs" / "example.yaml"
    load_config(str(path))
    written = yaml.safe_load(path.read_text())

    def keys(model, prefix=""):
        out = set()
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                out |= keys(annotation, f"{prefix}{name}.")
            else:
                out.add(prefix + name)
        return out

    def present(data, prefix=""):
        out = set()
        for name, value in data.items():
            out |= present(value, f"{prefix}{name}.") if isinstance(value, dict) else {prefix + name}
        return out

    missing = keys(Config) - present(written)
    assert not missing, f"configs/example.yaml lacks {sorted(missing)}"
    defaults = Config().model_dump()
    for dotted in keys(Config) - {"detectors"}:
        value, default = written, defaults
        for part in dotted.split("."):
            value, default = value[part], default[part]
        assert value == default, f"configs/example.yaml: {dotted} is {value!r}, the default is {default!r}"


def test_api_arguments_of_the_wrong_kind_are_input_errors(tmp, monkeypatch):
    """scan(out=None) had published a run folder named 'None' in the working folder; a config dict
    with an unknown key raised pydantic's ValidationError where a YAML file gives a ConfigError."""
    import poisonguard
    from poisonguard.errors import ConfigError, InputError

    monkeypatch.chdir(tmp)
    with pytest.raises(InputError, match="out must be the run folder's path"):
        poisonguard.scan(str(CLEAN), out=None)
    with pytest.raises(InputError, match="inputs must be a path or a list of paths"):
        poisonguard.scan(None, out=tmp / "run")
    with pytest.raises(ConfigError, match="config dict: bogus: Extra inputs are not permitted"):
        poisonguard.scan(str(CLEAN), out=tmp / "run", config={"bogus": 1})
    with pytest.raises(ConfigError, match="unknown detector 'nope'"):
        poisonguard.screen(np.zeros((10, 2)), np.arange(10) % 2, {"detectors": [{"name": "nope"}]})
    assert not list(tmp.iterdir())

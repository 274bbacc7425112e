"""What the provenance events say about a run: code, versions, config, suite, detectors, findings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from poisonguard import __version__
from poisonguard.config import Config
from poisonguard.io import sha256_file

DEPENDENCIES = ("apache-beam", "pyarrow", "numpy", "pandas", "scikit-learn", "scipy", "great-expectations", "torch")


def versions() -> dict:
    from importlib import metadata

    packages = {}
    for dist in DEPENDENCIES:
        try:
            packages[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            packages[dist] = None
    return {"python": sys.version.split()[0], "poisonguard": __version__, "packages": packages}


def code_commit() -> str | None:
    """poisonguard's own commit, only when it runs from a checkout of poisonguard itself.

    An installed copy (site-packages) has no commit; an editable install inside a checkout
    records the checkout's HEAD only if that checkout's top level holds poisonguard's pyproject.
    """
    package = Path(__file__).resolve().parents[1]
    top = package.parent
    pyproject = top / "pyproject.toml"
    if not (top / ".git").exists() or not pyproject.is_file() or 'name = "poisonguard"' not in pyproject.read_text():
        return None
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=top, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_facets(config: Config, suite: dict | None, public=lambda facets: facets) -> dict:
    """``public`` renames local copies of remote files (run/remote.py) to the names they were given."""
    facets = {
        "poisonguard_code": {"version": __version__, "git_commit": code_commit()},
        "poisonguard_versions": versions(),
        "poisonguard_config": json.loads(config.model_dump_json()),
        "poisonguard_detectors": {d.name: config.detector_params(d) for d in config.detectors},
    }
    if config.suite:
        facets["poisonguard_suite"] = {"path": config.suite, "sha256": sha256_file(config.suite),
                                       "name": (suite or {}).get("name"),
                                       "expectations": len((suite or {}).get("expectations", []))}
    return public(facets)


def findings(summary: dict) -> dict:
    return {
        "counts": summary["counts"],
        "per_reason": summary["per_reason"],
        "detectors": {name: rep["classes"] for name, rep in summary["detectors"].items()},
        "drift": summary.get("drift"),
        "review": summary.get("review"),
    }


def dataset(location: str, **dataset_facets) -> dict:
    """An OpenLineage dataset named as its naming spec says: ``file`` and an absolute path, or
    ``scheme://bucket`` and the key within it."""
    from poisonguard import storage

    if storage.is_remote(location):
        scheme, rest = location.split("://", 1)
        bucket, _, key = rest.partition("/")
        return {"namespace": f"{scheme}://{bucket}", "name": key or "/", "facets": dataset_facets}
    return {"namespace": "file", "name": location, "facets": dataset_facets}


def input_datasets(files, name=lambda path: path) -> list[dict]:
    return [dataset(name(f.path), poisonguard_content={"sha256": f.sha256, "rows": f.rows}) for f in files]


def write_events(path: str, events: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for event in events:
            handle.write(json.dumps(event, sort_keys=True) + "\n")



"""Packaging: the wheel lists every importable folder of the package (setuptools warns "Package ... would be
ignored" otherwise), and PyTorch as the benchmark's peer (the dependency group "peer") keeps one CUDA major
version per environment without touching the test group."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
LOCK = tomllib.loads((ROOT / "uv.lock").read_text())


def test_every_importable_folder_is_a_listed_package():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    for folder in (ROOT / "lenet_gpu").rglob("*"):
        if not folder.is_dir() or folder.name == "__pycache__" or not any(folder.iterdir()):
            continue
        name = ".".join(folder.relative_to(ROOT).parts)
        if all(part.isidentifier() for part in folder.relative_to(ROOT).parts):
            assert name in listed, f"{name} is importable but not in [tool.setuptools] packages"


def _package(name: str) -> list[dict]:
    return [p for p in LOCK["package"] if p["name"] == name]


def test_the_peer_group_is_cuda_12_and_apart_from_the_tests():
    groups = PYPROJECT["dependency-groups"]
    assert not any(req.startswith("torch") for req in groups["test"]), "torch would balloon the test environment"
    assert [r for r in groups["peer"] if r.startswith("torch")] == ["torch==2.10.0"]
    conflicts = [{tuple(sorted(d.items())) for d in c} for c in PYPROJECT["tool"]["uv"]["conflicts"]]
    assert {(("group", "peer"),), (("extra", "cuda13"),)} in [set(c) for c in conflicts]
    assert {(("group", "peer"),), (("group", "test"),)} in [set(c) for c in conflicts]
    (torch,) = _package("torch")
    deps = {d["name"] for d in torch.get("dependencies", [])}
    cuda = {d for d in deps if d.startswith(("nvidia-", "cuda-"))}
    assert cuda and all(d.endswith("-cu12") or d == "cuda-bindings" for d in cuda), cuda  # no CUDA 13 wheel
    assert {p["version"].split(".")[0] for p in _package("cuda-bindings")} >= {"12"}
    project = _package("lenet-gpu")[0]
    test_names = {d["name"] for d in project["dev-dependencies"]["test"]}
    assert "torch" not in test_names and "numba-cuda" in test_names

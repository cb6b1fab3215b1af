"""The README cannot rot: every command it names exists and answers --help, and what it quotes is true."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def modules_in_readme() -> list[str]:
    return sorted(set(re.findall(r"python -m ([\w.]+)", README)) - {"pytest", "pip"})


@pytest.mark.parametrize("module", modules_in_readme())
def test_every_readme_command_has_help(module):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    p = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=ROOT, env=env,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert "usage" in p.stdout.lower()


def test_readme_options_exist_in_train_help():
    from lenet_gpu.train import build_parser

    help_text = build_parser().format_help()
    section = README.split("### `python -m lenet_gpu.train`")[1].split("###")[0]
    for opt in set(re.findall(r"`(--[a-z0-9-]+)", section)):
        assert opt in help_text, f"README documents {opt}, which train --help does not have"


def test_readme_quotes_the_real_no_gpu_error(monkeypatch):
    """The error line quoted in the README is the one users get (on a machine without a GPU)."""
    from lenet_gpu.backends import BackendUnavailable, get_backend

    monkeypatch.delenv("NUMBA_ENABLE_CUDASIM", raising=False)
    quoted = re.search(r"lenet_gpu\.train: error: (.*)", README)
    assert quoted, "README quotes no error line"
    try:
        get_backend("numba")
    except BackendUnavailable as e:
        assert quoted.group(1).strip() == str(e)
    else:
        pytest.skip("a CUDA device is present: the no-GPU error cannot be produced here")


def test_readme_parameter_count_is_true():
    from lenet_gpu.spec import num_parameters

    assert f"{num_parameters():,} parameters" in README


def test_design_citations_point_at_sections_that_exist():
    """The code cites docs/DESIGN.md by section; each cited section is there, and nothing cites ../shared."""
    design = (ROOT / "docs" / "DESIGN.md").read_text()
    sections = set(re.findall(r"^## (\d+[a-z]?)\. ", design, flags=re.M))
    cited: dict[str, list[str]] = {}
    for path in [ROOT / "README.md", *ROOT.glob("lenet_gpu/**/*.py"), *ROOT.glob("bench/**/*.py"),
                 *ROOT.glob("kernels/*.cu*"), *ROOT.glob("docs/*.md")]:
        text = path.read_text(encoding="utf-8")
        assert "shared/DESIGN.md" not in text, path
        for sec in re.findall(r"DESIGN\.md §(\d+[a-z]?)", text):
            cited.setdefault(sec, []).append(path.name)
        assert not re.search(r"(?<![/\w])DESIGN\.md §", text), f"{path}: cite docs/DESIGN.md"
    assert cited, "nothing cites docs/DESIGN.md"
    missing = {sec: files for sec, files in cited.items() if sec not in sections}
    assert not missing, missing


def readme_block_after(marker: str) -> list[str]:
    """The commands of the first ```bash block after ``marker`` in the README, without comments."""
    rest = README.split(marker, 1)[1]
    block = rest.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.split("#", 1)[0].strip()]


def test_readme_examples_after_training_run_as_written(tmp_path):
    """The README's evaluate / visualize / predict examples, run as written (less `uv run ...`) after a tiny
    training run in a fresh folder: they take the latest run, and the named one."""
    require("matplotlib")
    require("PIL")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg", "LENET_GPU_OFFLINE": "1"}
    (tmp_path / "docs").symlink_to(ROOT / "docs")  # the README's relative docs/sample_digit.png
    train = [sys.executable, "-m", "lenet_gpu.train", "--dataset", "mnist-sample", "--backend", "numpy", "--limit",
             "64", "--epochs", "1", "--batch-size", "32", "--no-progress"]
    p = subprocess.run(train, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    commands = readme_block_after("**Runs never overwrite each other.**")
    assert any("lenet_gpu.predict" in c for c in commands) and any("lenet_gpu.visualize" in c for c in commands)
    for command in commands:
        args = command.split()
        args = args[args.index("python"):]  # drop "uv run [--extra viz]"
        args += ["--backend", "numpy"]  # and small sizes: the commands, not the figures' detail, are tested here
        if "lenet_gpu.evaluate" in args:
            args += ["--limit", "64"]
        if "lenet_gpu.visualize" in args:
            args += ["--limit", "64", "--mistakes", "8", "--dpi", "30"]
        p = subprocess.run([sys.executable, *args[1:]], capture_output=True, text=True, cwd=tmp_path, env=env,
                           timeout=300)
        assert p.returncode == 0, (command, p.stderr)
    assert (tmp_path / "runs" / "figures" / "lenet5-filters.png").is_file()

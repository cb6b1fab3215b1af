"""scripts/sanitize_kernels.py: command line and report parsing (its --self-test runs the same
sanitizer checks as test_cudacpu_sanitizers.py, so it is not repeated here)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from types import ModuleType

import pytest

from .helpers import ROOT

SCRIPT = ROOT / "scripts" / "sanitize_kernels.py"


@pytest.fixture(scope="module")
def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sanitize_kernels", SCRIPT)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_help() -> None:
    r = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0
    for flag in ("--self-test", "--sanitizers", "--pytest", "--env", "--no-build"):
        assert flag in r.stdout


def test_bad_env_argument_is_a_usage_error(script: ModuleType) -> None:
    with pytest.raises(SystemExit) as e:
        script.main(["--env", "NO_EQUALS_SIGN", "--no-build", "--no-pytest"])
    assert e.value.code == 2


def test_report_lines(script: ModuleType) -> None:
    asan = (
        "==1==ERROR: AddressSanitizer: heap-buffer-overflow on address 0x6190\n"
        "SUMMARY: AddressSanitizer: heap-buffer-overflow /k/harness_bad.cu:54 in global_oob\n"
    )
    assert script._reports("address", asan) == [
        "AddressSanitizer: heap-buffer-overflow /k/harness_bad.cu:54 in global_oob"
    ]
    tsan = (
        "WARNING: ThreadSanitizer: data race (pid=3)\n  Read of size 4\nWARNING: ThreadSanitizer: data race (pid=3)\n"
    )
    assert script._reports("thread", tsan) == ["WARNING: ThreadSanitizer: data race (pid=3)"] * 2
    ubsan = "k.cu:3:20: runtime error: signed integer overflow: 2147483646 + 2 cannot be represented\n"
    assert len(script._reports("undefined", ubsan)) == 1
    assert script._reports("address", "all good\n") == []
    totals = script.PYTEST_TOTALS.findall("==== 3 passed, 2 deselected in 12.5s ====")
    assert totals == ["3 passed, 2 deselected"]

"""bench/smem_banks.py: the shared-memory bank model on patterns whose wavefronts are known, and the window reads
of lenet_fwd / step_fwd it prints (the figures the kernel headers and docs/fused_kernels.md cite)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import smem_banks as sb

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("addresses, words, want", [
    ([7] * 32, 1, 1),                                  # one word: a broadcast
    (list(range(32)), 1, 1),                           # stride 1
    ([2 * lane for lane in range(32)], 1, 2),          # stride 2: 16 banks, 2 words each
    ([32 * lane for lane in range(32)], 1, 32),        # stride 32: one bank
    ([lane // 2 for lane in range(32)], 1, 1),         # pairs of lanes share a word
    ([2 * lane for lane in range(32)], 2, 2),          # 64-bit, contiguous: one wavefront a half-warp
    ([4 * lane for lane in range(32)], 2, 4),          # 64-bit, stride 4 words: 2-way in each half-warp
    ([0] * 32, 2, 2),                                  # 64-bit broadcast: each half-warp once
    ([0] * 16 + [None] * 16, 2, 1),                    # an idle half-warp costs nothing
    ([None] * 31 + [64], 1, 1),
])
def test_wavefronts_of_known_patterns(addresses, words, want):
    assert sb.wavefronts(addresses, words) == want


def test_wavefronts_rejects_what_a_warp_cannot_do():
    with pytest.raises(ValueError, match="even word address"):
        sb.wavefronts([1] * 32, 2)
    with pytest.raises(ValueError, match="32 lanes"):
        sb.wavefronts([0] * 33, 1)
    with pytest.raises(ValueError, match="words"):
        sb.wavefronts([0] * 32, 4)


@pytest.mark.parametrize("pattern", sb.patterns(), ids=lambda p: p.name)
def test_64_bit_rows_halve_the_loads_and_cut_the_wavefronts(pattern):
    ins32, wf32 = pattern.cost(1)
    ins64, wf64 = pattern.cost(2)
    assert ins64 * 2 == ins32
    assert wf64 < wf32
    assert wf64 >= 2 * ins64  # a 64-bit load is never under 2 wavefronts


def test_the_figures_the_headers_cite():
    """lenet_fwd v4's conv groups (2 images a pass): 990 -> 495 warp-loads, ~2.9 K -> ~2.1 K wavefronts an image
    (kernels/lenet_fwd.cu, docs/fused_kernels.md); step_fwd v1: 5.0 K -> 3.6 K wavefronts (kernels/step_fwd.cu)."""
    c1, c3 = sb.lenet_fwd_c1(2), sb.lenet_fwd_c3(2)
    assert c1.cost(1)[0] + c3.cost(1)[0] == 990 and c1.cost(2)[0] + c3.cost(2)[0] == 495
    assert round((c1.cost(1)[1] + c3.cost(1)[1]) / 100) == 29
    assert round((c1.cost(2)[1] + c3.cost(2)[1]) / 100) == 21
    s1, s3 = sb.step_fwd_c1(1), sb.step_fwd_c3(1)
    assert round((s1.cost(1)[1] + s3.cost(1)[1]) / 100) == 50
    assert round((s1.cost(2)[1] + s3.cost(2)[1]) / 100) == 36
    header = (ROOT / "kernels" / "lenet_fwd.cu").read_text()
    assert "495 loads and\n// ~2.1 K wavefronts" in header and "took 990 and ~2.9 K" in header
    assert "5.0K -> 3.6K" in (ROOT / "kernels" / "step_fwd.cu").read_text()


def test_the_kernels_read_their_window_rows_with_load_row2():
    """The model's 64-bit column is what the kernels do: every window row of lf_conv, sf_c1 and sf_c3 is read
    by load_row2 (no scalar row loop left)."""
    for name, count in (("lenet_fwd.cu", 4), ("step_fwd.cu", 4)):
        src = (ROOT / "kernels" / name).read_text()
        assert src.count("load_row2(xin") == count, name
        assert "ra[j] = xin[j]" not in src and "ra[c] = xin[c]" not in src and "ra[q] = xin[q]" not in src


def test_cli_prints_the_table(capsys):
    assert sb.main([]) == 0
    out = capsys.readouterr().out
    assert out.count("\n| ") == len(sb.patterns()) + 1
    with pytest.raises(SystemExit) as e:
        sb.main(["--help"])
    assert e.value.code == 0
    assert "bank model" in capsys.readouterr().out


def test_the_kernel_report_writes_the_table(tmp_path):
    path = sb.write_markdown(tmp_path / "reports")
    text = path.read_text()
    assert path.name == "smem_banks.md" and "Estimated, not measured" in text and sb.table() in text
    assert "smem_banks.write_markdown" in (ROOT / "scripts" / "kernel_report.py").read_text()

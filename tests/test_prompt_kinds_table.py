"""benchmarks/prompt_kinds_table.py --segments: per-segment ratios and the ratio of means, on small
synthetic side_by_side.json records whose figures are worked out by hand below."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def table():
    spec = importlib.util.spec_from_file_location("prompt_kinds_table", ROOT / "benchmarks" / "prompt_kinds_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(offset: int, ours: dict[str, float], presses: dict[str, float], kind: str = "docs") -> dict:
    """A side_by_side.json of one 2049-token segment: kvcompress rows, kvpress rows at 5x and one at 2x."""
    rows = [{"library": "kvcompress", "spec": spec, "method": f"kvcompress {spec}", "kl": kl}
            for spec, kl in ours.items()]
    rows += [{"library": "kvpress", "method": f"kvpress {press}, keep 20%", "context_compression": 5.0033, "kl": kl}
             for press, kl in presses.items()]
    # another compression: never the reference, however low its KL
    rows.append({"library": "kvpress", "method": "kvpress SnapKV, keep 50%", "context_compression": 2.0, "kl": 0.0001})
    text = {"kind": kind, "source": f"embedded:{kind}", "part": "report", "tokens": [offset, offset + 2049]}
    return {"text": text, "rows": rows}


# segment 0: best press SnapKV 0.010; segment 2049: best press StreamingLLM 0.030.
# per-segment ratios: 6x 0.004/0.010 = 0.4 and 0.012/0.030 = 0.4; 8x 0.009/0.010 = 0.9 and 0.018/0.030 = 0.6.
# means: 6x 0.008, 8x 0.0135, per-segment best (0.010 + 0.030) / 2 = 0.020 -> ratios of means 0.4 and 0.675.
# press means: SnapKV (0.010 + 0.040) / 2 = 0.025, StreamingLLM (0.024 + 0.030) / 2 = 0.027 -> SnapKV;
# ratios of means to it: 0.008 / 0.025 = 0.32, 0.0135 / 0.025 = 0.54.
RUNS = {0: run(0, {"prompt-6x": 0.004, "prompt-8x": 0.009}, {"SnapKV": 0.010, "StreamingLLM": 0.024}),
        2049: run(2049, {"prompt-6x": 0.012, "prompt-8x": 0.018}, {"SnapKV": 0.040, "StreamingLLM": 0.030})}


def test_segments_summary_per_segment_and_ratio_of_means(table):
    got = table.segments_summary(RUNS)
    first, second = got["segments"]
    assert (first["offset"], first["best"], first["best_kl"]) == (0, "kvpress SnapKV, keep 20%", 0.010)
    assert (second["offset"], second["best"], second["best_kl"]) == (2049, "kvpress StreamingLLM, keep 20%", 0.030)
    assert first["ratio"] == pytest.approx({"prompt-6x": 0.4, "prompt-8x": 0.9})
    assert second["ratio"] == pytest.approx({"prompt-6x": 0.4, "prompt-8x": 0.6})
    assert got["mean_kl"] == pytest.approx({"prompt-6x": 0.008, "prompt-8x": 0.0135})
    assert got["best_mean"] == pytest.approx(0.020)
    assert got["ratio_of_means"] == pytest.approx({"prompt-6x": 0.4, "prompt-8x": 0.675})
    assert got["best_press"] == "kvpress SnapKV, keep 20%"
    assert got["best_press_mean"] == pytest.approx(0.025)
    assert got["ratio_of_means_press"] == pytest.approx({"prompt-6x": 0.32, "prompt-8x": 0.54})


def test_overlapping_or_mixed_segments_are_refused(table):
    overlapping = {0: RUNS[0], 1000: run(1000, {"prompt-6x": 0.01}, {"SnapKV": 0.02})}
    with pytest.raises(ValueError, match="overlap"):
        table.segments_summary(overlapping)
    mixed = {0: RUNS[0], 2049: run(2049, {"prompt-6x": 0.012, "prompt-8x": 0.018}, {"SnapKV": 0.04}, kind="code")}
    with pytest.raises(ValueError, match="different texts"):
        table.segments_summary(mixed)


def test_a_segment_without_a_press_or_spec_is_refused(table):
    lacking = {0: RUNS[0], 2049: run(2049, {"prompt-6x": 0.012, "prompt-8x": 0.018}, {"SnapKV": 0.040})}
    with pytest.raises(ValueError, match="offset 2049 lacks kvpress StreamingLLM"):
        table.segments_summary(lacking)


def write_segments(root, kinds: dict[str, dict]) -> None:
    """ROOT/KIND/OFFSET/side_by_side.json for every kind's {offset: side-by-side record}."""
    for kind, runs in kinds.items():
        for offset, data in runs.items():
            folder = root / kind / str(offset)
            folder.mkdir(parents=True)
            (folder / "side_by_side.json").write_text(json.dumps(data))


def test_segments_table_from_folders(table, tmp_path, capsys):
    write_segments(tmp_path, {"docs": RUNS})
    (tmp_path / "docs" / "notes").mkdir()  # not an offset: not read
    assert table.main(["--segments", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| docs | 0 | 0.0040 | 0.0090 | SnapKV 0.0100 | 0.400x, yes | 0.900x, no |" in out
    assert "| docs | 2049 | 0.0120 | 0.0180 | StreamingLLM 0.0300 | 0.400x, yes | 0.600x, yes |" in out
    assert "per-segment best 0.0200 | **0.400x, yes** | **0.675x, yes** |" in out
    assert "SnapKV (best mean) 0.0250 | 0.320x, yes | 0.540x, yes |" in out
    assert table.main(["--segments", str(tmp_path / "docs")]) == 2  # no KIND/OFFSET/ below it
    assert table.main(["--segments", str(tmp_path), "--offsets", "2049"]) == 0
    out = capsys.readouterr().out
    assert "| docs | 0 |" not in out and "per-segment best 0.0300 | **0.400x, yes** | **0.600x, yes** |" in out


# the worst-kind rule over two kinds, each with segments 0 and 2049; kvpress's best is 0.010 then 0.020 on docs,
# 0.020 then 0.040 on code (per-segment best means 0.015 and 0.030):
#   prompt-6x:          docs 0.004, 0.008 -> 0.006 / 0.015 = 0.4;  code 0.006, 0.006 -> 0.006 / 0.030 = 0.2
#   prompt-6x-expected: docs 0.002, 0.010 -> 0.006 / 0.015 = 0.4;  code 0.004, 0.012 -> 0.008 / 0.030 = 0.2667
#   prompt-8x:          docs 0.006, 0.012 -> 0.009 / 0.015 = 0.6;  code 0.024, 0.028 -> 0.026 / 0.030 = 0.8667
# on the ratios of means both 6x specs have docs 0.4 as worst kind: the tie goes to the lower geometric mean
# (prompt-6x). Segment 0 alone: prompt-6x 0.4 (docs) / 0.3 (code), prompt-6x-expected 0.2 / 0.2 -> expected
# (worst 0.2); segment 2049 alone: prompt-6x 0.4 / 0.15, expected 0.5 / 0.3 -> prompt-6x (worst 0.4).
# prompt-8x, the only 8x spec: worst kind code, 1.2 on segment 0 and 0.7 on 2049.
def kinds_runs(kind: str, kls: dict[str, tuple[float, float]], best: tuple[float, float]) -> dict:
    return {offset: run(offset, {spec: pair[i] for spec, pair in kls.items()}, {"SnapKV": best[i]}, kind=kind)
            for i, offset in enumerate((0, 2049))}


KINDS_RUNS = {
    "docs": kinds_runs("docs", {"prompt-6x": (0.004, 0.008), "runs/s/prompt-6x-expected.json": (0.002, 0.010),
                                "prompt-8x": (0.006, 0.012)}, (0.010, 0.020)),
    "code": kinds_runs("code", {"prompt-6x": (0.006, 0.006), "runs/s/prompt-6x-expected.json": (0.004, 0.012),
                                "prompt-8x": (0.024, 0.028)}, (0.020, 0.040))}


def test_worst_kind_rule_on_ratios_of_means_and_on_each_segment(table, tmp_path, capsys):
    summaries = {kind: table.segments_summary(runs) for kind, runs in KINDS_RUNS.items()}
    rule = table.worst_kind_rule({kind: s["ratio_of_means"] for kind, s in summaries.items()})
    assert rule["picks"] == {"prompt-6x": "prompt-6x", "prompt-8x": "prompt-8x"}
    assert rule["worst"]["runs/s/prompt-6x-expected.json"]["kind"] == "docs"
    assert rule["worst"]["runs/s/prompt-6x-expected.json"]["ratio"] == pytest.approx(0.4)
    assert rule["worst"]["prompt-8x"]["kind"] == "code"
    assert rule["worst"]["prompt-8x"]["ratio"] == pytest.approx(0.026 / 0.030)
    write_segments(tmp_path, KINDS_RUNS)
    assert table.main(["--segments", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| `prompt-6x-expected` | 0.400x | 0.267x | docs 0.400x | - |" in out
    assert "| `prompt-6x` | 0.400x | 0.200x | docs 0.400x | prompt-6x |" in out
    assert "| `prompt-8x` | 0.600x | 0.867x | code 0.867x | prompt-8x |" in out
    assert "| segment 0 alone | `prompt-6x-expected` (docs 0.200x) | `prompt-8x` (code 1.200x) |" in out
    assert "| segment 2049 alone | `prompt-6x` (docs 0.400x) | `prompt-8x` (code 0.700x) |" in out


def test_presses_restrict_the_references(table, tmp_path, capsys):
    # StreamingLLM alone: best 0.024 then 0.030 (mean 0.027); 6x 0.008 / 0.027, 8x 0.0135 / 0.027 = 0.5
    got = table.segments_summary(RUNS, presses={"StreamingLLM"})
    assert [s["best_kl"] for s in got["segments"]] == [0.024, 0.030]
    assert got["ratio_of_means"] == pytest.approx({"prompt-6x": 0.008 / 0.027, "prompt-8x": 0.5})
    with pytest.raises(ValueError, match="among Knorm"):
        table.segments_summary(RUNS, presses={"Knorm"})
    write_segments(tmp_path, {"docs": RUNS})
    assert table.main(["--segments", str(tmp_path), "--presses", "StreamingLLM"]) == 0
    assert "per-segment best 0.0270 | **0.296x, yes** | **0.500x, yes** |" in capsys.readouterr().out

"""Report: valid PNG plots, tables that match the JSON records, boundaries and frontier derived by code."""

import json

import pytest

from kvcompress.experiments.curves import ZONES, curves, failure_boundary, pareto_front, zone_of
from kvcompress.experiments.grid import load_grid
from kvcompress.experiments.records import load_records
from kvcompress.experiments.report import write_report
from kvcompress.experiments.settings import SweepSettings
from kvcompress.experiments.sweep import run_sweep
from kvcompress.io import write_json_atomic
from tiny_text import CharTokenizer


def parse_markdown_table(markdown: str, first_header: str, section: str | None = None) -> list[dict[str, str]]:
    """Rows (header -> cell) of the first table in `markdown` (after the heading `## section`, if
    given) whose first header cell is `first_header`."""
    lines = markdown.splitlines()
    start = lines.index(f"## {section}") if section is not None else 0
    for i, line in enumerate(lines[start:], start):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_header:
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                rows.append(dict(zip(cells, (c.strip() for c in row.strip().strip("|").split("|")))))
            return rows
    raise ValueError(f"no table with first column {first_header!r}")


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def quant(bits_k: int, bits_v: int, name: str) -> dict:
    return {"name": name, "key": {"bits": bits_k, "axis": "channel", "group_size": 32},
            "value": {"bits": bits_v, "axis": "token", "group_size": 32}, "window": 16, "sinks": 4, "block_size": 32}


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory, tiny_llama):
    out = tmp_path_factory.mktemp("sweep")
    bad = quant(4, 4, "broken")
    bad["value"]["group_size"] = 24  # does not divide the tiny model's head_dim 32: fails when measured
    grid = {"specs": [quant(8, 8, "int8"), quant(4, 4, "int4"), bad, quant(4, 2, "k4v2"),
                      {"spec": quant(3, 3, "int3"), "eval": False}],
            "grids": [{"name": "v{value.bits}", "base": {**quant(8, 8, "x"), "key": {"method": "none"}},
                       "vary": {"value.bits": [2]}}]}
    entries = load_grid(grid)
    run_sweep(entries, out, SweepSettings(eval_tokens=80, recon_tokens=72), model=tiny_llama,
              tokenizer=CharTokenizer())
    write_report(out)
    return out


def test_plots_are_valid_png_files(sweep_dir):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    for name in ("failure_curves.png", "quality_vs_ratio.png", "layer_sensitivity.png"):
        path = sweep_dir / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE, name
        image = plt.imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert image.std() > 0.01, f"{name} is blank"
        assert f"({name})" in (sweep_dir / "report.md").read_text()


def test_summary_table_matches_the_records(sweep_dir):
    markdown = (sweep_dir / "report.md").read_text()
    rows = {row["spec"]: row for row in parse_markdown_table(markdown, "spec")}
    records = {r["label"]: r for r in load_records(sweep_dir) if r["status"] == "ok"}
    assert set(rows) == set(records) == {"int8", "int4", "k4v2", "int3", "v2"}
    for label, record in records.items():
        row, mean = rows[label], record["reconstruction"]["mean"]
        assert float(row["K cos"]) == pytest.approx(mean["key"]["cosine"], abs=5e-5)
        assert float(row["V cos"]) == pytest.approx(mean["value"]["cosine"], abs=5e-5)
        assert float(row["attn err"]) == pytest.approx(mean["attention"]["both"]["rel_error"], abs=5e-5)
        assert float(row["codec ratio"]) == pytest.approx(record["reconstruction"]["codec_ratio"], abs=5e-3)
        ev = record.get("eval")
        if ev is None:
            assert row["PPL change"] == "n/a" and label == "int3"
            continue
        assert float(row["PPL change"].rstrip("%")) == pytest.approx(100 * ev["ppl_change"], abs=5e-3)
        assert float(row["KL"]) == pytest.approx(ev["kl"], abs=5e-5)
        assert float(row["top-1"]) == pytest.approx(ev["top1"], abs=5e-4)
        assert float(row["eval ratio"]) == pytest.approx(ev["compression_ratio"], abs=5e-3)
        assert row["zone"] == zone_of(ev["ppl_change"])
    assert "**broken**: ValueError:" in markdown and "does not divide head_dim 32" in markdown


def test_failure_boundary_table_matches_the_records(sweep_dir):
    markdown = (sweep_dir / "report.md").read_text()
    rows = parse_markdown_table(markdown, "cosine below")
    records = [r for r in load_records(sweep_dir) if r["status"] == "ok"]
    # V at 2 bits per token: int8/int4/int3 records give 8/4/3, k4v2 and v2 give 2.
    v_cos = {}
    for r in records:
        v_cos.setdefault(r["spec"]["value"]["bits"], r["reconstruction"]["mean"]["value"]["cosine"])
    column = "V int/token32 (bits)"
    for row in rows:
        threshold = float(row["cosine below"])
        below = [b for b in sorted(v_cos, reverse=True) if v_cos[b] < threshold]
        if below:
            assert row[column] == f"bits {below[0]} ({v_cos[below[0]]:.3f})"
        else:
            assert row[column].startswith("none")
    for curve in curves(records):
        hit = failure_boundary(curve, 0.999999)
        assert hit is None or hit[1] < 0.999999


def test_passkey_table_shows_uncompressed_beside_and_says_when_it_fails(tmp_path):
    base = {"by_length": {"256": 1.0, "1024": 0.5}, "accuracy": 0.75,
            "cases": [{"length": 1024, "depth": 0.1, "key": "12345", "answer": " a method", "correct": False}]}
    write_json_atomic(tmp_path / "baseline.json", {"key": "k", "passkey": base})
    record = {"label": "int2", "status": "ok", "key": "k", "spec": quant(2, 2, "int2"),
              "reconstruction": {"codec_ratio": 4.0, "layers": [],
                                 "mean": {"key": {"cosine": 0.98}, "value": {"cosine": 0.92},
                                          "attention": {"both": {"rel_error": 0.4}, "key_only": {"rel_error": 0.3},
                                                        "value_only": {"rel_error": 0.3}}}},
              "tasks": {"passkey": {"by_length": {"256": 0.25, "1024": 0.0}, "accuracy": 0.125,
                                    "uncompressed": {k: base[k] for k in ("by_length", "accuracy")}}}}
    write_json_atomic(tmp_path / "records" / "int2.json", record)
    markdown = write_report(tmp_path).read_text()
    rows = {r["spec"]: r for r in parse_markdown_table(markdown, "spec", section="Passkey retrieval")}
    assert rows["uncompressed"]["256 tokens"] == "1.00" and rows["uncompressed"]["1024 tokens"] == "0.50"
    assert rows["int2"]["256 tokens"] == "0.25 (1.00)" and rows["int2"]["1024 tokens"] == "0.00 (0.50)"
    assert "The uncompressed model itself fails the passkey task at 1024 tokens" in markdown
    assert "at 256 tokens" not in markdown.split("## Passkey retrieval")[1].split("fails the passkey task")[1][:20]


def test_pareto_front_and_zones():
    points = [(1.0, 0.0, "none"), (2.0, 0.01, "a"), (2.0, 0.02, "b"), (3.0, 0.005, "c"), (4.0, 0.5, "d")]
    assert [p[2] for p in pareto_front(points)] == ["none", "c", "d"]
    assert [zone_of(x) for x in (0.0, 0.02, 0.1, 0.5)] == [z for z, _ in ZONES]


def test_report_of_an_empty_folder_says_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="kvcompress sweep"):
        write_report(tmp_path)


def test_report_cli(sweep_dir, capsys):
    from kvcompress.cli.main import main

    assert main(["report", str(sweep_dir)]) == 0
    assert "report.md" in capsys.readouterr().out
    assert json.loads((sweep_dir / "config.json").read_text())["specs"][0]["label"] == "int8"


def _bits_record(label, key, value, bits, kl, layers=None):
    spec = {"key": key, "value": value, **({"layers": layers} if layers else {})}
    return {"label": label, "status": "ok", "spec": spec,
            "eval": {"bits_per_value": bits, "kl": kl, "ppl_change": kl * 10, "compression_ratio": 16 / bits}}


def test_quality_per_bit_groups_the_two_families_and_leaves_out_mixed_specs(tmp_path):
    from kvcompress.experiments.curves import bits_points
    from kvcompress.experiments.plots import plot_quality_vs_bits

    kivi = {"method": "quant", "bits": 4, "axis": "token", "group_size": 32}
    records = [
        _bits_record("int4", {**kivi, "axis": "channel"}, kivi, 5.0, 0.0035),
        _bits_record("bits4", {"method": "pca+codebook", "bits": 4}, {"method": "rotated+codebook", "bits": 4},
                     4.25, 0.0029),
        _bits_record("bits2", {"method": "pca+codebook", "bits": 2}, {"method": "rotated+codebook", "bits": 2},
                     2.25, 0.023),
        _bits_record("mixed", kivi, {"method": "rotated+codebook", "bits": 4}, 4.6, 0.003),   # one of each: out
        _bits_record("override", kivi, kivi, 5.0, 0.004, layers={"0": {"key": {"bits": 8}}}),  # overrides: out
        {"label": "failed", "status": "error", "spec": {"key": kivi, "value": kivi}},
    ]
    points = bits_points(records)
    assert sorted((p["label"], p["bits"]) for p in points) == [("bits2", 2.25), ("bits4", 4.25), ("int4", 5.0)]
    families = {p["label"]: p["family"] for p in points}
    assert families["int4"].startswith("KIVI") and families["bits4"] == families["bits2"] != families["int4"]
    path = plot_quality_vs_bits(points, tmp_path / "bits.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_quality_vs_bits([], tmp_path / "none.png") is None


def test_report_has_a_quality_per_bit_table(tmp_path, tiny_llama):
    codebook = {"name": "cb2", "key": {"method": "rotated+codebook", "bits": 2},
                "value": {"method": "rotated+codebook", "bits": 2}, "window": 16, "sinks": 4, "block_size": 32}
    run_sweep(load_grid({"specs": [quant(2, 2, "int2"), codebook]}), tmp_path,
              SweepSettings(eval_tokens=80, recon_tokens=72), model=tiny_llama, tokenizer=CharTokenizer())
    report = write_report(tmp_path).read_text()
    rows = {r["spec"]: r for r in parse_markdown_table(report, "spec", section="Quality per bit")}
    records = {r["label"]: r for r in load_records(tmp_path)}
    assert set(rows) == {"int2", "cb2"}
    for label, row in rows.items():
        assert row["bits/value"] == f"{records[label]['eval']['bits_per_value']:.2f}"
    # head_dim 32: int2 stores 2 bits + fp16 scale and zero per 32 values (3.0); the codebook 2 bits + one fp16
    # scale per vector of 32 (2.5)
    assert rows["int2"]["bits/value"] == "3.00" and rows["cb2"]["bits/value"] == "2.50"
    assert (tmp_path / "quality_vs_bits.png").read_bytes()[:8] == PNG_SIGNATURE


def test_kl_vs_compression_plot_draws_each_familys_frontier(tmp_path):
    from kvcompress.experiments.plots import _frontier, plot_kl_vs_compression

    points = [{"family": "a", "x": 2.0, "kl": 0.002, "label": "p"}, {"family": "a", "x": 3.0, "kl": 0.004, "label": "q"},
              {"family": "a", "x": 2.5, "kl": 0.005, "label": "beaten by q"},
              {"family": "a", "x": 5.0, "kl": 0.003, "label": "r"}]
    assert [p["label"] for p in _frontier(points)] == ["p", "r"]  # q: r compresses more with lower KL
    out = plot_kl_vs_compression(points, tmp_path / "kl.png", "ratio")
    assert out.is_file() and out.stat().st_size > 1000
    assert plot_kl_vs_compression([], tmp_path / "none.png", "ratio") is None

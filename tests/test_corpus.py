"""The embedded corpus splits into fixed, disjoint parts; text files and token counts fail clearly."""

import pytest
import torch

from kvcompress import corpus
from kvcompress.corpus import CorpusError


class WordTokenizer:
    """Stands in for a HuggingFace tokenizer: one id per whitespace-separated word."""

    def __call__(self, text, add_special_tokens=True, return_attention_mask=True, verbose=True):
        assert add_special_tokens is False
        return {"input_ids": [len(word) for word in text.split()]}


def test_parts_are_disjoint_ordered_and_cover_the_text():
    text = corpus.full_text()
    ranges = corpus.part_ranges()
    assert list(ranges) == ["calibration", "selection", "report"]
    (cal_start, cal_end), (sel_start, sel_end), (rep_start, rep_end) = ranges.values()
    assert cal_start == 0 and rep_end == len(text)
    assert cal_end < sel_start and sel_end < rep_start  # no character belongs to two parts
    assert text[cal_end:sel_start].strip() == "" and text[sel_end:rep_start].strip() == ""  # only the breaks
    assert corpus.calibration_text() == text[cal_start:cal_end]
    assert corpus.selection_text() == text[sel_start:sel_end]
    assert corpus.report_text() == text[rep_start:rep_end]
    # cuts at 30% / 40% of the topics' text; paragraphs that recur later then leave the earlier parts
    assert 0.2 < cal_end / len(text) < 0.32 and 0.3 < sel_end / len(text) < 0.42
    assert len(text) > 300_000


def _topics_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip() for k in sorted(topics))


def test_report_part_is_the_former_evaluation_part():
    """The report part is the topics' text after the paragraph break at or after 40% of it, as it was
    before repeats were removed from the earlier parts, so figures measured on it still hold."""
    original = _topics_text()
    cut = original.find("\n\n", int(len(original) * 0.4))
    assert corpus.report_text() == original[cut + 2:]
    assert corpus.part_text("report") == corpus.report_text()
    with pytest.raises(CorpusError, match="Unknown corpus part 'evaluation'"):  # the former name is gone
        corpus.part_text("evaluation")


def test_calibration_and_selection_leave_out_paragraphs_that_recur_later():
    """Every long paragraph of the earlier parts occurs in no later part, and the earlier parts are the
    topics' paragraphs in order, some left out (pydoc topics repeat whole paragraphs)."""
    parts = [corpus.part_text(p).split("\n\n") for p in corpus.PARTS]
    for i, part in enumerate(parts[:-1]):
        later = {p.strip() for q in parts[i + 1:] for p in q}
        assert not [p for p in part if len(p.strip()) >= 40 and p.strip() in later]
    original, kept = iter(_topics_text().split("\n\n")), parts[0] + parts[1]
    assert all(any(p == o for o in original) for p in kept)  # a subsequence of the topics' paragraphs
    before_report = _topics_text()[:len(_topics_text()) - len(corpus.report_text()) - 2]
    assert len(kept) < len(before_report.split("\n\n"))  # some were left out


def test_a_text_file_is_split_the_same_way(tmp_path):
    paragraphs = [f"paragraph {i} " + "word " * 20 for i in range(50)]
    path = tmp_path / "mine.txt"
    path.write_text("\n\n".join(paragraphs))
    text = corpus.load_text(path)
    ranges = corpus.split_ranges(text)
    assert [corpus.part_text(p, text) for p in corpus.PARTS] == [text[a:b] for a, b in ranges.values()]
    words = {p: corpus.corpus_tokens(WordTokenizer(), p, path=path).shape[1] for p in corpus.PARTS}
    assert sum(words.values()) == len(text.split())  # every word in exactly one part
    assert 0.25 < words["calibration"] / len(text.split()) < 0.35
    assert corpus.corpus_tokens(WordTokenizer(), "all", path=path).shape[1] == len(text.split())
    # without paragraph breaks the cuts fall at the fractions themselves
    flat = "x" * 1000
    assert corpus.split_ranges(flat) == {"calibration": (0, 300), "selection": (300, 400), "report": (400, 1000)}


def test_slices_record_what_they_read(tmp_path):
    got = corpus.corpus_slice(WordTokenizer(), "selection", n_tokens=50, offset=10)
    assert got.ids.shape == (1, 50)
    assert got.record["part"] == "selection" and got.record["tokens"] == [10, 60]
    assert got.record["source"] == "embedded:pydoc_data.topics" and got.record["kind"] == "docs"
    assert got.record["text_sha256"] == corpus.corpus_fingerprint()["sha256"]
    assert got.record["chars"] == list(corpus.part_ranges()["selection"])
    other = corpus.corpus_slice(WordTokenizer(), "selection", n_tokens=50, offset=11)
    assert other.record["sha256"] != got.record["sha256"]
    path = tmp_path / "t.txt"
    path.write_text("one two three\n\nfour five six seven eight nine ten")
    from_file = corpus.corpus_slice(WordTokenizer(), "report", path=path).record
    assert from_file["source"] == f"file:{path}" and from_file["kind"] is None
    with pytest.raises(CorpusError, match="the selection part of .*t.txt \\(its 30% to 40% of the text\\) has "
                                          "only"):
        corpus.corpus_slice(WordTokenizer(), "selection", n_tokens=100, path=path)


def test_selection_may_not_read_the_report_part():
    corpus.require_selection_text({"part": "selection"}, "x")
    corpus.require_selection_text({"part": "calibration"}, "x")
    with pytest.raises(ValueError, match="must not read the 'report' part"):
        corpus.require_selection_text({"part": "report"}, "the preset choice")


def test_text_is_deterministic_and_built_from_sorted_topics():
    from pydoc_data.topics import topics

    corpus.kind_text.cache_clear()
    first = (corpus.calibration_text(), corpus.selection_text(), corpus.report_text())
    expected = "\n\n".join(topics[k].strip() for k in sorted(topics))
    assert corpus.full_text().endswith(corpus.report_text()) and expected.endswith(corpus.report_text())
    corpus.kind_text.cache_clear()
    assert (corpus.calibration_text(), corpus.selection_text(), corpus.report_text()) == first
    assert corpus.corpus_fingerprint() == corpus.corpus_fingerprint()
    # The parts start and end on topic text, not in the middle of a word.
    for part in corpus.PARTS:
        assert corpus.part_text(part)[:1].strip() and corpus.part_text(part)[-1:].strip()


def test_unknown_part_is_refused():
    with pytest.raises(CorpusError, match="calibration, selection, report"):
        corpus.part_text("training")


def test_load_text_reads_utf8_and_drops_bom(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes("\ufeffcafé au lait\n".encode("utf-8"))
    assert corpus.load_text(path) == "café au lait\n"


def test_load_text_missing_file(tmp_path):
    with pytest.raises(CorpusError, match="not found: .*nope.txt"):
        corpus.load_text(tmp_path / "nope.txt")


def test_load_text_folder(tmp_path):
    with pytest.raises(CorpusError, match="not a file"):
        corpus.load_text(tmp_path)


def test_load_text_not_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.raises(CorpusError, match="not UTF-8.*byte 3"):
        corpus.load_text(path)


def test_load_text_empty(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text(" \n\n")
    with pytest.raises(CorpusError, match="no text"):
        corpus.load_text(path)


def test_corpus_tokens_shape_and_count():
    ids = corpus.corpus_tokens(WordTokenizer(), "calibration", n_tokens=100)
    assert ids.shape == (1, 100) and ids.dtype == torch.long
    everything = corpus.corpus_tokens(WordTokenizer(), "report")
    assert everything.shape[1] == len(corpus.report_text().split())


def test_corpus_tokens_too_few(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("only four words here")
    assert corpus.corpus_tokens(WordTokenizer(), "all", path=path).tolist() == [[4, 4, 5, 4]]
    with pytest.raises(CorpusError, match="only 4 tokens, but 5 were asked"):
        corpus.corpus_tokens(WordTokenizer(), "all", path=path, n_tokens=5)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_corpus_tokens_bad_count(bad):
    with pytest.raises(CorpusError, match="positive integer"):
        corpus.corpus_tokens(WordTokenizer(), n_tokens=bad)


@pytest.mark.real_model
def test_real_tokenizer_counts(real_model):
    _, tokenizer = real_model
    report = corpus.corpus_tokens(tokenizer, "report")
    selection = corpus.corpus_tokens(tokenizer, "selection")
    calibration = corpus.corpus_tokens(tokenizer, "calibration")
    # report: eval up to 8192; selection: tune / measure-presets verification (2048) with room to spare;
    # calibration: artifacts (first 4096) and tune / sweep text from token 8192
    assert report.shape[1] > 60_000 and selection.shape[1] > 8192 and calibration.shape[1] > 8192 + 8192 + 1024
    first = corpus.corpus_tokens(tokenizer, "report", n_tokens=1024)
    assert first.shape == (1, 1024)
    assert torch.equal(first[0], report[0, :1024])
    assert first[0, 0].item() != tokenizer.bos_token_id  # no special tokens added
    with pytest.raises(CorpusError, match="calibration part of the embedded corpus has only"):
        corpus.corpus_tokens(tokenizer, "calibration", n_tokens=10**6)


def test_offset_gives_disjoint_stretches_of_one_part():
    class Words:
        def __call__(self, text, **kwargs):
            return {"input_ids": list(range(len(text.split())))}

    first = corpus.corpus_tokens(Words(), "report", n_tokens=100)
    later = corpus.corpus_tokens(Words(), "report", n_tokens=100, offset=100)
    assert first[0, -1].item() == 99 and later[0, 0].item() == 100
    with pytest.raises(CorpusError, match="offset must be a non-negative integer"):
        corpus.corpus_tokens(Words(), "report", n_tokens=10, offset=-1)


def test_parse_kinds_keeps_order_and_refuses_bad_lists():
    assert corpus.parse_kinds(" plays, docs ,,") == ("plays", "docs")
    for text, shown in (("docs,novels", "unknown novels"), ("docs,docs", "docs twice"), (" , ", "empty")):
        with pytest.raises(ValueError) as err:
            corpus.parse_kinds(text, option="--text")
        message = str(err.value)
        assert message.startswith(f"--text {text}: {shown}") and message.endswith(", ".join(corpus.KINDS))

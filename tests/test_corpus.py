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
    cal_start, cal_end = ranges["calibration"]
    ev_start, ev_end = ranges["evaluation"]
    assert cal_start == 0 and ev_end == len(text)
    assert cal_end < ev_start  # no character belongs to both parts
    assert text[cal_end:ev_start].strip() == ""  # only the paragraph break between them is in neither
    assert corpus.calibration_text() == text[cal_start:cal_end]
    assert corpus.evaluation_text() == text[ev_start:ev_end]
    assert 0.39 < len(corpus.calibration_text()) / len(text) < 0.42
    assert len(text) > 300_000


def test_text_is_deterministic_and_built_from_sorted_topics():
    from pydoc_data.topics import topics

    corpus.full_text.cache_clear()
    corpus.part_ranges.cache_clear()
    first = (corpus.calibration_text(), corpus.evaluation_text())
    expected = "\n\n".join(topics[k].strip() for k in sorted(topics))
    assert corpus.full_text() == expected
    corpus.full_text.cache_clear()
    corpus.part_ranges.cache_clear()
    assert (corpus.calibration_text(), corpus.evaluation_text()) == first
    assert corpus.corpus_fingerprint() == corpus.corpus_fingerprint()
    # The parts start and end on topic text, not in the middle of a word.
    assert corpus.evaluation_text()[:1].strip() and corpus.calibration_text()[-1:].strip()


def test_unknown_part_is_refused():
    with pytest.raises(CorpusError, match="calibration, evaluation"):
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
    everything = corpus.corpus_tokens(WordTokenizer(), "evaluation")
    assert everything.shape[1] == len(corpus.evaluation_text().split())


def test_corpus_tokens_too_few(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("only four words here")
    assert corpus.corpus_tokens(WordTokenizer(), path=path).tolist() == [[4, 4, 5, 4]]
    with pytest.raises(CorpusError, match="only 4 tokens, but 5 were asked"):
        corpus.corpus_tokens(WordTokenizer(), path=path, n_tokens=5)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_corpus_tokens_bad_count(bad):
    with pytest.raises(CorpusError, match="positive integer"):
        corpus.corpus_tokens(WordTokenizer(), n_tokens=bad)


@pytest.mark.real_model
def test_real_tokenizer_counts(real_model):
    _, tokenizer = real_model
    evaluation = corpus.corpus_tokens(tokenizer, "evaluation")
    calibration = corpus.corpus_tokens(tokenizer, "calibration")
    assert evaluation.shape[1] > 60_000 and calibration.shape[1] > 40_000
    first = corpus.corpus_tokens(tokenizer, "evaluation", n_tokens=1024)
    assert first.shape == (1, 1024)
    assert torch.equal(first[0], evaluation[0, :1024])
    assert first[0, 0].item() != tokenizer.bos_token_id  # no special tokens added
    with pytest.raises(CorpusError, match="calibration part of the embedded corpus has only"):
        corpus.corpus_tokens(tokenizer, "calibration", n_tokens=10**6)


def test_offset_gives_disjoint_stretches_of_one_part():
    class Words:
        def __call__(self, text, **kwargs):
            return {"input_ids": list(range(len(text.split())))}

    first = corpus.corpus_tokens(Words(), "evaluation", n_tokens=100)
    later = corpus.corpus_tokens(Words(), "evaluation", n_tokens=100, offset=100)
    assert first[0, -1].item() == 99 and later[0, 0].item() == 100
    with pytest.raises(CorpusError, match="offset must be a non-negative integer"):
        corpus.corpus_tokens(Words(), "evaluation", n_tokens=10, offset=-1)

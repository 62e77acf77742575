"""A memory layer's whole segments, one block: the torch path against the Triton window kernel.

    python bench/window_kernel.py --out OUT/window [--segments 64,16,8,4,2] [--tiles 128x64x4x3,64x64x4x3] \
        [--scan-tiles 16x64x4,32x64x4]

The default model's shapes (9 query heads over 3 KV heads, head_dim 64, segments of 512,
4 sinks, the XL window, delta rule), random bf16 inputs, on CUDA: `whole_segments` as
ingest runs it (compiled, TF32 memory matmuls, replayed from a CUDA graph) with the torch
path (SDPA over padded windows, then the memory read and the gate) and with the window
kernel, and the block's memory states alone (what both paths compute before their reads:
the torch path's chunk scan, the kernel's path the Triton scan with each of
--scan-tiles), for blocks of each --segments; then the kernel's path at the first of
them with each of --tiles (BM x BN x warps x stages). Writes OUT/window_kernel.jsonl and
OUT/window_kernel.md, with how far the kernel's output is from the torch path's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from infini_core import window_kernel
from infini_core.attention import BlockSpec, _block_memory, _compiled_steps, _compiled_version, whole_segments
from infini_core.memory.scan_kernel import SCAN_TILES
from infini_core.memory.chunk import chunk_states

HQ, HKV, D, N, SINKS = 9, 3, 64, 512, 4


def replay_ms(fn, repeats: int = 50) -> float:
    """Milliseconds per call of fn, captured once in a CUDA graph and replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def block_inputs(segments: int):
    g = torch.Generator(device="cuda").manual_seed(0)
    t = segments * N

    def rand(*shape, scale=1.0, dtype=torch.bfloat16):
        return (torch.randn(*shape, generator=g, device="cuda") * scale).to(dtype)

    # projections' layout: [B, T, H*D] viewed as heads
    q, mq = (rand(1, t, HQ, D, scale=s).transpose(1, 2) for s in (1.0, 0.3))
    k, v, mk = (rand(1, t, HKV, D, scale=s).transpose(1, 2) for s in (1.0, 1.0, 0.3))
    sink_k, sink_v, win_k, win_v = rand(1, HKV, SINKS, D), rand(1, HKV, SINKS, D), rand(1, HKV, N, D), rand(1, HKV, N, D)
    memory = [torch.rand(1, HKV, D, D, generator=g, device="cuda") for _ in range(2)]
    zs = [torch.rand(1, HKV, D, generator=g, device="cuda") * 100 + 1 for _ in range(2)]
    positions = torch.arange(SINKS + 3 * N, device="cuda")[:, None]
    angles = positions / 100000 ** (torch.arange(D // 2, device="cuda") / (D // 2))
    angles = torch.cat([angles, angles], -1)
    cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
    gate = rand(HQ, scale=2.0)
    return (gate, cos, sin, q, k, v, mq, mk, sink_k, sink_v, win_k, win_v, memory[0], zs[0], memory[1], zs[1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--segments", default="64", help="segments per block, comma-separated (ingest's blocks: 64, "
                    "then 32 down to 2 at a document's end)")
    ap.add_argument("--tiles", default="", help="tiles to time at the first --segments, comma-separated")
    ap.add_argument("--scan-tiles", default=window_kernel.tiles_text(SCAN_TILES),
                    help="the memory scan's tiles to time (columns x rows x warps), comma-separated")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name()
    torch.set_float32_matmul_precision("high")  # as ingest reads (TF32 memory matmuls)
    rows, out = [], open(args.out / "window_kernel.jsonl", "w")

    def record(segments, **row):
        row.update(gpu=gpu, segments=segments, tokens=segments * N, torch=torch.__version__)
        rows.append(row)
        out.write(json.dumps(row) + "\n")
        out.flush()
        print(json.dumps(row), flush=True)

    def timed(segments, inputs, kernel: bool):
        """whole_segments' result, through the kernel or the torch path, and its time recorded."""
        spec = BlockSpec(N, "delta", True, True, D ** -0.5, HKV, "chunk", kernel)
        run = _compiled_version(whole_segments)
        result = run(spec, *inputs)
        record(segments, path="window kernel" if kernel else "torch path (SDPA)",
               tiles=window_kernel.tiles_text() if kernel else None, ms=replay_ms(lambda: run(spec, *inputs)))
        return result

    sizes = [int(x) for x in args.segments.split(",")]
    scan_tiles, kept = args.scan_tiles.split(","), window_kernel.tiles_text(SCAN_TILES)
    with torch.no_grad():
        for segments in sizes:
            inputs = block_inputs(segments)
            (ref, ref_memory), (got, got_memory) = (timed(segments, inputs, kernel) for kernel in (False, True))
            diff = (got.float() - ref.float()).abs()
            record(segments, path="window kernel vs torch path", max_abs_diff=diff.max().item(),
                   mean_abs_diff=diff.mean().item(), mean_abs=ref.float().abs().mean().item(),
                   memory_max_rel_diff=max(((a - b).abs().max() / b.abs().max()).item()
                                           for a, b in zip(got_memory, ref_memory)))
            _, _, _, _, _, v, _, mk, _, _, _, _, M, z, M_next, z_next = inputs
            states = torch.compile(chunk_states)  # (inside the torch path's memory op)
            record(segments, path="memory states: chunk scan (torch)",
                   ms=replay_ms(lambda: states(mk, v, N, "delta", (M_next, z_next))))
            spec = BlockSpec(N, "delta", True, True, D ** -0.5, HKV, "chunk", True)
            for tiles in scan_tiles:  # the window kernel's blocks: the Triton scan
                window_kernel.set_tiles(tiles, SCAN_TILES)
                _compiled_steps.clear()
                torch._dynamo.reset()  # (the tiles are read when _block_memory is compiled)
                record(segments, path="memory states: Triton scan", tiles=tiles, ms=replay_ms(
                    lambda: _compiled_version(_block_memory)(spec, mk, v, M, z, M_next, z_next)))
            window_kernel.set_tiles(kept, SCAN_TILES)
        inputs = block_inputs(sizes[0])
        for tiles in filter(None, args.tiles.split(",")):
            window_kernel.set_tiles(tiles)
            torch._dynamo.reset()  # (the tiles are read when whole_segments is compiled)
            _compiled_steps.clear()
            try:
                timed(sizes[0], inputs, True)
            except Exception as error:  # (a tile that does not fit the card's shared memory)
                record(sizes[0], path="window kernel", tiles=tiles, error=str(error)[:200])
    out.close()
    lines = [f"GPU: {gpu}. Blocks of segments of {N} tokens, default model's shapes, bf16.", "",
             "| segments | what | tiles (window: BM x BN x warps x stages; scan: columns x rows x warps) "
             "| ms per block |", "|---|---|---|---|"]
    for r in rows:
        if "ms" in r:
            lines.append(f"| {r['segments']} | {r['path']} | {r.get('tiles') or '-'} | {r['ms']:.3f} |")
    lines.append("")
    for d in (r for r in rows if "max_abs_diff" in r):
        lines.append(f"- {d['segments']} segments: the window kernel's output differs from the torch path's by at most "
                     f"{d['max_abs_diff']:.4f}, {d['mean_abs_diff']:.5f} on average (outputs' mean size "
                     f"{d['mean_abs']:.3f}); the memory after the block by {d['memory_max_rel_diff']:.1e} of its "
                     "largest entry.")
    (args.out / "window_kernel.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

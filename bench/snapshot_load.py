"""Where the time of loading a snapshot from disk goes: the part of a cold question's time
to the first token that a warm one (the snapshot held in memory) does not pay.

    python bench/snapshot_load.py --out OUT/load [--repeats 15]

A state of the default model's shapes (30 memory layers, 512-token windows in bf16, M and
z in fp32: 14.2 MiB on disk), with random values: the time does not depend on them. Each
step is timed alone (best and median of --repeats): reading the file, one sha256 over all
of it (the checksum before the eleventh session, as a rate), the checksum per layer as
files now hold it, `read_state_file` (read, checked, viewed), the file's bytes onto the
GPU, and `MemoryState.load` onto the GPU (onto the CPU where there is none).
Writes OUT/snapshot_load.jsonl and OUT/snapshot_load.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from infini_core.state import LayerState, MemoryState, _checksum, _tensor_parts, read_state_file

LAYERS, KV_HEADS, HEAD_DIM, SEGMENT, SINKS = 30, 3, 64, 512, 4  # the default model's


def made_up_state() -> MemoryState:
    g = torch.Generator().manual_seed(0)

    def rand(*shape, dtype=torch.float32):
        return torch.rand(shape, generator=g).to(dtype)

    layers = [LayerState(M=rand(1, KV_HEADS, HEAD_DIM, HEAD_DIM), z=rand(1, KV_HEADS, HEAD_DIM),
                         M_next=rand(1, KV_HEADS, HEAD_DIM, HEAD_DIM), z_next=rand(1, KV_HEADS, HEAD_DIM),
                         sink_k=rand(1, KV_HEADS, SINKS, HEAD_DIM, dtype=torch.bfloat16),
                         sink_v=rand(1, KV_HEADS, SINKS, HEAD_DIM, dtype=torch.bfloat16),
                         win_k=rand(1, KV_HEADS, SEGMENT, HEAD_DIM, dtype=torch.bfloat16),
                         win_v=rand(1, KV_HEADS, SEGMENT, HEAD_DIM, dtype=torch.bfloat16))
              for _ in range(LAYERS)]
    fingerprint = {"architecture": "LlamaForCausalLM", "weights": "random", "adapter": None,
                   "conversion": {"segment_len": SEGMENT, "sink_tokens": SINKS}}
    return MemoryState(layers, fingerprint, tokens=20 * SEGMENT + 100, pending=list(range(100)))


def timed(fn, repeats: int, cuda: bool) -> tuple[float, float]:
    """(best, median) milliseconds of fn()."""
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return min(times), statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    machine = torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()})"
    state = made_up_state()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "state.infini"
        state.save(path)
        data = path.read_bytes()
        meta, tensors = read_state_file(path)
        parts = _tensor_parts(tensors)
        blob = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        steps = {
            "read the file": lambda: path.read_bytes(),
            "sha256 of the whole file, one stream": lambda: hashlib.sha256(data).digest(),
            "checksum per layer": lambda: _checksum(parts, meta),
            "read_state_file (read, checked, viewed)": lambda: read_state_file(path),
            **({"the file's bytes onto the GPU": lambda: blob.to(device)} if cuda else {}),
            f"MemoryState.load onto the {device.upper()}":
                lambda: MemoryState.load(path, state.fingerprint, device=device, dtype=torch.bfloat16),
        }
        rows = []
        for step, fn in steps.items():
            fn()  # (first use: allocations, the checksum's threads)
            best, median = timed(fn, args.repeats, cuda)
            rows.append({"step": step, "best_ms": best, "median_ms": median, "mib": len(data) / 2**20,
                         "machine": machine, "cpus": os.cpu_count(), "torch": torch.__version__})
    with open(args.out / "snapshot_load.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    lines = [f"{machine}, {os.cpu_count()} CPUs: a {rows[0]['mib']:.1f} MiB snapshot of the default model's shapes, "
             f"best / median of {args.repeats}.", "", "| step | ms |", "|---|---|"]
    lines += [f"| {r['step']} | {r['best_ms']:.1f} / {r['median_ms']:.1f} |" for r in rows]
    (args.out / "snapshot_load.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

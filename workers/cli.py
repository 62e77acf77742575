"""`infini`: read a book once into a snapshot, then ask it questions, on this machine.

    infini ingest BOOK.pdf -o book.infini     read a PDF, TXT or EPUB (progress, tokens/s, ETA)
    infini ask book.infini "question"         stream an answer from the snapshot
    infini info book.infini                   tokens, size, model, checksum

`ingest` also writes book.infini.index.zip (the passages and their pages); `ask` puts the
passages that best match the question in front of it and prints the pages it cited.
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from pathlib import Path

EXIT_ERROR = 1


def _load(args, source: dict | None = None, conversion: dict | None = None):
    from transformers.utils import logging as hf_logging

    from infini_core import InfiniConfig
    from infini_core.loading import DEFAULT_MODEL, load_model

    hf_logging.disable_progress_bar()  # our own progress bar is the one that matters
    hf_logging.set_verbosity_error()

    source = source or {}
    model = args.model or source.get("model") or DEFAULT_MODEL
    adapter = args.adapter or source.get("adapter", "default")
    return load_model(model, infini=InfiniConfig(**conversion) if conversion else None, adapter=adapter)


def cmd_ingest(args) -> None:
    from tqdm import tqdm

    from infini_core.ingest import ingest
    from infini_core.retrieval import RetrievalIndex
    from storage.parsing import parse_document
    from workers.service import plan_reading

    pages = parse_document(args.document, password=args.password)
    out = Path(args.output or Path(args.document).with_suffix(".infini").name)
    fields = {"segment_len": args.segment_len, "rule": args.rule}
    model = _load(args, conversion={k: v for k, v in fields.items() if v is not None})
    reading = plan_reading(model, pages)  # the same stream and passages as the workers'
    with tqdm(total=len(reading.ids), unit="tok", unit_scale=True, desc=f"reading {Path(args.document).name}",
              disable=args.quiet) as bar:
        state = ingest(model, reading.ids, on_progress=lambda p: bar.update(p.tokens_done - bar.n))
    sha = state.save(out)
    # the passages with their pages, for retrieval at question time, beside the snapshot
    RetrievalIndex(reading.chunks).save(index_path(out))
    print(f"{out}: {state.tokens:,} tokens from {len(pages)} pages, {out.stat().st_size / 2**20:.1f} MiB, "
          f"sha256 {sha[:16]}")


def index_path(snapshot) -> Path:
    return Path(f"{snapshot}.index.zip")


def cmd_ask(args) -> None:
    from infini_core.answer import answer
    from infini_core.state import MemoryState, read_state_file

    import json

    meta, _ = read_state_file(args.snapshot)  # fails early, before the model loads
    made_by = json.loads(meta["fingerprint"])
    model = _load(args, made_by.get("source"), made_by.get("conversion"))
    state = MemoryState.load(args.snapshot, model.fingerprint, device=model.device, dtype=model.lm.dtype)
    passages = []
    if index_path(args.snapshot).exists():
        from infini_core.retrieval import RetrievalIndex, cited_pages, passages_for

        passages = passages_for(RetrievalIndex.load(index_path(args.snapshot)).search(args.question, k=args.passages))
    for piece in answer(model, state, args.question, passages, max_new_tokens=args.max_new_tokens):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if passages:
        print(f"[pages {', '.join(cited_pages(passages))}]")


def cmd_info(args) -> None:
    import json

    from infini_core.state import read_state_file

    meta, tensors = read_state_file(args.snapshot)
    fp = json.loads(meta["fingerprint"])
    conv = fp["conversion"]
    rows = {
        "file": args.snapshot,
        "size": f"{os.path.getsize(args.snapshot) / 2**20:.2f} MiB",
        "tokens": f"{int(meta['tokens']):,}",
        "model": f"{fp['source']['model']} ({fp['architecture']}, weights {fp['weights'][:12]})",
        "adapter": fp["source"]["adapter"] or "none (gates closed: memory unused)",
        "memory": f"{conv['rule']} rule, segments of {conv['segment_len']} tokens, "
                  f"{sum(1 for k in tensors if k.endswith('.M'))} memory layers",
        "dtype": meta.get("dtype", "?"),
        "retrieval": str(index_path(args.snapshot)) if index_path(args.snapshot).exists() else "none",
        "sha256": meta["sha256"],
    }
    width = max(map(len, rows))
    for key, value in rows.items():
        print(f"{key:<{width}}  {value}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="infini", description="Read a document once, answer from its memory.")
    sub = p.add_subparsers(dest="command", required=True)

    def model_options(sp):
        sp.add_argument("--model", help="default model name or a local Hugging Face checkpoint folder")
        sp.add_argument("--adapter", help="memory adapter: a .safetensors file trained for the model, or "
                        "'none' (default: the one shipped with the default model, where there is one)")

    ing = sub.add_parser("ingest", help="read a document (PDF, TXT, EPUB) into a snapshot")
    ing.add_argument("document")
    ing.add_argument("-o", "--output", help="snapshot file (default: DOCUMENT.infini here)")
    ing.add_argument("--password", help="password of an encrypted PDF")
    ing.add_argument("--segment-len", type=int, help="tokens per memory segment")
    ing.add_argument("--rule", choices=["linear", "delta"], help="memory update rule")
    ing.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    model_options(ing)
    ing.set_defaults(run=cmd_ingest)

    ask = sub.add_parser("ask", help="answer a question from a snapshot")
    ask.add_argument("snapshot")
    ask.add_argument("question")
    ask.add_argument("--max-new-tokens", type=int, default=256)
    ask.add_argument("--passages", type=int, default=3, help="retrieved passages put before the question")
    model_options(ask)
    ask.set_defaults(run=cmd_ask)

    # listed for --help; its options belong to infini_core.train, which main() hands them to
    sub.add_parser("train", help="train the memory adapter (a GPU; see `infini train --help`)", add_help=False)

    info = sub.add_parser("info", help="what a snapshot holds")
    info.add_argument("snapshot")
    info.set_defaults(run=cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:
        from infini_core.train import main as train_main

        run = partial(train_main, argv[1:])
    else:
        args = parser().parse_args(argv)
        run = partial(args.run, args)
    from infini_core.loading import ModelLoadError
    from infini_core.state import StateError
    from storage.parsing import DocumentError

    try:
        run()
    except FileNotFoundError as e:
        print(f"infini: error: {e.filename}: no such file", file=sys.stderr)
        return EXIT_ERROR
    except (DocumentError, StateError, ModelLoadError, ValueError) as e:
        print(f"infini: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("infini: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

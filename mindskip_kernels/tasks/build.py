"""Regenerate the local tasks' data (`python mindskip_kernels/tasks/build.py`): prose paragraphs of the Python
standard library's docstrings (Python Software Foundation License), read from the running interpreter's modules.

The shipped JSONL was built with CPython 3.11; another Python version yields other docstrings, so rebuild only on
purpose. Modules are split by name (every 4th sorted module feeds `train`, the few-shot examples; the rest `test`),
and every draw comes from `random.Random(0)`. The router benchmarks tune on `pydoc_data.topics`, not on these.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import random
import re
import sys
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "pydoc_data"}  # side effects / GUI
MIN_WORDS = 30
CHOICE_WORDS = 8  # words per answer of the continuation task
DOCS = {"train": 40, "test": 200}  # documents per split and task (at most)


def paragraphs() -> dict[str, list[str]]:
    """{split: prose paragraphs}: docstring paragraphs of at least MIN_WORDS words without code, joined to one line."""
    warnings.filterwarnings("ignore")
    names = sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and n not in SKIP)
    out: dict[str, list[str]] = {"train": [], "test": []}
    for i, name in enumerate(names):
        try:
            module = importlib.import_module(name)
        except Exception:  # platform-specific or optional modules
            continue
        objects = [module] + [v for k, v in sorted(vars(module).items()) if not k.startswith("_")
                              and (inspect.isfunction(v) or inspect.isclass(v)) and v.__module__ == name]
        for obj in objects:
            for para in re.split(r"\n\s*\n", inspect.getdoc(obj) or ""):
                if any(line.startswith(" ") for line in para.split("\n")) or ">>>" in para or "::" in para:
                    continue
                words = para.split()
                if len(words) >= MIN_WORDS:
                    out["train" if i % 4 == 0 else "test"].append(" ".join(words))
    return out


def continuation_docs(paras: list[str], rng: random.Random) -> list[dict]:
    """Multiple choice: which CHOICE_WORDS words continue the passage (the others come from other paragraphs)."""
    docs = []
    for j, para in enumerate(paras):
        words = para.split()
        cut = rng.randint(20, min(40, len(words) - CHOICE_WORDS))
        gold = " ".join(words[cut : cut + CHOICE_WORDS])
        others = []
        for k in rng.sample([k for k in range(len(paras)) if k != j], 3):
            other = paras[k].split()
            start = rng.randint(0, len(other) - CHOICE_WORDS)
            others.append(" ".join(other[start : start + CHOICE_WORDS]))
        choices = others + [gold]
        rng.shuffle(choices)
        docs.append({"context": " ".join(words[:cut]), "choices": choices, "label": choices.index(gold)})
    return docs


def cloze_docs(paras: list[str]) -> list[dict]:
    """Loglikelihood / generation: the passage up to the last word (alphabetic, 4+ letters, after word 20) that
    already occurred in it, and that word (as LAMBADA picks words the context makes predictable)."""
    docs = []
    for para in paras:
        words = para.split()
        for j in range(len(words) - 1, 19, -1):
            word = words[j].rstrip(".,;:")
            seen = {w.rstrip(".,;:").lower() for w in words[:j]}
            if word.isalpha() and len(word) >= 4 and word.lower() in seen:
                docs.append({"context": " ".join(words[:j]), "target": word})
                break
    return docs


def main() -> None:
    rng = random.Random(0)
    for split, paras in paragraphs().items():
        tasks = {"continuation": continuation_docs(paras, rng), "cloze": cloze_docs(paras)}
        if split == "test":  # no few-shot examples for perplexity
            tasks["rolling"] = [{"text": p} for p in paras]
        for task, docs in tasks.items():
            docs = rng.sample(docs, min(len(docs), DOCS[split]))
            with open(os.path.join(HERE, f"stdlib_{task}.{split}.jsonl"), "w") as f:
                f.writelines(json.dumps(d) + "\n" for d in docs)
            print(f"stdlib_{task}.{split}.jsonl: {len(docs)} documents")


if __name__ == "__main__":
    main()

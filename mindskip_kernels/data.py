"""Router-Tuning data: reading data files, tokenizing them into training items, and batching.

JSON (an array) or JSONL of Alpaca records (`instruction`, optional `input`, `output`; the loss counts the
response tokens only), or plain text (any other extension; split into blocks of `max_length` tokens).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator, Sequence

import torch

Example = dict[str, str] | str
Item = dict[str, torch.Tensor]
Data = str | os.PathLike | Sequence[Example] | Sequence[Item]
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"



def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _alpaca(record: object, where: str) -> dict[str, str]:
    fields = ("instruction", "input", "output")
    ok = (isinstance(record, dict) and all(isinstance(record.get(k), str) for k in ("instruction", "output"))
          and isinstance(record.get("input", ""), str))
    if not ok:
        got = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{where}: expected an Alpaca record with string fields 'instruction' and 'output' "
                         f"(optional 'input'), got {got}")
    return {k: record.get(k, "") for k in fields}


def _json_records(text: str, path: str) -> Iterator[tuple[object, int]]:
    """The elements of a JSON array with the line each starts on."""
    decoder = json.JSONDecoder()
    pos = len(text) - len(text.lstrip())
    if not text.startswith("[", pos):
        raise ValueError(f"{path}:{_line_of(text, pos)}: a .json data file must hold an array of Alpaca records "
                         f"(use .jsonl for one record per line)")
    pos += 1
    while True:
        pos += len(text[pos:]) - len(text[pos:].lstrip())
        if text.startswith("]", pos):
            return
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
        yield record, _line_of(text, pos)
        pos = end + len(text[end:]) - len(text[end:].lstrip())
        if text.startswith(",", pos):
            pos += 1
        elif not text.startswith("]", pos):
            raise ValueError(f"{path}:{_line_of(text, pos)}: invalid JSON: expected ',' or ']' between records")


def read_examples(path: str | os.PathLike) -> list[Example]:
    """Read a data file: `.json` (array) / `.jsonl` Alpaca records as dicts, anything else as one text.

    Errors name the file and line."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path} does not exist")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text ({e.reason})") from None
    ext = os.path.splitext(path)[1].lower()
    if ext == ".jsonl":
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: invalid JSON: {e.msg}") from None
            records.append(_alpaca(record, f"{path}:{n}"))
    elif ext == ".json":
        records = [_alpaca(record, f"{path}:{line}") for record, line in _json_records(text, path)]
    else:
        records = [text] if text.strip() else []
    if not records:
        raise ValueError(f"{path}:1: data file holds no examples")
    return records


def _prompt(example: dict[str, str], tokenizer) -> str:
    """The chat template's user turn when the tokenizer has one, else the Alpaca template."""
    if getattr(tokenizer, "chat_template", None):
        content = example["instruction"] + (f"\n\n{example['input']}" if example["input"] else "")
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    return (ALPACA_PROMPT_INPUT if example["input"] else ALPACA_PROMPT).format(**example)


def tokenize_examples(examples: Sequence[Example], tokenizer, max_length: int = 512) -> list[Item]:
    """Token ids and labels per training item: texts are split into blocks of `max_length` tokens (labels =
    ids); an Alpaca record becomes prompt + response + EOS with the prompt's labels masked (-100). Records
    whose prompt alone fills `max_length` are dropped with a warning."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 tokens, got {max_length}")
    items, dropped = [], 0
    for ex in examples:
        if isinstance(ex, str):
            ids = tokenizer(ex, add_special_tokens=False)["input_ids"]
            for start in range(0, len(ids) - 1, max_length):
                block = torch.tensor(ids[start : start + max_length])
                if block.numel() >= 2:
                    items.append({"input_ids": block, "labels": block.clone()})
            continue
        prompt = tokenizer(_prompt(ex, tokenizer), add_special_tokens=False)["input_ids"]
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        response = tokenizer(ex["output"], add_special_tokens=False)["input_ids"] + eos
        if len(prompt) >= max_length or not response:
            dropped += 1
            continue
        ids = torch.tensor((prompt + response)[:max_length])
        labels = ids.clone()
        labels[: len(prompt)] = -100
        items.append({"input_ids": ids, "labels": labels})
    if dropped:
        warnings.warn(f"dropped {dropped} records whose prompt fills max_length={max_length} tokens", stacklevel=2)
    if not items:
        raise ValueError("data yields no training items (every text is shorter than 2 tokens or every prompt "
                         "fills max_length)")
    return items


def collate(items: Sequence[Item], pad_id: int = 0) -> Item:
    """Right-pad a list of items into a batch with `attention_mask` (padding labels are -100)."""
    n = max(it["input_ids"].numel() for it in items)
    batch = {"input_ids": torch.full((len(items), n), pad_id, dtype=torch.long),
             "labels": torch.full((len(items), n), -100, dtype=torch.long),
             "attention_mask": torch.zeros(len(items), n, dtype=torch.long)}
    for b, it in enumerate(items):
        m = it["input_ids"].numel()
        batch["input_ids"][b, :m], batch["labels"][b, :m], batch["attention_mask"][b, :m] = (
            it["input_ids"], it["labels"], 1)
    return batch


def as_items(data: Data, tokenizer, max_length: int) -> list[Item]:
    """Training/evaluation items from a data file, raw examples, or items already tokenized."""
    if isinstance(data, (str, os.PathLike)):
        data = read_examples(data)
    data = list(data)
    if data and isinstance(data[0], dict) and "input_ids" in data[0]:
        return data
    if tokenizer is None:
        raise ValueError("tokenizer is required when data is a file or raw examples (not tokenized items)")
    return tokenize_examples(data, tokenizer, max_length)

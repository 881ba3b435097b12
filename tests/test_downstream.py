"""lm-evaluation-harness on the local tasks (mindskip_kernels/tasks), checked against the model called directly.

The harness (through `evaluate_tasks`) scores right-padded batches; the independent computation here builds the
same (context, continuation) token rows the harness defines (the pair's whole encoding, split after the context's
tokens), runs them LEFT-padded with an attention mask and position ids, and recomputes accuracy, perplexity and
the keep rate of the routed layers from the loglikelihoods. Dense, token-routed and sequence-routed tiny Llamas;
generation is compared with a cache-free greedy recompute (the harness generates left-padded through the
MindSkipCache).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("lm_eval")

import mindskip_kernels as mk  # noqa: E402
from mindskip_kernels.downstream import TASKS_DIR, compare_tasks, evaluate_tasks, task_manager, task_table  # noqa: E402
from mindskip_kernels.integrations.hf import load_model, mindskip_layers, record_routing  # noqa: E402
from mindskip_kernels.tuning import calibrate  # noqa: E402
from tests.models import ROOT, randomize_routers, tiny_llama  # noqa: E402

TASKS = ["stdlib_continuation", "stdlib_cloze", "stdlib_cloze_gen", "stdlib_rolling"]
LIMIT = {"stdlib_continuation": 6, "stdlib_cloze": 6, "stdlib_cloze_gen": 4, "stdlib_rolling": 3}
MAX_LENGTH = 512  # no request is cut: the rows here are < 300 tokens
STOP = ["\n", ".", ",", ";", ":"]  # stdlib_cloze_gen.yaml's `until`
GEN_TOKENS = 6  # its max_gen_toks


def _docs(task: str) -> list[dict]:
    name = {"stdlib_cloze_gen": "stdlib_cloze"}.get(task, task)
    with open(os.path.join(TASKS_DIR, f"{name}.test.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def tok():
    """A byte-level BPE tokenizer trained on the task texts (short rows: fast tests)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [json.dumps(d) for task in ("stdlib_continuation", "stdlib_cloze", "stdlib_rolling") for d in _docs(task)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1024, special_tokens=["<pad>", "<eos>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", pad_token="<pad>")


@pytest.fixture(scope="module")
def manager():
    return task_manager(tasks=TASKS)


def _model(tok, routing: str) -> torch.nn.Module:
    """dense, or routers on layers 1-2 (random, calibrated to keep about 60 %) at token or sequence granularity."""
    model = tiny_llama(len(tok))
    model.generation_config.eos_token_id = None  # generate exactly max_gen_toks, like the recompute
    if routing == "dense":
        return model
    mk.apply_mindskip(model, layers=[1, 2], granularity=routing)
    randomize_routers(model)
    calibrate(model, [d["context"] for d in _docs("stdlib_cloze")[10:30]], 0.6, tok, progress=False)
    return model


@pytest.fixture(scope="module", params=["dense", "token", "sequence"])
def run(request, tok, manager):
    """(model, routing, the harness's TaskResult with samples) for each model: every task in one harness run,
    batch size 3 (odd: batches of mixed lengths)."""
    model = _model(tok, request.param)
    result = {task: evaluate_tasks(model, tok, [task], limit=LIMIT[task], batch_size=3, max_length=MAX_LENGTH,
                                   log_samples=True, manager=manager) for task in TASKS}
    return model, request.param, result


# ---- the independent computation ------------------------------------------------------------------------------

def _row(tok, context: str, continuation: str) -> tuple[list[int], int]:
    """The harness's request: the pair's whole encoding and how many of its last tokens are the continuation."""
    whole, ctx = tok.encode(context + continuation), tok.encode(context)
    return whole, len(whole) - len(ctx)


@torch.no_grad()
def direct(model, rows: list[tuple[list[int], int]], batch_size: int = 5) -> tuple[list[tuple[float, bool]], float]:
    """(loglikelihood of the continuation, is it greedy) per row, and the routed layers' mean keep rate (nan when
    dense): the model called on the rows' inputs (all tokens but the last) left-padded, with mask and positions."""
    out, routed = [], bool(mindskip_layers(model))
    with record_routing(model) if routed else contextlib.nullcontext() as rec:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            width = max(len(w) - 1 for w, _ in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for b, (whole, _) in enumerate(chunk):
                ids[b, width - len(whole) + 1 :] = torch.tensor(whole[:-1])
                mask[b, width - len(whole) + 1 :] = 1
            pos = (mask.cumsum(-1) - 1).clamp_min(0)
            logp = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits.log_softmax(-1)
            for b, (whole, k) in enumerate(chunk):
                target = torch.tensor(whole[-k:])
                scored = logp[b, width - k :]
                out.append((float(scored.gather(-1, target[:, None]).sum()), bool((scored.argmax(-1) == target).all())))
    rates = rec.keep_rates() if routed else {}
    return out, sum(rates.values()) / len(rates) if rates else math.nan


def _samples(result, task: str) -> list[dict]:
    samples = sorted(result.samples[task], key=lambda s: s["doc_id"])
    assert [s["doc"] for s in samples] == _docs(task)[: LIMIT[task]], "the harness took the first documents"
    return samples


# ---- accuracy, perplexity, keep rate ---------------------------------------------------------------------------

class TestLoglikelihoodTasks:
    def test_multiple_choice_accuracy_is_the_direct_computation(self, run, tok):
        model, routing, result = run
        docs = _docs("stdlib_continuation")[: LIMIT["stdlib_continuation"]]
        rows = [_row(tok, d["context"], " " + c) for d in docs for c in d["choices"]]
        scores, keep = direct(model, rows)
        lls = [[scores[4 * i + j][0] for j in range(4)] for i in range(len(docs))]
        for sample, ll in zip(_samples(result["stdlib_continuation"], "stdlib_continuation"), lls, strict=True):
            assert [r[0][0] for r in sample["resps"]] == pytest.approx(ll, abs=2e-4)
        acc = sum(max(range(4), key=ll.__getitem__) == d["label"] for ll, d in zip(lls, docs, strict=True))
        norm = sum(max(range(4), key=lambda j, ll=ll, d=d: ll[j] / len(d["choices"][j])) == d["label"]
                   for ll, d in zip(lls, docs, strict=True))
        metrics = result["stdlib_continuation"].metrics["stdlib_continuation"]
        assert metrics["acc,none"] == pytest.approx(acc / len(docs))
        assert metrics["acc_norm,none"] == pytest.approx(norm / len(docs))
        assert len({max(range(4), key=ll.__getitem__) for ll in lls}) > 1, "the model picks different answers"
        if routing == "dense":
            assert result["stdlib_continuation"].keep_rate is None
        else:  # every request is one row (no two choices share all but their last token): the same tokens routed
            assert 0.3 < keep < 0.9
            assert result["stdlib_continuation"].keep_rate == pytest.approx(keep, abs=1e-9)

    def test_cloze_perplexity_and_greedy_accuracy(self, run, tok):
        model, _, result = run
        docs = _docs("stdlib_cloze")[: LIMIT["stdlib_cloze"]]
        scores, _ = direct(model, [_row(tok, d["context"], " " + d["target"]) for d in docs])
        for sample, (ll, greedy) in zip(_samples(result["stdlib_cloze"], "stdlib_cloze"), scores, strict=True):
            assert sample["resps"][0][0][0] == pytest.approx(ll, abs=2e-4)
            assert sample["resps"][0][0][1] == greedy
        metrics = result["stdlib_cloze"].metrics["stdlib_cloze"]
        assert metrics["perplexity,none"] == pytest.approx(math.exp(-sum(s[0] for s in scores) / len(docs)),
                                                           rel=1e-3)
        assert metrics["acc,none"] == pytest.approx(sum(s[1] for s in scores) / len(docs))

    def test_rolling_loglikelihood_of_whole_paragraphs(self, run, tok):
        """loglikelihood_rolling: one window per paragraph here, [eos] + its tokens, every token scored."""
        model, _, result = run
        docs = _docs("stdlib_rolling")[: LIMIT["stdlib_rolling"]]
        rows = [([tok.eos_token_id, *tok.encode(d["text"])], len(tok.encode(d["text"]))) for d in docs]
        scores, _ = direct(model, rows)
        for sample, (ll, _) in zip(_samples(result["stdlib_rolling"], "stdlib_rolling"), scores, strict=True):
            assert sample["resps"][0][0] == pytest.approx(ll, rel=1e-5)
        words = sum(len(re.split(r"\s+", d["text"])) for d in docs)
        metrics = result["stdlib_rolling"].metrics["stdlib_rolling"]
        assert metrics["word_perplexity,none"] == pytest.approx(math.exp(-sum(s[0] for s in scores) / words), rel=1e-4)


class TestGeneration:
    def test_generations_are_the_cache_free_greedy_recompute(self, run, tok):
        """The harness generates left-padded batches through the model's cache (a MindSkipCache when routed):
        the text equals greedy decoding by full recomputation, one sequence at a time, cut at the stop strings."""
        model, _, result = run
        samples = _samples(result["stdlib_cloze_gen"], "stdlib_cloze_gen")
        for sample in samples:
            ids = torch.tensor([tok.encode(sample["doc"]["context"])])
            with torch.no_grad():
                for _ in range(GEN_TOKENS):
                    nxt = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
                    ids = torch.cat([ids, nxt], 1)
            text = tok.decode(ids[0, -GEN_TOKENS:], skip_special_tokens=True)
            for stop in STOP:
                text = text.split(stop)[0]
            assert sample["resps"][0][0] == text
        assert len({s["resps"][0][0] for s in samples}) > 1, "distinct generations"


class TestBatching:
    def test_loglikelihoods_do_not_depend_on_the_batch(self, tok, manager):
        """A sequence router averages its sequence's real tokens: with the batch's padding in that mean (HFLM's
        own forward passes no mask) a request's score would change with what it is batched with."""
        model = _model(tok, "sequence")
        one, many = (evaluate_tasks(model, tok, ["stdlib_continuation"], limit=5, batch_size=b, max_length=MAX_LENGTH,
                                    log_samples=True, manager=manager) for b in (1, 7))
        for a, b in zip(one.samples["stdlib_continuation"], many.samples["stdlib_continuation"], strict=True):
            assert [r[0][0] for r in a["resps"]] == pytest.approx([r[0][0] for r in b["resps"]], abs=1e-4)
        assert one.keep_rate == pytest.approx(many.keep_rate, abs=1e-9)


# ---- the table, errors -----------------------------------------------------------------------------------------

def test_compare_and_table(tok, manager):
    dense = _model(tok, "dense")
    routed = _model(tok, "token")
    results = compare_tasks({"dense": dense, "mindskip": routed}, tok, ["stdlib_cloze"], limit=3,
                            max_length=MAX_LENGTH, manager=manager)
    table = task_table(results, reference="dense")
    lines = table.splitlines()
    assert [c.strip() for c in lines[0].split("|")[1:-1]] == ["task", "metric", "dense", "mindskip", "mindskip - dense"]
    ppl = {n: r.metrics["stdlib_cloze"]["perplexity,none"] for n, r in results.items()}
    row = next(line for line in lines if "| perplexity" in line)
    assert f"{ppl['mindskip'] - ppl['dense']:+.4f}" in row
    assert "keep rate (task data)" in table and f"{results['mindskip'].keep_rate:.3f}" in table


def test_bad_tasks_name_the_problem(tok, tmp_path, manager):
    with pytest.raises(ValueError, match=r"unknown task\(s\) no_such_task: .*stdlib_continuation"):
        evaluate_tasks(tiny_llama(len(tok)), tok, ["stdlib_cloze", "no_such_task"], manager=manager)
    with pytest.raises(FileNotFoundError, match="include_path .*missing is not a directory"):
        task_manager(tmp_path / "missing")
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        evaluate_tasks(tiny_llama(len(tok)), tok, ["stdlib_cloze"], batch_size=0, manager=manager)


def test_missing_harness_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ImportError, match=r'pip install "mindskip_kernels\[eval\]"'):
        task_manager()


# ---- the command (the CI smoke) --------------------------------------------------------------------------------

def test_cli_eval_tasks_with_dense_and_attention_drop(tmp_path, saved_model):
    """`mindskip eval --tasks ... --compare dense,attention-drop --out`: one table with every model, agreement
    next to perplexity, and the JSON report (the README's command on a tiny model, offline)."""
    model, _ = load_model(saved_model)
    mk.apply_mindskip(model, layers=[1, 2])
    randomize_routers(model)
    mk.save_routers(model, tmp_path / "routers")
    held = tmp_path / "held.txt"
    held.write_text(" ".join(d["context"] for d in _docs("stdlib_cloze")[:10]))
    out = tmp_path / "res.json"
    proc = subprocess.run([sys.executable, "-m", "mindskip_kernels", "eval", "--model", str(saved_model), "--routers",
                           str(tmp_path / "routers"), "--data", str(held), "--max-length", "64", "--tasks",
                           "stdlib_continuation,stdlib_cloze_gen", "--limit", "3", "--compare",
                           "dense,attention-drop", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "top-1 agree" in proc.stdout and "| stdlib_continuation" in proc.stdout
    assert "attention drop - dense" in proc.stdout and "keep rate (task data)" in proc.stdout
    report = json.loads(out.read_text())
    assert set(report["tasks"]["results"]) == set(report["held_out"]) == {"dense", "mindskip", "attention drop"}
    for name in ("mindskip", "attention drop"):
        assert 0.0 <= report["held_out"][name]["top1_agreement"] <= 1.0 and report["held_out"][name]["kl"] > 0.0
    assert len(report["dropped_layers"]) == round(2 * (1 - report["held_out"]["mindskip"]["keep_rate"]))
    drop = report["tasks"]["results"]["attention drop"]
    assert set(drop["metrics"]) == {"stdlib_continuation", "stdlib_cloze_gen"} and drop["keep_rate"] is None


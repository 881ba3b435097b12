"""Router-Tuning on a tiny random Llama: training moves only the routers, data files, the CLI end to end, and
DDP with 2 CPU processes under torchrun."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

import mindskip_kernels as mk
from mindskip_kernels.data import collate, read_examples, tokenize_examples
from mindskip_kernels.integrations.hf import mindskip_layers
from mindskip_kernels.tuning import calibrate, evaluate, keep_threshold, router_tune
from tests.models import RECORDS, TEXT, randomize_routers, run_script, tiny_llama


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices on a shared machine: more threads only oversubscribe the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_read_examples_formats(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS[:2]) + "\n\n")
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": "i", "output": "o"}], indent=1))
    (tmp_path / "a.txt").write_text(TEXT)
    assert read_examples(tmp_path / "a.jsonl") == RECORDS[:2]
    assert read_examples(tmp_path / "a.json") == [{"instruction": "i", "input": "", "output": "o"}]
    assert read_examples(tmp_path / "a.txt") == [TEXT]


@pytest.mark.parametrize("name, content, line", [
    ("bad.jsonl", '{"instruction": "a", "output": "b"}\n\n{"instruction": "a", "output": \n', 3),
    ("bad.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a", "response": "b"}\n', 2),
    ("bad.json", '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a"}\n]', 3),
    ("bad.json", '[\n  {"instruction": "a", "output": "b"}\n  {"instruction": "a"}\n]', 3),
    ("bad.json", '{"instruction": "a", "output": "b"}', 1),
    ("bad.txt", b"fine\nstill fine\n\xff\xfe broken\n", 3),
    ("empty.txt", "  \n", 1),
])
def test_bad_data_files_name_file_and_line(tmp_path, name, content, line):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=f"{name}:{line}: "):
        read_examples(path)


def test_instruction_loss_is_masked_to_the_response(tokenizer):
    item, = tokenize_examples(RECORDS[:1], tokenizer, max_length=64)
    prompt = tokenizer("### Instruction:\nRepeat the word\n\n### Input:\nfox\n\n### Response:\n",
                       add_special_tokens=False)["input_ids"]
    assert item["input_ids"][: len(prompt)].tolist() == prompt
    assert (item["labels"][: len(prompt)] == -100).all()
    assert item["labels"][len(prompt):].tolist() == item["input_ids"][len(prompt):].tolist()
    assert item["input_ids"][-1] == tokenizer.eos_token_id
    blocks = tokenize_examples([TEXT], tokenizer, max_length=32)
    assert len(blocks) > 1 and all(b["input_ids"].numel() <= 32 for b in blocks)
    batch = collate(blocks[-2:], pad_id=tokenizer.pad_token_id)
    assert batch["attention_mask"].sum() == sum(b["input_ids"].numel() for b in blocks[-2:])


def test_router_tune_moves_only_routers_and_calibrates_the_keep_rate(tokenizer):
    model = tiny_llama(len(tokenizer))
    mk.apply_mindskip(model, backend="reference")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    items = tokenize_examples([TEXT], tokenizer, max_length=24)
    history = router_tune(model, items, keep=0.5, steps=30, batch_size=4, lr=1e-2, calibration_items=8,
                          progress=False)
    assert [h["step"] for h in history] == list(range(1, 31))
    assert history[0]["keep_rate"] == 1.0, "zero routers score 0.5 = threshold: every token starts kept"
    assert abs(sum(h["keep_rate"] for h in history[-10:]) / 10 - 0.5) < 0.15, "training follows the keep rate"
    assert history[-1]["lr"] == pytest.approx(0.0, abs=1e-12), "cosine schedule ends at zero"
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"model.layers.{i}.router.weight" for i in (1, 2)}
    assert not model.training and not any(p.requires_grad != (".router." not in n) for n, p in
                                          model.named_parameters() if ".router." not in n)
    thresholds = {layer.mindskip.threshold for layer in mindskip_layers(model).values()}
    assert len(thresholds) == 1, "one global threshold across the routed layers"
    assert abs(evaluate(model, items[:8]).keep_rate - 0.5) <= 0.03, "calibrated on the first 8 items"


def test_paper_rule_with_sparsity_reproduces_the_paper_setting(tokenizer):
    """rule="paper", keep=None: the threshold stays 0.5 and the sparsity term alone pushes layers to skip."""
    model = tiny_llama(len(tokenizer))
    mk.apply_mindskip(model, backend="reference")
    items = tokenize_examples([TEXT], tokenizer, max_length=24)
    history = router_tune(model, items, keep=None, rule="paper", steps=20, batch_size=4, lr=1e-2,
                          sparsity_weight=0.5, progress=False)
    assert all(h["threshold"] == 0.5 for h in history)
    assert history[-1]["keep_rate"] < 0.9, history
    assert all(layer.mindskip.rule == "paper" for layer in mindskip_layers(model).values())


@pytest.mark.parametrize("keep", [0.875, 0.5, 0.25])
def test_calibrate_hits_the_keep_rate_with_one_threshold(tokenizer, keep):
    model = tiny_llama(len(tokenizer), seed=2)
    mk.apply_mindskip(model, backend="reference")
    randomize_routers(model)
    items = tokenize_examples([TEXT], tokenizer, max_length=24)
    result = calibrate(model, items, keep, progress=False)
    assert abs(result.keep_rate - keep) <= 0.03
    assert {layer.mindskip.threshold for layer in mindskip_layers(model).values()} == {result.threshold}
    assert evaluate(model, items).keep_rate == pytest.approx(result.keep_rate)
    with pytest.raises(ValueError, match="keep must be"):
        calibrate(model, items, 0.0)


def test_keep_threshold_quantile():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.3])
    assert keep_threshold(scores, 0.4) == pytest.approx(0.7)
    assert keep_threshold(scores, 1.0) == pytest.approx(0.1)
    assert (scores >= keep_threshold(scores, 0.01)).sum() == 0
    with pytest.raises(ValueError, match="no router scores"):
        keep_threshold(torch.zeros(0), 0.5)


def test_router_tune_bf16_and_grad_accum_and_arguments(tokenizer):
    model = tiny_llama(len(tokenizer))
    mk.apply_mindskip(model, backend="reference")
    history = router_tune(model, RECORDS, tokenizer, steps=2, batch_size=2, grad_accum=2, lr=1e-2,
                          target_capacity=0.3, sparsity_weight=0.1, precision="bf16", progress=False)
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    with pytest.raises(ValueError, match="precision"):
        router_tune(model, RECORDS, tokenizer, precision="fp8")
    with pytest.raises(ValueError, match="target_capacity"):
        router_tune(model, RECORDS, tokenizer, target_capacity=1.5)
    with pytest.raises(ValueError, match="keep must be"):
        router_tune(model, RECORDS, tokenizer, keep=1.5)
    with pytest.raises(ValueError, match="rule must be"):
        router_tune(model, RECORDS, tokenizer, rule="mod")
    with pytest.raises(ValueError, match="tokenizer is required"):
        router_tune(model, RECORDS)
    with pytest.raises(ValueError, match="apply_mindskip"):
        router_tune(tiny_llama(len(tokenizer)), RECORDS, tokenizer)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_load_routers_from_paper_state_dict(tmp_path, fmt):
    from safetensors.torch import save_file

    weights = {f"model.layers.{i}.router.weight": torch.randn(1, 48) for i in (0, 2)}
    state = {**weights, "model.embed_tokens.weight": torch.randn(97, 48)}  # other keys are ignored
    path = tmp_path / f"routers.{fmt}"
    save_file(state, path) if fmt == "safetensors" else torch.save(state, path)
    model = tiny_llama(97)
    mk.load_routers(model, path, backend="reference")
    layers = mindskip_layers(model)
    assert set(layers) == {0, 2} and layers[0].mindskip.threshold == 0.5
    for i, layer in layers.items():
        assert torch.equal(layer.router.weight, weights[f"model.layers.{i}.router.weight"])
    save_file({"lm_head.weight": torch.randn(2, 2)}, tmp_path / "none.safetensors")
    with pytest.raises(ValueError, match="none.safetensors holds no"):
        mk.load_routers(tiny_llama(97), tmp_path / "none.safetensors")


def test_cli_tune_calibrate_export_eval(tmp_path, saved_model, capsys):
    from mindskip_kernels.cli import main

    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in RECORDS))
    held = tmp_path / "held.txt"
    held.write_text(TEXT)
    out = tmp_path / "run"
    main(["tune", "--model", str(saved_model), "--data", str(data), "--layers", "2", "--steps", "3", "--keep", "0.5",
          "--lr", "1e-2", "--batch-size", "2", "--backend", "reference", "--out", str(out)])
    assert {"routers.safetensors", "mindskip.json", "train_log.csv", "train_curve.png"} <= set(os.listdir(out))
    meta = json.loads((out / "mindskip.json").read_text())
    assert meta["layers"] == [1, 2] and meta["tuning"]["keep"] == 0.5 and meta["tuning"]["rule"] == "every_token"
    assert (out / "train_log.csv").read_text().splitlines()[0] == "step,lr,loss,lm_loss,keep_rate,threshold"

    recal = tmp_path / "recal"
    main(["calibrate", "--model", str(saved_model), "--routers", str(out), "--data", str(held), "--keep", "0.75",
          "--max-length", "32", "--backend", "reference", "--out", str(recal)])
    meta2 = json.loads((recal / "mindskip.json").read_text())
    assert abs(meta2["tuning"]["calibration_keep"] - 0.75) <= 0.03 and meta2["threshold"] != meta["threshold"]
    from mindskip_kernels.integrations.hf import load_model

    model, tok = load_model(saved_model)
    mk.load_routers(model, recal, backend="reference")
    items = tokenize_examples([TEXT], tok, max_length=32)
    assert evaluate(model, items).keep_rate == pytest.approx(meta2["tuning"]["calibration_keep"])

    layers_file = tmp_path / "layers.json"
    main(["export-layers", "--model", str(saved_model), "--routers", str(recal), "--data", str(held), "--n", "1",
          "--max-length", "32", "--backend", "reference", "--out", str(layers_file)])
    exported = json.loads(layers_file.read_text())
    assert exported["target"] == "attention" and set(exported["learned_keep_rates"]) == {"1", "2"}
    low = min(exported["learned_keep_rates"], key=exported["learned_keep_rates"].get)
    assert exported["drop"] == [int(low)]
    capsys.readouterr()
    for what in (["--routers", str(recal)], ["--drop-layers", str(layers_file)]):
        main(["eval", "--model", str(saved_model), *what, "--data", str(held), "--max-length", "32",
              "--backend", "reference"])
        report = capsys.readouterr().out
        assert "perplexity" in report and "speed vs dense" in report
    assert "dropped" in report


def test_torchrun_two_cpu_processes(tmp_path, saved_model):
    """DDP over gloo: each rank reads its own shard, yet the all-reduced router updates stay identical."""
    data = tmp_path / "train.txt"
    data.write_text(TEXT)
    run_script(tmp_path / "ddp.py", f"""
        import os, torch
        import mindskip_kernels as mk
        from mindskip_kernels.integrations.hf import load_model
        from mindskip_kernels.tuning import router_tune
        model, tok = load_model({str(saved_model)!r})
        mk.apply_mindskip(model, backend="reference")
        with torch.no_grad():  # layer 1 keeps no token: under the paper rule its router gets no gradient
            model.model.layers[1].router.weight.copy_(-100 * model.model.layers[1].input_layernorm.weight)
        history = router_tune(model, {str(data)!r}, tok, keep=None, rule="paper", steps=3, batch_size=2,
                              max_length=24, lr=1e-2, sparsity_weight=0.5, progress=False)
        tuned = router_tune(model, {str(data)!r}, tok, keep=0.5, steps=2, batch_size=2, max_length=24,
                            lr=1e-2, progress=False)
        history = history + tuned + [model.model.layers[2].mindskip.threshold]
        routers = {{n: p for n, p in model.state_dict().items() if ".router." in n}}
        torch.save((routers, history), os.path.join({str(tmp_path)!r}, f"rank{{os.environ['RANK']}}.pt"))
        torch.distributed.destroy_process_group()
    """, nproc=2)
    (r0, h0), (r1, h1) = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert h0 == h1, "logged losses are all-reduced means, the same on both ranks"
    for name in r0:
        assert torch.equal(r0[name], r1[name]), name
        assert r0[name].abs().sum() > 0, f"{name} did not train"


def test_cli_export_layers_of_the_block_target_and_eval(tmp_path, saved_model, capsys):
    from mindskip_kernels.cli import main
    from mindskip_kernels.integrations.hf import load_model

    model, _ = load_model(saved_model)
    mk.apply_mindskip(model, target="block", backend="reference")
    mk.save_routers(model, tmp_path / "block")
    held = tmp_path / "held.txt"
    held.write_text(TEXT)
    layers_file = tmp_path / "layers.json"
    main(["export-layers", "--model", str(saved_model), "--routers", str(tmp_path / "block"), "--data",
          str(held), "--n", "1", "--max-length", "32", "--out", str(layers_file)])
    exported = json.loads(layers_file.read_text())
    assert exported["target"] == "block" and len(exported["drop"]) == 1
    for name, spec in (("old", {"drop_attention": [1]}), ("target", {"target": "ffn", "drop": [1]}),
                       ("drop", {"target": "mlp", "drop": "1"})):
        bad = tmp_path / f"{name}.json"
        bad.write_text(json.dumps(spec))
        capsys.readouterr()
        with pytest.raises(SystemExit, match="2"):  # a usage error: one line on stderr (tests/test_cli_errors.py)
            main(["eval", "--model", str(saved_model), "--drop-layers", str(bad), "--data", str(held)])
        assert re.search(rf"mindskip eval: error: --drop-layers .*{name}.json: expected", capsys.readouterr().err)
    main(["eval", "--model", str(saved_model), "--drop-layers", str(layers_file), "--data", str(held),
          "--max-length", "32"])
    assert "dropped" in capsys.readouterr().out

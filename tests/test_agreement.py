"""Agreement with the dense model: top-1 agreement and KL(dense || model) over the real label tokens, batched and
padded, against a per-item computation written out here (no padding, the formula by hand)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import mindskip_kernels as mk
from mindskip_kernels.agreement import agreement, twin
from mindskip_kernels.data import tokenize_examples
from mindskip_kernels.layer_drop import drop_sublayers
from tests.models import RECORDS, TEXT, randomize_routers, tiny_llama


@pytest.fixture(scope="module")
def items(tokenizer):
    """Alpaca records (prompt tokens unlabelled) and text blocks of different lengths: batches are padded."""
    return tokenize_examples(RECORDS, tokenizer, 64) + tokenize_examples([TEXT[:700]], tokenizer, 24)


@torch.no_grad()
def by_hand(reference, model, items) -> tuple[float, float, int]:
    """(top-1 agreement, mean KL(reference || model), label tokens): one unpadded item at a time; position t
    counts when label t + 1 is real."""
    same, kl, count = 0, 0.0, 0
    for it in items:
        ids = it["input_ids"][None]
        p, q = (m(ids, use_cache=False).logits[0].double().softmax(-1) for m in (reference, model))
        for t in range(ids.shape[1] - 1):
            if it["labels"][t + 1] == -100:
                continue
            same += int(p[t].argmax() == q[t].argmax())
            kl += float((p[t] * (p[t].log() - q[t].log())).sum())
            count += 1
    return same / count, kl / count, count


class TestAgreement:
    def test_routed_and_dropped_models_against_the_per_item_formula(self, tokenizer, items):
        dense = tiny_llama(len(tokenizer))
        routed = mk.apply_mindskip(copy.deepcopy(dense), layers=[1, 2])
        randomize_routers(routed)
        dropped = drop_sublayers(copy.deepcopy(dense), [1], "attention")  # any two models: an Attention-Drop copy
        assert any(-100 in it["labels"] for it in items) and len({it["input_ids"].numel() for it in items}) > 2
        for model in (routed, dropped):
            got = agreement(dense, model, items, batch_size=3, progress=False)
            top1, kl, count = by_hand(dense, model, items)
            assert got.tokens == count
            assert got.top1 == pytest.approx(top1, abs=1e-12)
            assert got.kl == pytest.approx(kl, rel=1e-4)
            assert 0.0 < got.top1 < 1.0 and got.kl > 0.0, "the models differ"

    def test_kl_is_dense_to_model_not_the_reverse(self, tokenizer, items):
        dense = tiny_llama(len(tokenizer))
        dropped = drop_sublayers(copy.deepcopy(dense), [0, 2], "attention")
        forward, backward = (agreement(a, b, items, progress=False).kl for a, b in ((dense, dropped), (dropped, dense)))
        assert forward == pytest.approx(by_hand(dense, dropped, items)[1], rel=1e-4)
        assert abs(forward - backward) > 1e-3 * forward, "KL is asymmetric: the direction is tested"

    def test_a_model_agrees_with_itself(self, tokenizer, items):
        model = tiny_llama(len(tokenizer))
        got = agreement(model, model, items, batch_size=2, progress=False)
        assert got.top1 == 1.0 and got.kl == pytest.approx(0.0, abs=1e-7)

    def test_twin_shares_the_weights_not_the_patch(self, tokenizer):
        """What `mindskip eval` compares: a routed twin of the dense model, which stays dense."""
        dense = tiny_llama(len(tokenizer))
        ids = torch.randint(0, len(tokenizer), (2, 12))
        before = dense(ids).logits
        routed = mk.apply_mindskip(twin(dense), layers=[1, 2])
        randomize_routers(routed)
        assert routed.model.embed_tokens.weight is dense.model.embed_tokens.weight
        assert not any(hasattr(layer, "mindskip") for layer in dense.model.layers)
        assert torch.equal(dense(ids).logits, before) and not torch.allclose(routed(ids).logits, before)

    def test_data_file_and_bad_arguments(self, tokenizer, tmp_path):
        model = tiny_llama(len(tokenizer))
        data = tmp_path / "held.jsonl"
        data.write_text("\n".join(json.dumps(r) for r in RECORDS))
        assert agreement(model, model, data, tokenizer, max_length=64, progress=False).tokens > 0
        with pytest.raises(ValueError, match="batch_size must be positive"):
            agreement(model, model, data, tokenizer, batch_size=0)

"""The kernel tests' shared cases: the low precisions every op runs at, the keep patterns, and the varlen
attention shape tables (forward: ATTN_CASES, backward: ATTN_GRAD_CASES, with query positions: POSITION_CASES), each
(query lengths, key lengths, Hq, Hkv, Dh), the query-position patterns of harness.query_positions, and the cases of
each path the compiled CPU attention kernel dispatches to (DISPATCH_CASES with DISPATCH_MODES, CHUNK_CASES)."""

from __future__ import annotations

import torch

LOW = [torch.float32, torch.float16, torch.bfloat16]
PATTERNS = ["random", "all", "none", "empty_seq"]  # of harness.random_keep

ATTN_CASES = {
    "gqa_9_3_awkward": ([1, 97, 40], [1, 97, 40], 9, 3, 64),
    "long_1025": ([1025], [1025], 4, 2, 64),
    "empty_sequence": ([0, 33, 5], [0, 33, 5], 4, 4, 80),
    "all_empty": ([0, 0], [0, 0], 2, 1, 64),
    "decode_bottom_right": ([1, 1, 1], [0, 1, 57], 8, 2, 128),
    "head_dim_96": ([17, 64], [17, 64], 6, 2, 96),
}

ATTN_GRAD_CASES = {
    "gqa_9_3": ([1, 37, 20], [1, 37, 20], 9, 3, 64),
    "bottom_right": ([1, 3, 5], [0, 9, 70], 4, 2, 80),
    "empty_sequence": ([0, 33], [0, 33], 2, 2, 96),
    "head_dim_128": ([70], [70], 2, 1, 128),
}

# kept queries (often fewer than the keys) against every key of their sequence; the CPU kernel's query block is 64,
# the interpreted Triton kernels' blocks 64 or 128
POSITION_CASES = {
    "gqa_9_3_awkward": ([1, 37, 20], [1, 97, 40], 9, 3, 64),
    "longer_than_blocks": ([150, 3], [300, 5], 4, 2, 64),
    "head_dim_80_empty": ([0, 5, 0], [0, 33, 7], 4, 4, 80),
    "no_keys": ([3, 2], [0, 4], 2, 1, 32),
}
POSITION_PATTERNS = ["kept", "shuffled", "wild", "bottom_right"]

# The compiled CPU kernel's dispatch (csrc/cpu/attention_cpu.cpp): sequences of one length L packed back to back with
# keys == queries (and positions, if any, each query's index once clamped) in one batched call; otherwise per sequence
# one causal call (query t sees keys 0..t), one unmasked call (every query sees the same keys) or zeros (no query sees
# a key); otherwise chunks of 64 queries, masked where a chunk's queries see different numbers of keys. Every case
# runs with every mode of harness.dispatch_positions (causal, not causal, positions == each query's index, the same
# clamped past the end, one position one lower / higher: the batched call refused). (query lengths, key lengths)
DISPATCH_CASES = {
    "equal_5": ([5, 5, 5], [5, 5, 5]),
    "equal_70": ([70, 70, 70], [70, 70, 70]),  # more than one chunk of queries
    "longer_keys_5": ([5, 5, 5], [9, 5, 12]),  # equal query lengths, cu_seqlens_k != cu_seqlens_q
    "longer_keys_70": ([70, 70, 70], [70, 100, 75]),
    "fewer_keys": ([5, 5, 5], [5, 3, 0]),  # early queries see no key; the last sequence has none at all
    "empty_middle_5_10": ([5, 0, 10], [5, 0, 10]),  # as many rows as three sequences of 5
    "empty_middle_70": ([70, 0, 70], [70, 0, 70]),
}
DISPATCH_MODES = ["causal", "not_causal", "index", "index_clamped", "one_lower", "one_higher"]
DISPATCH_HEADS = (6, 2, 80)  # Hq, Hkv (GQA), Dh of the dispatch and chunk cases

# Kept queries in chunks of 64: per sequence (keys, runs of (queries, kind of their positions)), the kinds of
# harness.chunk_positions; runs aligned with the chunks or across their boundaries
CHUNK_CASES = {
    "ragged_same_none": [(200, [(64, "ragged"), (64, "same"), (22, "none")])],  # masked, unmasked, zero chunks
    "runs_across_chunks": [(150, [(40, "same"), (50, "ragged"), (40, "none"), (20, "same")])],
    "shuffled_and_wild": [(140, [(130, "shuffled")]), (9, [(70, "wild")])],
    "sequence_sees_nothing": [(90, [(70, "none")]), (20, [(5, "ragged")]), (10, []), (66, [(66, "index")])],
    "full_and_causal_sequences": [(10, [(3, "all")]), (70, [(70, "index")]), (70, [(70, "same")]), (0, [(4, "all")])],
    "index_one_lower": [(130, [(100, "index"), (1, "lower"), (29, "index")])],
    "full_but_the_rest": [(50, [(1, "all"), (69, "same")])],  # the first query sees every key, the others fewer
}

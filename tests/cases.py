"""The kernel tests' shared cases: the low precisions every op runs at, the keep patterns, and the varlen
attention shape tables (forward: ATTN_CASES, backward: ATTN_GRAD_CASES, with query positions: POSITION_CASES), each
(query lengths, key lengths, Hq, Hkv, Dh), and the query-position patterns of harness.query_positions."""

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

"""The loader the local task YAMLs name (`custom_dataset: !function data.load`): `datasets` resolves relative
`data_files` against the working directory, so the splits are read from this folder instead, wherever the
harness runs."""

from __future__ import annotations

import os

HERE = os.path.dirname(os.path.abspath(__file__))


def load(data_files: dict[str, str], **metadata):
    """The JSONL splits {split: file name in this folder} as a `datasets.DatasetDict` (metadata is unused)."""
    import datasets

    return datasets.load_dataset("json", data_files={s: os.path.join(HERE, f) for s, f in data_files.items()})

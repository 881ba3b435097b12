"""Model loading: a transformers causal LM and its tokenizer from a folder, a hub name or a `.gguf` file."""

from __future__ import annotations

import os

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "spiece.model",
                   "vocab.txt")


def load_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               tokenizer: str | os.PathLike | None = None):
    """(model, tokenizer) from a transformers directory or hub name, or a `.gguf` file (dequantized).

    `tokenizer`: a directory or hub name to take the tokenizer from (default: the model's own), for a model
    folder saved without one; a local folder without tokenizer files is a clear error."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = os.fspath(path)
    kwargs = {}
    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model file {path} does not exist")
        path, kwargs["gguf_file"] = os.path.split(os.path.abspath(path))
    tok_path, tok_kwargs = (path, kwargs) if tokenizer is None else (os.fspath(tokenizer), {})
    if (not tok_kwargs and os.path.isdir(tok_path)
            and not any(os.path.isfile(os.path.join(tok_path, f)) for f in TOKENIZER_FILES)):
        raise ValueError(f"{tok_path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): give one with "
                         f"--tokenizer DIR_OR_HUB_NAME (load_model(..., tokenizer=...) in Python), or save it into "
                         f"the folder with tokenizer.save_pretrained({tok_path!r})")
    tok = AutoTokenizer.from_pretrained(tok_path, **tok_kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).to(device)
    return model.eval(), tok

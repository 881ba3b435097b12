"""The `mindskip` command (also `python -m mindskip_kernels`): one argparse parser with a subcommand each.

Add a subcommand by writing `_name(args) -> int` and registering it in `build_parser`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform

import torch


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _info(args: argparse.Namespace) -> int:
    """Versions, which backends can run here, and how the compiled extension was built."""
    import mindskip_kernels
    from mindskip_kernels.backends import available, compiled

    cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
    print(f"mindskip_kernels {mindskip_kernels.__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__} ({cuda}), "
          f"triton {_version('triton')}, transformers {_version('transformers')}")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none visible"
    print(f"device: {torch.get_num_threads()} CPU threads, GPU {gpu}")
    print("backends: " + ", ".join(f"{name} {'yes' if ok else 'no'}" for name, ok in available().items()))
    info = compiled.build_info()
    if not info["built"]:
        print(f"compiled: not built ({info['error']})")
        return 0
    print(f"compiled: mindskip_kernels._C built against torch {info['torch_version_built']}")
    print("  CPU kernels: yes")
    print(f"  CUDA kernels: {'yes' if info['cuda'] else 'no'}"
          + (f" (archs {info['cuda_archs']})" if info["cuda"] else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mindskip", description="MindSkip dynamic-depth attention tools")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print versions, available backends and how _C was built")
    info.set_defaults(func=_info)
    from mindskip_kernels.tuning import add_commands  # `tune` and `eval` (Router-Tuning)

    add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)

"""The ``flashlite`` command.

* ``flashlite bench [options]`` — validate every backend against the reference, time each
  pattern beside PyTorch SDPA / FlexAttention, print a table, write JSON and plots
  (``flashlite bench --help``; the same as ``python -m flashlite.bench``).
* ``flashlite info`` — versions, the device, and which backends are available (and why not).
* ``flashlite heads MODEL [options]`` — what each attention head of a transformers model does:
  a table, layer × head heatmaps, pooled maps and a JSON (``flashlite heads --help``;
  :mod:`flashlite.heads`).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from typing import Dict, List, Optional, Sequence


def info() -> Dict[str, object]:
    """Versions, device and backends as a dict (what ``flashlite info`` prints)."""
    import torch

    import flashlite

    try:
        import triton

        triton_version: Optional[str] = triton.__version__
    except ImportError:
        triton_version = None
    data: Dict[str, object] = {
        "flashlite": flashlite.__version__,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "cuda_runtime": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cpu_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        devices: List[str] = []
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            devices.append(f"cuda:{index} {props.name} (sm_{props.major}{props.minor}, "
                           f"{props.total_memory / 2**30:.0f} GiB)")
        data["devices"] = devices
    else:
        data["devices"] = [f"cpu ({platform.machine()}, {data['cpu_threads']} threads)"]
    data["backends"] = flashlite.backends()
    return data


def _print_info(as_json: bool) -> int:
    data = info()
    if as_json:
        print(json.dumps(data, indent=1))
        return 0
    for key in ("flashlite", "torch", "triton", "python", "cuda_runtime"):
        print(f"{key:13s} {data[key]}")
    for device in data["devices"]:  # type: ignore[union-attr]
        print(f"{'device':13s} {device}")
    print("backends:")
    for name, state in data["backends"].items():  # type: ignore[union-attr]
        print(f"  {name:10s} {state}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="flashlite", description="flashlite: exact attention kernels for PyTorch")
    sub = parser.add_subparsers(dest="command", metavar="{bench,info,heads}")
    sub.add_parser("bench", add_help=False, help="validate, time beside the peers, table + JSON + plots "
                                                 "(flashlite bench --help)")
    sub.add_parser("heads", add_help=False, help="per-head attention statistics of a transformers model: table, "
                                                 "PNGs, JSON (flashlite heads --help)")
    info_parser = sub.add_parser("info", help="versions, device and available backends")
    info_parser.add_argument("--json", action="store_true", help="print as JSON")
    if args and args[0] == "bench":
        from flashlite.bench.runner import main as bench_main

        return bench_main(args[1:], prog="flashlite bench")
    if args and args[0] == "heads":
        from flashlite.heads.cli import main as heads_main

        return heads_main(args[1:], prog="flashlite heads")
    opts = parser.parse_args(args)
    if opts.command == "info":
        return _print_info(opts.json)
    parser.print_help()
    return 1


if __name__ == "__main__":
    sys.exit(main())

"""``minigpt train CONFIG.yaml [key=value ...]`` (also under ``torchrun --nproc_per_node N -m minigpt.cli``)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

EPILOG = """examples:
  minigpt train configs/minigpt4_stage2.yaml model.llm=/models/vicuna-7b run.batch_size=4
  minigpt train configs/mpp_sft.yaml data.datasets.0.path=llava_instruct.json run.resume=none
  torchrun --nproc_per_node 4 -m minigpt.cli train configs/minigpt4_stage1.yaml
  minigpt train configs/minigpt4qwen.yaml --print-config
"""


def register(subparsers: Any) -> None:
    from ..device import add_device_argument

    parser = subparsers.add_parser(
        "train",
        help="train a model from a YAML config",
        description="Train (or resume) from a YAML config with dotted key=value overrides. Writes checkpoints, "
        "metrics.jsonl and, at the end, OUTPUT_DIR/final (load it with MiniGPT.from_pretrained or minigpt chat).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. run.optimizer.lr=3e-5 run.epochs=2")
    parser.add_argument("--print-config", action="store_true", help="print the validated config and exit")
    parser.add_argument(
        "--no-memory-check",
        action="store_true",
        help="start even when the predicted peak memory exceeds the device's (run.memory_check=false)",
    )
    add_device_argument(
        parser,
        default=None,
        help="auto (cuda, npu, mps, then cpu), cpu, cuda, cuda:N, npu, npu:N or mps; the same as "
        "run.device=DEVICE (default: the config's run.device, auto)",
    )
    parser.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from .config import check_paths, load_config

    overrides = list(args.overrides)
    if getattr(args, "device", None):
        overrides.append(f"run.device={args.device}")
    if getattr(args, "no_memory_check", False):
        overrides.append("run.memory_check=false")
    config = load_config(args.config, overrides)
    if args.print_config:
        import yaml

        check_paths(config)  # as train() does first
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0
    from .launch import train

    result = train(config)
    if result.final_dir is not None:
        print(f"trained {result.step} steps; model written to {result.final_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m minigpt.train.cli CONFIG [overrides]``: the train command on its own (as ``minigpt train``)."""
    import logging

    parser = argparse.ArgumentParser(prog="minigpt")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run_train(args)
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as err:
        print(f"minigpt train: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

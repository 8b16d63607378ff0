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
    parser.set_defaults(func=run_train, unknown_hint=override_hint)


def override_hint(unknown: list[str]) -> str:
    """What to write instead of ``--batch_size 4``: the overrides are ``key=value`` (``run.batch_size=4``)."""
    from .config import keys_named

    examples = []
    for i, token in enumerate(unknown):
        if token.startswith("--"):
            name, sep, value = token[2:].partition("=")
            if not sep:
                value = unknown[i + 1] if i + 1 < len(unknown) and not unknown[i + 1].startswith("-") else "VALUE"
            examples += [f"{key}={value}" for key in keys_named(name.replace("-", "_"))]
    example = " ".join(examples) or "run.batch_size=4"
    return f" (config overrides are KEY=VALUE with a dotted key and no dashes, e.g. {example})"


def run_train(args: argparse.Namespace) -> int:
    from .config import load_config, path_problems

    overrides = list(args.overrides)
    if getattr(args, "device", None):
        overrides.append(f"run.device={args.device}")
    if getattr(args, "no_memory_check", False):
        overrides.append("run.memory_check=false")
    config = load_config(args.config, overrides)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        missing = [f"#   {key}: {problem}" for key, problem in path_problems(config)]
        if missing:  # shown, so a shipped recipe can be read before its data is downloaded
            print("# paths not found (`minigpt train` refuses to start until they exist):", *missing, sep="\n")
        return 0
    from .launch import train

    result = train(config)
    if result.final_dir is not None:
        print(f"trained {result.step} steps; model written to {result.final_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m minigpt.train.cli CONFIG [overrides]``: the train command on its own (as ``minigpt train``)."""
    from ..cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())

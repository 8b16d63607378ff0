"""``minigpt convert ...``: bring files of the original projects (and DeepSpeed runs) into minigpt, and
export minigpt models to plain transformers.

::

    minigpt convert lavis --eva eva_vit_g.pth --blip2 blip2_pretrained_flant5xxl.pth --out vision/
    minigpt convert hf-blip2 blip2-opt-2.7b/ --out vision/
    minigpt convert import-hf blip2-opt-2.7b/ --out blip2-opt/     # the whole BLIP-2 as a model directory
    minigpt convert projector pretrained_minigpt4_7b.pth --out projector.safetensors
    minigpt convert assemble --llm vicuna-7b/ --vision vision/ --projector pretrained_minigpt4_7b.pth \\
        --out minigpt4-7b/
    minigpt convert deepspeed output/run/ --out model/            # ZeRO or pipeline checkpoints
    minigpt convert export-hf model/ --out model-hf/               # Blip2ForConditionalGeneration folder
    minigpt convert apply-delta --base llama-7b/ --delta vicuna-7b-delta-v0/ --target vicuna-7b/
    minigpt convert merge-lora output/run/ --out merged/ [--export-hf merged-hf/]

Every input is read with safetensors or ``torch.load(weights_only=True)``; ``--trust-pickle`` (deepspeed
only) lifts that for files you made yourself. Each command prints what it wrote and a report of the
keys it ignored and anything else worth knowing.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    from ..cli import add_command_group

    sub = add_command_group(
        subparsers,
        "convert",
        help="convert LAVIS / MiniGPT-4 / transformers / DeepSpeed checkpoints; export to transformers",
        description="Convert checkpoints of the original projects into minigpt parts and model directories, "
        "and export a model to a transformers Blip2ForConditionalGeneration folder.",
    )
    _register_lavis(sub)
    _register_hf_blip2(sub)
    _register_import_hf(sub)
    _register_projector(sub)
    _register_assemble(sub)
    _register_deepspeed(sub)
    _register_export_hf(sub)
    _register_apply_delta(sub)
    _register_merge_lora(sub)


def _register_lavis(sub: Any) -> None:
    q = sub.add_parser("lavis", help="LAVIS eva_vit_g.pth + blip2_pretrained*.pth -> vision encoder folder")
    q.add_argument("--eva", required=True, metavar="PTH", help="EVA ViT-g file (eva_vit_g.pth)")
    q.add_argument("--blip2", required=True, metavar="PTH", help="BLIP-2 file (blip2_pretrained_flant5xxl.pth)")
    q.add_argument("--out", "-o", required=True, metavar="DIR", help="vision encoder folder to write")
    _head_arguments(q)
    q.add_argument(
        "--keep-last-block",
        action="store_true",
        help="use every ViT block of the file (BLIP-2 drops the last of eva_vit_g.pth's 40)",
    )
    q.set_defaults(func=_lavis)


def _register_hf_blip2(sub: Any) -> None:
    q = sub.add_parser("hf-blip2", help="transformers BLIP-2 folder (Salesforce/blip2-*) -> vision encoder folder")
    q.add_argument("directory", metavar="DIR", help="folder with config.json and the weights")
    q.add_argument("--out", "-o", required=True, metavar="DIR")
    q.set_defaults(func=_hf_blip2)


def _register_import_hf(sub: Any) -> None:
    q = sub.add_parser(
        "import-hf",
        help="transformers BLIP-2 folder (Salesforce/blip2-*, an export) -> a complete "
        "model directory (chat, eval, train)",
    )
    q.add_argument("directory", metavar="DIR", help="Blip2ForConditionalGeneration folder (config, weights, tokenizer)")
    q.add_argument("--out", "-o", required=True, metavar="MODEL_DIR")
    q.add_argument(
        "--template",
        help="prompt template (default: an export's recorded one, else blip2: transformers' "
        "Blip2Processor layout, the image then the text, which BLIP-2 continues)",
    )
    q.add_argument("--dtype", help="LLM dtype (default: the folder's)")
    q.set_defaults(func=_import_hf)


def _register_projector(sub: Any) -> None:
    q = sub.add_parser(
        "projector",
        help="MiniGPT-4 / MiniGPT4Qwen / MPP layer_00 checkpoint or transformers BLIP-2 "
        "folder -> projector safetensors",
    )
    q.add_argument(
        "checkpoint",
        metavar="CKPT",
        help="llama_proj / llm_proj / visionpipe.llm_proj checkpoint, or a BLIP-2 folder (language_projection)",
    )
    q.add_argument("--out", "-o", required=True, metavar="FILE.safetensors")
    q.set_defaults(func=_projector)


def _register_assemble(sub: Any) -> None:
    q = sub.add_parser(
        "assemble",
        help="LLM + vision folder + projector -> a model directory (chat, eval)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    q.add_argument("--llm", required=True, help="LLM folder or hub id (e.g. Vicuna for MiniGPT-4)")
    q.add_argument(
        "--vision",
        required=True,
        metavar="DIR",
        help="vision encoder folder (convert lavis / hf-blip2) or a transformers BLIP-2 folder",
    )
    q.add_argument("--projector", required=True, metavar="CKPT", help=".safetensors or an original .pth")
    q.add_argument("--projector-type", default="linear", help="linear or mlp2x_gelu")
    q.add_argument(
        "--template",
        help="prompt template of the checkpoint (default: from the checkpoint and the LLM: "
        "chatml for MiniGPT4Qwen llm_proj or a Qwen LLM, llama2 without Q-Former, else vicuna0)",
    )
    q.add_argument("--out", "-o", required=True, metavar="MODEL_DIR")
    q.add_argument("--dtype", default="float32", help="LLM dtype recorded (and used with --full)")
    q.add_argument(
        "--full",
        action="store_true",
        help="copy the LLM and the vision weights in (a self-contained folder); default: reference them "
        "by their path relative to --out",
    )
    q.add_argument("--trust-remote-code", action="store_true", help="allow the LLM's own modelling code")
    q.set_defaults(func=_assemble)


def _register_deepspeed(sub: Any) -> None:
    q = sub.add_parser("deepspeed", help="DeepSpeed ZeRO or pipeline checkpoint -> a model directory")
    q.add_argument(
        "checkpoint",
        metavar="CKPT_DIR",
        help="the save_dir (uses 'latest'), a global_stepN folder, or a training OUTPUT "
        "or OUTPUT/checkpoints/step_N folder",
    )
    q.add_argument("--out", "-o", required=True, metavar="MODEL_DIR")
    q.add_argument("--tag", help="checkpoint tag folder (default: 'latest', else the highest global_stepN)")
    q.add_argument(
        "--config",
        metavar="FILE|DIR",
        help="model config (config.json or a model directory) when the checkpoint records none; pipeline: optional",
    )
    q.add_argument("--llm", help="base LLM (pipeline: required; ZeRO: overrides the recorded one)")
    q.add_argument(
        "--vision",
        metavar="DIR",
        help="vision encoder folder, or a model directory such as the run's final/ (else from the checkpoint)",
    )
    q.add_argument("--template", help="prompt template (pipeline default: chatml)")
    q.add_argument(
        "--with-llm",
        action="store_true",
        help="pipeline: take the LLM weights from the layer files (the LLM was trained)",
    )
    q.add_argument("--fp32", action="store_true", help="ZeRO: rebuild fp32 master weights from the optimizer files")
    _head_arguments(q)
    q.add_argument("--dtype", help="LLM dtype recorded in the model config")
    q.add_argument("--full", action="store_true", help="write every part (a self-contained folder)")
    q.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow the LLM's own modelling code (Qwen(1) bases of MPP-Qwen14B)",
    )
    q.add_argument(
        "--trust-pickle",
        action="store_true",
        help="UNSAFE: load files that need full unpickling (runs code in them); only your own files",
    )
    q.set_defaults(func=_deepspeed)


def _register_export_hf(sub: Any) -> None:
    q = sub.add_parser("export-hf", help="model directory -> transformers Blip2ForConditionalGeneration folder")
    q.add_argument("model", metavar="MODEL_DIR")
    q.add_argument("--out", "-o", required=True, metavar="HF_DIR")
    q.add_argument("--dtype", help="weight dtype (default: the model's LLM dtype); the Q-Former stays float32")
    q.add_argument("--max-shard-size", default="5GB")
    q.set_defaults(func=_export_hf)


def _register_apply_delta(sub: Any) -> None:
    q = sub.add_parser(
        "apply-delta",
        help="LLaMA + a published delta (Vicuna) -> working weights, shard by shard",
        description="target = base + delta, tensor by tensor (FastChat's apply_delta), written one "
        "output shard at a time: peak memory is about --max-shard-size.",
    )
    q.add_argument("--base", required=True, metavar="LLAMA_DIR", help="the original LLaMA in transformers format")
    q.add_argument("--delta", required=True, metavar="DELTA_DIR", help="the delta (e.g. lmsys/vicuna-7b-delta-v0)")
    q.add_argument(
        "--target",
        "--out",
        "-o",
        dest="target",
        required=True,
        metavar="OUT_DIR",
        help="folder to write (new or empty)",
    )
    q.add_argument("--dtype", help="weight dtype written (default: the delta's, float16 for Vicuna)")
    q.add_argument(
        "--max-shard-size", default="2GB", help="output shard size, about the peak memory needed (default: 2GB)"
    )
    q.set_defaults(func=_apply_delta)


def _register_merge_lora(sub: Any) -> None:
    q = sub.add_parser(
        "merge-lora",
        help="fold a LoRA adapter into the LLM -> a plain model directory",
        description="Merge a LoRA adapter (a training checkpoint or run folder, a weights file, or a "
        "peft adapter folder) into the base LLM and save a model directory without "
        "adapters (and optionally its transformers export).",
    )
    q.add_argument(
        "adapter",
        metavar="ADAPTER",
        help="checkpoint folder (trainable.safetensors), run output folder (its newest checkpoint), "
        ".safetensors/.pth file, or peft adapter folder (adapter_config.json)",
    )
    q.add_argument(
        "--base",
        metavar="DIR",
        help="minigpt model directory or transformers LLM folder the adapter "
        "was trained on (default: built from --config)",
    )
    q.add_argument(
        "--config",
        metavar="TRAIN.yaml",
        help="the run's training config: LoRA alpha (and the base "
        "model when --base is not given); found as OUTPUT/final/train_config.yaml when it exists",
    )
    q.add_argument(
        "--lora-alpha",
        type=float,
        help="LoRA alpha, for checkpoints without their run's config (a value that contradicts the run's record "
        "or the peft folder's is refused)",
    )
    q.add_argument(
        "--force-lora-alpha", action="store_true", help="merge with --lora-alpha even where it contradicts the record"
    )
    q.add_argument("--out", "-o", required=True, metavar="DIR", help="folder to write (new or empty)")
    q.add_argument("--dtype", help="LLM dtype to load and save (default: the base's)")
    q.add_argument(
        "--full",
        action="store_true",
        help="store every part (default: reference the frozen vision "
        "encoder's recorded source, as training's final folder)",
    )
    q.add_argument(
        "--export-hf",
        metavar="HF_DIR",
        help="also write the transformers Blip2ForConditionalGeneration export (as 'convert export-hf')",
    )
    q.add_argument("--max-shard-size", default="5GB")
    q.add_argument("--trust-remote-code", action="store_true", help="allow the LLM's own modelling code")
    q.set_defaults(func=_merge_lora)


def _head_arguments(q: argparse.ArgumentParser) -> None:
    q.add_argument(
        "--heads", type=int, default=16, help="ViT attention heads, not readable from weights (default: 16, EVA ViT-g)"
    )
    q.add_argument("--qformer-heads", type=int, default=12, help="Q-Former attention heads (default: 12)")


def _print_report(report: Any) -> None:
    text = str(report)
    if text:
        print(text)


def _vision_summary(config: Any) -> str:
    return (
        f"ViT {config.depth} blocks x {config.width} ({config.heads} heads, mlp {config.mlp_dim}), image "
        f"{config.image_size}/{config.patch_size}; Q-Former {config.qformer_depth} x {config.qformer_width}, "
        f"{config.num_query_tokens} queries, cross-attention every {config.cross_attention_freq}"
    )


def _lavis(args: argparse.Namespace) -> int:
    from .lavis import convert_lavis_vision, save_vision

    config, state, report = convert_lavis_vision(
        args.eva,
        args.blip2,
        heads=args.heads,
        qformer_heads=args.qformer_heads,
        drop_last_block=not args.keep_last_block,
    )
    out = save_vision(args.out, config, state)
    print(f"wrote {out}: {_vision_summary(config)}")
    _print_report(report)
    return 0


def _hf_blip2(args: argparse.Namespace) -> int:
    from .lavis import convert_hf_blip2, save_vision

    if not Path(args.directory).is_dir():
        raise FileNotFoundError(f"{args.directory}: no such folder")
    config, state, report = convert_hf_blip2(args.directory)
    report.notes.insert(
        0,
        "only vision_model.*, qformer.*, query_tokens read (not language_model.*, "
        "language_projection.*: 'convert import-hf' takes the whole model)",
    )
    out = save_vision(args.out, config, state)
    print(f"wrote {out}: {_vision_summary(config)}")
    _print_report(report)
    return 0


def _import_hf(args: argparse.Namespace) -> int:
    from .import_hf import import_hf

    if not Path(args.directory).is_dir():
        raise FileNotFoundError(f"{args.directory}: no such folder")
    written, report = import_hf(args.directory, args.out, template=args.template, dtype=args.dtype)
    print(f"wrote {args.out}: {', '.join(written)} (a complete model directory)")
    _print_report(report)
    return 0


def _projector(args: argparse.Namespace) -> int:
    from .lavis import save_projector

    state, report = save_projector(args.checkpoint, args.out)
    out_dim, in_dim = state["weight"].shape
    print(f"wrote {args.out}: linear projector {in_dim} -> {out_dim}")
    _print_report(report)
    return 0


def _assemble(args: argparse.Namespace) -> int:
    from .assemble import AssembleOptions, assemble

    options = AssembleOptions(
        template=args.template,
        projector_type=args.projector_type,
        dtype=args.dtype,
        full=args.full,
        trust_remote_code=args.trust_remote_code,
    )
    written, report = assemble(args.llm, args.vision, args.projector, args.out, options)
    referenced = [
        f"{name} {source}"
        for name, source, part in (("llm", args.llm, "llm"), ("vision", args.vision, "vision"))
        if part not in written
    ]
    print(
        f"wrote {args.out}: {', '.join(written)}"
        + (
            f" ({' and '.join(referenced)} referenced relative to it, not copied: move them together)"
            if referenced
            else ""
        )
    )
    _print_report(report)
    return 0


def _deepspeed(args: argparse.Namespace) -> int:
    from .deepspeed import DeepSpeedConversion, convert_deepspeed

    conversion = DeepSpeedConversion(
        tag=args.tag,
        config=args.config,
        llm=args.llm,
        vision=args.vision,
        template=args.template,
        with_llm=args.with_llm,
        fp32=args.fp32,
        heads=args.heads,
        qformer_heads=args.qformer_heads,
        llm_dtype=args.dtype,
        full=args.full,
        trust_pickle=args.trust_pickle,
        trust_remote_code=args.trust_remote_code,
    )
    written, report = convert_deepspeed(args.checkpoint, args.out, conversion)
    print(f"wrote {args.out}: {', '.join(written)}")
    _print_report(report)
    return 0


def _export_hf(args: argparse.Namespace) -> int:
    from .export_hf import export_hf

    if not Path(args.model).is_dir():
        raise FileNotFoundError(f"{args.model}: no such model directory")
    result = export_hf(args.model, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size)
    print(
        f"wrote {result.directory}: Blip2ForConditionalGeneration + Blip2Processor; image token "
        f"<image> = {result.image_token_index}, {result.num_query_tokens} per image"
    )
    _print_report(result.report)
    return 0


def _apply_delta(args: argparse.Namespace) -> int:
    from .delta import apply_delta

    result = apply_delta(args.base, args.delta, args.target, dtype=args.dtype, max_shard_size=args.max_shard_size)
    size = f"{result.total_bytes / 1e9:.2f} GB" if result.total_bytes >= 1e8 else f"{result.total_bytes / 1e6:.1f} MB"
    print(f"wrote {result.directory}: {result.tensors} tensors, {size} in {len(result.shards)} shard(s)")
    _print_report(result.report)
    return 0


def _merge_lora(args: argparse.Namespace) -> int:
    from .lora import MergeOptions, merge_lora

    options = MergeOptions(
        lora_alpha=args.lora_alpha,
        force_alpha=args.force_lora_alpha,
        dtype=args.dtype,
        full=args.full,
        export_hf_dir=args.export_hf,
        max_shard_size=args.max_shard_size,
        trust_remote_code=args.trust_remote_code,
    )
    result = merge_lora(args.adapter, args.out, base=args.base, config=args.config, options=options)
    what = "model directory" if result.kind == "minigpt" else "LLM folder"
    print(f"wrote {result.directory}: {what} ({', '.join(result.written)}), LoRA merged")
    if result.hf is not None:
        print(f"wrote {result.hf.directory}: Blip2ForConditionalGeneration + Blip2Processor")
    _print_report(result.report)
    return 0

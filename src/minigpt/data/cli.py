"""``minigpt data ...``: look at a dataset before training on it.

::

    minigpt data analyze llava.json --format llava --image-root coco/ --tokenizer Qwen/Qwen-7B-Chat \\
        --template chatml --max-len 512 --out analysis/        # token lengths, recommended max_txt_len
    minigpt data check cc_sbu_align/ --format cc_sbu_align --write-clean clean/   # exit 1 when problems found
    minigpt data convert llava.json --from llava --to minigpt4qwen qwen.json
    minigpt data convert pairs.csv --from captions_csv --to webdataset shards/ --shard-size 10000
    minigpt data cache-features --config stage1.yaml --out features/   # frozen ViT + Q-Former outputs, once
    minigpt data import pictures/ --out mydata/     # class folders (or --captions / --qa FILE) -> LLaVA JSON + eval

Formats: llava, minigpt4qwen, cc_sbu_align (folder), captions_json (``[{image, caption}]``), captions_csv (columns
image,caption), webdataset (folder of .tar, a shard or a brace pattern). Exit codes: 0 done (check: no problem),
1 check found problems, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from .formats import DATASET_FORMATS, format_names

FORMATS_HELP = format_names()


def register(subparsers: Any) -> None:
    from ..cli import add_command_group

    sub = add_command_group(
        subparsers,
        "data",
        help="import a folder of pictures, analyze token lengths, check and clean, convert datasets",
        description="Dataset tools: import a folder of pictures, token-length analysis with the model's template, "
        "integrity checks with a cleaned copy, and conversion between LLaVA, MiniGPT4Qwen, cc_sbu_align and webdataset.",
    )

    q = sub.add_parser(
        "analyze",
        help="token-length distribution, truncation at a max length, recommended max_txt_len",
        description="Count the tokens of every sample as training encodes it (template, image slots) "
        "and report percentiles, the fraction a max length truncates and a recommended "
        "max_txt_len (smallest multiple of 32 covering 99%).",
    )
    _dataset_arguments(q)
    q.add_argument("--tokenizer", required=True, metavar="TOK", help="tokenizer folder or hub id (the LLM's)")
    q.add_argument(
        "--template",
        default="vicuna0",
        help="prompt template: vicuna0 (default), vicuna0_head, llama2, chatml, caption, hf",
    )
    q.add_argument(
        "--image-tokens", type=int, default=32, metavar="N", help="positions per image (default 32: Q-Former queries)"
    )
    q.add_argument("--max-len", type=int, metavar="N", help="report the fraction this max_txt_len truncates")
    q.add_argument("--out", "-o", metavar="DIR", help="write report.json and lengths.png (histograms) here")
    q.add_argument("--limit", type=int, metavar="N", help="only the first N samples")
    q.add_argument("--trust-remote-code", action="store_true", help="allow the tokenizer's own code (Qwen-1)")
    q.set_defaults(func=_analyze)

    q = sub.add_parser(
        "check",
        help="find missing/corrupt images, malformed records, empty answers (exit 1 if any)",
        description="Decode every image and inspect every record; print counts per problem kind "
        "with the first origins. Exit code 0 when clean, 1 when problems were found.",
    )
    _dataset_arguments(q)
    q.add_argument(
        "--write-clean",
        metavar="OUT",
        help="write the good records here, in the same format "
        "(a .json/.jsonl/.csv file; cc_sbu_align and webdataset: a folder)",
    )
    q.add_argument(
        "--workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        metavar="N",
        help="threads decoding images (default: min(8, CPUs))",
    )
    q.add_argument("--examples", type=int, default=5, metavar="N", help="origins shown per problem kind (default 5)")
    q.add_argument("--json", metavar="FILE", help="also write the full report (every problem) as JSON")
    q.set_defaults(func=_check)

    q = sub.add_parser(
        "convert",
        help=f"convert between {format_names()}",
        description="Convert a dataset; samples the target cannot hold (e.g. multi-turn to "
        "cc_sbu_align) are skipped and counted. Reading the output gives the same "
        "conversations as reading the source.",
    )
    q.add_argument("src", metavar="SRC", help="source file or folder")
    q.add_argument("--from", dest="source_format", required=True, metavar="FMT", help=FORMATS_HELP)
    q.add_argument(
        "--to",
        dest="target_format",
        required=True,
        metavar="FMT",
        help=format_names(n for n, f in DATASET_FORMATS.items() if f.writable),
    )
    q.add_argument(
        "out", metavar="OUT", help="output file (JSON targets) or folder (cc_sbu_align, webdataset); must not exist"
    )
    q.add_argument(
        "--image-root",
        metavar="DIR",
        help="folder the source's image paths are relative to (default: the source file's folder)",
    )
    q.add_argument(
        "--out-image-root",
        metavar="DIR",
        help="JSON targets: write image paths relative to this "
        "folder (default: the source's image root, so paths stay as they were)",
    )
    q.add_argument(
        "--copy-images",
        action="store_true",
        help="cc_sbu_align target: copy the images (default: hard links to the source images, copies where "
        "the file system has none)",
    )
    q.add_argument(
        "--shard-size", type=int, default=10_000, metavar="N", help="webdataset: samples per shard (default 10000)"
    )
    q.set_defaults(func=_convert)

    q = sub.add_parser(
        "cache-features",
        help="compute the frozen vision encoder + Q-Former outputs once (for data.feature_cache)",
        description="Run the frozen vision encoder (ViT + Q-Former) over every distinct image of the "
        "training data (eval resize, no augmentation) and store its outputs (before the "
        "projector) as sharded safetensors. Train with data.feature_cache=OUT and "
        "data.augment=false. Images already in OUT are not computed again.",
    )
    q.add_argument(
        "dataset",
        metavar="DATASET",
        nargs="?",
        help="with --model: dataset file, cc_sbu_align folder or webdataset shards",
    )
    src = q.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--config",
        metavar="YAML",
        help="a training config: its datasets and its vision encoder "
        "(vision_weights / init_from / the seeded random init)",
    )
    src.add_argument("--model", metavar="DIR", help="a minigpt model folder whose vision encoder to use (with DATASET)")
    q.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, as for `minigpt train` (repeatable)",
    )
    q.add_argument("--format", "-f", metavar="FMT", help=f"with --model: {FORMATS_HELP}")
    q.add_argument("--image-root", metavar="DIR", help="with --model: folder the image paths are relative to")
    q.add_argument("--eval-data", action="store_true", help="with --config: also cache the eval datasets")
    q.add_argument("--out", "-o", required=True, metavar="DIR", help="cache folder (new, or one to add to)")
    q.add_argument("--dtype", default="float16", help="stored dtype: float16 (default), bfloat16, float32")
    q.add_argument(
        "--amp",
        default="auto",
        help="autocast for the encoder: auto (bf16/fp16 on accelerators, none on CPU), bf16, fp16, no",
    )
    q.add_argument("--batch-size", type=int, default=32, metavar="N", help="images per forward (default 32)")
    q.add_argument("--shard-size", type=int, default=4096, metavar="N", help="images per shard (default 4096)")
    q.add_argument(
        "--workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        metavar="N",
        help="threads decoding images (default: min(8, CPUs))",
    )
    from ..device import add_device_argument

    add_device_argument(q)
    q.set_defaults(func=_cache_features)

    q = sub.add_parser(
        "import",
        help="a folder of pictures (class folders, or a captions / question-answer file) -> training data + eval split",
        description="Import a folder of pictures: class subfolders (FOLDER/cats/*.jpg) become questions answered with "
        "the class name; with --captions, caption pairs for stage 1; with --qa, question/answer pairs for stage 2. "
        "Writes OUT/train.json (LLaVA JSON), a held-out split that `minigpt eval` scores directly, and "
        "import_report.json. Every picture is checked (inside FOLDER, decodable, within the pixel limit); bad ones "
        "are named and counted. The pictures are hard-linked (or copied) into OUT/images, so OUT can move.",
    )
    q.add_argument("folder", metavar="FOLDER", help="the folder of pictures")
    q.add_argument("--out", "-o", required=True, metavar="DIR", help="output folder (new)")
    table = q.add_mutually_exclusive_group()
    table.add_argument("--captions", metavar="FILE", help="CSV, TSV or JSONL with columns image, caption")
    table.add_argument("--qa", metavar="FILE", help="CSV, TSV or JSONL with columns image, question, answer")
    q.add_argument(
        "--question",
        action="append",
        metavar="TEXT",
        help="class folders: a question phrasing (repeatable; the first is the held-out split's; default: "
        "'What is in the picture?' and three other phrasings)",
    )
    q.add_argument(
        "--answer",
        action="append",
        metavar="TEMPLATE",
        help="class folders: an answer template with {label} (repeatable; default '{label}', the class name, which "
        "the held-out VQA split scores exactly)",
    )
    q.add_argument(
        "--caption-template",
        metavar="TEMPLATE",
        help="class folders: the stage-1 caption with {label} (default 'a picture of {label}')",
    )
    split = q.add_mutually_exclusive_group()
    split.add_argument("--eval-fraction", type=float, default=0.1, metavar="F", help="held-out share (default 0.1)")
    split.add_argument("--eval-size", type=int, metavar="N", help="held-out pictures (instead of --eval-fraction)")
    q.add_argument("--seed", type=int, default=0, help="seed of the split and the phrasings (default 0)")
    q.add_argument(
        "--max-image-pixels",
        type=int,
        metavar="N",
        help="pictures with more pixels are left out (default 4096x4096 = 16,777,216; 0: no limit)",
    )
    q.add_argument("--copy", action="store_true", help="copy the pictures instead of hard-linking them")
    q.add_argument(
        "--workers", type=int, default=min(8, os.cpu_count() or 1), metavar="N", help="threads decoding pictures"
    )
    q.set_defaults(func=_import)


def _dataset_arguments(q: argparse.ArgumentParser) -> None:
    q.add_argument("dataset", metavar="DATASET", help="dataset file, cc_sbu_align folder or webdataset shards")
    q.add_argument("--format", "-f", required=True, metavar="FMT", help=FORMATS_HELP)
    q.add_argument(
        "--image-root",
        metavar="DIR",
        help="folder the image paths are relative to (default: the dataset file's folder)",
    )


def _analyze(args: argparse.Namespace) -> int:
    import itertools

    from ..model.llm import load_tokenizer
    from .analyze import analyze_samples, write_report
    from .convert import open_dataset, quiet_reader_warnings
    from .formats import SampleList
    from .templates import get_template

    template = get_template(args.template)  # fail fast, before loading anything
    with quiet_reader_warnings():  # the summary counts the skipped records
        data = open_dataset(args.format, args.dataset, args.image_root)
        tokenizer = load_tokenizer(args.tokenizer, trust_remote_code=args.trust_remote_code)
        total = len(data) if isinstance(data, SampleList) else None
        if total is not None and args.limit is not None:
            total = min(total, args.limit)
        report = analyze_samples(
            itertools.islice(data, args.limit),
            tokenizer,
            template,
            args.image_tokens,
            args.max_len,
            progress=total or True,
            dataset=args.dataset,
            fmt=args.format,
        )
    report.tokenizer = args.tokenizer
    report.reader_skipped = list(data.report.skipped)
    print(report.summary())
    if args.out:
        paths = write_report(report, args.out)
        print(f"wrote {paths['report']} and {paths['histogram']}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from .check import check_dataset, write_clean

    if args.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {args.workers}")
    report = check_dataset(args.format, args.dataset, args.image_root, workers=args.workers, progress=True)
    print(report.summary(args.examples))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report.to_dict(), f, indent=1, ensure_ascii=False)
    if args.write_clean:
        n = write_clean(report, args.write_clean)
        print(f"wrote {n} good records to {args.write_clean}")
        if report.format in ("llava", "minigpt4qwen", "captions_json", "captions_csv"):
            from pathlib import Path

            from .convert import source_image_root

            root = source_image_root(report.format, args.dataset, args.image_root)
            if root.resolve() != Path(args.write_clean).parent.resolve():
                print(f"image paths are unchanged: read {args.write_clean} with --image-root {root}")
    print("clean" if report.clean else f"problems found in {report.bad_records} of {report.records} records")
    return 0 if report.clean else 1


def _cache_features(args: argparse.Namespace) -> int:
    import itertools

    import torch

    from ..device import amp_dtype, resolve_device
    from .features import FeatureOptions, cache_features
    from .formats import read_dataset

    if min(args.batch_size, args.shard_size, args.workers) < 1:
        raise ValueError("--batch-size, --shard-size and --workers must be at least 1")
    if args.config:
        from ..model.minigpt import load_vision_encoder
        from ..train.config import load_config

        if args.dataset or args.format or args.image_root:
            raise ValueError("with --config the datasets come from the config; drop DATASET/--format/--image-root")
        config = load_config(args.config, args.overrides)
        specs = list(config.data.datasets) + (list(config.data.eval) if args.eval_data else [])
        sources = [read_dataset(spec.reader_spec()) for spec in specs]
        torch.manual_seed(config.run.seed)  # the same random init as training's build_model
        init = config.model.init_from
        encoder = load_vision_encoder(config.model.minigpt_config(), Path(init) if init else None)
    else:
        from ..model.minigpt import PART_FILES, load_model_config, load_vision_encoder
        from .convert import open_dataset

        if not args.dataset or not args.format:
            raise ValueError("with --model give DATASET and --format")
        directory = Path(args.model)
        model_config = load_model_config(directory)
        if not (directory / PART_FILES["vision"]).is_file() and not model_config.vision_weights:
            raise ValueError(f"{directory} has no vision weights (vision.safetensors or vision_weights)")
        encoder = load_vision_encoder(model_config, directory)
        sources = [open_dataset(args.format, args.dataset, args.image_root)]
    device = resolve_device(args.device)
    amp = amp_dtype(device, {"bf16": "bfloat16", "fp16": "float16"}.get(args.amp, args.amp))
    options = FeatureOptions(
        device=device,
        dtype=args.dtype,
        amp=amp,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        workers=args.workers,
        progress=True,
    )
    report = cache_features(encoder, itertools.chain.from_iterable(sources), args.out, options)
    print(report.summary())
    print(f"train with data.feature_cache={args.out} data.augment=false")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .convert import ConvertOptions, convert_dataset

    options = ConvertOptions(
        out_image_root=args.out_image_root, copy_images=args.copy_images, shard_size=args.shard_size
    )
    report = convert_dataset(
        args.src, args.source_format, args.out, args.target_format, args.image_root, options, progress=True
    )
    print(report.summary())
    if report.image_root is not None and Path(report.image_root).resolve() != Path(args.out).parent.resolve():
        print(f"image paths are relative to {report.image_root}: read {args.out} with --image-root {report.image_root}")
    return 0


def _import(args: argparse.Namespace) -> int:
    from .images import DEFAULT_MAX_PIXELS
    from .importer import DEFAULT_ANSWERS, DEFAULT_CAPTION, DEFAULT_QUESTIONS, ImportOptions, import_folder, next_steps

    pixels = DEFAULT_MAX_PIXELS if args.max_image_pixels is None else args.max_image_pixels or None
    options = ImportOptions(
        questions=tuple(args.question or DEFAULT_QUESTIONS),
        answers=tuple(args.answer or DEFAULT_ANSWERS),
        caption=args.caption_template or DEFAULT_CAPTION,
        eval_fraction=args.eval_fraction,
        eval_size=args.eval_size,
        seed=args.seed,
        max_pixels=pixels,
        copy=args.copy,
        workers=max(1, args.workers),
    )
    report = import_folder(args.folder, args.out, captions=args.captions, qa=args.qa, options=options)
    print(report.summary())
    print(next_steps(report))
    return 0

"""``minigpt info FOLDER``: what a folder is and holds, read from configs and safetensors headers.

A minigpt model directory (parts, shapes, dtypes, trained parts, parameters, files), a transformers model folder
(an LLM, a BLIP-2 checkpoint, an ``export-hf`` folder: architecture, parameters, dtypes), a vision encoder folder,
or a training run folder (steps done, last loss, checkpoints, ``final/``); anything else is a clear error.
Nothing is loaded: parameter counts, shapes and dtypes come from the safetensors headers (of the folder,
or of the sources its config records: ``vision_weights``, a local ``llm`` folder). ``--json`` prints the
same as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import struct
from pathlib import Path
from typing import Any

from ..model.config import CONFIG_FILE


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "info",
        help="describe a model directory, transformers model, vision folder or training run",
        description="Describe a minigpt model directory (or a transformers model folder, a vision encoder folder, "
        "a training run folder) without loading it.",
    )
    p.add_argument("model", metavar="FOLDER")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def safetensors_header(path: str | Path) -> dict[str, dict[str, Any]]:
    """``{name: {"dtype", "shape"}}`` from a safetensors file's header (the tensors are not read)."""
    path = Path(path)
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file")
        (size,) = struct.unpack("<Q", raw)
        if size > 100_000_000:
            raise ValueError(f"{path}: not a safetensors file (header of {size} bytes)")
        try:
            header = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not a safetensors file ({err})") from None
    header.pop("__metadata__", None)
    return {k: {"dtype": v["dtype"], "shape": list(v["shape"])} for k, v in header.items()}


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _summary(tensors: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        "parameters": sum(_numel(t["shape"]) for t in tensors.values()),
        "tensors": len(tensors),
        "dtypes": sorted({t["dtype"] for t in tensors.values()}),
    }


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err.msg} at line {err.lineno})") from None


def _llm_weights(folder: Path) -> dict[str, dict[str, Any]] | None:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    out: dict[str, dict[str, Any]] = {}
    for file in files:
        out.update(safetensors_header(file))
    return out


def merged_lora(directory: Path) -> dict[str, Any] | None:
    """``{"r", "alpha", "source"}`` of a LoRA adapter merged into this folder's LLM (``merge-lora``'s
    ``merged_lora.json``, or training's ``final/train_config.yaml`` with ``model.lora``) or kept beside it (QLoRA's
    ``llm_adapter/``); None otherwise."""
    adapter = directory / "llm_adapter" / "adapter_config.json"  # QLoRA's final/: an adapter over the base, unmerged
    if adapter.is_file():
        try:
            data = json.loads(adapter.read_text())
            return {"r": data.get("r"), "alpha": data.get("lora_alpha"), "source": "llm_adapter/adapter_config.json"}
        except json.JSONDecodeError:
            return {"r": None, "alpha": None, "source": "llm_adapter/adapter_config.json"}
    merge_info = directory / "merged_lora.json"
    if merge_info.is_file():
        try:
            data = json.loads(merge_info.read_text())
            return {"r": data.get("rank"), "alpha": data.get("alpha"), "source": merge_info.name}
        except json.JSONDecodeError:
            return {"r": None, "alpha": None, "source": merge_info.name}
    train_config = directory / "train_config.yaml"
    if train_config.is_file():
        import yaml

        try:
            data = yaml.safe_load(train_config.read_text()) or {}
        except yaml.YAMLError:
            return None
        lora = (data.get("model") or {}).get("lora") if isinstance(data, dict) else None
        if isinstance(lora, dict):
            return {"r": lora.get("r", 8), "alpha": lora.get("alpha", 16.0), "source": train_config.name}
    return None


def _files(directory: Path) -> list[dict[str, Any]]:
    return [
        {"file": str(p.relative_to(directory)), "bytes": p.stat().st_size}
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    ]


def describe(directory: str | Path) -> dict[str, Any]:
    """What ``minigpt info`` shows for any folder, as a JSON-able dict whose ``kind`` is ``minigpt``,
    ``transformers``, ``vision`` or ``run``; a clear error for anything else."""
    from ..convert.lavis import VISION_CONFIG
    from ..train.checkpoint import CHECKPOINTS
    from ..train.loop import FINAL_DIR, METRICS_FILE

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(
            f"{directory} is a file, not a folder: info describes a model directory, a transformers model, a vision "
            f"encoder folder or a training run folder (the folder that holds it: {directory.parent})"
        )
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such folder")
    config_path = directory / CONFIG_FILE
    if config_path.is_file():
        config = _read_json(config_path)
        if isinstance(config, dict) and {"llm", "vision"} <= config.keys():
            return model_info(directory)
        if isinstance(config, dict) and (config.get("model_type") or config.get("architectures")):
            return transformers_info(directory, config)
        raise ValueError(
            f"{config_path}: neither a minigpt model config (llm, vision) nor a transformers config (model_type)"
        )
    if (directory / VISION_CONFIG).is_file():
        return vision_info(directory)
    run_markers = (METRICS_FILE, CHECKPOINTS, FINAL_DIR)
    if any((directory / name).exists() for name in run_markers):
        return run_info(directory)
    raise FileNotFoundError(
        f"{directory} is not a minigpt model directory, a transformers model, a vision encoder folder or a training "
        f"run folder (it has no {CONFIG_FILE}, {VISION_CONFIG}, {', '.join(run_markers)})"
    )


def _file_summary(directory: Path) -> dict[str, Any]:
    files = _files(directory)
    return {"files": files, "bytes_total": sum(f["bytes"] for f in files)}


def transformers_info(directory: Path, config: dict[str, Any]) -> dict[str, Any]:
    """A transformers model folder (an LLM, a BLIP-2 checkpoint, an ``export-hf`` folder): architecture, dtype,
    parameters per top-level module (from the safetensors headers) and what minigpt can do with it."""
    from ..convert.export_hf import EXPORT_INFO

    weights = _llm_weights(directory) or {}
    modules: dict[str, dict[str, dict[str, Any]]] = {}
    for name, tensor in weights.items():
        modules.setdefault(name.split(".")[0], {})[name] = tensor
    text = config.get("text_config") or {}
    info: dict[str, Any] = {
        "kind": "transformers",
        "directory": str(directory),
        "architectures": config.get("architectures"),
        "model_type": config.get("model_type"),
        "language_model": text.get("model_type"),
        "stored_dtype": config.get("dtype", config.get("torch_dtype")),
        **(_summary(weights) if weights else {"parameters": None}),
        "modules": {name: _summary(tensors) for name, tensors in sorted(modules.items())},
        "export": _read_json(directory / EXPORT_INFO) if (directory / EXPORT_INFO).is_file() else None,
    }
    if config.get("model_type") == "blip-2":
        info["use"] = f"minigpt convert import-hf {directory} --out MODEL_DIR (a minigpt model directory)"
    else:
        info["use"] = f"an LLM for minigpt: --llm {directory} (chat, convert assemble) or model.llm (training)"
    return {**info, **_file_summary(directory)}


def vision_info(directory: Path) -> dict[str, Any]:
    """A vision encoder folder (``convert lavis`` / ``hf-blip2``): architecture and parameters."""
    from ..model.vision import VISION_CONFIG, VISION_WEIGHTS

    config = _read_json(directory / VISION_CONFIG)
    weights = directory / VISION_WEIGHTS
    tensors = safetensors_header(weights) if weights.is_file() else {}
    qformer = {k: v for k, v in tensors.items() if k.startswith(("qformer.", "query_tokens"))}
    vit = {k: v for k, v in tensors.items() if k not in qformer}
    return {
        "kind": "vision",
        "directory": str(directory),
        "encoder": config,
        "vision": _summary(vit) if vit else None,
        "qformer": _summary(qformer) if qformer else None,
        **_file_summary(directory),
    }


def run_info(directory: Path) -> dict[str, Any]:
    """A training run folder: steps done, last losses (``metrics.jsonl``), checkpoints and ``final/``."""
    from ..train.checkpoint import META, list_checkpoints
    from ..train.loop import FINAL_DIR, METRICS_FILE

    records = []
    metrics = directory / METRICS_FILE
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line torn by a kill
                continue
    train = [r for r in records if isinstance(r, dict) and r.get("loss") is not None]
    evals = [r for r in records if isinstance(r, dict) and r.get("eval_loss") is not None]
    checkpoints = []
    for folder in list_checkpoints(directory):
        meta = _read_json(folder / META) if (folder / META).is_file() else {}
        size = sum(f["bytes"] for f in _files(folder))
        checkpoints.append({"path": str(folder.relative_to(directory)), "step": meta.get("step"), "bytes": size})
    steps = [r["step"] for r in train] + [c["step"] for c in checkpoints if c["step"] is not None]
    final = directory / FINAL_DIR
    return {
        "kind": "run",
        "directory": str(directory),
        "steps_done": max(steps, default=0),
        "last_loss": train[-1]["loss"] if train else None,
        "last_eval_loss": evals[-1]["eval_loss"] if evals else None,
        "checkpoints": checkpoints,
        "final": model_info(final) if (final / "config.json").is_file() else None,
    }


def _trained_earlier(directory: Path, frozen: list[str], max_depth: int = 8) -> dict[str, str]:
    """For the parts frozen in the run that wrote ``directory``: the model directory of an earlier run, followed
    through the ``model.init_from`` its ``train_config.yaml`` records (stage 2 starts from stage 1), that trained
    them; a part never trained is left out."""
    import yaml

    from ..model.config import DEFAULT_FREEZE

    found: dict[str, str] = {}
    seen = {directory.resolve()}
    current = directory
    for _ in range(max_depth):
        try:
            record = yaml.safe_load((current / "train_config.yaml").read_text())
            source = record["model"]["init_from"]
        except (OSError, yaml.YAMLError, KeyError, TypeError):  # no record (not trained here), or not readable
            break
        if not isinstance(source, str) or not source:
            break
        path = Path(source)
        if not path.is_absolute() and not path.exists():
            path = current / path  # a path recorded relative to the model directory
        if path.resolve() in seen or not (path / "config.json").is_file():
            break
        seen.add(path.resolve())
        current = path
        recorded = _read_json(path / "config.json").get("freeze") or {}
        for part in frozen:
            if part not in found and not bool(recorded.get(part, DEFAULT_FREEZE[part])):
                found[part] = str(path)
    return found


def model_info(directory: str | Path) -> dict[str, Any]:
    """Everything ``minigpt info`` shows for a minigpt model directory, as a JSON-able dict."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} is not a minigpt model directory (no {CONFIG_FILE})")
    from ..model.config import DEFAULT_FREEZE, PARTS
    from ..model.minigpt import PART_FILES, resolve_sources
    from ..model.vision import VISION_WEIGHTS, VisionConfig

    config = resolve_sources(_read_json(config_path), directory)
    vision_cfg = config.get("vision", {})
    freeze = {p: bool(config.get("freeze", {}).get(p, DEFAULT_FREEZE[p])) for p in PARTS}
    info: dict[str, Any] = {
        "kind": "minigpt",
        "directory": str(directory),
        "format_version": config.get("format_version"),
        "template": config.get("template"),
        "max_txt_len": config.get("max_txt_len"),
        "dtypes": {"llm": config.get("llm_dtype"), "vision": config.get("vision_dtype")},
        "trained": {p: not frozen for p, frozen in freeze.items()},
        "trained_earlier": _trained_earlier(directory, [p for p, frozen in freeze.items() if frozen]),
        "parts": {},
    }

    # vision + qformer
    stored = directory / PART_FILES["vision"]
    source_dir = Path(config["vision_weights"]) if config.get("vision_weights") else None
    if stored.is_file():
        vision_file, vision_source = stored, "stored"
    elif source_dir is not None and (source_dir / VISION_WEIGHTS).is_file():
        vision_file, vision_source = source_dir / VISION_WEIGHTS, str(source_dir)
    else:
        vision_file = None
        vision_source = f"{source_dir} (missing)" if source_dir else "none: random init"
    vision_tensors = safetensors_header(vision_file) if vision_file else {}
    qformer = {k: v for k, v in vision_tensors.items() if k.startswith(("qformer.", "query_tokens"))}
    vit = {k: v for k, v in vision_tensors.items() if k not in qformer}
    encoder = {
        "image_size": vision_cfg.get("image_size"),
        "patch_size": vision_cfg.get("patch_size"),
        "width": vision_cfg.get("width"),
        "depth": vision_cfg.get("depth"),
        "heads": vision_cfg.get("heads"),
        "mlp_dim": vision_cfg.get("mlp_dim"),
    }
    info["parts"]["vision"] = {"source": vision_source, "encoder": encoder, **(_summary(vit) if vit else {})}
    if vision_cfg.get("use_qformer", True):
        info["parts"]["qformer"] = {
            "source": vision_source,
            "num_query_tokens": vision_cfg.get("num_query_tokens"),
            "width": vision_cfg.get("qformer_width"),
            "depth": vision_cfg.get("qformer_depth"),
            "heads": vision_cfg.get("qformer_heads"),
            **(_summary(qformer) if qformer else {}),
        }
    vision = VisionConfig.from_dict(vision_cfg)  # the model's own arithmetic for the token count and width
    out_dim = vision.out_dim
    info["image_tokens"] = vision.num_tokens

    # projector
    proj_file = directory / PART_FILES["projector"]
    proj: dict[str, Any] = {"type": config.get("projector")}
    if proj_file.is_file():
        tensors = safetensors_header(proj_file)
        weights = [v["shape"] for k, v in sorted(tensors.items()) if k.endswith("weight")]
        proj.update(source="stored", shapes={k: v["shape"] for k, v in tensors.items()}, **_summary(tensors))
        if weights:
            proj["in_dim"], proj["out_dim"] = weights[0][1], weights[-1][0]
    elif config.get("projector_weights"):
        proj["source"] = config["projector_weights"]
    else:
        proj["source"] = "missing"
    proj.setdefault("in_dim", out_dim)
    info["parts"]["projector"] = proj

    # llm
    llm_dir = directory / "llm"
    llm: dict[str, Any] = {"id": config.get("llm")}
    if llm_dir.is_dir():
        folder, llm["source"] = llm_dir, "stored"
    elif config.get("llm") and Path(config["llm"]).is_dir():
        folder, llm["source"] = Path(config["llm"]), config["llm"]
    else:
        folder, llm["source"] = None, f"{config.get('llm')} (hub id or missing folder: not inspected)"
    if config.get("llm_gguf_file"):
        llm["gguf_file"] = config["llm_gguf_file"]
    if folder is not None and (folder / "config.json").is_file():
        hf = json.loads((folder / "config.json").read_text())
        text = hf.get("text_config", hf)
        llm.update(
            architectures=hf.get("architectures"),
            model_type=hf.get("model_type"),
            hidden_size=text.get("hidden_size"),
            layers=text.get("num_hidden_layers"),
            vocab_size=text.get("vocab_size"),
            stored_dtype=hf.get("dtype", hf.get("torch_dtype")),
        )
        weights = _llm_weights(folder)
        if weights:
            llm.update(_summary(weights))
    info["parts"]["llm"] = llm
    info["lora"] = merged_lora(directory)

    counts = {}
    for part in PARTS:
        total = info["parts"].get(part, {}).get("parameters")
        trainable = None if total is None else total if info["trained"][part] else 0
        counts[part] = {"total": total, "trainable": trainable}
    info["parameters"] = counts
    known = [c["total"] for c in counts.values() if c["total"] is not None]
    info["parameters_total"] = sum(known) if len(known) == len(PARTS) else None
    info.update(_file_summary(directory))
    return info


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _count(n: int | None) -> str:
    if n is None:
        return "?"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _num(x: Any) -> str:
    return "?" if x is None else f"{x:g}" if isinstance(x, (int, float)) else str(x)


def _files_lines(info: dict[str, Any]) -> list[str]:
    lines = [f"files           {_size(info['bytes_total'])} in {len(info['files'])} file(s)"]
    lines += [f"                {_size(f['bytes']):>9}  {f['file']}" for f in info["files"]]
    return lines


def _summary_text(summary: dict[str, Any] | None) -> str:
    if not summary:
        return "no weights"
    return f"{_count(summary['parameters'])} parameters, {summary['tensors']} tensors, {', '.join(summary['dtypes'])}"


def format_transformers(info: dict[str, Any]) -> str:
    arch = ", ".join(info["architectures"] or []) or "?"
    language = f", language model {info['language_model']}" if info["language_model"] else ""
    lines = [
        f"transformers model {info['directory']} (not a minigpt model directory)",
        f"architecture    {arch} (model_type {info['model_type']}{language})",
        f"stored dtype    {info['stored_dtype'] or '?'}",
        f"parameters      {_count(info['parameters'])}",
    ]
    lines += [
        f"                {name:<20} {_count(m['parameters']):>7}  {', '.join(m['dtypes'])}"
        for name, m in info["modules"].items()
    ]
    if info["export"]:
        e = info["export"]
        lines.append(
            f"export          {e.get('exported_by')}: template {e.get('template')}, "
            f"{e.get('num_query_tokens')} x {e.get('image_token')} per image, from {e.get('source_llm')}"
        )
    lines.append(f"use             {info['use']}")
    return "\n".join(lines + _files_lines(info))


def format_vision(info: dict[str, Any]) -> str:
    e = info["encoder"]
    lines = [
        f"vision encoder folder {info['directory']}",
        f"vision          ViT {e.get('depth')} x {e.get('width')} ({e.get('heads')} heads, "
        f"mlp {e.get('mlp_dim')}), "
        f"image {e.get('image_size')}/{e.get('patch_size')}; {_summary_text(info['vision'])}",
    ]
    if e.get("use_qformer", True):
        lines.append(
            f"qformer         {e.get('qformer_depth')} x {e.get('qformer_width')} ({e.get('qformer_heads')} "
            f"heads), {e.get('num_query_tokens')} queries; {_summary_text(info['qformer'])}"
        )
    return "\n".join(lines + _files_lines(info))


def format_run(info: dict[str, Any]) -> str:
    loss = "?" if info["last_loss"] is None else f"{info['last_loss']:.4f}"
    lines = [
        f"training run    {info['directory']}",
        f"steps done      {info['steps_done']} (last loss {loss}"
        + ("" if info["last_eval_loss"] is None else f", last eval loss {info['last_eval_loss']:.4f}")
        + ")",
        f"checkpoints     {len(info['checkpoints'])}",
    ]
    lines += [f"                {_size(c['bytes']):>9}  {c['path']} (step {c['step']})" for c in info["checkpoints"]]
    final = info["final"]
    if final is None:
        lines.append("final           none yet (the run has not finished)")
    else:
        lines.append(
            f"final           final/: template {final['template']}, {_count(final['parameters_total'])} "
            f"parameters, {_size(final['bytes_total'])} (minigpt info {final['directory']} for more)"
        )
    return "\n".join(lines)


def format_info(info: dict[str, Any]) -> str:
    """``info``'s text, for any ``kind`` of :func:`describe`."""
    formatter = {"transformers": format_transformers, "vision": format_vision, "run": format_run}.get(info.get("kind"))
    if formatter is not None:
        return formatter(info)
    parts = info["parts"]
    v, q, p, llm = parts["vision"], parts.get("qformer"), parts["projector"], parts["llm"]
    e = v["encoder"]
    lines = [
        f"model directory {info['directory']} (format {info['format_version']})",
        f"template        {info['template']} (max_txt_len {info['max_txt_len']}), "
        f"{info['image_tokens']} tokens per image",
        f"dtypes          llm {info['dtypes']['llm']}, vision {info['dtypes']['vision']}",
        f"vision          ViT {e['depth']} x {e['width']} ({e['heads']} heads, mlp {e['mlp_dim']}), image "
        f"{e['image_size']}/{e['patch_size']}; {v['source']}; {', '.join(v.get('dtypes', []))}",
    ]
    if q:
        lines.append(
            f"qformer         {q['depth']} x {q['width']} ({q['heads']} heads), "
            f"{q['num_query_tokens']} queries; {', '.join(q.get('dtypes', []))}"
        )
    lines.append(
        f"projector       {p['type']} {p.get('in_dim')} -> {p.get('out_dim', '?')}; {p['source']}; "
        f"{', '.join(p.get('dtypes', []))}"
    )
    arch = ", ".join(llm.get("architectures") or []) or llm.get("model_type") or "?"
    lines.append(
        f"llm             {llm['id']} ({arch}; hidden {llm.get('hidden_size', '?')}, {llm.get('layers', '?')} "
        f"layers, vocab {llm.get('vocab_size', '?')}); {llm['source']}; {', '.join(llm.get('dtypes', []))}"
    )
    lines.append("parameters      part        total    trainable")
    lora = info.get("lora")
    for part, c in info["parameters"].items():
        if part == "llm" and lora:
            how = "adapter in llm_adapter/" if lora["source"].startswith("llm_adapter") else "merged"
            note = f"  (LoRA r={lora['r'] if lora['r'] is not None else '?'}, alpha={_num(lora['alpha'])}, {how})"
        else:
            earlier = info["trained_earlier"].get(part)
            note = "" if info["trained"][part] else "  (frozen)"
            if earlier and not info["trained"][part]:
                note = f"  (frozen in this run; trained earlier, in {earlier})"
        lines.append(f"                {part:<10} {_count(c['total']):>7}    {_count(c['trainable']):>7}{note}")
    if info["parameters_total"] is not None:
        lines.append(f"                {'all':<10} {_count(info['parameters_total']):>7}")
    return "\n".join(lines + _files_lines(info))


def run(args: argparse.Namespace) -> int:
    info = describe(args.model)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


__all__ = ["describe", "model_info", "format_info", "safetensors_header", "register"]

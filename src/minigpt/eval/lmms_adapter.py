"""Adapter so `lmms-eval <https://github.com/EvolvingLMMs-Lab/lmms-eval>`_ can evaluate a minigpt model.

lmms-eval is optional (``pip install lmms-eval``; it pulls many packages). With it installed,
:class:`MiniGPTLmms` subclasses its ``lmms_eval.api.model.lmms`` model class and implements
``generate_until``, ``generate_until_multi_round`` and ``loglikelihood``. Without it, importing this module
still works, and :class:`MiniGPTLmmsCore` (all the logic, usable with any object shaped like lmms-eval's
``Instance``: ``.args``) is what the tests exercise.

Use it from Python::

    from lmms_eval.evaluator import simple_evaluate
    from minigpt.eval.lmms_adapter import MiniGPTLmms

    results = simple_evaluate(model=MiniGPTLmms(pretrained="runs/stage2", batch_size=8), tasks=["mme"])

or from lmms-eval's command line (this package declares the ``lmms_eval.models`` entry point ``minigpt``)::

    lmms-eval --model minigpt --model_args pretrained=runs/stage2,batch_size=8 --tasks mme,pope

Model arguments: ``pretrained`` (model directory), ``device`` (``auto``), ``dtype`` (LLM dtype override),
``batch_size`` (1), ``max_new_tokens`` (default when a task sets none: 128). lmms-eval also passes its own
``--batch_size`` (default 1), ``max_batch_size`` and ``--device`` to :meth:`MiniGPTLmms.create_from_arg_string`:
a value in ``--model_args`` wins over them, ``--batch_size auto`` means :data:`AUTO_BATCH_SIZE`, and
``max_batch_size`` is ignored (:func:`model_arguments`).

How requests map onto the model: the task's context becomes one user turn; its ``<image>`` placeholders mark
where the visuals go, and when it has none the visuals come first (MiniGPT-4's ``<Img><ImageHere></Img> text``).
A context that is a JSON list of ``{"value": ...}`` turns becomes a multi-turn conversation. ``until`` strings
are extra stop strings on top of the template's; ``temperature`` 0 (or no ``do_sample``) means greedy.
``loglikelihood`` scores the continuation as the assistant's answer (tokenized on its own, as in training).
A request that fails (an unreadable visual, a video) is answered ``""`` (or ``(-inf, False)``) with a warning,
so one bad document does not stop a long run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from ..data.conversation import Conversation, Image, Text, Turn, parse_content
from ..infer.generate import GenerationOptions

log = logging.getLogger(__name__)


#: Requests per generate call for lmms-eval's ``--batch_size auto`` (there is no automatic search).
AUTO_BATCH_SIZE = 8
#: ``--model_args`` keys passed on to :class:`~minigpt.infer.loading.LoadSpec` (besides ``device`` and ``dtype``).
LOAD_ARGS = ("vision_dtype", "quantize", "template", "trust_remote_code")


def parse_batch_size(value: int | str) -> int:
    """``8`` / ``"8"`` -> 8; lmms-eval's ``"auto"`` / ``"auto:N"`` -> :data:`AUTO_BATCH_SIZE`; else ``ValueError``."""
    if isinstance(value, str) and value.strip().lower().startswith("auto"):
        return AUTO_BATCH_SIZE
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"batch_size must be a positive integer or 'auto', got {value!r}") from None
    if size < 1:
        raise ValueError(f"batch_size must be a positive integer or 'auto', got {value!r}")
    return size


def model_arguments(model_args: dict[str, Any], additional_config: dict[str, Any] | None) -> dict[str, Any]:
    """The constructor arguments from lmms-eval's parsed ``--model_args`` and the ``additional_config`` it adds
    (``batch_size``, ``max_batch_size``, ``device``): ``--model_args`` wins on a key both give, ``None`` values and
    ``max_batch_size`` are dropped."""
    extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k != "max_batch_size"}
    for key in sorted(extra.keys() & model_args.keys()):
        if str(extra[key]) != str(model_args[key]):
            log.info(
                "minigpt lmms adapter: %s=%s from --model_args (lmms-eval passed %s)", key, model_args[key], extra[key]
            )
    return {**extra, **{k: v for k, v in model_args.items() if k != "max_batch_size"}}


class AdapterWarning(UserWarning):
    """A request the adapter could not serve (answered with an empty string)."""


def _flatten(items: Any) -> list[Any]:
    if items is None:
        return []
    if not isinstance(items, (list, tuple)):
        return [items]
    out: list[Any] = []
    for x in items:
        out.extend(_flatten(x))
    return out


def request_conversation(context: str, num_images: int) -> Conversation:
    """A task's context -> the user turn (or a JSON conversation), with ``num_images`` image slots."""
    turns = None
    if context.lstrip().startswith("["):
        try:
            data = json.loads(context)
            if isinstance(data, list) and data and all(isinstance(t, dict) and "value" in t for t in data):
                turns = [str(t["value"]) for t in data]
        except ValueError:
            pass
    conv = Conversation()
    for i, text in enumerate(turns or [context]):
        conv.add("user" if i % 2 == 0 else "assistant", parse_content(text))
    slots = conv.num_images
    if num_images and slots == 0:
        first = conv.turns[0]
        text_parts = [p for p in first.parts if isinstance(p, Text)]
        lead = [Text(" ")] if text_parts and not text_parts[0].text.startswith((" ", "\n")) else []
        conv.turns[0] = Turn("user", [Image() for _ in range(num_images)] + lead + list(first.parts))
    elif slots != num_images:
        raise ValueError(f"the context has {slots} image placeholder(s) but the document {num_images} visual(s)")
    if conv.turns[-1].role != "user":
        raise ValueError("a conversational context must end with a user turn")
    return conv


def options_from_gen_kwargs(gen_kwargs: dict[str, Any] | None, default_max_new_tokens: int = 128) -> GenerationOptions:
    """lmms-eval ``generation_kwargs`` -> :class:`GenerationOptions` (greedy unless sampling with temperature > 0)."""
    kw = dict(gen_kwargs or {})
    until = kw.get("until") or []
    until = [until] if isinstance(until, str) else [str(u) for u in until]
    temperature = float(kw.get("temperature") or 0.0)
    do_sample = bool(kw.get("do_sample", temperature > 0)) and temperature > 0
    top_p = kw.get("top_p")
    top_p = float(top_p) if top_p is not None and 0 < float(top_p) <= 1 else 1.0
    return GenerationOptions(
        max_new_tokens=int(kw.get("max_new_tokens") or default_max_new_tokens),
        do_sample=do_sample,
        temperature=temperature if do_sample else 1.0,
        top_p=top_p,
        num_beams=int(kw.get("num_beams") or 1),
        repetition_penalty=float(kw.get("repetition_penalty") or 1.0),
        stop=[u for u in until if u],
    )


class MiniGPTLmmsCore:
    """The adapter's logic over a loaded model (anything with :class:`~minigpt.infer.engine.Engine`'s ``generate``;
    ``loglikelihood`` needs a real Engine). ``task_dict[task][split][doc_id]`` holds the documents, as
    lmms-eval fills it."""

    def __init__(self, model: Any, batch_size: int = 1, max_new_tokens: int = 128) -> None:
        self.model = model
        self.batch_size_per_gpu = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        if not hasattr(self, "task_dict"):
            self.task_dict: dict[str, Any] = {}
        self.failures = 0

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    # ------------------------------------------------------------------ helpers
    def _doc(self, task: str, split: str, doc_id: Any) -> Any:
        return self.task_dict[task][split][doc_id]

    def _visuals(self, doc_to_visual: Callable[[Any], Any] | None, task: str, split: str, doc_id: Any) -> list[Any]:
        if doc_to_visual is None:
            return []
        return _flatten(doc_to_visual(self._doc(task, split, doc_id)))

    def _fail(self, what: str, err: BaseException) -> None:
        self.failures += 1
        warnings.warn(
            f"lmms adapter: {what} failed, answered empty: {type(err).__name__}: {err}", AdapterWarning, stacklevel=3
        )

    def _prepared(self, context: str, visuals: list[Any]) -> tuple[Conversation, list[Any]]:
        from ..data.images import load_image

        images = [load_image(v) for v in visuals]
        return request_conversation(context, len(images)), images

    # ------------------------------------------------------------------ lmms API
    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        """``Instance.args = (context, gen_kwargs, doc_to_visual, doc_id, task, split)`` -> answers, in order.
        Requests with the same generation kwargs are batched, longest context first."""
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            key = json.dumps(req.args[1] or {}, sort_keys=True, default=str)
            groups.setdefault(key, []).append(i)
        bar = self._bar(len(requests))
        for indices in groups.values():
            options = options_from_gen_kwargs(requests[indices[0]].args[1], self.max_new_tokens)
            indices.sort(key=lambda i: -len(requests[i].args[0]))
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                prepared: list[tuple[int, Conversation, list[Any]]] = []
                for i in chunk:
                    context, _, doc_to_visual, doc_id, task, split = requests[i].args[:6]
                    try:
                        conv, images = self._prepared(context, self._visuals(doc_to_visual, task, split, doc_id))
                        prepared.append((i, conv, images))
                    except Exception as e:  # noqa: BLE001 - one bad document must not stop the run
                        self._fail(f"{task} doc {doc_id}", e)
                        results[i] = ""
                for (i, _, _), answer in zip(prepared, self._generate(prepared, options)):
                    results[i] = answer
                if bar is not None:
                    bar.update(len(chunk))
        if bar is not None:
            bar.close()
        return [r if r is not None else "" for r in results]

    def _generate(self, prepared: list[tuple[int, Conversation, list[Any]]], options: GenerationOptions) -> list[str]:
        if not prepared:
            return []
        try:
            answers = self.model.generate([c for _, c, _ in prepared], [im for _, _, im in prepared], options)
            return [answer.text for answer in answers]
        except Exception as e:  # noqa: BLE001
            if len(prepared) == 1:
                self._fail(f"request {prepared[0][0]}", e)
                return [""]
            return [self._generate([p], options)[0] for p in prepared]

    def generate_until_multi_round(self, requests: Sequence[Any]) -> list[list[str]]:
        """``args = (context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split)``. Round 0 answers the
        context; then ``doc_to_text(doc, previous_output=[...], round_idx=r, previous_round_info=info)`` returns
        ``(visuals, context, terminal, round_results, info)`` until ``terminal``; the result per request is the
        task's final ``round_results``."""
        out: list[list[str]] = []
        for req in requests:
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = req.args[:7]
            options = options_from_gen_kwargs(gen_kwargs, self.max_new_tokens)
            doc = self._doc(task, split, doc_id)
            visuals = self._visuals(doc_to_visual, task, split, doc_id)
            answers: list[str] = []
            final: list[str] | None = None
            info = None
            for round_idx in range(100):  # a task that never signals the end stops here
                if round_idx:
                    visuals, context, terminal, round_res, info = doc_to_text(
                        doc, previous_output=list(answers), round_idx=round_idx, previous_round_info=info
                    )
                    visuals = _flatten(visuals)
                    if terminal:
                        final = [str(x) for x in _flatten(round_res)]
                        break
                try:
                    conv, images = self._prepared(context, visuals)
                    answers.append(self._generate([(0, conv, images)], options)[0])
                except Exception as e:  # noqa: BLE001
                    self._fail(f"{task} doc {doc_id} round {round_idx}", e)
                    answers.append("")
            out.append(final if final is not None else answers)
        return out

    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        """``args = (context, continuation | doc_to_target, doc_to_visual, doc_id, task, split)`` (or just
        ``(context, continuation)``) -> ``(log P(continuation | context, visuals), is_greedy)``."""
        results: list[tuple[float, bool]] = []
        tokenizer = self.model.processor.tokenizer
        for req in requests:
            args = req.args
            context, target = args[0], args[1]
            try:
                if len(args) >= 6:
                    _, _, doc_to_visual, doc_id, task, split = args[:6]
                    if callable(target):
                        target = target(self._doc(task, split, doc_id))
                    visuals = self._visuals(doc_to_visual, task, split, doc_id)
                else:
                    visuals = []
                conv, images = self._prepared(context, visuals)
                ids = tokenizer.encode(str(target), add_special_tokens=False)
                results.append(continuation_logprobs(self.model, [conv], [images], [ids])[0])
            except Exception as e:  # noqa: BLE001
                self._fail("loglikelihood request", e)
                results.append((-math.inf, False))
        return results

    def _bar(self, total: int) -> Any:
        if getattr(self, "_rank", 0) != 0 or total < 2:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc="minigpt", unit="request")


def continuation_logprobs(
    engine: Any,
    conversations: Sequence[Conversation],
    images: Sequence[Sequence[Any]],
    continuations: Sequence[Sequence[int]],
) -> list[tuple[float, bool]]:
    """For each conversation (ending with a user turn) and continuation token ids: the summed log-probability of
    the ids as the start of the assistant's answer, and whether greedy decoding would produce exactly them."""
    import torch

    from ..data.conversation import Sample
    from ..data.tokenize import IGNORE_INDEX, ModelBatch, collate

    model, processor = engine.model, engine.processor
    encoded, pixels = [], []
    for conv, imgs, ids in zip(conversations, images, continuations, strict=True):
        if not ids:
            raise ValueError("empty continuation")
        Sample(conv, list(imgs)).check()
        enc = processor.encode(conv, train=False)
        enc.extend(list(ids), supervised=True)
        encoded.append(enc)
        pixels.extend(processor.image_processor(img) for img in imgs)
    text = collate(encoded, processor.pad_token_id or 0, side="right")
    batch = ModelBatch(text, torch.stack(pixels) if pixels else None).to(model.device)
    with torch.inference_mode():
        embeds = model.embed(batch)
        logits = model.llm(inputs_embeds=embeds, attention_mask=batch.text.attention_mask).logits
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = batch.text.labels[:, 1:]
    out = []
    for row in range(len(encoded)):
        keep = targets[row] != IGNORE_INDEX
        tgt = targets[row][keep]
        lp = logprobs[row][keep]
        total = float(lp.gather(-1, tgt.unsqueeze(-1)).sum())
        greedy = bool((lp.argmax(-1) == tgt).all())
        out.append((total, greedy))
    return out


def manifest() -> Any:
    """lmms-eval model registration (entry point group ``lmms_eval.models``)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="minigpt", simple_class_path="minigpt.eval.lmms_adapter.MiniGPTLmms")


try:  # pragma: no cover - exercised only where lmms-eval is installed
    from lmms_eval.api.model import lmms as _LmmsBase
except Exception:  # ImportError, or lmms-eval failing on its own optional dependencies
    _LmmsBase = None

if _LmmsBase is not None:  # pragma: no cover

    class MiniGPTLmms(MiniGPTLmmsCore, _LmmsBase):
        """lmms-eval model class: ``--model minigpt --model_args pretrained=DIR[,batch_size=8,device=cuda]``, plus
        :data:`LOAD_ARGS` (``dtype``, ``vision_dtype``, ``quantize=4bit``, ``trust_remote_code=True``...), loaded as
        every front-end loads (:func:`minigpt.infer.engine.load_engine`)."""

        is_simple = True

        @classmethod
        def create_from_arg_string(cls, arg_string: str, additional_config: dict[str, Any] | None = None) -> Any:
            """What lmms-eval calls: ``--model_args`` plus its own batch size and device (:func:`model_arguments`)."""
            from lmms_eval import utils

            return cls(**model_arguments(utils.simple_parse_args_string(arg_string), additional_config))

        def __init__(
            self,
            pretrained: str,
            device: str = "auto",
            dtype: str | None = None,
            batch_size: int | str = 1,
            max_new_tokens: int = 128,
            **kwargs: Any,
        ) -> None:
            _LmmsBase.__init__(self)
            load_options = {k: kwargs.pop(k) for k in LOAD_ARGS if k in kwargs}
            if kwargs:
                log.warning("minigpt lmms adapter: ignoring unknown model_args %s", sorted(kwargs))
            from ..device import resolve_device
            from ..infer.engine import load_engine
            from ..infer.loading import LoadSpec

            self._world_size = int(os.environ.get("WORLD_SIZE", 1))
            self._rank = int(os.environ.get("RANK", 0))
            local = int(os.environ.get("LOCAL_RANK", 0))
            dev = resolve_device(device)
            if self._world_size > 1 and device == "auto" and dev.type != "cpu":
                dev = resolve_device(f"{dev.type}:{local}")
            engine = load_engine(LoadSpec(model=pretrained, device=str(dev), dtype=dtype or "auto", **load_options))
            MiniGPTLmmsCore.__init__(self, engine, parse_batch_size(batch_size), max_new_tokens)

    try:
        from lmms_eval.api.registry import register_model

        register_model("minigpt")(MiniGPTLmms)
    except Exception:  # noqa: BLE001 - registration is a convenience (newer versions use entry points)
        pass
else:

    class MiniGPTLmms:  # type: ignore[no-redef]
        """Placeholder: lmms-eval is not installed."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise ImportError("the lmms-eval adapter needs lmms-eval: pip install lmms-eval")


__all__ = [
    "AUTO_BATCH_SIZE",
    "LOAD_ARGS",
    "MiniGPTLmms",
    "MiniGPTLmmsCore",
    "continuation_logprobs",
    "options_from_gen_kwargs",
    "manifest",
    "model_arguments",
    "parse_batch_size",
    "request_conversation",
]

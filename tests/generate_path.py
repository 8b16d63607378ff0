"""Measure the path from :meth:`Engine.generate <minigpt.infer.engine.Engine.generate>` to its answer.

:func:`trace_path` runs a call under ``sys.setprofile`` and keeps the minigpt functions it enters (``module:qualname``,
files under ``src/minigpt``), their modules, the deepest chain of nested minigpt calls (frames of other libraries in
between do not count) and the call tree. ``tests/test_generate_path.py`` bounds these numbers; run this file for the
tree of one greedy generation on a tiny model (``plain``: on transformers' generate; ``--warm``: a second one, the
slot decoder already built)::

    PYTHONPATH=src python tests/generate_path.py [static|plain] [--warm]
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import minigpt

PACKAGE = Path(minigpt.__file__).resolve().parent
#: Code that is no function a reader jumps to: module bodies and comprehensions (inlined from Python 3.12 on).
SKIPPED = {"<module>", "<listcomp>", "<dictcomp>", "<setcomp>", "<genexpr>"}


@dataclass
class CallPath:
    """What one traced call entered: ``tree`` maps each chain of functions (a tuple, the caller first) to its calls."""

    functions: set[str] = field(default_factory=set)
    tree: dict[tuple[str, ...], int] = field(default_factory=dict)  # in the order first entered
    depth: int = 0

    @property
    def modules(self) -> set[str]:
        return {name.split(":")[0] for name in self.functions}

    def numbers(self) -> dict[str, int]:
        return {"functions": len(self.functions), "modules": len(self.modules), "depth": self.depth}

    def render(self) -> str:
        """The call tree, one line per distinct chain, indented by depth (``xN``: entered N times)."""
        order = {chain: i for i, chain in enumerate(self.tree)}
        lines = []
        for chain in sorted(self.tree, key=lambda c: [order[c[:n]] for n in range(1, len(c) + 1)]):
            count = self.tree[chain]
            lines.append("  " * (len(chain) - 1) + chain[-1] + (f"  x{count}" if count > 1 else ""))
        return "\n".join(lines)


@functools.cache
def _module(filename: str) -> str | None:
    """The minigpt module of a source file, or None."""
    try:
        relative = Path(filename).resolve().relative_to(PACKAGE)
    except ValueError:
        return None
    return ".".join(("minigpt", *relative.with_suffix("").parts)).removesuffix(".__init__")


def _name(frame: Any) -> str | None:
    """``module:qualname`` of a frame running a minigpt function (module bodies, comprehensions excluded), else None."""
    code = frame.f_code
    module = _module(code.co_filename)
    if module is None or code.co_name in SKIPPED:
        return None
    return f"{module}:{code.co_qualname}"


def trace_path(call: Callable[[], Any]) -> tuple[Any, CallPath]:
    """Run ``call()`` (in this thread) under a profiler; its result and the minigpt path it took."""
    path = CallPath()
    stack: list[str | None] = []  # one entry per Python frame entered since the start: its name, or None
    chain: list[str] = []  # the minigpt names among them

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            name = _name(frame)
            stack.append(name)
            if name is not None:
                chain.append(name)
                key = tuple(chain)
                path.functions.add(name)
                path.tree[key] = path.tree.get(key, 0) + 1
                path.depth = max(path.depth, len(chain))
        elif event == "return" and stack:
            if stack.pop() is not None:
                chain.pop()

    sys.setprofile(profile)
    try:
        result = call()
    finally:
        sys.setprofile(None)
    return result, path


def tiny_engine(llm_dir: Path, decoding: str = "static") -> Any:
    """An :class:`Engine` on a tiny MiniGPT (random tiny BLIP-2 stack and the LLaMA in ``llm_dir``), as the tests'
    ``tiny_pair_factory`` builds it."""
    import torch

    from minigpt.infer.decoding import DecodingSettings
    from minigpt.infer.engine import Engine
    from minigpt.model.minigpt import MiniGPT, MiniGPTConfig
    from minigpt.model.processor import MiniGPTProcessor
    from minigpt.model.vision import VisionConfig

    torch.manual_seed(0)
    model = MiniGPT.build(
        MiniGPTConfig(llm=str(llm_dir), vision=VisionConfig.tiny(), template="vicuna0", max_txt_len=32)
    )
    return Engine(model, MiniGPTProcessor.from_config(model.config), DecodingSettings(decoding))


def trace_generate(engine: Any, image: Any, warm: bool = False) -> tuple[Any, CallPath]:
    """One greedy, non-streaming ``engine.generate`` of one conversation (an image and a question), 4 new tokens, on
    a fresh engine (``warm``: after an untraced one, so that the trace leaves out building the slot decoder)."""
    from minigpt.data.conversation import Conversation, Image, Text
    from minigpt.infer.generate import GenerationOptions

    conversation = Conversation()
    conversation.add("user", [Image(), Text(" What is this?")])
    options = GenerationOptions(max_new_tokens=4)
    if warm:
        engine.generate([conversation], [image], options)
    return trace_path(lambda: engine.generate([conversation], [image], options))


def main() -> None:
    import argparse
    import tempfile

    from PIL import Image as PILImage

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("decoding", nargs="?", default="static", choices=["static", "plain"])
    parser.add_argument("--warm", action="store_true", help="trace a second generation (the slot decoder built)")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import _gguf_tokenizer, save_tiny_llm

    tokenizer = _gguf_tokenizer("llama-spm", "ggml-vocab-llama-spm.gguf")
    tokenizer.bos_token, tokenizer.eos_token = "<s>", "</s>"
    with tempfile.TemporaryDirectory() as tmp:
        engine = tiny_engine(save_tiny_llm(Path(tmp) / "llm", tokenizer), args.decoding)
        result, path = trace_generate(engine, PILImage.new("RGB", (40, 30), (220, 20, 20)), args.warm)
    print(path.render())
    print(f"\nanswer: {result[0].text!r}")
    print(path.numbers(), sorted(path.modules), sep="\n")


if __name__ == "__main__":
    main()

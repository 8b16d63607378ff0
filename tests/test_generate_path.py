"""The path from a question to an answer stays short: bounds on what one greedy ``Engine.generate`` enters.

``tests/generate_path.py`` measures it (run it for the call tree). The bounds are the values measured when the path
was last shortened (issue 23: 88 functions, 12 modules, 10 deep on the slot decoder before); a change that adds a
hop fails here, and one that removes hops lowers them."""

from __future__ import annotations

import pytest
from PIL import Image as PILImage

from generate_path import tiny_engine, trace_generate

RED = PILImage.new("RGB", (40, 30), (220, 20, 20))

#: decoding -> the most distinct minigpt functions, modules, and the deepest chain of nested minigpt calls.
BOUNDS = {
    "static": {"functions": 78, "modules": 12, "depth": 8},  # a fresh engine: building the slot decoder included
    "plain": {"functions": 51, "modules": 9, "depth": 8},
}


@pytest.mark.parametrize("decoding", sorted(BOUNDS))
def test_generate_takes_a_short_path(decoding, tiny_llama_dir):
    engine = tiny_engine(tiny_llama_dir, decoding)
    assert engine.decoding_choice.mode == decoding
    result, path = trace_generate(engine, RED)
    assert len(result) == 1 and result[0].completion_tokens == 4
    numbers = path.numbers()
    over = {name: value for name, value in numbers.items() if value > BOUNDS[decoding][name]}
    assert not over, f"Engine.generate ({decoding}) now enters {numbers}, over {BOUNDS[decoding]}:\n{path.render()}"
    # The profiler saw the path (a broken trace would pass any upper bound).
    first = path.render().splitlines()[0]
    assert first == "minigpt.infer.engine:Engine.generate" and numbers["depth"] >= 5
    assert "minigpt.model.processor:MiniGPTProcessor.decode" in path.functions

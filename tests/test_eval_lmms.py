"""The lmms-eval adapter as lmms-eval builds it: the entry point in pyproject.toml, ``create_from_arg_string`` with
the batch size and device lmms-eval always adds, and the subclass it instantiates answering a request.

lmms-eval is not installed here (its dependencies would replace torch), so :func:`fake_lmms_eval` writes a stand-in
package holding the few lmms-eval pieces the adapter meets, copied in behaviour from lmms-eval: ``lmms`` with its
``create_from_arg_string`` (``cls(**parsed model_args, **{k: v for k, v in additional_config.items() if v is not
None})``, so a key in both raises ``TypeError``), ``utils.simple_parse_args_string``, ``api.registry.register_model``
and ``models.registry_v2.ModelManifest``."""

from __future__ import annotations

import importlib
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
from PIL import Image as PILImage

import minigpt.eval.lmms_adapter as adapter

ROOT = Path(__file__).resolve().parents[1]

FAKE = {
    "__init__.py": "",
    "utils.py": """
        def handle_arg_string(arg):
            if arg.lower() == "true":
                return True
            if arg.lower() == "false":
                return False
            if arg.isnumeric():
                return int(arg)
            try:
                return float(arg)
            except ValueError:
                return arg


        def simple_parse_args_string(args_string):
            args_string = args_string.strip()
            if not args_string:
                return {}
            arg_list = [arg for arg in args_string.split(",") if arg]
            return {k: handle_arg_string(v) for k, v in [arg.split("=") for arg in arg_list]}
    """,
    "api/__init__.py": "",
    "api/model.py": """
        import abc

        from lmms_eval import utils


        class lmms(abc.ABC):
            is_simple = True

            def __init__(self):
                self._rank = 0
                self._world_size = 1
                self.task_dict = {}

            @abc.abstractmethod
            def loglikelihood(self, requests): ...

            @abc.abstractmethod
            def generate_until(self, requests): ...

            @abc.abstractmethod
            def generate_until_multi_round(self, requests): ...

            @classmethod
            def create_from_arg_string(cls, arg_string, additional_config=None):
                additional_config = {} if additional_config is None else additional_config
                args = utils.simple_parse_args_string(arg_string)
                args2 = {k: v for k, v in additional_config.items() if v is not None}
                return cls(**args, **args2)
    """,
    "api/registry.py": """
        MODEL_REGISTRY = {}


        def register_model(*names):
            def decorate(cls):
                for name in names:
                    MODEL_REGISTRY[name] = cls
                return cls
            return decorate
    """,
    "models/__init__.py": "",
    "models/registry_v2.py": """
        from dataclasses import dataclass


        @dataclass(frozen=True)
        class ModelManifest:
            model_id: str
            simple_class_path: str | None = None
            chat_class_path: str | None = None
            aliases: tuple = ()
    """,
}


def _drop_fake_modules() -> None:
    for name in [m for m in sys.modules if m == "lmms_eval" or m.startswith("lmms_eval.")]:
        del sys.modules[name]


@pytest.fixture()
def fake_lmms_eval(tmp_path, monkeypatch):
    """The adapter module reloaded with the stand-in lmms-eval importable (and reloaded without it afterwards)."""
    for rel, text in FAKE.items():
        path = tmp_path / "lmms_eval" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(tmp_path))
    _drop_fake_modules()
    yield importlib.reload(adapter)
    monkeypatch.undo()
    _drop_fake_modules()
    importlib.reload(adapter)


@pytest.fixture()
def model_dir(tiny_model_factory, tmp_path) -> Path:
    path = tmp_path / "model"
    tiny_model_factory().save_pretrained(path)
    return path


def test_the_base_construction_path_is_what_failed(fake_lmms_eval):
    from lmms_eval.api.model import lmms

    class Plain(lmms):  # the adapter without its create_from_arg_string: lmms-eval's documented call fails
        def __init__(self, pretrained, batch_size=1, **kwargs):
            super().__init__()

        loglikelihood = generate_until = generate_until_multi_round = None

    with pytest.raises(TypeError, match="got multiple values for keyword argument 'batch_size'"):
        Plain.create_from_arg_string("pretrained=x,batch_size=8", {"batch_size": 1, "max_batch_size": None})


def test_create_from_arg_string_as_lmms_eval_calls_it(fake_lmms_eval, model_dir, tmp_path):
    from lmms_eval.api.model import lmms
    from lmms_eval.api.registry import MODEL_REGISTRY

    cls = fake_lmms_eval.MiniGPTLmms
    assert issubclass(cls, lmms) and cls.is_simple and MODEL_REGISTRY["minigpt"] is cls
    # lmms-eval's CLI: --model_args pretrained=DIR,batch_size=8 plus its own --batch_size (default 1), --device
    lm = cls.create_from_arg_string(
        f"pretrained={model_dir},batch_size=8", {"batch_size": 1, "max_batch_size": None, "device": "cpu"}
    )
    assert lm.batch_size == 8 and str(lm.model.model.device) == "cpu"  # --model_args wins
    auto = cls.create_from_arg_string(
        f"pretrained={model_dir}", {"batch_size": "auto", "max_batch_size": 64, "device": None}
    )
    assert auto.batch_size == fake_lmms_eval.AUTO_BATCH_SIZE
    assert cls.create_from_arg_string(f"pretrained={model_dir}", {"batch_size": "4"}).batch_size == 4

    image = tmp_path / "red.png"
    PILImage.new("RGB", (16, 16), (200, 0, 0)).save(image)
    lm.task_dict = {"t": {"test": {0: {"image": image}}}}

    class Request:
        args = ("What is this?", {"max_new_tokens": 3, "temperature": 0}, lambda doc: [doc["image"]], 0, "t", "test")

    answers = lm.generate_until([Request()])
    assert len(answers) == 1 and isinstance(answers[0], str) and lm.failures == 0


def test_the_entry_point_resolves_to_the_lmms_subclass(fake_lmms_eval):
    from lmms_eval.api.model import lmms

    entry = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["lmms_eval.models"]
    module, attr = entry["minigpt"].split(":")
    manifest = getattr(importlib.import_module(module), attr)()
    assert manifest.model_id == "minigpt" and manifest.chat_class_path is None
    module, name = manifest.simple_class_path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, lmms) and cls.is_simple  # what lmms-eval's registry checks before instantiating


@pytest.mark.parametrize(
    ("value", "size"), [(8, 8), ("8", 8), ("auto", adapter.AUTO_BATCH_SIZE), ("auto:4", adapter.AUTO_BATCH_SIZE)]
)
def test_parse_batch_size(value, size):
    assert adapter.parse_batch_size(value) == size


def test_parse_batch_size_rejects_nonsense():
    with pytest.raises(ValueError, match="batch_size must be a positive integer or 'auto', got 'big'"):
        adapter.parse_batch_size("big")
    with pytest.raises(ValueError, match="got 0"):
        adapter.parse_batch_size(0)


def test_model_arguments_merge():
    merged = adapter.model_arguments(
        {"pretrained": "d", "batch_size": 8}, {"batch_size": 1, "max_batch_size": None, "device": "cuda:1"}
    )
    assert merged == {"pretrained": "d", "batch_size": 8, "device": "cuda:1"}

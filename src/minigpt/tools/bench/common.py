"""What the benchmarks share: model shapes, the bench model, useful FLOPs, the matmul ceiling, machine facts."""

from __future__ import annotations

import platform
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

LLM_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,
    ),
    "small": dict(
        model_type="llama",
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=32000,
    ),
    "llama-7b": dict(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    ),
    "llama-13b": dict(
        model_type="llama",
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        vocab_size=32000,
    ),
    "qwen-7b": dict(
        model_type="qwen2",
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
    ),
    "qwen-14b": dict(
        model_type="qwen2",
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=48,
        num_attention_heads=40,
        num_key_value_heads=8,
        vocab_size=152064,
    ),
}
VISION_SHAPES = ("tiny", "small", "eva_vit_g")

BOS, SLOT = 1, 0


# ---------------------------------------------------------------------------------------------- shapes


def vision_shape(name: str) -> Any:
    from ...model.vision import VisionConfig

    if name == "tiny":
        return VisionConfig.tiny()
    if name == "small":
        return VisionConfig(
            image_size=112,
            width=256,
            depth=4,
            heads=4,
            mlp_dim=1024,
            qformer_width=256,
            qformer_depth=2,
            qformer_heads=4,
            qformer_mlp_dim=1024,
        )
    if name == "eva_vit_g":
        return VisionConfig()
    raise ValueError(f"unknown vision shape {name!r}; use one of {', '.join(VISION_SHAPES)}")


def llm_shape(name: str) -> Any:
    """A transformers config: a preset name, a folder holding config.json, or a config.json file."""
    from transformers import AutoConfig

    if name in LLM_SHAPES:
        fields = dict(LLM_SHAPES[name])
        kind = fields.pop("model_type")
        return AutoConfig.for_model(
            kind, max_position_embeddings=4096, bos_token_id=BOS, eos_token_id=2, pad_token_id=SLOT, **fields
        )
    path = Path(name)
    if path.is_file():
        return AutoConfig.from_pretrained(str(path.parent))
    if path.is_dir():
        return AutoConfig.from_pretrained(str(path))
    raise ValueError(f"unknown LLM shape {name!r}; use one of {', '.join(LLM_SHAPES)} or a config folder/file")


def build_bench_model(
    llm_cfg: Any, vision_cfg: Any, device: torch.device, llm_dtype: torch.dtype, attn: str, seed: int = 0
) -> Any:
    """A MiniGPT with random weights, built on ``device`` (projector float32, vision float32, LLM ``llm_dtype``)."""
    from transformers import AutoModelForCausalLM

    from ...model.config import MiniGPTConfig
    from ...model.minigpt import MiniGPT
    from ...model.projector import build_projector
    from ...model.vision import Blip2VisionEncoder

    torch.manual_seed(seed)
    with torch.device(device):
        vision = Blip2VisionEncoder(vision_cfg)
        llm = AutoModelForCausalLM.from_config(llm_cfg, dtype=llm_dtype, attn_implementation=attn)
        projector = build_projector("linear", vision.out_dim, llm_cfg.hidden_size)
    config = MiniGPTConfig(llm="bench", vision=vision_cfg, template="caption")
    return MiniGPT(config, vision, projector, llm)


def decoder_matmul_params(llm: nn.Module) -> int:
    from ...model.llm import decoder_layers

    return sum(m.weight.numel() for m in decoder_layers(llm).modules() if isinstance(m, nn.Linear))


@dataclass
class FlopModel:
    """Useful FLOPs of a step (see the module doc)."""

    params: int  # decoder matmul parameters
    layers: int
    attn_width: int
    hidden: int
    vocab: int
    projector_params: int
    image_tokens: int
    vision_per_image: float = 0.0

    @classmethod
    def of(cls, model: Any) -> FlopModel:
        cfg = model.llm.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        proj = sum(p.numel() for p in model.projector.parameters() if p.ndim >= 2)
        return cls(
            decoder_matmul_params(model.llm),
            cfg.num_hidden_layers,
            cfg.num_attention_heads * head_dim,
            cfg.hidden_size,
            cfg.vocab_size,
            proj,
            model.image_tokens,
        )

    def step(self, lengths: list[int], answers: int, images: int, vision: bool) -> float:
        llm = sum(2 * self.params * t + 4 * self.layers * self.attn_width * t * t for t in lengths)
        head = 2 * self.hidden * self.vocab * answers
        projector = 2 * self.projector_params * self.image_tokens * images * 2  # forward + weight gradient
        return 2 * (llm + head) + projector + (self.vision_per_image * images if vision else 0.0)


def vision_flops_per_image(model: Any, device: torch.device, amp: torch.dtype | None) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    from ...device import autocast

    size = model.config.vision.image_size
    with torch.no_grad(), autocast(device, amp), FlopCounterMode(display=False) as counter:
        model.vision(torch.randn(1, 3, size, size, device=device))
    return float(counter.get_total_flops())


def matmul_ceiling_tflops(device: torch.device, dtype: torch.dtype, seconds: float = 0.5) -> float:
    """The best matmul rate seen in ``seconds`` (n = 1024 on CPU, 8192 on accelerators), TFLOP/s."""
    from ...device import synchronize

    n = 1024 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    synchronize(device)
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        synchronize(device)
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t0))
    return best / 1e12


def machine_info(device: torch.device) -> dict[str, Any]:
    import transformers

    from ...device import describe_device

    return {
        "device": describe_device(device),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def prompt_encoded(image_tokens: int, prompt_tokens: int, vocab: int, rng: random.Random) -> Any:
    """A one-image generation prompt: ``[6 text][image][prompt_tokens - 6 text]``."""
    from ...data.tokenize import Encoded

    before = min(6, prompt_tokens)
    enc = Encoded()
    enc.extend([rng.randrange(3, vocab) for _ in range(before)], supervised=False)
    enc.extend([SLOT] * image_tokens, supervised=False, image=True)
    enc.extend([rng.randrange(3, vocab) for _ in range(prompt_tokens - before)], supervised=False)
    return enc


def to_reference_precision(model: Any) -> None:
    """fp16 ViT matmul weights (the original's vit_precision fp16); Q-Former, norms and projector stay float32."""
    for module in model.vision.vision_model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            module.half()


def significant(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")

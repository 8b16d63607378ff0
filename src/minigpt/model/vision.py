"""Vision encoders: pixels -> a fixed number of visual tokens of width ``out_dim``.

``Blip2VisionEncoder`` is BLIP-2's frozen stack as MiniGPT-4 uses it: EVA ViT-g/14 (transformers'
``Blip2VisionModel``) -> ``ln_vision`` (LayerNorm eps 1e-5, as LAVIS) -> Q-Former with learned query
tokens (``Blip2QFormerModel``). Its state-dict names are those of transformers'
``Blip2ForConditionalGeneration`` (``vision_model.*``, ``qformer.*``, ``query_tokens``), so real BLIP-2
weights load directly and the converters in :mod:`minigpt.convert` map LAVIS files onto them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel, Blip2VisionConfig, Blip2VisionModel

from ..files import save_safetensors
from ..safe_load import load_safetensors

#: A vision folder (what ``minigpt convert lavis|hf-blip2`` writes and ``vision_weights`` names): the architecture
#: and the encoder's tensors.
VISION_CONFIG = "vision_config.json"
VISION_WEIGHTS = "vision.safetensors"


@dataclass
class VisionConfig:
    """Architecture of the BLIP-2 vision stack; defaults are EVA ViT-g/14 + BERT-base Q-Former."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1408
    depth: int = 39
    heads: int = 16
    mlp_dim: int = 6144
    vit_eps: float = 1e-6
    ln_vision_eps: float = 1e-5
    use_qformer: bool = True
    num_query_tokens: int = 32
    qformer_width: int = 768
    qformer_depth: int = 12
    qformer_heads: int = 12
    qformer_mlp_dim: int = 3072
    qformer_eps: float = 1e-12
    cross_attention_freq: int = 2
    #: Without Q-Former (MiniGPT-4 LLaMA-2 variant): patch tokens (no CLS), ``concat_tokens`` neighbours
    #: concatenated into one visual token.
    concat_tokens: int = 4
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        """Visual tokens per image handed to the projector."""
        return self.num_query_tokens if self.use_qformer else self.num_patches // self.concat_tokens

    @property
    def out_dim(self) -> int:
        return self.qformer_width if self.use_qformer else self.width * self.concat_tokens

    def hf_vision_config(self) -> Blip2VisionConfig:
        """The ViT as transformers' ``Blip2VisionConfig`` (EVA ViT: GELU, q/v biases)."""
        return Blip2VisionConfig(
            hidden_size=self.width,
            intermediate_size=self.mlp_dim,
            num_hidden_layers=self.depth,
            num_attention_heads=self.heads,
            image_size=self.image_size,
            patch_size=self.patch_size,
            layer_norm_eps=self.vit_eps,
            hidden_act="gelu",
            qkv_bias=True,
        )

    def hf_qformer_config(self) -> Blip2QFormerConfig:
        """The Q-Former as transformers' ``Blip2QFormerConfig`` (cross-attending to the ViT's features)."""
        return Blip2QFormerConfig(
            hidden_size=self.qformer_width,
            num_hidden_layers=self.qformer_depth,
            num_attention_heads=self.qformer_heads,
            intermediate_size=self.qformer_mlp_dim,
            layer_norm_eps=self.qformer_eps,
            encoder_hidden_size=self.width,
            cross_attention_frequency=self.cross_attention_freq,
            hidden_act="gelu",
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VisionConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"unknown vision config key(s): {', '.join(unknown)}")
        for key in ("mean", "std"):
            if key in known:
                known[key] = tuple(known[key])
        return cls(**known)

    @classmethod
    def tiny(cls, **overrides: Any) -> VisionConfig:
        """A few-KB variant of the real architecture for tests and the CPU quickstart."""
        base = dict(
            image_size=56,
            patch_size=14,
            width=64,
            depth=2,
            heads=4,
            mlp_dim=128,
            num_query_tokens=8,
            qformer_width=32,
            qformer_depth=2,
            qformer_heads=4,
            qformer_mlp_dim=64,
        )
        base.update(overrides)
        return cls(**base)


class Blip2VisionEncoder(nn.Module):
    """EVA ViT + ln_vision + Q-Former; ``forward(pixels [B,3,S,S]) -> [B, num_tokens, out_dim]``."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        vit = config.hf_vision_config()
        vit.initializer_range = 0.02  # transformers' default (1e-10) assumes pretrained weights; random needs noise
        self.vision_model = Blip2VisionModel(vit)
        # LAVIS' ln_vision is a plain LayerNorm (eps 1e-5); transformers would use the ViT's 1e-6.
        self.vision_model.post_layernorm = nn.LayerNorm(config.width, eps=config.ln_vision_eps)
        if config.use_qformer:
            self.qformer = Blip2QFormerModel(config.hf_qformer_config())
            self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.qformer_width))
            nn.init.normal_(self.query_tokens, std=0.02)

    @property
    def num_tokens(self) -> int:
        return self.config.num_tokens

    @property
    def out_dim(self) -> int:
        return self.config.out_dim

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pixels -> ``ln_vision(ViT(pixels))`` ([B, 1 + patches, width], CLS first) -> the Q-Former's query outputs,
        or without a Q-Former the patches, ``concat_tokens`` neighbours concatenated."""
        param = self.vision_model.embeddings.patch_embedding.weight
        feats = self.vision_model(pixel_values=pixel_values.to(param.dtype)).last_hidden_state
        if not self.config.use_qformer:
            patches = feats[:, 1:, :]
            b, n, d = patches.shape
            return patches.reshape(b, n // self.config.concat_tokens, d * self.config.concat_tokens)
        queries = self.query_tokens.expand(feats.shape[0], -1, -1)
        mask = torch.ones(feats.shape[:2], dtype=torch.long, device=feats.device)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=feats, encoder_attention_mask=mask)
        return out.last_hidden_state

    def part_names(self) -> dict[str, list[nn.Module | nn.Parameter]]:
        """The freezable parts: ``vision`` (ViT + ln_vision) and ``qformer`` (Q-Former + queries)."""
        parts: dict[str, list[Any]] = {"vision": [self.vision_model]}
        if self.config.use_qformer:
            parts["qformer"] = [self.qformer, self.query_tokens]
        return parts


def save_vision(directory: str | Path, config: VisionConfig, state_dict: Mapping[str, torch.Tensor]) -> Path:
    """Write ``vision_config.json`` + ``vision.safetensors`` into ``directory`` (created); returns it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / VISION_CONFIG).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    tensors = {k: v.contiguous() for k, v in state_dict.items()}
    save_safetensors(tensors, directory / VISION_WEIGHTS, metadata={"format": "pt"})
    return directory


def load_vision_folder(directory: str | Path) -> Blip2VisionEncoder:
    """A :func:`save_vision` directory -> encoder in eval mode (strict load, no random init)."""
    directory = Path(directory)
    if not (directory / VISION_CONFIG).is_file():
        raise FileNotFoundError(
            f"{directory}: not a vision encoder folder (no {VISION_CONFIG}); make one with 'minigpt convert lavis' or "
            "'minigpt convert hf-blip2' (a whole transformers BLIP-2 model: 'minigpt convert import-hf')"
        )
    config = VisionConfig.from_dict(json.loads((directory / VISION_CONFIG).read_text()))
    return vision_encoder(config, load_safetensors(directory / VISION_WEIGHTS))


def vision_encoder(config: VisionConfig, state: Mapping[str, torch.Tensor]) -> Blip2VisionEncoder:
    """An encoder of ``config`` holding ``state`` (strict; built on the meta device, no random init), in eval mode."""
    with torch.device("meta"):
        model = Blip2VisionEncoder(config)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()

"""Names in a MiniGPT's DeepSpeed checkpoints, shared by the strategies that write them
(:mod:`minigpt.train.deepspeed`) and the converter that reads them (:mod:`minigpt.convert.deepspeed`).

Only names, no imports. Pipeline layer files hold flat state dicts whose keys start with these module paths
(MPP-Qwen14B's layout; ``vision`` is ours, for a trained vision encoder under its MiniGPT names).
"""

#: DeepSpeed's save_dir inside a training run's ``OUTPUT/checkpoints``: ``latest`` and ``global_stepN/``.
DS_DIR = "deepspeed"
#: The client_state key holding ``MiniGPTConfig.to_dict()``.
CONFIG_KEY = "minigpt_config"

# Pipeline layer 0 (the head): vision encoder, projector, word embeddings.
VISION = "vision"
VISIONPIPE = "visionpipe"
PROJECTOR = f"{VISIONPIPE}.llm_proj"
EMBEDDING = "wtepipe.word_embeddings"
# One layer per LLM decoder block.
BLOCK = "layer"
# The last layer (the tail): final norm and LM head.
FINAL_NORM = "final_layernorm"
LM_HEAD = "lm_head"
#: The zero Linear a stage without a trained matrix and vector gets (MPP-Qwen14B's ``occupy`` layer).
OCCUPY = "occupy"

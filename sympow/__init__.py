"""sympow: conformal symmetric power transformers as Equinox modules, and generation."""

from sympow.attention import Attention, KeysCache, StateCache
from sympow.config import ATTENTIONS, PRESETS, ModelConfig, preset
from sympow.generate import generate, sample_token
from sympow.transformer import Transformer

__all__ = [
    "ATTENTIONS",
    "PRESETS",
    "Attention",
    "KeysCache",
    "ModelConfig",
    "StateCache",
    "Transformer",
    "generate",
    "preset",
    "sample_token",
]

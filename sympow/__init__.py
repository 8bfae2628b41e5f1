"""sympow: conformal symmetric power transformers as Equinox modules."""

from sympow.attention import Attention
from sympow.config import ATTENTIONS, PRESETS, ModelConfig, preset
from sympow.transformer import Transformer

__all__ = ["ATTENTIONS", "PRESETS", "Attention", "ModelConfig", "Transformer", "preset"]

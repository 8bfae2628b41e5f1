"""Model configuration and the presets of the paper's experiments."""

import dataclasses

from ops.sympow import IMPLS, check_power

ATTENTIONS = ("softmax", "sympow", "sympow_gated", "conformal")
GPT2_VOCAB_SIZE = 50257


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A GPT-2-like transformer whose attention is one of the paper's four variants:

    softmax: softmax attention, fixed rotary (the baseline);
    sympow: symmetric power attention of power p, fixed rotary;
    sympow_gated: sympow with a data-dependent gate;
    conformal: sympow_gated with learned, data-dependent rotary.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    attention: str = "conformal"
    # Key/value heads, each shared by n_heads // n_kv_heads query heads (grouped-query attention);
    # None: one per query head. The gate, the learned rotary and the decoding caches are per
    # key/value head, so grouping divides the state and the caches by the group size.
    n_kv_heads: int | None = None
    p: int = 2
    chunk_size: int | None = None
    impl: str = "auto"
    mlp_ratio: int = 4  # 0: no MLP (attention-only models, as for the recall probes)
    # Each position also adds an embedding of the previous token (off by default): with it one
    # attention layer can answer associative recall (Zoology's and Based's models use a short
    # convolution for the same reason).
    token_shift: bool = False
    # The gate's initial gamma = sigmoid(bias) for every token; the authors start near 0.999.
    gate_init: float = 0.999
    # N of the rotary frequencies theta_k = 2 pi / N^(2k/d): the longest document, never the
    # current sequence length, so a model evaluates at any length.
    rotary_length: int = 65536

    def __post_init__(self):
        if self.attention not in ATTENTIONS:
            raise ValueError(f"unknown attention {self.attention!r}; choose one of {ATTENTIONS}")
        if self.impl not in IMPLS:
            raise ValueError(f"unknown impl {self.impl!r}; choose one of {IMPLS}")
        check_power(self.p)
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "rotary_length"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive; got {getattr(self, name)}")
        if self.mlp_ratio < 0:
            raise ValueError(f"mlp_ratio must be >= 0 (0: no MLP); got {self.mlp_ratio}")
        if not 0 < self.gate_init < 1:
            raise ValueError(f"gate_init is the initial gamma, in (0, 1); got {self.gate_init}")
        if self.d_model % self.n_heads or self.head_dim % 2:
            raise ValueError(f"d_model ({self.d_model}) must split into n_heads ({self.n_heads}) heads of even size")
        kv_heads = self.n_kv_heads
        if kv_heads is not None and (
            isinstance(kv_heads, bool) or not isinstance(kv_heads, int) or kv_heads <= 0 or self.n_heads % kv_heads
        ):
            raise ValueError(
                f"n_kv_heads ({self.n_kv_heads}) must be a positive divisor of n_heads ({self.n_heads}): "
                "each key/value head serves a group of query heads"
            )
        if kv_heads == self.n_heads:  # one spelling for equal heads, so that equal configs compare equal
            object.__setattr__(self, "n_kv_heads", None)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def gated(self) -> bool:
        return self.attention in ("sympow_gated", "conformal")

    @property
    def learned_rotary(self) -> bool:
        return self.attention == "conformal"


PRESETS = {
    # Small enough to train for a few hundred steps on a laptop CPU.
    "tiny": dict(d_model=128, n_layers=2, n_heads=4, chunk_size=64),
    # The paper's 124M-class model: 12 layers, d_model 768, 12 heads of 64.
    "124m": dict(d_model=768, n_layers=12, n_heads=12, chunk_size=1024),
    # The recall probes (docs/experiments.md): heads of 16 (D = 136 at p = 2, 3876 at p = 4), one
    # layer with the token shift, the vocabulary of the task.
    "recall": dict(d_model=64, n_layers=1, n_heads=4, chunk_size=64, token_shift=True),
    # Context scaling on bytes (--data embedded-bytes): two layers of 4 heads of 16, a state small
    # enough (D = 136 at p = 2) to fill within a few thousand bytes.
    "bytes": dict(d_model=64, n_layers=2, n_heads=4, chunk_size=64),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A preset ModelConfig (GPT-2 vocabulary unless overridden), e.g. preset("tiny", attention="sympow")."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {tuple(PRESETS)}")
    return ModelConfig(**{"vocab_size": GPT2_VOCAB_SIZE, **PRESETS[name], **overrides})

"""World presets: the demo's ``full`` world and the test suite's ``tiny`` one, same code path."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from alignlab.core.errors import ConfigError


@dataclass(frozen=True)
class WorldPreset:
    name: str
    n_documents: int
    n_heldout: int
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    pretrain_steps: int
    pretrain_batch_size: int
    pretrain_lr: float
    n_train_prompts: int
    n_eval_prompts: int

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS = {
    # ~2.8M parameters, pretrained for about three minutes on 2 CPU cores.
    "full": WorldPreset("full", n_documents=60_000, n_heldout=500, vocab_size=1024, hidden_size=192,
                        num_layers=6, num_heads=6, intermediate_size=512,
                        max_position_embeddings=256, pretrain_steps=1000, pretrain_batch_size=32,
                        pretrain_lr=2e-3, n_train_prompts=1024, n_eval_prompts=128),
    # ~0.2M parameters, built in seconds for the test suite.
    "tiny": WorldPreset("tiny", n_documents=4_000, n_heldout=200, vocab_size=512, hidden_size=64,
                        num_layers=2, num_heads=4, intermediate_size=192,
                        max_position_embeddings=256, pretrain_steps=300, pretrain_batch_size=32,
                        pretrain_lr=3e-3, n_train_prompts=256, n_eval_prompts=64),
}


def get_preset(name: str) -> WorldPreset:
    if name not in PRESETS:
        raise ConfigError(f"unknown world preset {name!r}; allowed values: {', '.join(PRESETS)}")
    return PRESETS[name]

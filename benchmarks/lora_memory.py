"""Memory of LoRA against full fine-tuning: the same DPO and GRPO runs with and without adapters.

    python benchmarks/lora_memory.py [--hidden 512 --layers 8 --steps 3]

Each run is its own process (so its peak RSS is its own): DPO (``precompute_reference`` on,
the default) and GRPO (``rl.kl_coef`` 0.05, so a reference is held) on the tiny world's data
and prompts, with the world's tokenizer and a random-init Llama of ``--hidden`` × ``--layers``
(the world's own model, 0.14M parameters, is too small for its weights to show next to the
~300 MB the Python and torch runtime take). Printed per run: the peak RSS, and the bytes the
run holds for its models as ``models/adapters.py: trained_bytes`` counts them (weights of
policy + reference (+ critic) with every shared storage once, gradients and Adam's two moments
of what trains). Last line: ``lora_rss_ratio_dpo=… lora_rss_ratio_grpo=…`` (LoRA / full).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def make_model(out: Path, hidden: int, layers: int, cache: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from alignlab.models.loading import load_tokenizer
    from alignlab.world.build import ensure_world

    world = ensure_world("tiny", seed=0, cache_dir=cache, progress=False)
    tok = load_tokenizer(str(world.base_dir))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                      intermediate_size=3 * hidden, max_position_embeddings=256,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)


def one_run(kind: str, lora: bool, model_dir: str, out: str, steps: int, cache: str) -> None:
    """Train in this process; print a JSON line with its peak RSS and model bytes."""
    from alignlab.algorithms.policy_gradient import run as pg_run
    from alignlab.algorithms.policy_gradient.config import OnlineRLConfig, RLSection
    from alignlab.algorithms.preference import trainer as pref_trainer
    from alignlab.algorithms.preference.trainer import PreferenceConfig, PreferenceSection
    from alignlab.core.config import (
        DataSection,
        LoraSettings,
        ModelSection,
        OnlineTrainSection,
        RolloutSection,
        TrainSection,
        WorldSection,
    )
    from alignlab.models.adapters import reference_model, trained_bytes

    def peak_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    training_peak = {}
    for module in (pref_trainer, pg_run):  # the peak before the final model is written
        def save_final(*args, _real=module.save_final, **kwargs):
            training_peak["mb"] = peak_mb()
            return _real(*args, **kwargs)
        module.save_final = save_final

    model = ModelSection(name_or_path=model_dir, lora=LoraSettings(r=8, alpha=16) if lora else None)
    world = WorldSection(preset="tiny", cache_dir=cache)
    held = []
    if kind == "dpo":
        run = pref_trainer.run_preference(PreferenceConfig(
            model=model, world=world, data=DataSection(source="world:positive", limit=64,
                                                       max_length=96),
            train=TrainSection(output_dir=out, max_steps=steps, batch_size=8, lr=1e-4,
                               progress=False, tensorboard=False, save_every=None),
            preference=PreferenceSection(loss="dpo")))
        held = [run.model]
    else:
        seen = {}
        real = pg_run.run_online

        def capture(setup, *args, **kwargs):
            seen["alg"] = setup.algorithm
            return real(setup, *args, **kwargs)

        pg_run.run_online = capture
        cfg = OnlineRLConfig(
            model=model, world=world, rl=RLSection(kl_coef=0.05),
            train=OnlineTrainSection(output_dir=out, max_steps=steps, lr=1e-4, batch_size=16,
                                     progress=False, tensorboard=False, save_every=None),
            rollout=RolloutSection(prompts="world:positive", prompts_per_step=4, n=4,
                                   max_new_tokens=24))
        run = pg_run.train_policy_gradient(cfg, "grpo")
        held = [run.model, seen["alg"].reference]
    peak = peak_mb()
    if kind == "dpo" and not lora:  # it loaded (and freed) a reference copy for log π_ref
        held.append(reference_model(run.model))
    print(json.dumps({"kind": kind, "lora": lora, "peak_rss_mb": round(peak, 1),
                      "training_peak_rss_mb": round(training_peak["mb"], 1),
                      "bytes": trained_bytes(*held)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--cache", default=None, help="world cache (default: $ALIGNLAB_CACHE)")
    p.add_argument("--one", nargs=4, metavar=("KIND", "LORA", "MODEL", "OUT"),
                   help=argparse.SUPPRESS)
    args = p.parse_args()
    import os

    cache = args.cache or os.environ.get("ALIGNLAB_CACHE") or str(Path.home() / ".cache/alignlab")
    if args.one:
        kind, lora, model_dir, out = args.one
        one_run(kind, lora == "lora", model_dir, out, args.steps, cache)
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        make_model(model_dir, args.hidden, args.layers, cache)
        from transformers import AutoConfig

        n = AutoConfig.from_pretrained(model_dir)
        print(f"random Llama hidden {n.hidden_size} x {n.num_hidden_layers} layers, vocab "
              f"{n.vocab_size}; {args.steps} steps each")
        for kind in ("dpo", "grpo"):
            for lora in ("full", "lora"):
                out = Path(tmp) / f"{kind}-{lora}"
                proc = subprocess.run(
                    [sys.executable, __file__, "--steps", str(args.steps), "--cache", cache,
                     "--one", kind, lora, str(model_dir), str(out)],
                    capture_output=True, text=True, check=False)
                lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
                if proc.returncode or not lines:
                    sys.exit(f"{kind} {lora} failed:\n{proc.stderr[-3000:]}")
                row = json.loads(lines[-1])
                results[(kind, lora)] = row
                b = row["bytes"]
                print(f"{kind:4} {lora:4}: peak RSS {row['training_peak_rss_mb']:7.1f} MB in "
                      f"training, {row['peak_rss_mb']:7.1f} MB with the final save; models "
                      f"{b['total'] / 2**20:7.1f} MB (weights {b['weights'] / 2**20:.1f}, "
                      f"gradients {b['gradients'] / 2**20:.1f}, Adam {b['optimizer'] / 2**20:.1f})")
    ratios = {k: results[(k, "lora")]["training_peak_rss_mb"]
              / results[(k, "full")]["training_peak_rss_mb"] for k in ("dpo", "grpo")}
    print(" ".join(f"lora_rss_ratio_{k}={v:.3f}" for k, v in ratios.items()))


if __name__ == "__main__":
    main()

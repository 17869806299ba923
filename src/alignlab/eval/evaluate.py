"""``alignlab eval``: gold rewards, perplexity, length and diversity on a task's eval prompts."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from alignlab.core.config import EvalSection
from alignlab.core.io import atomic_write_json, atomic_write_text
from alignlab.engine.scoring import perplexity
from alignlab.eval.diversity import distinct_n
from alignlab.rollout.sampling import sample


def evaluate(model, tokenizer, task, cfg: EvalSection, *, heldout_texts: list[str] | None = None,
             n_examples: int = 8) -> dict[str, Any]:
    prompts = task.eval_prompts[:cfg.n_prompts]
    s = sample(model, tokenizer, prompts, n=cfg.samples_per_prompt,
               max_new_tokens=cfg.max_new_tokens or task.max_new_tokens,
               temperature=cfg.temperature, top_p=cfg.top_p, batch_size=cfg.batch_size, seed=cfg.seed)
    gold = task.gold(s.prompts, s.completions)
    metrics: dict[str, float] = {
        "gold_mean": statistics.fmean(gold),
        "gold_std": statistics.pstdev(gold),
    }
    for name, values in task.criteria(s.prompts, s.completions).items():
        metrics[f"{name}_mean"] = statistics.fmean(values)
    metrics["length_tokens"] = statistics.fmean(len(c) for c in s.completion_ids)
    metrics["length_words"] = statistics.fmean(len(c.split()) for c in s.completions)
    metrics["hit_length_limit"] = sum(r == "length" for r in s.finish_reasons) / len(s.finish_reasons)
    metrics["distinct_1"] = distinct_n(s.completions, 1)
    metrics["distinct_2"] = distinct_n(s.completions, 2)
    if heldout_texts:
        metrics["ppl_heldout"] = perplexity(model, tokenizer, heldout_texts)
    examples = [{"prompt": p, "completion": c, "gold": g}
                for p, c, g in list(zip(s.prompts, s.completions, gold))[:n_examples]]
    return {"task": task.name, "n_samples": len(gold), "metrics": metrics, "examples": examples,
            "config": cfg.model_dump()}


def markdown_report(result: dict[str, Any], title: str = "Evaluation") -> str:
    """A world task's result (``evaluate``) or one on the user's prompts (``user.evaluate_user``)."""
    what = f"Task `{result['task']}`" if "task" in result else f"Prompts `{result['prompts']}`"
    lines = [f"# {title}", "", f"{what}, {result['n_samples']} samples.", "",
             "| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {v:.4f} |" for k, v in result["metrics"].items()]
    if "kl_estimator" in result.get("config", {}):
        lines += ["", f"KL estimator: {result['config']['kl_estimator']}."]
    lines += ["", "## Examples", ""]
    for e in result["examples"]:
        score = "gold" if "gold" in e else "reward"
        value = "failed" if e[score] is None else f"{e[score]:.3f}"
        lines.append(f"- `{e['prompt']}` → `{e['completion']}` ({score} {value})")
    return "\n".join(lines) + "\n"


def write_report(result: dict[str, Any], out_dir: str | Path, name: str = "eval") -> Path:
    out = Path(out_dir)
    atomic_write_json(out / f"{name}.json", result)
    atomic_write_text(out / f"{name}.md", markdown_report(result, title=f"Evaluation: {name}"))
    return out / f"{name}.json"


def comparison_table(results: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Rows of metric values for several labelled eval results (e.g. before/after)."""
    labels = list(results)
    keys = list(dict.fromkeys(k for r in results.values() for k in r["metrics"]))
    rows = [[k] + [f"{results[lab]['metrics'][k]:.4f}" if k in results[lab]["metrics"] else "–"
                   for lab in labels] for k in keys]
    return ["metric", *labels], rows

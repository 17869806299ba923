"""The main job at tiny scale: same code path as `make demo`."""

from __future__ import annotations

import json

from alignlab.demo import run_demo


def test_demo_pipeline_improves_gold_and_writes_table_and_plot(tiny_world, world_cache, tmp_path, capsys):
    summary = run_demo(preset="tiny", out=tmp_path, cache_dir=world_cache, progress=False)
    assert summary["metrics"]["sft"]["gold_mean"] > summary["metrics"]["base"]["gold_mean"] + 0.2
    out = capsys.readouterr().out
    assert "gold_mean" in out and "base" in out and "sft" in out
    png = (tmp_path / "demo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert json.loads((tmp_path / "summary.json").read_text())["task"] == "positive"
    assert "| gold_mean |" in (tmp_path / "summary.md").read_text()

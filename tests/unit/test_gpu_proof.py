"""The GPU proof script in --tiny mode on CPU: same code path as the device run (tokenizer and processor
built locally, the project's TransformersEngine end to end, forced lengths, continuous batching, result
files), so the script cannot rot unnoticed before the next GPU slot."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from guard.gpu_proof import ForcedLength, Out, Plan, forced_length, make_plan, model_config, prompt_key


def _plan(**kw: object) -> Plan:
    import argparse

    return make_plan(argparse.Namespace(tiny=False, median_tokens=0, max_tokens=0, **kw))


def test_forced_lengths_are_deterministic_long_tailed_and_capped() -> None:
    plan = _plan()
    keys = [prompt_key([i, i * 7, 3]) for i in range(2000)]
    lengths = [forced_length(k, plan) for k in keys]
    assert lengths == [forced_length(k, plan) for k in keys]  # same prompt, same length, every run
    lengths.sort()
    median = lengths[len(lengths) // 2]
    assert abs(median - plan.median_tokens) <= 0.1 * plan.median_tokens
    assert lengths[-1] == plan.max_tokens  # the tail reaches the cap
    assert lengths[0] >= plan.min_tokens
    assert lengths[int(0.95 * len(lengths))] > 2 * median  # long tail: p95 well above the median


def test_forced_length_processor_bans_eos_until_the_rows_step_then_forces_it() -> None:
    import torch

    proc = ForcedLength(prompt_len=3, lengths=[1, 3], eos_id=151645, device="cpu")
    scores = torch.zeros(2, 152064)
    scores[:, 151645] = 10.0  # the model "wants" to stop everywhere
    out = proc(torch.zeros(2, 3, dtype=torch.long), scores.clone())  # first new token
    assert int(out[0].argmax()) == 151645  # row 0 has length 1: EOS forced now
    assert out[1, 151645] == float("-inf") and out[1, 151643] == float("-inf")  # row 1 may not stop yet
    out = proc(torch.zeros(2, 5, dtype=torch.long), scores.clone())  # third new token
    assert int(out[1].argmax()) == 151645
    assert out[1].isinf().sum() == out.shape[1] - 1


def test_7b_config_is_the_published_architecture() -> None:
    cfg = model_config(tiny=False)
    t, v = cfg.text_config, cfg.vision_config
    assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers) == (3584, 18944, 28)
    assert (t.num_attention_heads, t.num_key_value_heads, t.vocab_size) == (28, 4, 152064)
    assert t.rope_parameters["rope_theta"] == 1e6
    assert t.rope_parameters["mrope_section"] == [16, 24, 24]
    assert (v.depth, v.hidden_size, v.intermediate_size, v.num_heads, v.out_hidden_size) == (
        32,
        1280,
        3420,
        16,
        3584,
    )
    assert (v.patch_size, v.spatial_merge_size, v.temporal_patch_size, v.window_size) == (14, 2, 2, 112)
    assert list(v.fullatt_block_indexes) == [7, 15, 23, 31]
    assert (cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id) == (
        151655,
        151652,
        151653,
    )


@pytest.mark.timeout(280)
def test_tiny_run_end_to_end_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "guard.gpu_proof", "--out", str(out), "--tiny", "--budget-s", "600"],
        capture_output=True,
        text=True,
        timeout=270,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = {p.name for p in out.iterdir()}
    assert files <= {
        "progress.log",
        "results.json",
        "summary.md",
        "nvidia_smi.csv",
        "samples.txt",
        "error.txt",
    }
    assert "error.txt" not in files, (out / "error.txt").read_text()
    r = json.loads((out / "results.json").read_text())
    assert r["errors"] == [] and not r.get("skipped")
    # the engine ran every shape without an exception; random weights give parse errors, not crashes
    e2e = r["e2e"]
    assert e2e["exceptions"] == 0 and e2e["requests"] == e2e["posts"] + 1  # the two-image post expands
    assert e2e["two_image_post_images_judged"] == "2"
    rows = {(x["run"], x["mix"], x["batch"]): x for x in r["rows"]}
    for mix in ("text", "image"):
        for b in (2, 4):
            row = rows["static", mix, b]
            assert row["posts"] == b and row["gen_tokens"] > 0 and row["posts_per_s"] > 0
            assert sum(row["safe_true_false_none"]) == b
    cb = r["continuous_batching"]
    assert cb["requests"] == 4 and cb["length_mismatches"] == 0 and cb["gen_tokens"] > 0
    assert r["streaming_seam"]["posts"] == 8
    assert r["tokenizer"]["system_prompt_tokens"] > 500
    summary = (out / "summary.md").read_text()
    assert "random bf16 weights" in summary and "| static | image | 4 |" in summary


def test_errors_a_library_only_logs_are_saved_with_the_phase(tmp_path: Path) -> None:
    # transformers' continuous-batching thread logs its failure and the caller only sees a timeout:
    # the saved files must hold the logged error, attributed to the phase, and only while it runs
    out = Out(tmp_path)
    with out.library_errors("continuous batching"):
        logging.getLogger("transformers.generation").error("The expanded size of the tensor (30)")
        logging.getLogger("transformers").warning("a warning is not kept")
    logging.getLogger("transformers").error("after the phase: not kept")
    saved = (tmp_path / "error.txt").read_text()
    assert "continuous batching (transformers.generation log)" in saved
    assert "The expanded size of the tensor (30)" in saved
    assert "not kept" not in saved
    assert out.results["errors"] == [
        {
            "where": "continuous batching (transformers.generation log)",
            "error": "The expanded size of the tensor (30)",
        }
    ]
    assert "ERROR during continuous batching" in (tmp_path / "progress.log").read_text()

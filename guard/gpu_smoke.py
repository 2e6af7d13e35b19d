"""GPU check: moderate built-in samples through each ProGuard engine; print verdicts and throughput.

On a machine with a GPU and the ProGuard weights (``pip install -e '.[gpu]'``)::

    python -m guard.gpu_smoke --model /models/ProGuard-7B --engines vllm,transformers
    python -m guard.gpu_smoke --engines vllm-server --server-url http://gpu-pool:8003/v1

For the in-process vLLM engine it also checks that guardstream's Qwen2.5-VL prompt rendering equals the
checkpoint's own chat template (``tokenizer.apply_chat_template``), and says so if it does not.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from guard.chat import render_qwen2_5_vl
from guard.config import CpuConfig, EngineConfig, ServerConfig, TransformersConfig, VllmConfig
from guard.engines import EngineKind, build_engine
from guard.samples import TEXTS, drawn_image
from guard.types import GuardEngine, ModerationItem


def samples(repeat: int) -> list[ModerationItem]:
    items = [ModerationItem(f"text-{i}", t) for i, (_, t) in enumerate(TEXTS)]
    items += [ModerationItem(f"image-{i}", None, (drawn_image(i),)) for i in range(3)]
    items += [
        ModerationItem("combo-0", "Look at my new garden!", (drawn_image(10),)),
        ModerationItem(
            "combo-1", "Selling stolen credit card numbers in bulk, see picture", (drawn_image(11),)
        ),
    ]
    return [ModerationItem(f"{it.post_id}#{r}", it.text, it.images) for r in range(repeat) for it in items]


def check_chat_template(engine: Any, console: Console) -> None:
    tok = engine.llm.get_tokenizer()
    system, user = "SYSTEM", "USER"
    ours = render_qwen2_5_vl(system, user, 0)
    theirs = tok.apply_chat_template(
        [{"role": "system", "content": system}, {"role": "user", "content": user}],
        tokenize=False,
        add_generation_prompt=True,
    )
    if ours == theirs:
        console.print("[green]chat template matches the checkpoint's[/]")
    else:
        console.print(
            f"[red]chat template differs from the checkpoint's[/]\nours:   {ours!r}\ntheirs: {theirs!r}"
        )


def run(engine: GuardEngine, items: list[ModerationItem], batch: int, console: Console) -> None:
    t0 = time.perf_counter()
    verdicts = []
    for i in range(0, len(items), batch):
        verdicts.extend(engine.moderate(items[i : i + batch]))
    dt = time.perf_counter() - t0
    t = Table(title=f"{engine.name} ({engine.model_version}, policy {engine.policy_version})")
    for c in ("post", "safe", "category", "novel risk", "p_unsafe", "parse error"):
        t.add_column(c)
    for it, v in list(zip(items, verdicts, strict=True))[:13]:
        t.add_row(
            it.post_id,
            str(v.safe),
            v.subcategory or v.category or "",
            v.novel_risk or "",
            "" if v.p_unsafe is None else f"{v.p_unsafe:.3f}",
            "yes" if v.parse_error else "",
        )
    console.print(t)
    console.print(f"{len(items)} posts in {dt:.2f}s = [bold]{len(items) / dt:.1f} posts/s[/] (batch {batch})")


def _config(kind: EngineKind, model: str, server_url: str) -> EngineConfig:
    if kind is EngineKind.VLLM:
        return VllmConfig(model=model)
    if kind is EngineKind.TRANSFORMERS:
        return TransformersConfig(model=model)
    if kind is EngineKind.VLLM_SERVER:
        return ServerConfig(base_url=server_url)
    return CpuConfig()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", default="vllm", help="comma list of vllm, transformers, vllm-server, cpu")
    ap.add_argument("--model", default="yushaohan/ProGuard-7B", help="checkpoint directory or model id")
    ap.add_argument("--server-url", default="http://127.0.0.1:8003/v1")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=8, help="repeat the 13 samples this many times")
    a = ap.parse_args()
    console = Console()
    items = samples(a.repeat)
    for name in a.engines.split(","):
        engine = build_engine(_config(EngineKind(name.strip()), a.model, a.server_url))
        if name.strip() == "vllm":
            check_chat_template(engine, console)
        run(engine, items, a.batch, console)
        engine.close()


if __name__ == "__main__":
    main()

"""Rebuild the CPU engine's head: ``python -m training.cpu_head`` (a few minutes on 2 CPU cores).

1. ``guard.cpu_data.build_dataset()``: the project's own templated training set, split by template.
2. Embed every row with the shipped MiniLM (the engine's own encoder, so train and serve match).
3. Fit a tiny MLP (384 -> hidden -> safe + 28 subcategories) on ``train`` with torch, full batch,
   seeded, single-threaded math: the same inputs give the same weights.
4. Fit the isotonic calibration of ``p_unsafe`` on ``calib``; pick the novel-risk confidence there.
5. Write ``guard/data/cpu_head.npz`` and print the held-out report (``guard.cpu_report``) on ``test``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt
import structlog

from guard.cpu_data import build_dataset, digest
from guard.cpu_head import HEAD_PATH, CpuHead
from guard.cpu_metrics import average_precision, isotonic_fit
from guard.embeddings import FloatArray, shared_embedder
from guard.taxonomy import Taxonomy

log = structlog.get_logger()
HEAD_FORMAT = "mlp-v1"
# Unsafe, but no subcategory reaches this probability (about eight times the uniform 1/28): the head is
# guessing among subcategories, so the post is reported as a novel risk instead of a wrong category.
NOVEL_CONFIDENCE = 0.3


def _embed(texts: list[str], key: str) -> FloatArray:
    """Embeddings of the dataset, cached by content so a second run (tuning) skips the slow part."""
    cache_dir = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "guardstream"
    path = cache_dir / f"cpu_head_emb_{key}.npy"
    if path.exists():
        arr: FloatArray = np.load(path)
        if arr.shape[0] == len(texts):
            return arr
    t0 = time.perf_counter()
    arr = shared_embedder().encode(texts, batch_size=128)
    log.info("embedded dataset", rows=len(texts), seconds=round(time.perf_counter() - t0, 1))
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.save(path, arr)
    return arr


def fit_mlp(
    x: FloatArray, y: npt.NDArray[np.int64], n_classes: int, hidden: int, seed: int, epochs: int = 400
) -> list[tuple[FloatArray, FloatArray]]:
    import torch

    torch.manual_seed(seed)
    torch.set_num_threads(1)  # deterministic reductions; the data is small enough that it does not matter
    xt = torch.from_numpy(x)
    yt = torch.from_numpy(y)
    mods: list[torch.nn.Module] = []
    if hidden:
        mods += [torch.nn.Dropout(0.1), torch.nn.Linear(x.shape[1], hidden), torch.nn.ReLU()]
    mods += [torch.nn.Dropout(0.1), torch.nn.Linear(hidden or x.shape[1], n_classes)]
    model = torch.nn.Sequential(*mods)
    # "safe" is one class holding half the rows: weigh it so safe and unsafe rows carry equal total mass.
    n_safe = float((yt == 0).sum())
    weight = torch.full((n_classes,), len(yt) / (2 * max(len(yt) - n_safe, 1.0)))
    weight[0] = len(yt) / (2 * max(n_safe, 1.0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=0.05)
    model.train()
    for _ in range(epochs):
        opt.zero_grad()
        loss = loss_fn(model(xt), yt)
        loss.backward()
        opt.step()
    model.eval()
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    return [
        (m.weight.detach().numpy().T.copy().astype(np.float32), m.bias.detach().numpy().astype(np.float32))
        for m in linears
    ]


def build(out: Path = HEAD_PATH, seed: int = 0, hidden: int = 512) -> CpuHead:
    rows = build_dataset()
    subs = [s.id for c in Taxonomy.load().categories for s in c.subcategories]
    data_digest = digest(rows)
    enc = shared_embedder().version
    key = hashlib.sha256(f"{data_digest}|{enc}".encode()).hexdigest()[:16]
    x = _embed([r.text for r in rows], key)
    y = np.array([0 if r.sub is None else 1 + subs.index(r.sub) for r in rows], dtype=np.int64)
    split = np.array([r.split for r in rows])
    tr, ca = split == "train", split == "calib"
    t0 = time.perf_counter()
    layers = fit_mlp(x[tr], y[tr], 1 + len(subs), hidden, seed)
    log.info("fitted head", hidden=hidden, seconds=round(time.perf_counter() - t0, 1))
    head = CpuHead(layers, subs, np.array([0.0, 1.0]), np.array([0.0, 1.0]), 0.5, 0.0, "")
    # Round-trip through float16 first so the calibration is fitted on exactly what ships.
    head.layers = [(w.astype(np.float16).astype(np.float32), b) for w, b in layers]
    raw = head(x[ca])
    head.iso_x, head.iso_y = isotonic_fit(raw.p_raw, (y[ca] > 0).astype(np.float64))
    head.novel_confidence = NOVEL_CONFIDENCE
    pos = (y[ca] > 0) & (head.calibrate(raw.p_raw) >= 0.5)
    conf = raw.sub_probs[pos].max(axis=1)
    log.info("calib positives that would be novel", share=round(float((conf < NOVEL_CONFIDENCE).mean()), 3))
    head.version = f"cpu-head-{HEAD_FORMAT};h={hidden};data={data_digest}"
    calib_ap = average_precision(y[ca] > 0, raw.p_raw)
    out.parent.mkdir(parents=True, exist_ok=True)
    head.save(out, dataset=data_digest, encoder=enc, seed=str(seed))
    log.info(
        "wrote head",
        path=str(out),
        kb=round(out.stat().st_size / 1024, 1),
        calib_auprc=round(calib_ap, 4),
        novel_confidence=head.novel_confidence,
    )
    return head


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=HEAD_PATH)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden", type=int, default=512, help="hidden units; 0 = softmax regression")
    ap.add_argument("--no-report", action="store_true", help="skip the held-out report after training")
    a = ap.parse_args(argv)
    build(a.out, a.seed, a.hidden)
    if not a.no_report:
        from guard.cpu_report import print_report, report

        print_report(report(head_path=a.out))


if __name__ == "__main__":
    main()

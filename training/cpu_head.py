"""Rebuild the CPU engine's head: ``python -m training.cpu_head`` (a few minutes on 2 CPU cores).

1. ``guard.engines.cpu.data.build_dataset()``: the project's own templated training set, split by template.
2. Embed every row with the shipped MiniLM (the engine's own encoder, so train and serve match).
3. Fit a tiny MLP (384 -> hidden -> safe + 28 subcategories) on ``train`` with torch, full batch,
   seeded, single-threaded math: the same inputs give the same weights.
4. Fit the isotonic calibration of ``p_unsafe`` on ``calib``; pick there the operating point (benign
   false-positive rate <= ``TARGET_BENIGN_FPR``) and the novel-risk confidence.
5. Write ``guard/data/cpu_head.npz`` and print the held-out report (``guard.engines.cpu.report``) on ``test``.
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

from guard.embeddings import FloatArray, shared_embedder
from guard.engines.cpu.data import Example, build_dataset, digest
from guard.engines.cpu.head import HEAD_PATH, CpuHead
from guard.engines.cpu.metrics import average_precision, isotonic_fit
from guard.taxonomy import Taxonomy

log = structlog.get_logger()
HEAD_FORMAT = "mlp-v2"
# Share of the training loss each kind of row carries, whatever its row count: unsafe rows (a known
# subcategory, or novel harm that fits none) about half; the benign half split between hard negatives
# (same topic, benign intent) and everyday posts.
KIND_MASS = {"pos": 0.43, "novel": 0.05, "hard": 0.3, "everyday": 0.22}
# Operating point, chosen on the calib split: the lowest threshold whose false-positive rate over the
# benign calib rows (hard negatives and everyday posts together) is at most this.
TARGET_BENIGN_FPR = 0.10
# Novel risk: unsafe, but the top subcategory's probability is below a cut chosen on calib so that at
# most this share of the caught calib posts of a known subcategory would be reported as novel.
NOVEL_SHARE_OF_KNOWN = 0.06
LABEL_SMOOTHING = 0.05


def _embed(texts: list[str], encoder: str) -> FloatArray:
    """Embeddings of the dataset, cached per text (keyed by the encoder) so a rerun after editing a few
    templates embeds only the new rows."""
    cache_dir = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "guardstream"
    key = hashlib.sha256(encoder.encode()).hexdigest()[:12]
    path = cache_dir / f"cpu_head_emb_{key}.npz"
    cached: dict[str, FloatArray] = {}
    if path.exists():
        z = np.load(path, allow_pickle=False)
        cached = dict(zip([str(t) for t in z["texts"]], z["vecs"], strict=True))
    todo = sorted({t for t in texts if t not in cached})
    if todo:
        t0 = time.perf_counter()
        vecs = shared_embedder().encode(todo, batch_size=128)
        log.info("embedded dataset rows", rows=len(todo), seconds=round(time.perf_counter() - t0, 1))
        cached.update(zip(todo, vecs, strict=True))
        cache_dir.mkdir(parents=True, exist_ok=True)
        keep = sorted(set(texts))
        with path.open("wb") as f:
            np.savez(f, texts=np.array(keep), vecs=np.stack([cached[t] for t in keep]))
    return np.stack([cached[t] for t in texts]).astype(np.float32)


def kind_weights(kinds: npt.NDArray[np.str_], mass: dict[str, float] = KIND_MASS) -> npt.NDArray[np.float32]:
    """Per-row loss weights: each kind of row carries its share of the total mass, whatever its row count."""
    w = np.zeros(len(kinds), dtype=np.float32)
    for kind, share in mass.items():
        m = kinds == kind
        if m.any():
            w[m] = share * len(kinds) / m.sum()
    return w


def targets(rows: list[Example], subs: list[str]) -> npt.NDArray[np.float32]:
    """Target distributions over ``safe`` + subcategories: one-hot, except novel harm (unsafe, no
    subcategory), whose mass is spread evenly over every subcategory; then label smoothing."""
    t = np.zeros((len(rows), 1 + len(subs)), dtype=np.float32)
    for k, r in enumerate(rows):
        if r.sub is not None:
            t[k, 1 + subs.index(r.sub)] = 1.0
        elif r.unsafe:
            t[k, 1:] = 1.0 / len(subs)
        else:
            t[k, 0] = 1.0
    return (1 - LABEL_SMOOTHING) * t + LABEL_SMOOTHING / t.shape[1]


def fit_mlp(
    x: FloatArray,
    y: npt.NDArray[np.float32],
    hidden: int,
    seed: int,
    row_weight: npt.NDArray[np.float32],
    epochs: int = 400,
) -> list[tuple[FloatArray, FloatArray]]:
    """Full-batch AdamW on soft targets ``y`` (rows x classes), weighted per row."""
    import torch

    torch.manual_seed(seed)
    torch.set_num_threads(1)  # deterministic reductions; the data is small enough that it does not matter
    xt = torch.from_numpy(x)
    yt = torch.from_numpy(y)
    n_classes = y.shape[1]
    mods: list[torch.nn.Module] = []
    if hidden:
        mods += [torch.nn.Dropout(0.1), torch.nn.Linear(x.shape[1], hidden), torch.nn.ReLU()]
    mods += [torch.nn.Dropout(0.1), torch.nn.Linear(hidden or x.shape[1], n_classes)]
    model = torch.nn.Sequential(*mods)
    wt = torch.from_numpy(np.asarray(row_weight, dtype=np.float32))
    wt = wt / wt.sum()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-3)
    model.train()
    for _ in range(epochs):
        opt.zero_grad()
        logp = torch.log_softmax(model(xt), dim=1)
        loss = -((yt * logp).sum(dim=1) * wt).sum()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
    model.eval()
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    return [
        (m.weight.detach().numpy().T.copy().astype(np.float32), m.bias.detach().numpy().astype(np.float32))
        for m in linears
    ]


def operating_point(p: npt.NDArray[np.float64], benign: npt.NDArray[np.bool_], target: float) -> float:
    """The lowest threshold (on a 0.01 grid, at least 0.5) whose benign false-positive rate is <= target."""
    for t in np.arange(0.5, 0.99, 0.01):
        if float((p[benign] >= t).mean()) <= target:
            return round(float(t), 2)
    return 0.99


def build(out: Path = HEAD_PATH, seed: int = 0, hidden: int = 512) -> CpuHead:
    rows = list(build_dataset())
    subs = [s.id for c in Taxonomy.load().categories for s in c.subcategories]
    data_digest = digest(tuple(rows))
    enc = shared_embedder().version
    x = _embed([r.text for r in rows], enc)
    y = targets(rows, subs)
    unsafe = np.array([r.unsafe for r in rows])
    kind = np.array([r.kind for r in rows])
    split = np.array([r.split for r in rows])
    tr, ca = split == "train", split == "calib"
    t0 = time.perf_counter()
    layers = fit_mlp(x[tr], y[tr], hidden, seed, kind_weights(kind[tr]))
    log.info("fitted head", hidden=hidden, seconds=round(time.perf_counter() - t0, 1))
    head = CpuHead(layers, subs, np.array([0.0, 1.0]), np.array([0.0, 1.0]), 0.5, 0.0, "")
    # Round-trip through float16 first so the calibration is fitted on exactly what ships.
    head.layers = [(w.astype(np.float16).astype(np.float32), b) for w, b in layers]
    raw = head(x[ca])
    head.iso_x, head.iso_y = isotonic_fit(raw.p_raw, unsafe[ca].astype(np.float64))
    p = head.calibrate(raw.p_raw)
    head.threshold = operating_point(p, ~unsafe[ca], TARGET_BENIGN_FPR)
    known = np.array([r.sub is not None for r in rows])[ca]
    conf = raw.sub_probs.max(axis=1)
    caught = p >= 0.5
    head.novel_confidence = round(float(np.quantile(conf[caught & known], NOVEL_SHARE_OF_KNOWN)), 3)
    novel_rows = caught & unsafe[ca] & ~known
    log.info(
        "calib operating point",
        threshold=head.threshold,
        recall=round(float((p[unsafe[ca]] >= head.threshold).mean()), 3),
        benign_fpr=round(float((p[~unsafe[ca]] >= head.threshold).mean()), 3),
        recall_at_half=round(float((p[unsafe[ca]] >= 0.5).mean()), 3),
        benign_fpr_at_half=round(float((p[~unsafe[ca]] >= 0.5).mean()), 3),
        novel_confidence=head.novel_confidence,
        novel_rows_reported_novel=round(float((conf[novel_rows] < head.novel_confidence).mean()), 3),
    )
    head.version = f"cpu-head-{HEAD_FORMAT};h={hidden};data={data_digest}"
    calib_ap = average_precision(unsafe[ca], raw.p_raw)
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
        from guard.engines.cpu.report import print_report, report

        print_report(report(head_path=a.out))


if __name__ == "__main__":
    main()

"""Unsupervised retrieval on Oxford5k (PROTOCOL.md, "Unsupervised retrieval: Oxford5k"; paper Table 8).

No training: each image goes through the pretrained backbone (``num_classes=0``, its own pooled
features), resized to 256x256 and centre-cropped to 224x224; the query is cropped to its box
first. Features are L2-normalised and the database is ranked by cosine similarity. The metric is
the mean over the queries of the average precision that the Oxford Buildings evaluation code
(``compute_ap.cpp``) computes: good + ok images are positives, junk images are left out of the
ranking. A random ranking's mAP is the floor any backbone, even a random-init one, must clear.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

# The ground truth's record lives with the adapter that parses it (data may not import evaluation).
from transferbench.data.oxford5k import Query
from transferbench.progress import progress

__all__ = ["Query", "extract_features", "figures", "mean_average_precision", "oxford_average_precision",
           "mean_precision_recall", "precision_recall", "random_ranking_map", "rank_database"]


def oxford_average_precision(ranked: Sequence[str], positives: set[str] | frozenset[str],
                             junk: set[str] | frozenset[str]) -> float:
    """Average precision exactly as Oxford's ``compute_ap.cpp`` computes it.

    Junk items are skipped (they neither count as seen nor as positive); after each remaining
    item, recall = positives found / |positives| and precision = positives found / items seen,
    and AP accumulates the trapezoid (recall - old_recall) * (old_precision + precision) / 2,
    with old_precision starting at 1.0 -- so a perfect ranking scores exactly 1.0. Like the
    original, the query image is not removed: it is in the database and, for Oxford, listed in
    ``good``, so it counts as a positive wherever it is ranked. (The original sums in C++
    ``float``; this sums in double precision.)
    """
    if not positives:
        raise ValueError("average precision needs at least one positive")
    ap, old_recall, old_precision = 0.0, 0.0, 1.0
    found, seen = 0, 0
    for item in ranked:
        if item in junk:
            continue
        if item in positives:
            found += 1
        recall = found / len(positives)
        precision = found / (seen + 1.0)
        ap += (recall - old_recall) * (old_precision + precision) / 2.0
        old_recall, old_precision = recall, precision
        seen += 1
    return ap


def precision_recall(ranked: Sequence[str], positives: set[str] | frozenset[str],
                     junk: set[str] | frozenset[str]) -> tuple[np.ndarray, np.ndarray]:
    """(precision, recall) after each non-junk item of ``ranked``: the points AP integrates."""
    if not positives:
        raise ValueError("a precision-recall curve needs at least one positive")
    hits = np.array([item in positives for item in ranked if item not in junk], dtype=float)
    found = np.cumsum(hits)
    return found / np.arange(1, len(hits) + 1), found / len(positives)


def rank_database(query_features: np.ndarray, database_features: np.ndarray) -> np.ndarray:
    """Database indices per query by descending cosine similarity; ties keep database order."""
    q = _l2_normalise(np.asarray(query_features, dtype=np.float64))
    d = _l2_normalise(np.asarray(database_features, dtype=np.float64))
    return np.argsort(-(q @ d.T), axis=1, kind="stable")


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def mean_average_precision(queries: Sequence[Query], query_features: np.ndarray, database_features: np.ndarray,
                           database_names: Sequence[str]) -> tuple[float, dict[str, float], dict[str, list[str]]]:
    """mAP over ``queries`` (rows of ``query_features`` in the same order), the AP of each query
    and each query's ranking of ``database_names`` (rows of ``database_features``)."""
    if len(queries) != len(query_features):
        raise ValueError(f"{len(queries)} queries but {len(query_features)} query feature rows")
    if len(database_names) != len(database_features):
        raise ValueError(f"{len(database_names)} database names but {len(database_features)} feature rows")
    order = rank_database(query_features, database_features)
    names = np.asarray(database_names, dtype=object)
    rankings = {q.name: names[row].tolist() for q, row in zip(queries, order)}
    per_query = {q.name: oxford_average_precision(rankings[q.name], q.positives, q.junk) for q in queries}
    return float(np.mean(list(per_query.values()))), per_query, rankings


def random_ranking_map(queries: Sequence[Query], database_names: Sequence[str], *, seed: int,
                       repeats: int = 20) -> float:
    """The mAP of uniformly random rankings of the database, averaged over ``repeats`` draws."""
    rng = np.random.default_rng(seed)
    names = np.asarray(database_names, dtype=object)
    scores = [oxford_average_precision(names[rng.permutation(len(names))].tolist(), q.positives, q.junk)
              for _ in range(repeats) for q in queries]
    return float(np.mean(scores))


def _load(path: Path, box: tuple[float, float, float, float] | None, *, img_size: int, resize: int,
          mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as opened:
        image = opened.convert("RGB")
    if box is not None:
        x1, y1, x2, y2 = box
        w, h = image.size
        left, top = max(0, int(np.floor(x1))), max(0, int(np.floor(y1)))
        right, bottom = min(w, int(np.ceil(x2))), min(h, int(np.ceil(y2)))
        if right <= left or bottom <= top:
            raise ValueError(f"{path}: box {box} lies outside the {w}x{h} image")
        image = image.crop((left, top, right, bottom))
    image = image.resize((resize, resize), Image.Resampling.BICUBIC)
    offset = (resize - img_size) // 2
    image = image.crop((offset, offset, offset + img_size, offset + img_size))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (pixels - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def extract_features(model: torch.nn.Module, images: Sequence[Path], *,
                     boxes: Sequence[tuple[float, float, float, float] | None] | None = None,
                     img_size: int = 224, resize: int = 256, mean: Sequence[float] | None = None,
                     std: Sequence[float] | None = None, batch_size: int = 32) -> np.ndarray:
    """L2-normalised features (one row per image) of a timm model created with ``num_classes=0``
    (its forward returns the backbone's own pooled features).

    Each image is read as RGB, cropped to its box (if any), resized to ``resize`` x ``resize``,
    centre-cropped to ``img_size`` and normalised with ``mean``/``std`` (default: what timm
    resolves for the model, ``models.backbones.InputSpec``).
    """
    if resize < img_size:
        raise ValueError(f"resize {resize} is smaller than the crop img_size {img_size}")
    if boxes is not None and len(boxes) != len(images):
        raise ValueError(f"{len(images)} images but {len(boxes)} boxes")
    if mean is None or std is None:
        from transferbench.models.backbones import InputSpec

        spec = InputSpec.of(model)
        mean = spec.mean if mean is None else mean
        std = spec.std if std is None else std
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    chunks = []
    try:
        with torch.inference_mode(), progress(desc="features", total=len(images), unit="img") as bar:
            for start in range(0, len(images), batch_size):
                batch = torch.stack([
                    _load(Path(path), boxes[start + i] if boxes is not None else None, img_size=img_size,
                          resize=resize, mean=mean, std=std)
                    for i, path in enumerate(images[start:start + batch_size])])
                features = model(batch.to(device)).float()
                chunks.append(torch.nn.functional.normalize(features, dim=1).cpu().numpy())
                bar.update(len(batch))
    finally:
        model.train(was_training)
    if not chunks:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(chunks)


def mean_precision_recall(queries: Sequence[Query], rankings: Mapping[str, Sequence[str]], *,
                          points: int = 101) -> tuple[np.ndarray, np.ndarray]:
    """(recall grid, mean interpolated precision) over the queries: each query's precision at recall r
    is its best precision at any recall >= r, so curves of different lengths average."""
    grid = np.linspace(0.0, 1.0, points)
    curves = []
    for q in queries:
        precision, recall = precision_recall(rankings[q.name], q.positives, q.junk)
        best = np.append(np.maximum.accumulate(precision[::-1])[::-1], 0.0)  # 0 past the last recall
        curves.append(best[np.searchsorted(recall, grid, side="left")])  # recall never decreases
    return grid, (np.mean(curves, axis=0) if curves else np.zeros_like(grid))


def figures(queries: Sequence[Query], rankings: Mapping[str, Sequence[str]], image_paths: Mapping[str, Path],
            out_dir: Path, *, per_query: Mapping[str, float], mean_curve: tuple[np.ndarray, np.ndarray],
            title: str | None = None, top_k: int = 8, grid_queries: int = 4) -> list[Path]:
    """Write ``pr_curve.png`` (each query faint, their mean in bold) and ``top_k.png`` (the query
    crop, then its top-k images framed green/red/grey for positive/negative/junk). ``per_query`` and
    ``mean_curve`` are what ``mean_average_precision`` and ``mean_precision_recall`` returned."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 4))
    for q in queries:
        precision, recall = precision_recall(rankings[q.name], q.positives, q.junk)
        ax.plot(recall, precision, color="tab:blue", alpha=0.15, linewidth=0.8)
    if queries:
        grid, mean_precision = mean_curve
        mean_ap = float(np.mean(list(per_query.values())))
        ax.plot(grid, mean_precision, color="tab:blue", linewidth=2.0, label=f"mean (mAP {mean_ap:.3f})")
        ax.legend(loc="upper right")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02),
           title=title or "Retrieval precision-recall")
    fig.tight_layout()
    written = [out_dir / "pr_curve.png"]
    fig.savefig(written[0], dpi=120)
    plt.close(fig)

    shown = list(queries)[:grid_queries]
    if shown:
        fig, axes = plt.subplots(len(shown), top_k + 1, figsize=(1.4 * (top_k + 1), 1.5 * len(shown)), squeeze=False)
        for row, q in zip(axes, shown):
            with Image.open(image_paths[q.image]) as opened:
                row[0].imshow(opened.convert("RGB").crop(tuple(int(round(v)) for v in q.bbox)))
            row[0].set_title(f"{q.name}\nAP {per_query[q.name]:.2f}", fontsize=6)
            for cell, name in zip(row[1:], list(rankings[q.name])[:top_k]):
                with Image.open(image_paths[name]) as opened:
                    cell.imshow(opened.convert("RGB"))
                colour = "tab:green" if name in q.positives else "grey" if name in q.junk else "tab:red"
                for spine in cell.spines.values():
                    spine.set(edgecolor=colour, linewidth=3)
            for cell in row:
                cell.set_xticks([])
                cell.set_yticks([])
        if title:
            fig.suptitle(title, fontsize=8)
        fig.tight_layout()
        written.append(out_dir / "top_k.png")
        fig.savefig(written[1], dpi=120)
        plt.close(fig)
    return written

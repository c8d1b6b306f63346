"""Prompt selection by sharpness (the CLIP-ES paper) and background sets for new vocabularies.

sharpness(template) = Σ_i var(s_i) / Σ_i mean(s_i), s_i the post-softmax scores of image i's
labelled classes (population variance; softmax over the image's labels + the background set;
image embedding = patch-token mean as in CLIP-ES). Lower is better. Only image-level labels are used.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

from .gradcam import class_scores
from ..classes import DATA_DIR, ClassList
from ..clip.model import CLIP
from ..io import write_bytes
from ..clip.text import encode_grid

TEMPLATES_FILE = DATA_DIR / "templates.txt"

# Common scene/stuff words to draw a class-related background set from (CLIP-ES's 25 VOC words and more).
SCENE_WORDS = (
    "ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water", "river", "sea", "railway",
    "railroad", "keyboard", "helmet", "cloud", "house", "mountain", "ocean", "road", "rock", "street", "valley",
    "bridge", "sign", "floor", "ceiling", "window", "door", "field", "sand", "snow", "forest", "beach", "desert",
    "dirt", "pavement", "sidewalk", "fence", "curtain", "carpet", "shelf", "table", "plant", "leaves", "bush",
    "hill", "stone", "brick", "wood", "metal", "fabric", "paper", "light", "shadow", "cabinet", "counter",
)


def load_templates(path: str | Path | None = None) -> list[str]:
    """Templates, one per line ('#' comments allowed), each with one '{}'."""
    path = Path(path) if path else TEMPLATES_FILE
    templates = [t.strip() for t in path.read_text().splitlines() if t.strip() and not t.lstrip().startswith("#")]
    bad = [t for t in templates if t.count("{}") != 1]
    if bad or not templates:
        raise ValueError(f"{path}: every template needs exactly one '{{}}' (bad: {bad[:3]})" if bad
                         else f"{path}: no templates")
    return templates


def sharpness_terms(scores: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-template numerator and denominator terms of one image.

    scores (T, Kmax) post-softmax scores of the image's labels (padded), counts: K (scalar) ->
    (population variance (T,), mean (T,)) over the first K columns.
    """
    s = scores[:, : int(counts)]
    return s.var(dim=1, unbiased=False), s.mean(dim=1)


def sharpness(per_image_scores: Iterable[torch.Tensor]) -> torch.Tensor:
    """Σ_i var(s_i) / Σ_i mean(s_i) for images' score sets; each item (T, K_i) -> (T,)."""
    num = den = 0
    for s in per_image_scores:
        var, mean = sharpness_terms(s, torch.tensor(s.shape[1]))
        num, den = num + var, den + mean
    return num / den


@dataclass
class Ranking:
    """Templates sorted by sharpness (lowest first), with optional initial-CAM mIoU."""

    templates: list[str]
    sharpness: list[float]
    miou: dict[str, float]

    def rows(self) -> list[dict]:
        """One row per template; mIoU in percent (0-100), as every file and screen of the project shows it."""
        return [{"rank": i + 1, "template": t, "sharpness": s,
                 "init_cam_miou_pct": None if self.miou.get(t) is None else 100 * self.miou[t]}
                for i, (t, s) in enumerate(zip(self.templates, self.sharpness))]


@torch.no_grad()
def image_embedding(model: CLIP, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H', W') -> normalised patch-mean embeddings (B, E) (CLIP-ES's pooling), float32."""
    tokens = model.visual.forward_intermediates(images).tokens
    emb = model.visual.pool(tokens, "patch_mean").float()
    return emb / emb.norm(dim=-1, keepdim=True)


@torch.no_grad()
def score_templates(model: CLIP, classes: ClassList, templates: Sequence[str],
                    images: Iterable[tuple[torch.Tensor, list[int]]], background: bool = True) -> torch.Tensor:
    """Sharpness of every template, (T,). Text for all templates x classes in one batched pass;
    each image embedded once; ``images`` yields (image (1, 3, H', W'), labels)."""
    strings = list(classes.prompts) + (list(classes.background) if background else [])
    text = encode_grid(model, strings, templates).float()           # (T, C + M, E)
    scale = float(model.logit_scale.exp())
    num = torch.zeros(len(templates))
    den = torch.zeros(len(templates))
    seen = 0
    for image, labels in images:
        emb = image_embedding(model, image)[0].to(text.device)     # (E,)
        logits = scale * torch.einsum("tce,e->tc", text, emb)      # (T, C + M)
        scores = class_scores(logits, [labels] * len(templates), classes.num_classes)
        var, mean = sharpness_terms(scores.cpu(), torch.tensor(len(labels)))
        num += var
        den += mean
        seen += 1
    if not seen:
        raise ValueError("no usable image to score the templates on")
    return num / den


def rank(templates: Sequence[str], values: torch.Tensor) -> Ranking:
    order = sorted(range(len(templates)), key=lambda i: (float(values[i]), i))
    return Ranking([templates[i] for i in order], [float(values[i]) for i in order], {})


def write_ranking(out_dir: str | Path, ranking: Ranking) -> None:
    """ranking.csv, ranking.md and sharpness.png in ``out_dir`` (atomic writes)."""
    out = Path(out_dir)
    rows = ranking.rows()
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    write_bytes(out / "ranking.csv", buf.getvalue().encode())
    md = ["| rank | template | sharpness | initial-CAM mIoU (%) |", "|---:|---|---:|---:|"]
    md += [f"| {r['rank']} | `{r['template']}` | {r['sharpness']:.5f} | {_pct(r['init_cam_miou_pct'])} |" for r in rows]
    write_bytes(out / "ranking.md", ("\n".join(md) + "\n").encode())
    write_bytes(out / "sharpness.png", _plot(ranking))


def _pct(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}"


def _plot(ranking: Ranking) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(ranking.templates)
    fig, ax = plt.subplots(figsize=(10, max(3.0, 0.18 * n + 1)))
    ax.barh(range(n), ranking.sharpness, color="#4c72b0")
    ax.set_yticks(range(n), ranking.templates, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("sharpness (lower is better)")
    if ranking.miou:
        ax2 = ax.twiny()
        idx = [i for i, t in enumerate(ranking.templates) if t in ranking.miou]
        ax2.plot([100 * ranking.miou[ranking.templates[i]] for i in idx], idx, "o", color="#dd8452")
        ax2.set_xlabel("initial-CAM mIoU (%)", color="#dd8452")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def best_template(ranking_csv: str | Path) -> str:
    """The top template of a ``ranking.csv`` written by ``make prompts``."""
    path = Path(ranking_csv)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no prompt ranking; run `make prompts` first or pass --prompt-ranking")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "template" not in rows[0]:
        raise ValueError(f"{path}: not a ranking written by make prompts")
    return min(rows, key=lambda r: int(r["rank"]))["template"]


def _words(text: str) -> set[str]:
    out = set()
    for w in text.lower().replace(",", " ").split():
        out |= {w, w.rstrip("s"), w[:-2] if w.endswith("es") else w}
    return out


def propose_background(classes: ClassList, words: Sequence[str] = SCENE_WORDS) -> list[str]:
    """Background words for a vocabulary: ``words`` minus any sharing a word (or its singular) with a
    foreground name or synonym (e.g. 'tree' is dropped for a class 'christmas tree')."""
    taken: set[str] = set()
    for c in range(classes.num_classes):
        taken |= _words(classes.names[c]) | _words(classes.prompts[c])
    return [w for w in words if not (_words(w) & taken)]


@dataclass
class PromptsConfig:
    """``make prompts``: rank templates on a labelled split."""

    dataset: str
    root: str
    split: str
    clip: str
    out: str
    classes: str | None = None
    labels: str | None = None
    masks: str | None = None
    templates: str | None = None       # file of templates (default data/templates.txt: ExCEL's 85)
    top: int = 5                       # initial-CAM mIoU for this many best templates when GT exists
    max_images: int = 0                # 0: every image of the split
    background: bool = True
    device: str = "auto"
    precision: str = "auto"
    progress: bool = True


def run_prompts(cfg: PromptsConfig) -> tuple[Ranking, dict[str, str]]:
    """Score every template, rank, and (with ground truth) measure initial-CAM mIoU of the top few.
    Writes ranking.csv/.md, sharpness.png, manifest.json and errors.json to ``cfg.out``."""
    import numpy as np
    from tqdm import tqdm

    from .gradcam import CAMConfig, CAMEngine
    from ..data.camfile import upsample_cams
    from ..clip.model import load_clip, resolve_device
    from ..data.datasets import SampleError, build_dataset, read_mask
    from ..data.image import ImageError, load_for_model
    from ..io import sha256_file, write_errors, write_manifest
    from ..eval.metrics import TAUS_RAW, cam_sweep_confusions, mean_iou

    device, dtype = resolve_device(cfg.device, cfg.precision)
    data = build_dataset(cfg.dataset, cfg.root, cfg.classes, cfg.labels, cfg.masks, needs=("images", "labels"))
    ids = data.ids(cfg.split)
    ids = ids[: cfg.max_images] if cfg.max_images else ids
    templates = load_templates(cfg.templates)
    model = load_clip(cfg.clip, device=device, dtype=dtype)
    errors: dict[str, str] = {}
    usable: list[str] = []

    def samples():
        for image_id in tqdm(ids, desc="prompts: sharpness", unit="img", disable=not cfg.progress):
            try:
                labels = data.labels(image_id)
                x, _ = load_for_model(data.image_path(image_id))
            except (SampleError, ImageError, OSError, ValueError) as e:
                errors[image_id] = str(e)
                continue
            usable.append(image_id)
            yield x[None].to(device, dtype), labels

    ranking = rank(templates, score_templates(model, data.classes, templates, samples(), cfg.background))
    gt_ids = [i for i in usable if data.mask_path(i) is not None]
    for template in ranking.templates[: cfg.top] if gt_ids else []:
        engine = CAMEngine(model, data.classes, CAMConfig(box_threshold=data.classes.box_threshold, template=template,
                                                         affinity="none", background=cfg.background))
        n = data.classes.num_classes + 1
        total = np.zeros((len(TAUS_RAW), n, n), np.int64)
        for image_id in tqdm(gt_ids, desc=f"prompts: CAMs '{template}'", unit="img", disable=not cfg.progress):
            labels = data.labels(image_id)
            x, size = load_for_model(data.image_path(image_id))
            init = engine(x[None].to(device, dtype), [labels])[0].init
            gt = read_mask(data.mask_path(image_id), data.classes.num_classes)
            total += cam_sweep_confusions(upsample_cams(init, size), np.asarray(labels), gt, n, TAUS_RAW)
        ranking.miou[template] = max(mean_iou(c) for c in total)
    out = Path(cfg.out)
    write_ranking(out, ranking)
    write_errors(out, errors)
    write_manifest(out, {"stage": "prompts", "dataset": cfg.dataset, "split": cfg.split,
                         "checkpoint_sha256": sha256_file(cfg.clip), "templates": templates,
                         "background": cfg.background}, counts={"images": len(ids), "scored": len(usable),
                                                                "failed": len(errors), "with_gt": len(gt_ids)})
    return ranking, errors

"""ExCEL's training-free CAMs (Exploring CLIP's dense knowledge for WSSS, CVPR 2025).

No gradients: one calibrated forward of the image encoder (``VisionTransformer.forward_calibrated``)
gives dense token features that are compared directly with the class text embeddings, which text
semantic enrichment (``tse``) has sharpened with visual attributes. The resulting patch-text CAMs are
refined with the attention of the last blocks as in CLIP-ES's affinity (Sinkhorn, symmetrise, square,
box-masked columns), from the same forward.

Reference behaviour kept by default (``exact``): ImageNet statistics normalise the image, the
positional table goes through the 20 x 20 grid of the reference's 320 x 320 training crops, the
calibrated blocks' attention is summed over heads (mixing scales with the plain block before them),
and the token features are normalised over the token axis. ``exact=False`` uses CLIP's statistics,
interpolates the table directly, averages heads and normalises each token's feature.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..labels.affinity import box_masks, mean_attention, refine, transition_matrix
from .gradcam import CAMResult, batch_results, label_slots
from ..classes import DATA_DIR, ClassList
from ..clip.model import CLIP, Calibrated
from ..data.image import DEFAULT_MAX_PATCHES, load_image, normalize_then_resize, target_size
from ..io import sha256_file
from ..clip.text import encode_prompts
from . import tse
from .tse import CLUSTERINGS, DROP

CUDA_PRECISION = "fp32"  # the reference runs this CLIP in fp32
ATTRIBUTES = {"voc": 112, "coco": 224}  # the reference's bank sizes
ATTRIBUTES_PER_CLASS = 5.6              # others: VOC's ratio


@dataclass(frozen=True)
class ExcelConfig:
    """Settings of ExCEL's training-free CAMs; defaults are the reference's.

    calibrated_blocks: how many final blocks run the calibrated second path.
    attention_layers: attention maps of the last blocks averaged for the refinement.
    class_temperature: the CLS token's class scores are sharpened by this factor before the softmax
        that weights each class's similarity map.
    input_size: None keeps each image's aspect ratio (sides rounded up to multiples of 16, as the
        CLIP-ES method); an int resizes every image to that square, as the reference (320).
    pos_via: side of the grid the positional table is first resized to (the reference's 20) or None.
    tse: text semantic enrichment on/off; descriptions / attribute_bank: its knowledge base or a
        saved bank (sha256 recorded); attributes: bank size B; seed: KMeans seed; drop: masked share;
        attribute_clustering: one KMeans over all descriptions ('global', the reference's) or one per
        class ('per-class'), see ``tse``.
    """

    box_threshold: float = 0.79
    calibrated_blocks: int = 5
    attention_layers: int = 6
    sinkhorn_rounds: int = 3
    power: int = 2
    class_temperature: float = 2.0
    input_size: int | None = None
    pos_via: int | None = 20
    exact: bool = True
    template: str | None = None
    tse: bool = True
    descriptions: str | None = None
    descriptions_sha256: str | None = None
    attribute_bank: str | None = None
    attribute_bank_sha256: str | None = None
    attributes: int = 112
    attribute_clustering: str = CLUSTERINGS[0]
    seed: int = 0
    drop: float = DROP

    def __post_init__(self) -> None:
        if self.input_size is not None and (self.input_size <= 0 or self.input_size % 16):
            raise ValueError(f"--input-size must be a positive multiple of 16, got {self.input_size}")
        if self.attention_layers < 1 or self.calibrated_blocks < 1:
            raise ValueError("attention_layers and calibrated_blocks must be at least 1")
        if self.attribute_clustering not in CLUSTERINGS:
            raise ValueError(f"attribute clustering {self.attribute_clustering!r}: choose {' or '.join(CLUSTERINGS)}")


def make_config(dataset: str, classes: ClassList, exact: bool, box_threshold: float | None,
                options: dict[str, Any]) -> ExcelConfig:
    """Resolve defaults (description file of the dataset, bank size) and check the TSE inputs now."""
    opts = dict(options)
    if box_threshold is not None:
        opts["box_threshold"] = box_threshold
    if not exact:
        opts.setdefault("pos_via", None)
    opts.setdefault("attributes", ATTRIBUTES.get(dataset, round(ATTRIBUTES_PER_CLASS * classes.num_classes)))
    if "attribute_clustering" in opts and (opts.get("attribute_bank") or not opts.get("tse", True)):
        raise ValueError("--attribute-clustering chooses how descriptions are clustered; it does nothing with "
                         "--attribute-bank or --no-tse: drop one of them")
    if opts.get("tse", True):
        if opts.get("attribute_bank"):
            path = opts["attribute_bank"]
            bank = tse.load_bank(path, classes)
            opts.update(attribute_bank=str(Path(path).resolve()), attribute_bank_sha256=sha256_file(path),
                        attributes=len(bank.centres), descriptions=None)
        else:
            path = opts.get("descriptions") or (str(DATA_DIR / "descriptions" / f"{dataset}.json")
                                                if dataset in ATTRIBUTES else None)
            if path is None:
                raise ValueError("ExCEL's text enrichment needs descriptions of this vocabulary's classes: pass "
                                 "--descriptions FILE (JSON: class -> list of descriptions), --attribute-bank FILE, "
                                 "or --no-tse")
            distinct = sum(len(set(d)) for d in tse.load_descriptions(path, classes))
            if "attributes" not in options and dataset not in ATTRIBUTES:
                opts["attributes"] = min(opts["attributes"], distinct)
            if not classes.num_classes <= opts["attributes"] <= distinct:
                raise ValueError(f"{path}: {opts['attributes']} attributes asked for, but {classes.num_classes} classes "
                                 f"with {distinct} distinct descriptions allow {classes.num_classes} to {distinct} "
                                 "(--attributes)")
            opts.update(descriptions=str(Path(path).resolve()), descriptions_sha256=sha256_file(path))
    else:
        opts.update(descriptions=None, attribute_bank=None)
    return ExcelConfig(exact=exact, **opts)


def manifest(config: ExcelConfig) -> dict[str, Any]:
    d = dataclasses.asdict(config)
    if config.tse and config.attribute_bank is None:
        import sklearn  # KMeans results may change with its version

        d["sklearn"] = sklearn.__version__
    return d


# ----------------------------------------------------------------------------------- images
def load_for_model(path: str | Path, input_size: int | None = None, max_patches: int = DEFAULT_MAX_PATCHES,
                   exact: bool = True, exif_transpose: bool = False) -> tuple[torch.Tensor, tuple[int, int]]:
    """One image for the ExCEL method: (float32 (3, h', w'), original (H, W))."""
    img = load_image(path, exif_transpose).convert("RGB")
    H, W = img.height, img.width
    size = (input_size, input_size) if input_size else target_size(H, W, max_patches)
    return normalize_then_resize(np.asarray(img), size, exact), (H, W)


def image_loader(config: ExcelConfig, max_patches: int, exif_transpose: bool):
    return functools.partial(load_for_model, input_size=config.input_size, max_patches=max_patches,
                             exact=config.exact, exif_transpose=exif_transpose)


# ------------------------------------------------------------------------------------- maths
def patch_text_cams(features: torch.Tensor, text: torch.Tensor, num_classes: int, temperature: float = 2.0) -> torch.Tensor:
    """Static patch-text CAMs (ExCEL, after CLIP Surgery's feature surgery).

    features (B, L, E) projected tokens, CLS first, already normalised; text (C_all, E) rows of the
    foreground classes followed by the background words -> (B, n, num_classes), n = L - 1.
    c = features textᵀ; class weights w = softmax(temperature · c_CLS) / mean(softmax); s = w·c minus
    its mean over the C_all rows (the part every class shares); min-max over all L tokens, CLS
    included, with no epsilon; CLS dropped, foreground columns kept.
    """
    c = features @ text.to(features.dtype).t()                                   # (B, L, C_all)
    p = (temperature * c[:, 0]).softmax(dim=-1)
    w = p / p.mean(dim=-1, keepdim=True)                                         # (B, C_all)
    s = w[:, None] * c
    s = s - s.mean(dim=-1, keepdim=True)
    s = s - s.amin(dim=1, keepdim=True)
    s = s / s.amax(dim=1, keepdim=True)
    return s[:, 1:, :num_classes]


class ExcelEngine:
    """Frozen CLIP + a vocabulary's (enriched) text embeddings -> ExCEL CAMs for batches of same-size images."""

    def __init__(self, model: CLIP, classes: ClassList, config: ExcelConfig | None = None,
                 bank: tse.AttributeBank | None = None):
        self.model, self.classes = model, classes
        self.config = cfg = config or ExcelConfig()
        template = cfg.template or classes.template
        device = model.token_embedding.weight.device
        fg = encode_prompts(model, list(classes.prompts), [template])
        if cfg.tse:
            if bank is None:
                bank = (tse.load_bank(cfg.attribute_bank, classes, model.arch.embed_dim) if cfg.attribute_bank else
                        tse.build_bank(model, classes, tse.load_descriptions(cfg.descriptions, classes),
                                       cfg.attributes, cfg.seed, template, cfg.attribute_clustering))
            fg = tse.enrich(fg, torch.from_numpy(bank.centres).to(device, fg.dtype), cfg.drop)
        rows = [fg]
        if classes.background:
            rows.append(encode_prompts(model, list(classes.background), [template]))
        text = torch.cat(rows)
        self.text = text / text.norm(dim=-1, keepdim=True)                       # (C + M, E)
        self.bank = bank

    @torch.no_grad()
    def encode(self, images: torch.Tensor, relation: torch.Tensor | None = None,
               features: bool = False) -> Calibrated:
        """The calibrated forward with this method's settings (``relation``, ``features``: see
        ``VisionTransformer.forward_calibrated``); attention of the last ``attention_layers`` blocks."""
        cfg, visual = self.config, self.model.visual
        n_blocks = len(visual.blocks)
        return visual.forward_calibrated(images, cfg.calibrated_blocks,
                                         attention_blocks=range(n_blocks - cfg.attention_layers, n_blocks),
                                         calibrated_attention="sum" if cfg.exact else "mean", relation=relation,
                                         features=features, pos_via=cfg.pos_via)

    @torch.no_grad()
    def recalibrate(self, done: Calibrated, relation: torch.Tensor | None) -> Calibrated:
        """``encode(images, relation)`` from an ``encode`` of the same images run with this method's
        settings and ``keep_qkv`` (``VisionTransformer.recalibrate``): only the calibrated path is redone."""
        return self.model.visual.recalibrate(done, relation)

    @torch.no_grad()
    def cams_from(self, out: Calibrated, grid: tuple[int, int]) -> torch.Tensor:
        """Patch-text CAMs of every foreground class (B, C, h, w) float32 from an ``encode`` result."""
        visual = self.model.visual
        x = visual.ln_post(out.tokens) @ visual.proj.to(out.tokens.dtype)
        x = x.float()
        x = x / x.norm(dim=1 if self.config.exact else -1, keepdim=True)   # the reference normalises over tokens
        cams = patch_text_cams(x, self.text_on(x.device), self.classes.num_classes, self.config.class_temperature)
        return cams.transpose(1, 2).unflatten(-1, grid)

    def text_on(self, device: torch.device) -> torch.Tensor:
        """The class text rows (C + M, E) on ``device``, moved once when the model has moved since it was
        built (the training benchmark builds the label maker before moving the model)."""
        if self.text.device != device:
            self.text = self.text.to(device)
        return self.text

    @torch.no_grad()
    def maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, h', w') -> (static CAMs of every foreground class (B, C, h, w) float32,
        refinement transition matrices (B, n, n) float32)."""
        cfg = self.config
        out = self.encode(images)
        p = self.model.visual.patch_size
        cams = self.cams_from(out, (images.shape[-2] // p, images.shape[-1] // p))
        attn = mean_attention([out.attentions[i] for i in sorted(out.attentions)], cfg.attention_layers)
        return cams, transition_matrix(attn, cfg.sinkhorn_rounds, cfg.power)

    def __call__(self, images: torch.Tensor, labels: Sequence[Sequence[int]]) -> list[CAMResult]:
        """images (B, 3, h', w') normalised; labels[b] the 0-based foreground ids of image b (non-empty).
        One ``CAMResult`` per image: refined ``cams`` and the static ``init`` maps, (K, h, w) float32."""
        if any(len(lab) == 0 for lab in labels):
            raise ValueError("every image needs at least one label")
        cams, trans = self.maps(images)
        init, _, _ = select_classes(cams, labels)
        masks = box_masks(init, self.config.box_threshold, self.config.exact)
        return batch_results(refine(trans, init, masks), init, labels)


def select_classes(cams: torch.Tensor, labels: Sequence[Sequence[int]]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every class's maps (B, C, h, w) -> (each image's labels' maps (B, K, h, w) in label order, zero in
    unused slots; ``label_slots``' classes and valid (B, K))."""
    classes, valid = label_slots(labels, cams.device)
    picked = cams.gather(1, classes[:, :, None, None].expand(-1, -1, *cams.shape[-2:]))
    return picked.masked_fill(~valid[:, :, None, None], 0), classes, valid


def build_engine(model: CLIP, classes: ClassList, config: ExcelConfig) -> ExcelEngine:
    return ExcelEngine(model, classes, config)

"""An independent re-statement of the CLIP-ES reference computation (CLIP, GradCAM, CAA), for parity tests
and for the per-class-loop baseline of ``make bench``.

Deliberately written the way the reference is, not the way ``pipeline`` is: OpenAI's
sequence-first model built on ``nn.MultiheadAttention``, positional embedding re-interpolated on
every forward, a forward hook on block 12's LN1 with a tensor hook for its gradient, one forward
and backward of block 12 per class, numpy host arithmetic, Sinkhorn recomputed per class.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.clip.tokenizer import tokenize


class _LN(nn.LayerNorm):
    def forward(self, x):  # fp32 for half inputs, as OpenAI's; float64 kept for the float64 checks
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        return F.layer_norm(x.to(dt), self.normalized_shape, self.weight.to(dt), self.bias.to(dt), self.eps).to(x.dtype)


class _Block(nn.Module):
    def __init__(self, d: int, heads: int, mask: torch.Tensor | None = None):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads)
        self.ln_1, self.ln_2 = _LN(d), _LN(d)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(d, 4 * d))
        self.mlp.add_module("gelu", _QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * d, d))
        self.register_buffer("mask", mask)

    def forward(self, x):  # x (L, N, D)
        y = self.ln_1(x)
        mask = None if self.mask is None else self.mask.to(x.dtype)  # as CLIP-ES: the mask in the input's dtype
        out, w = self.attn(y, y, y, need_weights=True, attn_mask=mask)
        x = x + out
        return x + self.mlp(self.ln_2(x)), w


class _QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ReferenceCLIP(nn.Module):
    """OpenAI CLIP ViT with CLIP-ES's changes, loaded from an OpenAI state dict."""

    def __init__(self, sd: dict[str, torch.Tensor]):
        super().__init__()
        vw = sd["visual.conv1.weight"].shape[0]
        tw = sd["ln_final.weight"].shape[0]
        nv = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
        nt = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
        ctx = sd["positional_embedding"].shape[0]
        self.patch = sd["visual.conv1.weight"].shape[-1]
        self.conv1 = nn.Conv2d(3, vw, self.patch, self.patch, bias=False)
        self.class_embedding = nn.Parameter(sd["visual.class_embedding"].float().clone())
        self.register_buffer("vpos", sd["visual.positional_embedding"].float().clone())
        self.ln_pre, self.ln_post = _LN(vw), _LN(vw)
        self.vblocks = nn.ModuleList(_Block(vw, vw // 64) for _ in range(nv))
        self.register_buffer("proj", sd["visual.proj"].float().clone())
        mask = torch.full((ctx, ctx), float("-inf")).triu_(1)
        self.tblocks = nn.ModuleList(_Block(tw, tw // 64, mask) for _ in range(nt))
        self.token_embedding = nn.Embedding(sd["token_embedding.weight"].shape[0], tw)
        self.register_buffer("tpos", sd["positional_embedding"].float().clone())
        self.ln_final = _LN(tw)
        self.register_buffer("text_projection", sd["text_projection"].float().clone())
        self.register_buffer("logit_scale", sd["logit_scale"].float().clone())
        self.full_depth_tokens = ctx  # the reference's "12 layers iff 77 tokens" test (CLIP-ES clip/model.py)
        own = {"conv1.weight": "visual.conv1.weight", "ln_pre.weight": "visual.ln_pre.weight",
               "ln_pre.bias": "visual.ln_pre.bias", "ln_post.weight": "visual.ln_post.weight",
               "ln_post.bias": "visual.ln_post.bias", "token_embedding.weight": "token_embedding.weight",
               "ln_final.weight": "ln_final.weight", "ln_final.bias": "ln_final.bias"}
        for name, p in self.named_parameters():
            if name.startswith("vblocks."):
                src = "visual.transformer.resblocks." + name[len("vblocks."):]
            elif name.startswith("tblocks."):
                src = "transformer.resblocks." + name[len("tblocks."):]
            else:
                src = own.get(name)
            if src is not None:
                p.data.copy_(sd[src].float())
        self.requires_grad_(True)  # the reference's clip.load leaves parameters trainable

    def as_on_cuda(self) -> "ReferenceCLIP":
        """In place, the precision ``clip.load`` gives on CUDA (OpenAI's convert_weights): conv, linear and
        attention weights and the two projections in fp16; embeddings, LayerNorms and logit_scale stay float32
        (LayerNorms compute in float32). Inputs are then cast to fp16, as ``encode_image`` does."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.half()
            elif isinstance(m, nn.MultiheadAttention):
                m.in_proj_weight.data, m.in_proj_bias.data = m.in_proj_weight.data.half(), m.in_proj_bias.data.half()
        self.proj, self.text_projection = self.proj.half(), self.text_projection.half()
        return self

    def upsample_pos_emb(self, h: int, w: int) -> torch.Tensor:
        first, grid = self.vpos[:1], self.vpos[1:]
        g = int(np.sqrt(grid.shape[0]))
        grid = grid.permute(1, 0).view(1, -1, g, g)
        grid = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)
        return torch.cat([first, grid.view(grid.shape[1], -1).permute(1, 0)], 0)

    def encode_image(self, img: torch.Tensor):
        h, w = img.shape[-2] // self.patch, img.shape[-1] // self.patch
        x = self.conv1(img)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = self.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype, device=x.device)
        x = torch.cat([cls, x], dim=1) + self.upsample_pos_emb(h, w).to(x.dtype)
        x = self.ln_pre(x).permute(1, 0, 2)
        attns = []
        with torch.no_grad():
            layers = len(self.vblocks) if x.shape[0] == self.full_depth_tokens else len(self.vblocks) - 1
            for blk in self.vblocks[:layers]:
                x, a = blk(x)
                attns.append(a)
        return x, attns

    def forward_last_layer(self, feats: torch.Tensor, text: torch.Tensor):
        x, attn = self.vblocks[-1](feats)
        x = self.ln_post(x.permute(1, 0, 2))
        x = torch.mean(x[:, 1:, :], dim=1) @ self.proj
        x = x / x.norm(dim=1, keepdim=True)
        text = text / text.norm(dim=1, keepdim=True)
        return (self.logit_scale.exp() * x @ text.t()).softmax(dim=-1), attn

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        dt = self.tblocks[0].attn.in_proj_weight.dtype  # OpenAI's model.dtype: fp16 after convert_weights
        x = (self.token_embedding(tokens).to(dt) + self.tpos.to(dt)).permute(1, 0, 2)
        for blk in self.tblocks:
            x = blk(x)[0]
        x = self.ln_final(x.permute(1, 0, 2))
        return x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)] @ self.text_projection


def reference_text(model: ReferenceCLIP, strings: list[str], template: str) -> torch.Tensor:
    rows = []
    for s in strings:
        f = model.encode_text(tokenize([template.format(s)]).to(model.tpos.device))
        f = f / f.norm(dim=-1, keepdim=True)
        f = f.mean(dim=0)
        rows.append(f / f.norm())
    return torch.stack(rows)


def _scale(img: np.ndarray) -> np.ndarray:
    img = img - np.min(img)
    return img / (1e-7 + np.max(img))


def scoremap2bbox(scoremap: np.ndarray, threshold: float, clip_boxes: bool = True):
    """``clip_boxes`` False: the reference without its size - 1 clipping of the box end."""
    height, width = scoremap.shape
    if not clip_boxes:
        height, width = height + 1, width + 1
    u = np.expand_dims((scoremap * 255).astype(np.uint8), 2)
    _, thr = cv2.threshold(u, int(threshold * np.max(u)), 255, cv2.THRESH_BINARY)
    contours = cv2.findContours(thr, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[0]
    if len(contours) == 0:
        return np.asarray([[0, 0, 0, 0]]), 1
    boxes = []
    for c in contours:
        x, y, w, h = cv2.boundingRect(c)
        boxes.append([x, y, min(x + w, width - 1), min(y + h, height - 1)])
    return np.asarray(boxes), len(contours)


def reference_cams(model: ReferenceCLIP, image: torch.Tensor, labels: list[int], text: torch.Tensor,
                   num_classes: int, threshold: float, clip_boxes: bool = True):
    """image (1, 3, H', W'); text (C + M, E). Returns (refined, init), each (K, h, w) float32.
    ``clip_boxes`` False: boxes without the reference's clipping (``scoremap2bbox``)."""
    h, w = image.shape[-2] // model.patch, image.shape[-1] // model.patch
    feats, attns = model.encode_image(image)
    rows = torch.cat([text[labels], text[num_classes:]])
    saved = {}

    def fwd_hook(_m, _i, out):
        saved["act"] = out.detach()
        out.register_hook(lambda g: saved.__setitem__("grad", g.detach()))

    handle = model.vblocks[-1].ln_1.register_forward_hook(fwd_hook)
    refined, init = [], []
    host = np.float64 if image.dtype == torch.float64 else np.float32  # the reference: float32 (fp64 for checks)
    try:
        for j in range(len(labels)):
            model.zero_grad()
            probs, attn_last = model.forward_last_layer(feats, rows)
            probs[0, j].backward()
            act = saved["act"].permute(1, 0, 2)[:, 1:, :].reshape(1, h, w, -1).permute(0, 3, 1, 2).cpu().numpy()
            grad = saved["grad"].permute(1, 0, 2)[:, 1:, :].reshape(1, h, w, -1).permute(0, 3, 1, 2).cpu().numpy()
            weights = np.mean(grad, axis=(2, 3))
            # fp16 arrays on CUDA: base_cam.py scales in float32 ("float16->32")
            cam = np.maximum((weights[:, :, None, None] * act).sum(axis=1), 0).astype(host)
            cam = np.asarray([_scale(c) for c in cam], host)[:, None]     # per layer
            cam = _scale(np.mean(np.maximum(cam, 0), axis=1)[0])          # aggregate the one layer
            init.append(cam)

            attn_all = torch.stack(attns + [attn_last.detach()])[-8:].mean(dim=0)[0, 1:, 1:]
            attn_all = attn_all.cpu().to(torch.float64 if host == np.float64 else torch.float32)  # the script's .float()
            box, cnt = scoremap2bbox(cam, threshold, clip_boxes)
            mask = torch.zeros(h, w)
            for x0, y0, x1, y1 in box[:cnt]:
                mask[y0:y1, x0:x1] = 1
            mask = mask.view(1, h * w)
            t = attn_all / torch.sum(attn_all, dim=0, keepdim=True)
            t = t / torch.sum(t, dim=1, keepdim=True)
            for _ in range(2):
                t = t / torch.sum(t, dim=0, keepdim=True)
                t = t / torch.sum(t, dim=1, keepdim=True)
            t = (t + t.transpose(1, 0)) / 2
            t = torch.matmul(t, t) * mask
            r = torch.matmul(t, torch.from_numpy(cam).view(-1, 1)).reshape(h, w).numpy().astype(host)
            refined.append(_scale(r))
    finally:
        handle.remove()
    return np.stack(refined), np.stack(init)


# ---------------------------------------------------------------------- fp16 spread (GPU tolerance)
def box_mask(cam: np.ndarray, threshold: float) -> np.ndarray:
    """The reference's box mask of one map (``scoremap2bbox``, boxes filled as its script fills them)."""
    mask = np.zeros(cam.shape, bool)
    box, cnt = scoremap2bbox(cam, threshold)
    for x0, y0, x1, y1 in box[:cnt]:
        mask[y0:y1, x0:x1] = True
    return mask


def map_distance(a: list[np.ndarray], b: list[np.ndarray], keep: list[np.ndarray] | None = None) -> dict[str, float]:
    """Two runs' maps, per image (K, h, w) -> over all maps (those flagged in ``keep``, per image (K,) bool):
    the largest and the mean absolute difference, the lowest Pearson correlation (1 for a map constant and
    equal in both runs, 0 for one constant in one run only) and the number of maps compared."""
    diffs, worst_r, n = [], 1.0, 0
    for i, (x, y) in enumerate(zip(a, b)):
        for k, (u, v) in enumerate(zip(np.asarray(x, np.float64), np.asarray(y, np.float64))):
            if keep is not None and not keep[i][k]:
                continue
            diffs.append(np.abs(u - v).ravel())
            if u.std() == 0 or v.std() == 0:
                r = 1.0 if np.array_equal(u, v) else 0.0
            else:
                r = float(np.corrcoef(u.ravel(), v.ravel())[0, 1])
            worst_r, n = min(worst_r, r), n + 1
    d = np.concatenate(diffs) if diffs else np.zeros(1)
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean()), "min_pearson": worst_r, "maps": n}


def same_boxes(init_a: list[np.ndarray], init_b: list[np.ndarray], threshold: float) -> list[np.ndarray]:
    """Per image (K,) bool: the two runs' GradCAM maps give the same box mask. Where they do not, a
    pixel crossed the box threshold and the refined maps differ by whole boxes, a jump that says nothing
    about the arithmetic's precision."""
    return [np.array([np.array_equal(box_mask(u, threshold), box_mask(v, threshold)) for u, v in zip(x, y)])
            for x, y in zip(init_a, init_b)]


def compare_runs(a: list[tuple[np.ndarray, np.ndarray]], b: list[tuple[np.ndarray, np.ndarray]],
                 threshold: float, keep: list[np.ndarray] | None = None) -> dict[str, dict[str, float]]:
    """Two runs, per image (refined, init) -> {'init': GradCAM maps, 'cams': refined maps whose box masks
    agree (``same_boxes``) and, when given, that ``keep`` (per image (K,) bool) keeps}, each ``map_distance``."""
    init_a, init_b = [r[1] for r in a], [r[1] for r in b]
    agree = same_boxes(init_a, init_b, threshold)
    if keep is not None:
        agree = [x & y for x, y in zip(agree, keep)]
    return {"init": map_distance(init_a, init_b),
            "cams": map_distance([r[0] for r in a], [r[0] for r in b], agree)}


def paired_spreads(reference: tuple[list, list], ours: tuple[list, list], threshold: float) -> dict[str, dict]:
    """Two pairs of runs on the same images and labels, each (runs a, runs b) as ``compare_runs`` takes them ->
    {'reference': ..., 'ours': ...} ``compare_runs`` of each, the refined maps of both restricted to the maps
    whose box masks agree in both pairs: the same maps on both sides, since the largest difference and the
    lowest correlation of two different sets of maps differ by chance (measured: docs/testing.md)."""
    def agree(pair):
        return same_boxes([r[1] for r in pair[0]], [r[1] for r in pair[1]], threshold)

    both = [x & y for x, y in zip(agree(reference), agree(ours))]
    return {"reference": compare_runs(*reference, threshold, both), "ours": compare_runs(*ours, threshold, both)}


def precision_runs(state_dict: dict[str, torch.Tensor], images: torch.Tensor, labels: list[list[int]],
                   strings: list[str], template: str, num_classes: int, threshold: float,
                   device: str | torch.device = "cpu") -> tuple[list, list]:
    """The reference's maps in float32 and in the precision CLIP-ES runs in on CUDA (``as_on_cuda``: fp16
    weights and activations, numpy host arithmetic on fp16 arrays), on the same inputs and ``device`` (fp16 on
    the CPU where torch has the kernels): (float32 runs, fp16 runs), per image (refined, init).

    images (B, 3, H', W') normalised, labels per image; strings: the text rows (foreground prompts then
    background)."""
    runs = {}
    for name in ("float32", "cuda"):
        model = ReferenceCLIP(state_dict).to(device)
        if name == "cuda":
            model.as_on_cuda()
        text = reference_text(model, strings, template)
        dt = torch.float16 if name == "cuda" else torch.float32
        runs[name] = [reference_cams(model, images[b:b + 1].to(device, dt), labels[b], text, num_classes, threshold)
                      for b in range(len(labels))]
    return runs["float32"], runs["cuda"]


def precision_spread(state_dict: dict[str, torch.Tensor], images: torch.Tensor, labels: list[list[int]],
                     strings: list[str], template: str, num_classes: int, threshold: float,
                     device: str | torch.device = "cpu") -> dict[str, dict[str, float]]:
    """How far the reference's own maps move between float32 and fp16 as on CUDA: ``compare_runs`` of
    ``precision_runs``."""
    return compare_runs(*precision_runs(state_dict, images, labels, strings, template, num_classes, threshold,
                                        device), threshold)

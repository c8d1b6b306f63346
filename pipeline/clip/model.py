"""Frozen CLIP ViT backbone in OpenAI's parameter layout, run as CLIP-ES's clip/model.py does.

Loads OpenAI checkpoints as distributed (TorchScript archive such as ``ViT-B-16.pt``) or as a
plain ``state_dict``, infers the architecture from the weights, and exposes per-block tokens,
attention (per head or head-averaged) and q/k/v on request, for any ``h x w`` patch grid, and runs
ExCEL's calibrated forward (``forward_calibrated``).
"""
from __future__ import annotations

import math
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..io import UnreadableWeights, error_detail, torch_load

HEAD_DIM = 64  # every OpenAI CLIP uses 64-dim heads
# Keys the OpenAI TorchScript archives carry next to the weights.
_JIT_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


class CheckpointError(ValueError):
    """The file is not a usable OpenAI CLIP ViT checkpoint; the message names it and the fix."""


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32 for half types (as the reference), float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class LayerNorm(nn.LayerNorm):
    """LayerNorm evaluated in fp32 (fp64 for fp64 input) and cast back to the input dtype (as OpenAI's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = acc_dtype(x.dtype)
        return F.layer_norm(x.to(dt), self.normalized_shape, self.weight.to(dt), self.bias.to(dt), self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def attention_weights(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q kᵀ / √d + mask) per head: q, k (B, H, L, d) -> (B, H, L, L) (q scaled first, as
    nn.MultiheadAttention does)."""
    logits = (q * (q.shape[-1] ** -0.5)) @ k.transpose(-2, -1)
    if mask is not None:
        logits = logits + mask
    return logits.softmax(dim=-1)


def intra_correlation(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      relation: torch.Tensor | None = None) -> torch.Tensor:
    """ExCEL's static visual calibration map (CVPR 2025): each token attends to tokens that resemble
    it in query, key and value space rather than to those its query selects.

    q, k, v (B, H, L, d) -> S (B, L, L) = Σ_h ⅓[softmax(q_h q_hᵀ/√d) + softmax(k_h k_hᵀ/√d) +
    softmax(v_h v_hᵀ/√d)] (+ ``relation`` (B, n, n) on every head's patch-patch block, n = L - 1,
    before the head sum). Heads are summed, not averaged, as in the reference (rows sum to H).
    """
    s = (attention_weights(q, q) + attention_weights(k, k) + attention_weights(v, v)) / 3
    if relation is not None:
        s = s + F.pad(relation, (1, 0, 1, 0)).unsqueeze(1).to(s.dtype)  # zero CLS row and column
    return s.sum(dim=1)


class Attention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names (``in_proj_weight``,
    ``in_proj_bias``, ``out_proj``), batch-first, optionally returning weights and q/k/v."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, weights: str | None = None,
                return_qkv: bool = False):
        """x (B, L, D) -> (out (B, L, D), attn, qkv).

        ``weights``: None (fast fused kernel, attn None), 'mean' (B, L, L) head-averaged, or
        'heads' (B, H, L, L). ``qkv``: (q, k, v) each (B, H, L, 64), q unscaled, or None.
        """
        q, k, v = self.project_qkv(x)
        attn = None
        if weights is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            a = attention_weights(q, k, mask)
            out = a @ v
            attn = a.mean(dim=1) if weights == "mean" else a
        return self.merge_heads(out), attn, ((q, k, v) if return_qkv else None)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, L, D) -> q, k, v each (B, H, L, 64), q unscaled."""
        B, L, _ = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(B, L, 3, self.heads, -1)
        return tuple(qkv.permute(2, 0, 3, 1, 4))

    def merge_heads(self, out: torch.Tensor) -> torch.Tensor:
        """Per-head values (B, H, L, 64) -> concatenated and output-projected (B, L, D)."""
        B, H, L, d = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(B, L, H * d))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("gelu", QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, weights: str | None = None,
                return_qkv: bool = False, ln1_out: torch.Tensor | None = None):
        """x <- x + attn(ln_1(x)); x <- x + mlp(ln_2(x)). ``ln1_out`` replaces ln_1(x) (GradCAM
        differentiates with respect to it). Returns (x, attn, qkv) as ``Attention``."""
        h = self.ln_1(x) if ln1_out is None else ln1_out
        a, attn, qkv = self.attn(h, mask, weights, return_qkv)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, attn, qkv


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))


@dataclass
class Intermediates:
    """What ``VisionTransformer.forward_intermediates`` returns.

    tokens: (B, L, D) residual stream after the last block run (CLS first, then patches row-major).
    blocks: per-block outputs (B, L, D) when requested, keyed by 0-based block index.
    attentions: per-block attention, keyed by block index: (B, L, L) 'mean' or (B, H, L, L) 'heads'.
    qkv: per-block (q, k, v), each (B, H, L, 64).
    """

    tokens: torch.Tensor
    blocks: dict[int, torch.Tensor] = field(default_factory=dict)
    attentions: dict[int, torch.Tensor] = field(default_factory=dict)
    qkv: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)


@dataclass
class Calibrated:
    """What ``VisionTransformer.forward_calibrated`` returns.

    tokens: (B, L, D) calibrated path after the last block, its CLS token taken from the original
        path (ln_post and the projection not applied yet).
    attentions: per-block attention of the original path, keyed by 0-based block index, (B, L, L):
        head mean for plain blocks; head sum (the reference's) or mean for calibrated blocks.
    features: with ``features=True`` the per-block maps ExCEL's decoder reads, one per block, (B, L, D),
        as the reference's in-place updates leave them: block outputs before the first calibrated
        block; then the final calibrated path; then, for each later calibrated block but the last, its
        output plus the next block's attention residual; then the last block's output.
    entry, qkv: with ``keep_qkv=True`` the tokens (B, L, D) entering the first calibrated block and each
        calibrated block's (q, k, v), each (B, H, L, 64): what ``recalibrate`` needs.
    """

    tokens: torch.Tensor
    attentions: dict[int, torch.Tensor] = field(default_factory=dict)
    features: list[torch.Tensor] = field(default_factory=list)
    entry: torch.Tensor | None = None
    qkv: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def interpolate_pos_embed(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(1 + g*g, D) pretrained table -> (1 + h*w, D) for grid (h, w) as CLIP-ES: the g x g rows as
    a (1, D, g, g) image, bilinear with align_corners=False (no antialias) in fp32, CLS row kept."""
    g = int(round(math.sqrt(pos.shape[0] - 1)))
    dt = acc_dtype(pos.dtype)
    grid_rows = pos[1:].to(dt).t().reshape(1, -1, g, g)
    grid_rows = F.interpolate(grid_rows, size=grid, mode="bilinear", align_corners=False)
    return torch.cat([pos[:1].to(dt), grid_rows.reshape(pos.shape[1], -1).t()], dim=0).to(pos.dtype)


class VisionTransformer(nn.Module):
    def __init__(self, width: int, layers: int, patch_size: int, grid: int, output_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros(grid * grid + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, width // HEAD_DIM)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(torch.zeros(width, output_dim))
        self._pos_cache: dict[tuple, torch.Tensor] = {}

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.resblocks

    def pos_embed(self, grid: tuple[int, int], via: int | None = None) -> torch.Tensor:
        """Positional embedding for a (h, w) grid, cached per grid (weights are frozen). ``via``: first
        resize the pretrained table to a via x via grid and interpolate from that one when the grid
        differs (ExCEL's model resizes its table to 20 x 20 when it is built)."""
        key = (grid, via, self.positional_embedding.device, self.positional_embedding.dtype)
        if key not in self._pos_cache:
            with torch.no_grad():
                pos = self.positional_embedding
                if via is not None:
                    pos = interpolate_pos_embed(pos, (via, via))
                self._pos_cache[key] = pos if grid == (via, via) else interpolate_pos_embed(pos, grid)
        return self._pos_cache[key]

    def embed(self, images: torch.Tensor, pos_via: int | None = None) -> torch.Tensor:
        """images (B, 3, H', W'), H' and W' multiples of the patch size -> tokens after ln_pre (B, 1+n, D).
        ``pos_via``: see ``pos_embed``."""
        B, _, H, W = images.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}")
        x = self.conv1(images.to(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(B, 1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed((H // p, W // p), pos_via).to(x.dtype)
        return self.ln_pre(x)

    def forward_intermediates(self, images: torch.Tensor, n_blocks: int | None = None,
                              attention: str | None = None, attention_blocks: Sequence[int] | None = None,
                              block_outputs: Sequence[int] = (), qkv_blocks: Sequence[int] = (),
                              pos_via: int | None = None) -> Intermediates:
        """Run the first ``n_blocks`` blocks (all by default) and collect what is asked for.

        attention: None, 'mean' or 'heads', recorded for ``attention_blocks`` (default: every block run).
        block_outputs / qkv_blocks: 0-based indices of blocks whose output / q,k,v to keep.
        pos_via: see ``pos_embed``.
        """
        n_blocks = len(self.blocks) if n_blocks is None else n_blocks
        want_attn = set(range(n_blocks) if attention_blocks is None else attention_blocks) if attention else set()
        out = Intermediates(tokens=self.embed(images, pos_via))
        x = out.tokens
        for i in range(n_blocks):
            x, attn, qkv = self.blocks[i](x, weights=attention if i in want_attn else None,
                                          return_qkv=i in qkv_blocks)
            if attn is not None:
                out.attentions[i] = attn
            if qkv is not None:
                out.qkv[i] = qkv
            if i in block_outputs:
                out.blocks[i] = x
        out.tokens = x
        return out

    def forward_calibrated(self, images: torch.Tensor, calibrated: int = 5, attention_blocks: Sequence[int] = (),
                           calibrated_attention: str = "sum", relation: torch.Tensor | None = None,
                           features: bool = False, pos_via: int | None = None, keep_qkv: bool = False) -> Calibrated:
        """ExCEL's static visual calibration: the last ``calibrated`` blocks run two paths at once.

        The original path z runs every block as CLIP does; each calibrated block reads z only
        (ln_1(z) -> q, k, v) and adds, besides z's own attention output, ``Proj(S v_h)`` per head with
        S = ``intra_correlation(q, k, v, relation)`` to a second path p, which starts at z and has no
        MLP. The result is p with z's CLS token. One forward for a batch (B, 3, H', W').

        attention_blocks: 0-based blocks whose original-path attention to return, head-averaged for
            plain blocks and reduced over heads by ``calibrated_attention`` ('sum' as the reference,
            or 'mean') for calibrated ones.
        relation: optional (B, n, n) added to every calibrated head's patch-patch part of S (ExCEL's
            learnable calibration); features: also return the decoder maps (see ``Calibrated``);
            keep_qkv: also return what ``recalibrate`` needs.
        """
        if calibrated_attention not in ("sum", "mean"):
            raise ValueError(f"calibrated_attention must be 'sum' or 'mean', got {calibrated_attention!r}")
        n = len(self.blocks)
        first = n - calibrated
        if not 0 < first < n:
            raise ValueError(f"calibrated blocks must be between 1 and {n - 1}, got {calibrated}")
        inter = self.forward_intermediates(images, n_blocks=first, attention="mean",
                                           attention_blocks=[i for i in attention_blocks if i < first],
                                           block_outputs=range(first - 1) if features else (), pos_via=pos_via)
        out = Calibrated(tokens=inter.tokens, attentions=inter.attentions, entry=inter.tokens if keep_qkv else None)
        feats = [inter.blocks[i] for i in range(first - 1)] + [None] if features else []
        z = p = inter.tokens
        for i in range(first, n):
            blk = self.blocks[i]
            attn = blk.attn
            q, k, v = attn.project_qkv(blk.ln_1(z))
            a = attention_weights(q, k)
            residual = attn.merge_heads(a @ v)
            if i in attention_blocks:
                out.attentions[i] = a.sum(dim=1) if calibrated_attention == "sum" else a.mean(dim=1)
            if keep_qkv:
                out.qkv[i] = (q, k, v)
            p = p + self.calibration(i, q, k, v, relation)
            z = z + residual
            if features and i > first:  # the reference adds this residual in place to the stored input
                feats.append(z)
            z = z + blk.mlp(blk.ln_2(z))
        if features:
            feats[first - 1] = p  # the stored entry is the calibrated path itself, updated in place
            out.features = feats + [z]
        out.tokens = torch.cat([z[:, :1], p[:, 1:]], dim=1)
        return out

    def calibration(self, block: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    relation: torch.Tensor | None) -> torch.Tensor:
        """What calibrated ``block`` adds to the calibrated path: Proj(S v_h) of every head, (B, L, D)."""
        # one (L x L) @ (L x H·d) product applies the head-summed map to every head's values at once
        return self.blocks[block].attn.out_proj(intra_correlation(q, k, v, relation) @ v.transpose(1, 2).flatten(2))

    def recalibrate(self, done: Calibrated, relation: torch.Tensor | None) -> Calibrated:
        """``forward_calibrated`` of the same images with another ``relation``, from a pass run with
        ``keep_qkv=True``: the original path never sees the relation, so only the calibrated path is
        recomputed (the same operations, so the same numbers). Tokens and attentions, no decoder maps."""
        if done.entry is None:
            raise ValueError("recalibrate needs a forward_calibrated pass run with keep_qkv=True")
        p = done.entry
        for i in sorted(done.qkv):
            p = p + self.calibration(i, *done.qkv[i], relation)
        return Calibrated(tokens=torch.cat([done.tokens[:, :1], p[:, 1:]], dim=1), attentions=done.attentions)

    def pool(self, tokens: torch.Tensor, mode: str = "cls") -> torch.Tensor:
        """ln_post then projection: of the CLS token ('cls', CLIP) or of the patch-token mean
        ('patch_mean', CLIP-ES's forward_last_layer). tokens (B, L, D) -> (B, E)."""
        x = self.ln_post(tokens)
        x = x[:, 0] if mode == "cls" else x[:, 1:].mean(dim=1)
        return x @ self.proj.to(x.dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Plain CLIP image embedding (B, E) from the CLS token."""
        return self.pool(self.forward_intermediates(images).tokens)


@dataclass(frozen=True)
class CLIPArch:
    """Architecture read off a state dict (as OpenAI's ``build_model`` does)."""

    embed_dim: int
    vision_width: int
    vision_layers: int
    patch_size: int
    grid: int
    context_length: int
    vocab_size: int
    text_width: int
    text_layers: int

    @property
    def name(self) -> str:
        size = {768: "B", 1024: "L", 1280: "H"}.get(self.vision_width, f"w{self.vision_width}")
        return f"ViT-{size}/{self.patch_size}"

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], source: str = "checkpoint") -> "CLIPArch":
        if any(k.startswith("visual.layer1.") or k.startswith("visual.attnpool.") for k in sd):
            raise CheckpointError(f"{source}: this is a ResNet CLIP (RN50/RN101/...); this project needs a ViT CLIP "
                                  "such as ViT-B/16 (ViT-B-16.pt): the CAMs, prompt ranking and WeCLIP's "
                                  "decoder all read the ViT's patch tokens and attention")
        required = ["visual.conv1.weight", "visual.positional_embedding", "visual.class_embedding", "visual.proj",
                    "token_embedding.weight", "positional_embedding", "text_projection", "ln_final.weight"]
        missing = [k for k in required if k not in sd]
        if missing:
            raise CheckpointError(f"{source}: not an OpenAI CLIP checkpoint (missing {', '.join(missing[:4])}"
                                  f"{', ...' if len(missing) > 4 else ''}); use the ViT-B-16.pt file OpenAI distributes")

        def count(prefix: str) -> int:
            return len({k.split(".")[len(prefix.split("."))] for k in sd if k.startswith(prefix + ".")})

        conv = sd["visual.conv1.weight"]
        return cls(embed_dim=sd["text_projection"].shape[1], vision_width=conv.shape[0],
                   vision_layers=count("visual.transformer.resblocks"), patch_size=conv.shape[-1],
                   grid=round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5),
                   context_length=sd["positional_embedding"].shape[0], vocab_size=sd["token_embedding.weight"].shape[0],
                   text_width=sd["ln_final.weight"].shape[0], text_layers=count("transformer.resblocks"))


class CLIP(nn.Module):
    """OpenAI CLIP (ViT image tower + text tower) with OpenAI's state-dict keys."""

    def __init__(self, arch: CLIPArch):
        super().__init__()
        self.arch = arch
        self.visual = VisionTransformer(arch.vision_width, arch.vision_layers, arch.patch_size, arch.grid, arch.embed_dim)
        self.transformer = Transformer(arch.text_width, arch.text_layers, arch.text_width // HEAD_DIM)
        self.token_embedding = nn.Embedding(arch.vocab_size, arch.text_width)
        self.positional_embedding = nn.Parameter(torch.zeros(arch.context_length, arch.text_width))
        self.ln_final = LayerNorm(arch.text_width)
        self.text_projection = nn.Parameter(torch.zeros(arch.text_width, arch.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(100.0)))
        mask = torch.full((arch.context_length, arch.context_length), float("-inf")).triu_(1)
        self.register_buffer("attn_mask", mask, persistent=False)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens int64 (N, 77) -> (N, E): causal blocks, ln_final, EOT row (argmax id), projection."""
        x = self.token_embedding(tokens) + self.positional_embedding.to(self.token_embedding.weight.dtype)
        mask = self.attn_mask.to(x.dtype)
        for blk in self.transformer.resblocks:
            x = blk(x, mask=mask)[0]
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        return x @ self.text_projection.to(x.dtype)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)


PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(device: str = "auto", precision: str = "auto", local_rank: int = 0) -> tuple[torch.device, torch.dtype]:
    """'auto' device: cuda:LOCAL_RANK when available, else cpu; 'auto' precision: fp16 on CUDA (as the
    reference), fp32 on CPU."""
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if precision == "auto":
        precision = "fp16" if dev.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose fp32, fp16 or bf16")
    return dev, PRECISIONS[precision]


def checkpoint_file(path: str | Path) -> Path:
    """``path`` (``~`` expanded) if it is a file, else ``CheckpointError`` saying where to get one."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found. Download OpenAI's ViT-B-16.pt (see README) and pass CLIP=/path/to/ViT-B-16.pt")
    return path


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from an OpenAI TorchScript archive or a (possibly wrapped) plain state_dict file."""
    path = checkpoint_file(path)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
            if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
                with warnings.catch_warnings():  # torch.jit is deprecated, but it is OpenAI's format
                    warnings.simplefilter("ignore", DeprecationWarning)
                    sd = torch.jit.load(str(path), map_location="cpu").state_dict()
            else:
                sd = torch_load(path, "download it again")
        else:
            sd = torch_load(path, "download it again")
    except UnreadableWeights as e:
        raise CheckpointError(str(e)) from None
    except Exception as e:  # a damaged TorchScript archive
        raise CheckpointError(f"{path}: cannot read checkpoint ({error_detail(e)}); the file is truncated or not "
                              "a PyTorch/TorchScript file: download it again") from None
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: does not hold a state_dict of tensors; not a CLIP checkpoint")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_clip(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> CLIP:
    """Build a frozen, eval-mode CLIP from a checkpoint file (TorchScript archive or state_dict)."""
    sd = read_state_dict(path)
    arch = CLIPArch.from_state_dict(sd, str(path))
    model = CLIP(arch)
    sd = {k: v for k, v in sd.items() if k not in _JIT_EXTRA_KEYS}
    try:
        model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit a {arch.name} CLIP ({str(e)[:300]})") from e
    model.requires_grad_(False).eval()
    return model.to(device=device, dtype=dtype)

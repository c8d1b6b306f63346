"""Text semantic enrichment (ExCEL, CVPR 2025): class prompts enriched with visual attributes.

A knowledge base (JSON: class name -> list of short visual descriptions) is embedded with CLIP's
text encoder, one sentence per description, formed as the authors form them: the template filled with
the class *name* followed by the description, lower-cased (``a clean origami cat. pointed ears on top
of the head.``); a description that already starts with that sentence (the authors' own JSON files)
is taken as it is. KMeans turns the embeddings into an attribute bank of B centres; each class's global
prompt embedding then adds the softmax-weighted sum of the attributes it matches best (``enrich``).

Clustering (``CLUSTERINGS``): ``global``, the authors', is one KMeans over all descriptions; a class's
attributes are the clusters its descriptions fall into, so an attribute may serve several classes.
``per-class`` finds clusters per class, so every attribute belongs to exactly one class; the B clusters
are shared out in proportion to how spread out each class's descriptions are (their sum of squared
distances to the class mean; largest remainders, at least one per class, at most one per distinct
description): classes described in more varied ways get more attributes.

Banks are stored as ``.npz`` (``centres`` (B, E), ``membership`` (C, B), ``classes``) or read in the
reference's ``torch.save`` format, a list ``[centres (E, B), membership (C, B)]`` of float32 tensors.
"""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..classes import ClassList
from ..io import save_npz

DROP = 0.1  # the reference's "topK = 0.9": the lowest 10 % of attribute scores are masked
CLUSTERINGS = ("global", "per-class")  # the first is the authors' and the default


@dataclass(frozen=True)
class AttributeBank:
    """centres (B, E) float32 (not re-normalised); membership (C, B) float32, 1 where an attribute serves a
    class (one-hot columns with per-class clustering)."""

    centres: np.ndarray
    membership: np.ndarray
    classes: tuple[str, ...] = ()


def load_descriptions(path: str | Path, classes: ClassList) -> list[list[str]]:
    """Descriptions per class, in the vocabulary's order, from a JSON ``{class: [description, ...]}``.
    Keys match class names case- and space-insensitively; every class needs at least one description."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: description file not found; pass --descriptions FILE (JSON: class -> list of "
                         "descriptions, see data/descriptions/voc.json) or --no-tse") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read the description file ({e}); it must be JSON: "
                         "{\"class name\": [\"description\", ...], ...}") from e
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: the description file must be a JSON object mapping class names to lists of strings")
    out: list[list[str] | None] = [None] * classes.num_classes
    for name, items in doc.items():
        try:
            c = classes.index(name)
        except KeyError:
            raise ValueError(f"{path}: {name!r} is not a class of the vocabulary ({', '.join(classes.names)})") from None
        if not isinstance(items, list) or not items or not all(isinstance(d, str) and d.strip() for d in items):
            raise ValueError(f"{path}: class {name!r} needs a non-empty list of non-empty description strings")
        out[c] = [d.strip() for d in items]
    missing = [classes.names[c] for c, d in enumerate(out) if d is None]
    if missing:
        raise ValueError(f"{path}: no descriptions for {', '.join(missing)}; every class of the vocabulary needs some")
    return out


def sentences(classes: ClassList, descriptions: Sequence[Sequence[str]], template: str | None = None) -> list[list[str]]:
    """Per class: ``template.format(name)`` + ' ' + description, lower-cased, as the authors' knowledge
    base holds them; a description already starting with ``template.format(name)`` is kept whole."""
    template = template or classes.template
    out = []
    for c, descs in enumerate(descriptions):
        head = template.format(classes.names[c])
        out.append([(d if d.lower().startswith(head.lower()) else f"{head} {d}").lower() for d in descs])
    return out


def distinct_count(embeddings: Sequence[np.ndarray]) -> int:
    """How many different rows the (N_c, E) embeddings hold together: at most that many clusters."""
    return len(np.unique(np.concatenate(embeddings).round(6), axis=0))


def allocate(spread: np.ndarray, distinct: np.ndarray, total: int) -> np.ndarray:
    """Share ``total`` clusters over classes in proportion to ``spread`` (C,), at least 1 and at most
    ``distinct`` (C,) per class; largest remainders, ties to the lower class index. -> int64 (C,)."""
    C = len(spread)
    if not C <= total <= distinct.sum():
        raise ValueError(f"cannot make {total} attributes for {C} classes with {int(distinct.sum())} distinct "
                         f"descriptions; choose between {C} and {int(distinct.sum())}")
    counts = np.ones(C, np.int64)
    for _ in range(total - C):  # one at a time: the class furthest below its share that still has room
        share = spread / max(spread.sum(), 1e-12) * total
        room = counts < distinct
        deficit = np.where(room, share - counts, -np.inf)
        counts[int(np.argmax(deficit))] += 1
    return counts


def cluster(embeddings: Sequence[np.ndarray], total: int, seed: int = 0, clustering: str = "global") -> AttributeBank:
    """KMeans on L2-normalised description embeddings, each (N_c, E) -> a bank of ``total`` centres with
    its class membership: ``global`` (one KMeans over all rows, the authors') or ``per-class``."""
    if clustering == "global":
        return cluster_global(embeddings, total, seed)
    if clustering != "per-class":
        raise ValueError(f"unknown attribute clustering {clustering!r}; choose {' or '.join(CLUSTERINGS)}")
    return cluster_per_class(embeddings, total, seed)


def cluster_global(embeddings: Sequence[np.ndarray], total: int, seed: int = 0) -> AttributeBank:
    """One KMeans (k-means++, 10 starts, the authors' scikit-learn defaults) over all (N_c, E) rows ->
    ``total`` centres; class c's membership is 1 at every cluster one of its descriptions falls into."""
    from sklearn.cluster import KMeans

    distinct = distinct_count(embeddings)
    if not 1 <= total <= distinct:
        raise ValueError(f"cannot make {total} attributes from {distinct} distinct descriptions; choose between 1 "
                         f"and {distinct}")
    km = KMeans(n_clusters=total, random_state=seed, n_init=10).fit(np.concatenate(embeddings).astype(np.float64))
    owner = np.repeat(np.arange(len(embeddings)), [len(e) for e in embeddings])
    membership = np.zeros((len(embeddings), total), np.float32)
    membership[owner, km.labels_] = 1
    return AttributeBank(km.cluster_centers_.astype(np.float32), membership)


def cluster_per_class(embeddings: Sequence[np.ndarray], total: int, seed: int = 0) -> AttributeBank:
    """Per-class KMeans, each (N_c, E) -> a bank of ``total`` centres (class after class) with its
    one-hot class membership; clusters shared out by ``allocate``."""
    from sklearn.cluster import KMeans

    spread = np.array([((e - e.mean(0)) ** 2).sum() for e in embeddings], np.float64)
    distinct = np.array([len(np.unique(e.round(6), axis=0)) for e in embeddings])
    counts = allocate(spread, distinct, total)
    centres, owner = [], []
    for c, (e, k) in enumerate(zip(embeddings, counts)):
        km = KMeans(n_clusters=int(k), random_state=seed, n_init=10).fit(e.astype(np.float64))
        centres.append(km.cluster_centers_.astype(np.float32))
        owner += [c] * int(k)
    membership = np.zeros((len(embeddings), total), np.float32)
    membership[owner, np.arange(total)] = 1
    return AttributeBank(np.concatenate(centres), membership)


@torch.no_grad()
def build_bank(model, classes: ClassList, descriptions: Sequence[Sequence[str]], total: int, seed: int = 0,
               template: str | None = None, clustering: str = "global") -> AttributeBank:
    """Embed every description sentence with ``model``'s text encoder and cluster (see ``cluster``)."""
    from ..clip.text import encode_grid

    groups = sentences(classes, descriptions, template)
    flat = encode_grid(model, [s for g in groups for s in g], ["{}"])[0].float().cpu().numpy()
    parts = np.split(flat, np.cumsum([len(g) for g in groups])[:-1])
    bank = cluster(parts, total, seed, clustering)
    return AttributeBank(bank.centres, bank.membership, tuple(classes.names))


def enrich(text: torch.Tensor, centres: torch.Tensor, drop: float = DROP) -> torch.Tensor:
    """Global prompt embeddings text (C, E), L2-normalised, + attributes centres (B, E) -> (C, E):
    t_c + Σ_j softmax_j(z_cj) a_j with z = text centresᵀ (no temperature) and the lowest int(drop·B)
    scores of each row masked out. Not re-normalised here."""
    z = text @ centres.t()
    masked = int(drop * centres.shape[0])
    if masked:
        lowest = z.topk(masked, dim=-1, largest=False).indices
        z = z.scatter(-1, lowest, float("-inf"))
    return text + z.softmax(dim=-1) @ centres


def check_bank_path(path: str | Path, overwrite: bool = False) -> None:
    """Refuse a bank path that is a folder, or an existing file without ``overwrite`` (it stays untouched)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a folder; --out (OUT=) names the bank file, e.g. {path / 'attributes.npz'}")
    if path.exists() and not overwrite:
        raise ValueError(f"{path}: already exists; pass --overwrite (ARGS=--overwrite) to replace it, or choose "
                         "another --out (OUT=)")


def save_bank(path: str | Path, bank: AttributeBank) -> None:
    save_npz(path, {"centres": bank.centres.astype(np.float32), "membership": bank.membership.astype(np.float32),
                    "classes": np.array(bank.classes, dtype=str)})


def save_reference_bank(path: str | Path, bank: AttributeBank) -> None:
    """The reference's layout: ``torch.save([centres (E, B), membership (C, B)])``."""
    from ..io import atomic_open

    with atomic_open(path, "wb") as f:
        torch.save([torch.from_numpy(bank.centres.T.copy()), torch.from_numpy(bank.membership.copy())], f)


def load_bank(path: str | Path, classes: ClassList, embed_dim: int | None = None) -> AttributeBank:
    """Read a bank in either format and check it fits the vocabulary (and the model's embedding
    width when given). ``ValueError`` names the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: attribute bank not found; build one with `make attributes` or drop --attribute-bank")
    try:
        with zipfile.ZipFile(path) as zf:
            is_npz = all(n.endswith(".npy") for n in zf.namelist())
    except (zipfile.BadZipFile, OSError):
        is_npz = False
    try:
        if is_npz:
            with np.load(path, allow_pickle=False) as z:
                centres, membership = z["centres"], z["membership"]
                names = tuple(str(s) for s in z["classes"]) if "classes" in z.files else ()
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if not (isinstance(obj, (list, tuple)) and len(obj) == 2 and all(isinstance(t, torch.Tensor) for t in obj)):
                raise ValueError("expected a list [centres (E x B), membership (classes x B)] of tensors")
            centres, membership, names = obj[0].float().numpy().T, obj[1].float().numpy(), ()
    except Exception as e:
        detail = "" if "weights_only" in str(e) else f": {str(e).splitlines()[0][:200]}"
        raise ValueError(f"{path}: not an attribute bank ({type(e).__name__}{detail}); rebuild it with "
                         "`make attributes`") from e
    C = classes.num_classes
    if centres.ndim != 2 or membership.ndim != 2 or membership.shape[1] != centres.shape[0]:
        raise ValueError(f"{path}: inconsistent attribute bank: centres {centres.shape}, membership {membership.shape}")
    if membership.shape[0] != C or (names and names != tuple(classes.names)):
        raise ValueError(f"{path}: attribute bank is for {membership.shape[0]} classes "
                         f"{'(' + ', '.join(names[:5]) + ', ...) ' if names else ''}but the vocabulary has {C}; "
                         "rebuild it with `make attributes` for this class list")
    if embed_dim is not None and centres.shape[1] != embed_dim:
        raise ValueError(f"{path}: attribute centres have {centres.shape[1]} dims but the CLIP model embeds in "
                         f"{embed_dim}; the bank was built with another model")
    if not np.isfinite(centres).all():
        raise ValueError(f"{path}: attribute centres contain NaN or inf; rebuild the bank")
    return AttributeBank(np.ascontiguousarray(centres, np.float32), np.ascontiguousarray(membership, np.float32),
                         names or tuple(classes.names))

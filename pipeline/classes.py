"""Class vocabularies (YAML): names, prompt strings with synonyms, background set, palette.

A vocabulary file looks like ``data/voc.yaml``::

    template: a clean origami {}.      # prompt template, '{}' is replaced by the class string
    box_threshold: 0.4                 # CAA box threshold lambda (CLIP-ES: 0.4 VOC, 0.7 COCO)
    classes:                           # foreground classes, 0-based ids in file order
      - {name: person, prompt: "person with clothes,people,human"}   # commas: synonyms
      - cat                            # a bare string is both name and prompt
    background: [ground, sky, ...]     # class-related background set (CLIP-ES's clip_text.py)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
IGNORE_INDEX = 255
MAX_CLASSES = IGNORE_INDEX - 1  # foreground ids 1..254 in 8-bit label maps


@dataclass(frozen=True)
class ClassList:
    """Foreground vocabulary of a dataset; label maps use 0 = background, c + 1 = class c."""

    names: tuple[str, ...]
    prompts: tuple[str, ...]
    background: tuple[str, ...]
    template: str = "a clean origami {}."
    box_threshold: float = 0.4
    source: str = ""
    _index: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        where = f" in {self.source}" if self.source else ""
        if not self.names:
            raise ValueError(f"no foreground classes{where}")
        if len(self.names) > MAX_CLASSES:
            raise ValueError(f"{len(self.names)} foreground classes{where}; at most {MAX_CLASSES} fit the 8-bit label "
                             f"PNGs (0 is background, {IGNORE_INDEX} is ignore): split the vocabulary")
        if len(self.prompts) != len(self.names):
            raise ValueError(f"{len(self.names)} class names but {len(self.prompts)} prompts{where}")
        if "{}" not in self.template:
            raise ValueError(f"template {self.template!r}{where} has no '{{}}' placeholder for the class name")
        for i, name in enumerate(self.names):
            for key in {name, name.lower(), name.replace(" ", "")}:
                if self._index.setdefault(key, i) != i:
                    raise ValueError(f"class name {name!r} appears twice{where}")

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        """0-based id of a class given by name (case- and space-insensitive) or numeric id string."""
        key = name.strip()
        for k in (key, key.lower(), key.replace(" ", ""), key.lower().replace(" ", "")):
            if k in self._index:
                return self._index[k]
        if key.isdigit() and int(key) < self.num_classes:
            return int(key)
        raise KeyError(f"unknown class {name!r}; known classes: {', '.join(self.names)}")

    def synonyms(self, c: int) -> list[str]:
        """The comma-separated synonyms of class ``c``'s prompt string."""
        return [s.strip() for s in self.prompts[c].split(",") if s.strip()]

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ClassList":
        path = Path(path)
        try:
            doc = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"{path}: cannot read class list ({e})") from e
        if not isinstance(doc, dict) or "classes" not in doc:
            raise ValueError(f"{path}: a class list needs a 'classes:' list (see data/voc.yaml)")
        names, prompts = [], []
        for i, c in enumerate(doc["classes"]):
            if isinstance(c, str):
                names.append(c)
                prompts.append(c)
            elif isinstance(c, dict) and "name" in c:
                names.append(str(c["name"]))
                prompts.append(str(c.get("prompt", c["name"])))
            else:
                raise ValueError(f"{path}: class entry {i} must be a name or a {{name, prompt}} mapping, got {c!r}")
        return cls(names=tuple(names), prompts=tuple(prompts),
                   background=tuple(str(b) for b in doc.get("background") or ()),
                   template=str(doc.get("template", cls.template)),
                   box_threshold=float(doc.get("box_threshold", cls.box_threshold)), source=str(path))


def builtin(name: str) -> ClassList:
    """The shipped vocabulary ``data/<name>.yaml`` ('voc' or 'coco')."""
    return ClassList.from_yaml(DATA_DIR / f"{name}.yaml")


def palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map, (n, 3) uint8; entry 255 is overridden to white (ignore)."""
    idx = np.arange(n)
    pal = np.zeros((n, 3), np.uint8)
    for bit in range(8):
        for ch in range(3):
            pal[:, ch] |= (((idx >> (3 * bit + ch)) & 1) << (7 - bit)).astype(np.uint8)
    if n > IGNORE_INDEX:
        pal[IGNORE_INDEX] = 255
    return pal

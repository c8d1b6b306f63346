"""ExCEL's text enrichment as its authors build it (issue 22 item 5): the description sentences are the
template filled with the class name, then the description, lower-cased (their JSON files hold exactly
these sentences); one KMeans over all descriptions (scikit-learn defaults, seed 0) is the default, and
a class's attributes are the clusters its descriptions fall into. Per-class clustering is an option.

The restatement below follows the authors' attr_clustering (model/load_attr.py) and is written here
independently of pipeline.cams.tse."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.cams import excel, tse
from pipeline.classes import ClassList, builtin


def _reference_bank(groups: list[np.ndarray], n_clusters: int):
    from sklearn.cluster import KMeans

    flat = np.concatenate(groups)
    km = KMeans(n_clusters=n_clusters, random_state=0, n_init=10).fit(flat)  # n_init=10: scikit-learn 1.0.2's default
    owner = np.concatenate([[c] * len(g) for c, g in enumerate(groups)])
    flags = np.zeros((len(groups), n_clusters))
    for c in range(len(groups)):
        flags[c, np.unique(km.labels_[owner == c])] = 1
    return km.cluster_centers_.T, flags  # the authors' file: [centres (E x B), membership (C x B)]


def _random_groups(seed: int, classes: int = 5, per_class: int = 8, dim: int = 16) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(classes):
        e = rng.normal(size=dim) + 0.7 * rng.normal(size=(per_class, dim))
        out.append((e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float32))
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_global_clustering_is_the_default_and_matches_the_reference(seed):
    groups = _random_groups(seed)
    bank = tse.cluster(groups, 12)  # the default
    centres_t, flags = _reference_bank(groups, 12)
    np.testing.assert_allclose(bank.centres, centres_t.T, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(bank.membership, flags)
    assert excel.ExcelConfig().attribute_clustering == "global"


def test_an_attribute_shared_by_two_classes_serves_both():
    rng = np.random.default_rng(0)
    a, b, c = np.eye(8)[:3]
    near = lambda v: v + 0.01 * rng.normal(size=(4, 8))  # noqa: E731
    groups = [np.concatenate([near(a), near(b)]).astype(np.float32), np.concatenate([near(b), near(c)]).astype(np.float32)]
    bank = tse.cluster(groups, 3, clustering="global")
    shared = int(np.argmax(bank.centres @ b))
    assert bank.membership[:, shared].tolist() == [1, 1] and bank.membership.sum() == 4
    per_class = tse.cluster(groups, 4, clustering="per-class")  # the option: each attribute serves one class
    assert (per_class.membership.sum(axis=0) == 1).all()


def test_sentences_are_formed_as_the_authors_form_them():
    voc = builtin("voc")
    descriptions = [["Has Wings"]] + [["x"]] * 13 + [["Wears a red coat"]] + [["x"]] * 5
    got = tse.sentences(voc, descriptions)
    assert got[0] == ["a clean origami aeroplane. has wings"]
    assert got[14] == ["a clean origami person. wears a red coat"]  # the class name, not CLIP-ES's synonym prompt
    # the authors' knowledge base holds whole sentences: taken as they are, lower-cased
    authors = [["a clean origami aeroplane. It has a streamlined shape for efficient aerodynamics."]] + [["x"]] * 19
    assert tse.sentences(voc, authors)[0] == ["a clean origami aeroplane. it has a streamlined shape for efficient "
                                              "aerodynamics."]


def test_the_authors_json_format_loads(tmp_path):
    classes = ClassList(names=("traffic light", "cat"), prompts=("traffic light", "cat"), background=())
    doc = {"traffic light": ["a clean origami traffic light. it has three lamps."],
           "cat": ["a clean origami cat. it has whiskers.", "pointed ears"]}
    (tmp_path / "kb.json").write_text(json.dumps(doc))
    got = tse.sentences(classes, tse.load_descriptions(tmp_path / "kb.json", classes))
    assert got == [["a clean origami traffic light. it has three lamps."],
                   ["a clean origami cat. it has whiskers.", "a clean origami cat. pointed ears"]]


def test_clustering_option_is_refused_where_it_does_nothing(tmp_path):
    voc = builtin("voc")
    with pytest.raises(ValueError, match="--attribute-clustering"):
        excel.make_config("voc", voc, True, None, {"tse": False, "attribute_clustering": "per-class"})
    cfg = excel.make_config("voc", voc, True, None, {"attribute_clustering": "per-class"})
    assert cfg.attribute_clustering == "per-class" and excel.manifest(cfg)["attribute_clustering"] == "per-class"
    assert excel.make_config("voc", voc, True, None, {}).attribute_clustering == "global"

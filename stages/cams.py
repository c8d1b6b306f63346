"""make cams: training-free CAMs for a dataset split, by CLIP-ES (default) or ExCEL (--method excel).

    python -m stages.cams --dataset voc --root ~/data/VOC2012 --split train_aug --clip ~/models/ViT-B-16.pt
    python -m stages.cams --method excel --dataset voc --root ~/data/VOC2012 --split train --clip ~/models/ViT-B-16.pt
    torchrun --nproc_per_node 4 -m stages.cams ...      # shards the images over 4 processes
"""
from __future__ import annotations

import argparse
import contextlib
import sys

from pipeline.clip.model import CheckpointError
from pipeline.io import FolderInUse, StaleOutputError, output_lock
from pipeline.cams.stage import CamsConfig, run_cams
from stages.common import fail, print_failures
from stages.pseudo import add_pseudo_args, pseudo_config


def parse_args(argv: list[str] | None = None) -> CamsConfig:
    p = argparse.ArgumentParser(prog="python -m stages.cams", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, choices=["voc", "coco", "folder"])
    p.add_argument("--root", required=True, help="dataset root (VOC2012 folder, COCO in VOC style, or an image folder)")
    p.add_argument("--split", default=None,
                   help="split shipped in data/splits/<dataset>/ (voc: train, train_aug, val) or a path to an id list; "
                        "default: train_aug (voc), train (coco), every labelled image (folder)")
    p.add_argument("--clip", required=True, help="OpenAI CLIP ViT checkpoint (ViT-B-16.pt) or a state_dict file")
    p.add_argument("--method", choices=["clipes", "excel"], default="clipes",
                   help="CAM method: CLIP-ES (GradCAM + CAA) or ExCEL (calibrated patch-text CAMs, no gradients)")
    p.add_argument("--out", default=None, help="output folder (default outputs/<dataset>/cams, ExCEL: .../cams_excel)")
    p.add_argument("--classes", default=None, help="class list YAML (default data/<dataset>.yaml; required for folder)")
    p.add_argument("--labels", default=None, help="image-level labels file: JSON/CSV id -> names, or '<id> <label>...' lines")
    p.add_argument("--masks", default=None, help="folder dataset: folder of <id>.png ground-truth masks")
    p.add_argument("--save-init", action="store_true",
                   help="also store the maps before refinement (cams_init): GradCAM (CLIP-ES) or static patch-text CAMs (ExCEL)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda:LOCAL_RANK if available)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="model precision (auto: on CUDA the method's reference dtype, CLIP-ES fp16, ExCEL fp32; fp32 on CPU)")
    p.add_argument("--batch-size", type=int, default=0, help="images per forward, same-size images are grouped (0: auto)")
    p.add_argument("--workers", type=int, default=None,
                   help="image decoding worker processes (default: on CUDA up to 8, one per core; on the CPU 2)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace outputs in --out made with another configuration or checkpoint, recomputing everything")
    p.add_argument("--fixed", action="store_true",
                   help="fix CLIP-ES's reference-code quirks instead of reproducing them: no fp16 host GradCAM "
                        "arithmetic, no double block 12 for 76-patch images, RGB conversion before resizing, "
                        "box masks that may include the grid's last row and column")
    p.add_argument("--max-patches", type=int, default=CamsConfig.max_patches,
                   help="larger images are scaled down for the model to at most this many 16x16 patches")
    p.add_argument("--exif-transpose", action="store_true", help="apply EXIF orientation (off: VOC/COCO masks use stored pixels)")
    p.add_argument("--box-threshold", type=float, default=None,
                   help="box threshold of the refinement (default CLIP-ES 0.4 VOC, 0.7 COCO; ExCEL 0.79)")
    p.add_argument("--prompt", default=None,
                   help="prompt template with '{}' (default: the class list's, 'a clean origami {}.'), or 'best' "
                        "for the top template of `make prompts` (see --prompt-ranking)")
    p.add_argument("--prompt-ranking", default=None, help="ranking.csv of make prompts (default outputs/<dataset>/prompts/)")
    abl = p.add_argument_group("ablations (CLIP-ES Tables 2, 6, 8)")
    abl.add_argument("--no-softmax", action="store_true", help="GradCAM on the raw logit instead of the softmax score")
    abl.add_argument("--softmax-set", choices=["present", "all"], default="present",
                     help="softmax over the image's labels (+ background) or over every class")
    abl.add_argument("--no-background", action="store_true", help="no class-related background set")
    abl.add_argument("--no-synonyms", action="store_true", help="bare class names instead of the synonym prompt strings")
    abl.add_argument("--fusion", choices=["sentence", "feature", "cam"], default="sentence",
                     help="synonym fusion: one sentence (reference), mean embedding, or mean CAM")
    abl.add_argument("--affinity", choices=["caa", "mhsa", "none"], default="caa",
                     help="refinement: class-aware attention affinity, plain attention, or none")
    ex = p.add_argument_group("ExCEL (--method excel)")
    ex.add_argument("--input-size", type=int, default=None,
                    help="square input side for every image, e.g. 320 as the reference (default: each image's own "
                         "aspect, sides rounded up to multiples of 16)")
    ex.add_argument("--descriptions", default=None,
                    help="knowledge base JSON (class -> list of visual descriptions); default data/descriptions/<dataset>.json")
    ex.add_argument("--attribute-bank", default=None,
                    help="saved attribute bank (make attributes, or the reference's .pth) instead of clustering the descriptions")
    ex.add_argument("--attributes", type=int, default=None, help="attribute bank size B (default 112 VOC, 224 COCO)")
    ex.add_argument("--attribute-clustering", choices=("global", "per-class"), default=None,
                    help="global: one KMeans over all descriptions, as the authors (default); per-class: one per "
                         "class, each attribute serving one class")
    ex.add_argument("--no-tse", action="store_true", help="plain class prompts, no text semantic enrichment")
    ex.add_argument("--calibrated-blocks", type=int, default=None, help="final blocks with calibrated attention (default 5)")
    ps = p.add_argument_group("pseudo labels straight from the CAMs (make cams-pseudo)")
    ps.add_argument("--pseudo-out", default=None, help="also write CRF pseudo-label PNGs here as CAMs are computed")
    ps.add_argument("--no-keep-cams", action="store_true", help="with --pseudo-out: write no CAM files at all")
    ps.add_argument("-j", "--jobs", type=int, default=None, help="CRF worker processes (default: all cores)")
    add_pseudo_args(ps)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    clipes = {"softmax": not a.no_softmax, "softmax_set": a.softmax_set, "background": not a.no_background,
              "synonyms": not a.no_synonyms, "fusion": a.fusion, "affinity": a.affinity}
    excel = {"input_size": a.input_size, "descriptions": a.descriptions, "attribute_bank": a.attribute_bank,
             "attributes": a.attributes, "attribute_clustering": a.attribute_clustering,
             "tse": False if a.no_tse else None, "calibrated_blocks": a.calibrated_blocks}
    if a.method == "excel":
        defaults = {"softmax": True, "softmax_set": "present", "background": True, "synonyms": True,
                    "fusion": "sentence", "affinity": "caa"}
        changed = [k for k, v in clipes.items() if v != defaults[k]]
        if changed:
            p.error(f"CLIP-ES ablation flags do not apply to --method excel ({', '.join(changed)})")
        cam_options = excel
    else:
        if any(v is not None for v in excel.values()):
            p.error("--input-size, --descriptions, --attribute-bank, --attributes, --attribute-clustering, --no-tse "
                    "and --calibrated-blocks are ExCEL options: add --method excel")
        cam_options = clipes
    cam_options = {k: v for k, v in {"template": a.prompt, **cam_options}.items() if v is not None}
    split = a.split or {"voc": "train_aug", "coco": "train", "folder": "all"}[a.dataset]
    out = a.out or f"outputs/{a.dataset}/{'cams' if a.method == 'clipes' else 'cams_excel'}"
    return CamsConfig(dataset=a.dataset, root=a.root, split=split, clip=a.clip, out=out, method=a.method,
                      classes=a.classes, labels=a.labels, masks=a.masks, save_init=a.save_init, device=a.device,
                      precision=a.precision, batch_size=a.batch_size, workers=a.workers, overwrite=a.overwrite,
                      exact=not a.fixed, max_patches=a.max_patches, exif_transpose=a.exif_transpose,
                      box_threshold=a.box_threshold, cam_options=cam_options, prompt_ranking=a.prompt_ranking,
                      pseudo_out=a.pseudo_out, pseudo=pseudo_config(a) if a.pseudo_out else None, pseudo_jobs=a.jobs,
                      keep_cams=not a.no_keep_cams, progress=not a.no_progress)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        with contextlib.ExitStack() as locks:
            for folder, flag in ((cfg.out if cfg.keep_cams else None, "--out"), (cfg.pseudo_out, "--pseudo-out")):
                if folder:
                    locks.enter_context(output_lock(folder, flag=flag))
            s = run_cams(cfg)
    except (FolderInUse, StaleOutputError, CheckpointError, OSError, ValueError, ImportError) as e:
        return fail(e)
    if s.rank:  # under torchrun rank 0 reports the whole run
        return 0
    rate = s.written / s.seconds if s.seconds else 0.0
    print(f"cams: {s.written} written, {s.skipped} already done, {s.failed} failed, "
          f"{s.seconds:.1f} s ({rate:.2f} img/s) -> "
          f"{' and '.join(str(d) for d in (cfg.out if cfg.keep_cams else None, cfg.pseudo_out) if d)}")
    print_failures(s.errors, cfg.pseudo_out or cfg.out)
    return 1 if s.failed else 0


if __name__ == "__main__":
    sys.exit(main())

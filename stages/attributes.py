"""make attributes: (re)build ExCEL's attribute bank from a description file and save it.

    python -m stages.attributes --dataset voc --clip ~/models/ViT-B-16.pt
    python -m stages.cams --method excel ... --attribute-bank outputs/voc/attributes.npz

Each description becomes the sentence "<template with the class name> <description>" (lower-cased, as the
authors form them), is embedded with CLIP's text encoder and clustered with KMeans (seeded): one clustering
of all descriptions as the authors do (--attribute-clustering global, the default), or one per class. The
bank holds B centres and their class membership. --reference-format writes the reference's torch.save layout.
An existing bank file is only replaced with --overwrite.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m stages.attributes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, choices=("voc", "coco", "folder"))
    p.add_argument("--clip", required=True, help="OpenAI CLIP ViT checkpoint (ViT-B-16.pt)")
    p.add_argument("--classes", default=None, help="class list YAML (default data/<dataset>.yaml; required for folder)")
    p.add_argument("--descriptions", default=None, help="JSON class -> descriptions (default data/descriptions/<dataset>.json)")
    p.add_argument("--attributes", type=int, default=None, help="bank size B (default 112 VOC, 224 COCO)")
    p.add_argument("--seed", type=int, default=0, help="KMeans seed")
    p.add_argument("--attribute-clustering", choices=("global", "per-class"), default="global",
                   help="one KMeans over all descriptions (the authors'; an attribute may serve several classes) "
                        "or one per class (each attribute belongs to one class, classes get them by spread)")
    p.add_argument("--prompt", default=None, help="prompt template with '{}' (default: the class list's)")
    p.add_argument("--out", default=None, help="bank file (default outputs/<dataset>/attributes.npz)")
    p.add_argument("--reference-format", action="store_true",
                   help="write torch.save([centres (E x B), membership (C x B)]) as the reference's .pth instead")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bank file")
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from pipeline.cams import excel, tse
    from pipeline.classes import DATA_DIR, ClassList, builtin
    from pipeline.clip.model import CheckpointError, load_clip, resolve_device
    from pipeline.io import FolderInUse, output_lock
    from stages.common import fail

    out = Path(args.out or f"outputs/{args.dataset}/attributes.{'pth' if args.reference_format else 'npz'}")
    try:
        if args.classes:
            classes = ClassList.from_yaml(args.classes)
        elif args.dataset == "folder":
            raise ValueError("the folder dataset needs a class list (--classes classes.yaml)")
        else:
            classes = builtin(args.dataset)
        tse.check_bank_path(out, args.overwrite)
        with output_lock(out.parent, name=f".{out.name}.lock"):
            tse.check_bank_path(out, args.overwrite)  # again: another run may have just written it
            path = args.descriptions or (DATA_DIR / "descriptions" / f"{args.dataset}.json")
            descriptions = tse.load_descriptions(path, classes)
            total = args.attributes or excel.ATTRIBUTES.get(args.dataset,
                                                            round(excel.ATTRIBUTES_PER_CLASS * classes.num_classes))
            device, _ = resolve_device(args.device, "fp32")
            model = load_clip(args.clip, device=device)
            bank = tse.build_bank(model, classes, descriptions, total, args.seed, args.prompt, args.attribute_clustering)
            (tse.save_reference_bank if args.reference_format else tse.save_bank)(out, bank)
    except (FolderInUse, ValueError, OSError, CheckpointError) as e:
        return fail(e)
    per_class = bank.membership.sum(axis=1).astype(int)
    print(f"attributes: {len(bank.centres)} from {sum(map(len, descriptions))} descriptions of {classes.num_classes} "
          f"classes ({args.attribute_clustering} clustering) -> {out}")
    print("attributes per class: " + ", ".join(f"{n} {k}" for n, k in zip(classes.names, per_class)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

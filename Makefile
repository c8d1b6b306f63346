# WSSS with a frozen CLIP: CAMs -> pseudo labels -> segmentation models.
# Variables: DATASET (voc|coco|folder), ROOT (dataset folder), SPLIT, CLIP (ViT-B-16.pt), OUT, ARGS (extra flags).
PY      ?= .venv/bin/python
DATASET ?= voc
SPLIT   ?=
OUT     ?=
ARGS    ?=
SPLIT_FLAG = $(if $(SPLIT),--split $(SPLIT))
OUT_FLAG   = $(if $(OUT),--out $(OUT))

.PHONY: setup test cams demo bench

setup:
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps openai-clip==1.0.1

test:
	$(PY) -m pytest -q

cams:
	@test -n "$(ROOT)" || { echo "usage: make cams DATASET=voc ROOT=~/data/VOC2012 SPLIT=train_aug CLIP=~/models/ViT-B-16.pt"; exit 2; }
	@test -n "$(CLIP)" || { echo "CLIP=/path/to/ViT-B-16.pt is required (see README: Weights)"; exit 2; }
	$(PY) -m stages.cams --dataset $(DATASET) --root $(ROOT) $(SPLIT_FLAG) --clip $(CLIP) $(OUT_FLAG) $(ARGS)

demo:
	$(PY) -m stages.demo $(if $(CLIP),--clip $(CLIP)) $(ARGS)

bench:
	$(PY) -m benchmarks.cams $(ARGS)

# WSSS with a frozen CLIP: CAMs -> pseudo labels -> segmentation models.
# Variables: DATASET (voc|coco|folder), ROOT (dataset folder), SPLIT, CLIP (ViT-B-16.pt), PROMPT, WHAT,
# JOBS (CRF processes), OUT, ARGS (extra flags passed through); training: MODEL (weclip|deeplab), CONFIG,
# LABELS (pseudo-label folder), INIT (ResNet-101 checkpoint), CKPT, IMAGES, NPROC.
PY      ?= .venv/bin/python
DATASET ?= voc
SPLIT   ?=
OUT     ?=
ARGS    ?=
JOBS    ?=
PROMPT  ?=
WHAT    ?= cams
MODEL   ?= weclip
CONFIG  ?= configs/$(MODEL)_$(DATASET).yaml
RUN     ?= outputs/$(DATASET)/train/$(basename $(notdir $(CONFIG)))
SPLIT_FLAG  = $(if $(SPLIT),--split $(SPLIT))
OUT_FLAG    = $(if $(OUT),--out $(OUT))
JOBS_FLAG   = $(if $(JOBS),-j $(JOBS))
PROMPT_FLAG = $(if $(PROMPT),--prompt "$(PROMPT)")
NEED_ROOT   = @test -n "$(ROOT)" || { echo "ROOT=/path/to/dataset is required (e.g. ROOT=~/data/VOC2012)"; exit 2; }
NEED_CLIP   = @test -n "$(CLIP)" || { echo "CLIP=/path/to/ViT-B-16.pt is required (see README: Weights)"; exit 2; }

.PHONY: setup test cams cams-pseudo prompts pseudo eval viz train predict export-mmseg demo bench

setup:
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	grep -v '^pydensecrf2' requirements.txt > .venv/requirements-core.txt
	$(PY) -m pip install -q -r .venv/requirements-core.txt
	$(PY) -m pip install -q "$$(grep '^pydensecrf2' requirements.txt | cut -d' ' -f1)" || echo "note: pydensecrf2 \
	did not install (it compiles C++); the dense CRF runs on its PyTorch backend and its comparison tests skip"
	$(PY) -m pip install -q --no-deps openai-clip==1.0.1 mmengine==0.10.7

test:
	$(PY) -m pytest -q

cams:
	$(NEED_ROOT)
	$(NEED_CLIP)
	$(PY) -m stages.cams --dataset $(DATASET) --root $(ROOT) $(SPLIT_FLAG) --clip $(CLIP) $(OUT_FLAG) $(PROMPT_FLAG) $(ARGS)

# CAMs and CRF pseudo labels in one pass, without keeping CAM files (COCO-sized runs)
cams-pseudo:
	$(NEED_ROOT)
	$(NEED_CLIP)
	$(PY) -m stages.cams --dataset $(DATASET) --root $(ROOT) $(SPLIT_FLAG) --clip $(CLIP) $(PROMPT_FLAG) \
		--pseudo-out $(or $(OUT),outputs/$(DATASET)/pseudo) --no-keep-cams $(JOBS_FLAG) $(ARGS)

prompts:
	$(NEED_ROOT)
	$(NEED_CLIP)
	$(PY) -m stages.prompts --dataset $(DATASET) --root $(ROOT) $(SPLIT_FLAG) --clip $(CLIP) $(OUT_FLAG) $(ARGS)

pseudo:
	$(NEED_ROOT)
	$(PY) -m stages.pseudo --dataset $(DATASET) --root $(ROOT) $(SPLIT_FLAG) $(OUT_FLAG) $(JOBS_FLAG) $(ARGS)

eval:
	$(NEED_ROOT)
ifeq ($(WHAT),model)
	$(PY) -m stages.evaluate_model --checkpoint $(or $(CKPT),$(RUN)) --dataset $(DATASET) --root $(ROOT) $(SPLIT_FLAG) $(OUT_FLAG) $(ARGS)
else
	$(PY) -m stages.eval --what $(WHAT) --dataset $(DATASET) --root $(ROOT) $(SPLIT_FLAG) $(OUT_FLAG) $(JOBS_FLAG) $(ARGS)
endif

viz:
	$(NEED_ROOT)
	$(PY) -m stages.viz --dataset $(DATASET) --root $(ROOT) $(SPLIT_FLAG) $(OUT_FLAG) $(JOBS_FLAG) $(ARGS)

train:
	$(NEED_ROOT)
	$(if $(NPROC),$(PY) -m torch.distributed.run --standalone --nproc_per_node $(NPROC),$(PY)) -m stages.train \
		--config $(CONFIG) --dataset $(DATASET) --root $(ROOT) $(if $(LABELS),--pseudo $(LABELS)) \
		$(if $(CLIP),--clip $(CLIP)) $(if $(INIT),--set model.pretrained=$(INIT)) $(if $(OUT),--out $(OUT)) $(ARGS)

predict:
	$(PY) -m stages.predict --checkpoint $(or $(CKPT),$(RUN)) $(if $(IMAGES),--images $(IMAGES),--dataset $(DATASET) --root $(ROOT) $(SPLIT_FLAG)) $(OUT_FLAG) $(ARGS)

export-mmseg:
	$(NEED_ROOT)
	$(PY) -m stages.export_mmseg --dataset $(DATASET) --root $(ROOT) $(SPLIT_FLAG) $(if $(LABELS),--pseudo $(LABELS)) $(OUT_FLAG) $(ARGS)

demo:
	$(PY) -m stages.demo $(if $(CLIP),--clip $(CLIP)) $(ARGS)

bench:
	$(PY) -m benchmarks.cams $(ARGS)
	$(PY) -m benchmarks.pseudo
	$(PY) -m benchmarks.train

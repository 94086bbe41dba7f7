# Two commands on a fresh machine:  `make demo`  and  `make test`.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
TORCH   ?= torch==2.13.0

.PHONY: setup demo lint test test-all docs bench bench-setup bench-capture clean

$(VENV)/.installed: pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	# The CPU build of torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q $(TORCH)
	$(VPY) -m pip install -q -e ".[experiments,test,mnist1d,slurm,docs,baselines]"
	$(VPY) -c "import torch; print('torch', torch.__version__)"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VPY) scripts/demo.py

# Lint and format check (ruff) and type check (mypy, the library) before the tests. `ruff format .` fixes the format.
lint: setup
	$(VPY) -m ruff check .
	$(VPY) -m ruff format --check .
	$(VPY) -m mypy tensorcurv

# The peers come first (bench-setup, --no-deps): the kronfluence agreement tests then run instead of skipping.
test: lint bench-setup
	$(VPY) -m pytest -q -m "not slow"
	$(MAKE) --no-print-directory docs

test-all: lint
	$(VPY) -m pytest -q

# The documentation site (mkdocs.yml, docs/) into site/. --strict: a broken link, anchor or include, or a docstring
# mkdocstrings cannot render, is an error.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(VPY) -m mkdocs build --strict

# The peer libraries of bench_capture (pyproject's `bench` extra) without their dependencies, so torch stays
# the CPU build installed above; `make test` installs them too, for the peer agreement tests.
bench-setup: setup
	$(VPY) -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['bench'], sep='\n')" \
		| $(VPY) -m pip install -q --no-deps -r /dev/stdin
	$(VPY) -c "import torch, curvlinops, nngeometry, backpack, kronfluence; print('torch', torch.__version__)"

bench-capture: bench-setup
	$(VPY) scripts/bench_capture.py --out reports/bench_capture.md

# Benchmarks: each prints a table and writes it under reports/ (minutes each on 2 CPU cores).
bench: bench-capture
	$(VPY) scripts/bench_structures.py --out reports/bench_structures.md
	$(VPY) scripts/bench_tensorly_fit.py --repeats 5 > reports/bench_tensorly_fit.md
	$(VPY) scripts/bench_optim.py --parts b --structures kfac kron_sum tt --out reports/bench_optim.md
	$(VPY) scripts/bench_optim.py --parts a c --structures diagonal kfac ekfac --rounds 8 --steps-per-round 20 --batches 256 1024 --out reports/bench_optim_cost.md
	$(VPY) scripts/bench_optim.py --parts a --structures kron_sum tucker tt --rounds 3 --steps-per-round 5 --out reports/bench_optim_tensor.md
	$(VPY) scripts/bench_unlearn.py --scenarios label_flip backdoor deletion --out reports/unlearning
	$(VPY) scripts/unlearn_fidelity.py --out reports/unlearning/structure_fidelity
	$(VPY) scripts/bench_unlearn.py --scenarios label_flip --hidden 32 --methods first_order exact lissa pcg:kfac kfac ekfac kfac+refine "kfac (cached)" "kfac+refine (cached)" "ekfac+refine (cached)" --out reports/unlearning/mlp32
	$(VPY) scripts/bench_distributed.py --out reports/bench_distributed.md

clean:
	rm -rf $(VENV) .pytest_cache outputs multirun site

#!/usr/bin/env bash
# Fetch, on a machine with pip and a package index, every wheel benchmarks/gpu_check.py needs on a
# GPU image that has Python 3.12, torch, transformers, accelerate, safetensors, numpy, pandas,
# pyarrow, scikit-learn, scipy, sacrebleu, matplotlib, jinja2, pyyaml, tqdm, typer and
# huggingface_hub, but none of this project's other dependencies and no package index:
#
#   bash benchmarks/gpu_wheels.sh .whl          # here: about 19 MB of wheels into .whl/
#   bash benchmarks/gpu_check.sh .whl           # there
#
# Versions are the ones this project is tested with. PYARROW=1 adds pyarrow (datasets needs
# >= 24; about 45 MB) for an image whose own is older. PYTHON_VERSION=3.11 etc. for another image.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.whl}
mkdir -p "$dest"
binary=(
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0 lm-eval==0.4.13 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
  more-itertools==11.2.1 nevergrad==1.0.12 cma==4.5.0 bayesian-optimization==1.4.0
  directsearch==1.1 optuna==5.0.0 alembic==1.20.1 sqlalchemy==2.1.9 mako==1.4.3
  colorlog==6.12.0 cmaes==0.13.1
)
source_only=(sqlitedict==2.1.0 word2number==1.1)  # pure Python, published as sources only
if [[ ${PYARROW:-0} == 1 ]]; then binary+=(pyarrow==26.0.1); fi
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$tag")
done
python3 -m pip download -q --no-deps --only-binary=:all: --implementation cp \
  --python-version "${PYTHON_VERSION:-3.12}" "${platforms[@]}" -d "$dest" "${binary[@]}"
python3 -m pip wheel -q --no-deps -w "$dest" "${source_only[@]}" .  # and evomerge itself
ls "$dest"
du -sh "$dest"

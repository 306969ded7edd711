#!/usr/bin/env bash
# Run benchmarks/gpu_check.py on a GPU machine with the wheels benchmarks/gpu_wheels.sh fetched:
# they are installed into a folder put first on PYTHONPATH (no index, no dependencies resolved),
# so the image's own torch and transformers are the ones that run.
#
#   bash benchmarks/gpu_check.sh .whl [gpu_check.py options, e.g. --out $OUT/gpu_check.json]
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=${1:-.whl}
shift || true
site=${EVOMERGE_SITE:-/tmp/evomerge-site}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$site" "$wheels"/*.whl
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
sections=()
python3 - <<'PY' || sections=(--sections merge materialize)
import pyarrow, torch, transformers
print(f"torch {torch.__version__} (cuda {torch.cuda.is_available()}), transformers "
      f"{transformers.__version__}, pyarrow {pyarrow.__version__}")
if int(pyarrow.__version__.split(".")[0]) < 24:
    raise SystemExit("datasets needs pyarrow >= 24 (PYARROW=1 bash benchmarks/gpu_wheels.sh "
                     "fetches it): running the merge and materialize sections only")
PY
exec python3 benchmarks/gpu_check.py "$@" "${sections[@]}"

#!/usr/bin/env bash
# Run the TransformerBridge adapter tests under transformer-lens 4.x in a separate venv.
# torch==2.13.0 is installed FIRST (the CPU build on this machine), so that transformer-lens
# never pulls a CUDA torch. Usage: bash scripts/test_tl4.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${TL4_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/apd_lens/venv-tl4}"
mkdir -p "$(dirname "$VENV")"
TL4_SPEC="${TL4_SPEC:-transformer-lens>=4,<5}"
if [ ! -x "$VENV/bin/python" ]; then
    python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q "$TL4_SPEC" pytest
"$VENV/bin/python" -m pip install -q --no-deps -e .
"$VENV/bin/python" - <<'PY'
import torch, importlib.metadata as md
tl = md.version("transformer-lens")
print(f"torch {torch.__version__}, transformer-lens {tl}")
assert torch.__version__.startswith("2.13.0"), "torch was replaced: refuse to test on another build"
assert tl.split(".")[0] == "4", f"expected transformer-lens 4.x, got {tl}"
PY
"$VENV/bin/python" -m pytest tests/test_adapters_bridge.py -q "$@"

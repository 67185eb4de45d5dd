#!/usr/bin/env bash
# Assemble .device-carry/ for the GPU machine within its 64 MiB limit (see tools/README.md).
#
# Why not only ../shared/device/prepare.sh: the release binaries carry debug info (180 MB), so they
# are stripped and xz-compressed here (≈ 8 + 3 MB); and the NVIDIA Vulkan ICD (libGLX_nvidia.so.0)
# needs glvnd's libGLdispatch — without libglvnd0 the loader fails with "Could not get
# 'vkCreateInstance' via 'vk_icdGetInstanceProcAddr'" (seen on the H200 on 2026-11-29), so the glvnd
# packages downloaded into .gl/ (the device README's recipe) travel as well.
# Usage: bash tools/device_pack.sh [DATA_ITEM ...]   (default: tiny-llama-15m, stories260K,
#        wikitext-2-raw-v1, c4, tinystories — the pipeline tests calibrate on the latter).
#        Test binaries (`cargo test --release --no-run`) named in PACK_TESTS
#        (default "gpu_kernels quant_gpu forward"; "lib": the library's unit tests) travel too, so the
#        GPU tests run on the real GPU (tools/device_perf.sh runs them first); PACK_TESTS="" leaves
#        them out.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
shared=$root/../shared
grep -qx '/.device-carry/' .git/info/exclude 2>/dev/null || echo '/.device-carry/' >> .git/info/exclude
rm -rf .device-carry && mkdir -p .device-carry/debs .device-carry/data/corpora
cp "$shared"/device/debs/*.deb .device-carry/debs/
# A fresh checkout has no .gl/ (it is ignored): fetch the glvnd packages once where apt can.
if ! ls .gl/*.deb > /dev/null 2>&1 && command -v apt-get > /dev/null; then
  grep -qx '/.gl/' .git/info/exclude 2>/dev/null || echo '/.gl/' >> .git/info/exclude
  mkdir -p .gl && (cd .gl && apt-get download libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2 \
    > /dev/null 2>&1) || true
fi
if ls .gl/*.deb > /dev/null 2>&1; then cp .gl/*.deb .device-carry/debs/; else
  echo "warning: no .gl/*.deb (glvnd); the NVIDIA Vulkan ICD may not load" >&2; fi
cp "$shared"/device/setup.sh .device-carry/setup.sh
strip -o .device-carry/gptaq-studio target/release/gptaq-studio
kb=$(ls -t target/release/deps/kernels-* 2>/dev/null | grep -v '\.d$' | head -n1 || true)
[ -n "$kb" ] && strip -o .device-carry/kernels-bench "$kb"
tests=()
for t in ${PACK_TESTS-gpu_kernels quant_gpu forward}; do
  if [ "$t" = lib ]; then
    # The library's own unit tests (src/**, e.g. quant::gpu's kernel agreement tests): the newest
    # gptaq_studio-* harness that lists them (the binary's own harness has the same name).
    tb=$(for f in $(ls -t target/release/deps/gptaq_studio-* 2>/dev/null | grep -v '\.d$'); do
      # (Counting, not `grep -q`: an early exit would kill the lister with SIGPIPE, which
      # pipefail turns into a miss.)
      [ "$("$f" --list 2> /dev/null | grep -c '^quant::gpu::tests::')" -gt 0 ] && { echo "$f"; break; }; done || true)
  else
    tb=$(ls -t target/release/deps/"$t"-* 2>/dev/null | grep -v '\.d$' | head -n1 || true)
  fi
  if [ -n "$tb" ]; then strip -o ".device-carry/test-$t" "$tb"; tests+=(".device-carry/test-$t"); else
    echo "warning: no test binary for $t (run cargo test --release --no-run)" >&2; fi
done
xz -T0 -6 .device-carry/gptaq-studio ${kb:+.device-carry/kernels-bench} "${tests[@]}"
items=("$@")
[ ${#items[@]} -eq 0 ] && items=(tiny-llama-15m stories260K corpora/wikitext-2-raw-v1 corpora/c4 corpora/tinystories)
for d in "${items[@]}"; do cp -r "$shared/data/$d" ".device-carry/data/$d"; done
# The kernel lab's variant files (benches/lab/, tools/README.md "Kernel lab"); more can be added
# to .device-carry/lab/ after packing.
mkdir -p .device-carry/lab && cp benches/lab/*.wgsl .device-carry/lab/
du -sh .device-carry

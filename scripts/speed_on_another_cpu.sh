#!/bin/bash
# The llama-bench comparison on a machine that has a compiler, Python 3.11+ and ninja but neither this repo's
# venv nor a network: another CPU, more cores. Stock and patched llama.cpp are built there from the
# pinned source with scripts/vendor.py's CMake options (`vendor.py options`), so with that CPU's native
# flags and no AMX; on an AMX CPU, stock is also built with AMX and run once: llama.cpp #20824 crashes
# some AMX machines, not all.
#
#   here:   scripts/speed_on_another_cpu.sh pack SRC.tar.xz          after `make build`: the pinned source,
#                                                                    without docs, models, tests and GPU backends
#   there:  scripts/speed_on_another_cpu.sh build SRC.tar.xz WORK    (in a copy of this repo: patches/, kvggml/csrc)
#           scripts/speed_on_another_cpu.sh bench MODEL WORK OUT     OUT/results.jsonl, OUT/bench.log, OUT/amx.txt
#   here:   .venv/bin/python scripts/measure_tier.py speed --import OUT/results.jsonl --out docs/results/...
#
# bench: every stock cache type and kvggml's default preset at depths 2048 and 8192 with all cores
# (-r 3), then decode at depth 8192 with 2, 4 and 8 threads. Each JSON line gets its variant's label.
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
mode=${1:-}

case "$mode" in
pack)
  tar -C "$REPO/build" -cJf "$2" --exclude=.git --exclude=llama.cpp-stock/{docs,models,benches,tests} \
    --exclude=llama.cpp-stock/ggml/src/ggml-{cuda,vulkan,sycl,opencl,hexagon,metal,et,webgpu,openvino,cann} \
    llama.cpp-stock
  ;;
build)
  W=$3; mkdir -p "$W" && cd "$W" || exit 1
  lscpu > cpu.txt; gcc --version | head -1 >> cpu.txt
  tar xJf "$2" && rm -rf patched && cp -r llama.cpp-stock patched || exit 1
  (cd patched && for p in "$REPO"/patches/*.patch; do patch -p1 -s < "$p" || exit 1; done) || exit 1
  mapfile -t stock < <(python3 "$REPO/scripts/vendor.py" options stock)
  mapfile -t patched < <(python3 "$REPO/scripts/vendor.py" options patched)
  one() {  # name source cmake-options...: the build tree b-<name>, its llama-bench
    local name=$1 src=$2; shift 2
    cmake -S "$src" -B "b-$name" "$@" > "b-$name.log" 2>&1 &&
      cmake --build "b-$name" -j "$(nproc)" --target llama-bench >> "b-$name.log" 2>&1
    echo "built $name: rc $?"
  }
  one stock llama.cpp-stock "${stock[@]}" &
  one patched patched "${patched[@]}" &
  # a later -D wins: empty C flags drop the -mno-amx-* ones
  if grep -q amx_tile /proc/cpuinfo; then one stock-amx llama.cpp-stock "${stock[@]}" -DCMAKE_C_FLAGS= -DCMAKE_CXX_FLAGS= & fi
  wait
  ;;
bench)
  M=$2 W=$3 OUT=$4; mkdir -p "$OUT"
  N=$(nproc) LOG=$OUT/bench.log
  run() {  # label build environment... -- llama-bench arguments...
    local label=$1 build=$2; shift 2
    local env=(); while [ "$1" != "--" ]; do env+=("$1"); shift; done; shift
    echo "== $label: $*" | tee -a "$LOG"
    env "${env[@]}" "$W/b-$build/bin/llama-bench" -m "$M" -o jsonl "$@" > "$W/out.jsonl" 2>> "$LOG"
    local rc=$?
    echo "   rc $rc" | tee -a "$LOG"
    sed "s/^{/{\"label\": \"$label\", \"rc\": $rc, /" "$W/out.jsonl" >> "$OUT/results.jsonl"
  }
  if [ -x "$W/b-stock-amx/bin/llama-bench" ]; then
    timeout 300 "$W/b-stock-amx/bin/llama-bench" -m "$M" -p 512 -n 32 -r 2 -t "$N" -d 0,2048 > "$OUT/amx.txt" 2>&1
    echo "== stock with AMX kernels: rc $?" | tee -a "$LOG"
  fi
  off=(OLLAMA_KV_COMPRESSION=0) on=(OLLAMA_KV_COMPRESSION=1 OLLAMA_KV_COMPRESSION_PRESET=balanced)
  all=(-p 512 -n 32 -r 3 -d 2048,8192 -t "$N")
  run "stock f16" stock "${off[@]}" -- -ctk f16 -ctv f16 -fa 1,0 "${all[@]}"
  run "kvggml balanced" patched "${on[@]}" -- -fa 1,0 "${all[@]}"
  run "stock q8_0" stock "${off[@]}" -- -ctk q8_0 -ctv q8_0 -fa 1 "${all[@]}"
  run "stock q4_0" stock "${off[@]}" -- -ctk q4_0 -ctv q4_0 -fa 1 "${all[@]}"
  run "kvggml balanced" patched "${on[@]}" -- -fa 1 -p 0 -n 32 -r 2 -d 8192 -t 2,4,8
  run "stock f16" stock "${off[@]}" -- -ctk f16 -ctv f16 -fa 0 -p 0 -n 32 -r 2 -d 8192 -t 2,4,8
  ;;
*)
  sed -n '2,15p' "$0"; exit 2
  ;;
esac

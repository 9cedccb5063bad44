#!/usr/bin/env bash
# Kiln against PyTorch eager on the standard benchmark shapes (issue 9).
#
# Runs `kiln bench` and shared/bench/torch_gpt_bench.py alternately for ROUNDS rounds (so both see the
# same machine load), then prints the median tokens/s of each, their ratio, and peak memory, for
# training, generation at batch 1 and generation at batch 16; then a kiln-only scaling table (train
# tok/s over context length and over width). Without PyTorch it prints the kiln figures only.
#
# Environment: ROUNDS (3), THREADS (2), KILN (./target/release/kiln, built if missing),
# TORCH_PY (/tmp/torch-venv/bin/python), TORCH_SCRIPT (shared/bench/torch_gpt_bench.py),
# SCALING (1; 0 skips the scaling table), WEIGHTS (f32; kiln's generation weights: f32, bf16 or int8),
# BENCHES ("train gen1 gen16 rollout llama lora llamaroll"; a subset runs only those: rollout is the RL
# sampling shape, 64 sequences x 64 new tokens; llama is training at SmolLM2-135M's shape through
# transformers' LlamaForCausalLM; lora the same with rank-16 LoRA on every block linear, the base
# frozen, against PEFT (scripts/torch_lora_bench.py); llamaroll the rollout shape on that model, GRPO's sampling), PRECISION (f32; kiln's training matmuls: f32 or bf16), ISA (native).
# Kiln runs on the best SIMD path of the CPU. ISA=avx2 runs both sides as on an AVX2-only CPU (an
# AMD Zen 3, say) on this one: Kiln with KILN_SIMD=avx2 (its kernels and the gemm crate's matmuls on
# AVX2 + FMA), PyTorch with ATEN_CPU_CAPABILITY=avx2, MKL_ENABLE_INSTRUCTIONS=AVX2 and
# DNNL_MAX_CPU_ISA=AVX2 (same clock and caches, so a stand-in for such a CPU, not a measurement of one).
set -u
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
THREADS=${THREADS:-2}
KILN=${KILN:-./target/release/kiln}
TORCH_PY=${TORCH_PY:-/tmp/torch-venv/bin/python}
SCALING=${SCALING:-1}
WEIGHTS=${WEIGHTS:-f32}
PRECISION=${PRECISION:-f32}
BENCHES=${BENCHES:-train gen1 gen16 rollout llama lora llamaroll}
ISA=${ISA:-native}
case $ISA in
    native) ;;
    avx2)
        export KILN_SIMD=avx2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 DNNL_MAX_CPU_ISA=AVX2
        ;;
    *)
        echo "ISA must be native or avx2 (got $ISA)" >&2
        exit 2
        ;;
esac
# SmolLM2-135M: 30 layers, width 576, 9 heads / 3 kv heads, SwiGLU 1,536, vocabulary 49,152.
LLAMA_MODEL="--arch llama --vocab 49152 --layers 30 --dim 576 --heads 9 --kv-heads 3 --ffn 1536 --ctx 512"
LLAMA_SHAPE="$LLAMA_MODEL --batch 4"
if [ -z "${TORCH_SCRIPT:-}" ]; then
    for c in shared/bench/torch_gpt_bench.py /work/shared/bench/torch_gpt_bench.py; do
        [ -f "$c" ] && TORCH_SCRIPT=$c && break
    done
fi
TORCH_SCRIPT=${TORCH_SCRIPT:-}

if [ ! -x "$KILN" ]; then
    echo "building $KILN ..." >&2
    cargo build --release -q || exit 1
fi

HAVE_TORCH=0
if [ -n "$TORCH_SCRIPT" ] && [ -x "$TORCH_PY" ] && "$TORCH_PY" -c 'import torch' 2>/dev/null; then
    HAVE_TORCH=1
else
    echo "PyTorch not available (TORCH_PY=$TORCH_PY, TORCH_SCRIPT=${TORCH_SCRIPT:-none}): kiln figures only" >&2
fi

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# field NAME < line: the value of NAME=... on a RESULT line (empty if absent).
field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" | head -n1; }

# median of the numbers on stdin (empty input: empty output).
median() { sort -g | awk '{v[NR]=$1} END {if (NR) print v[int((NR+1)/2)]}'; }

# run_kiln KEY ARGS...: appends "tok peak" to $TMP/kiln.KEY
run_kiln() {
    local key=$1
    shift
    local line
    local out
    out=$("$KILN" bench "$@" --threads "$THREADS" 2>/dev/null)
    line=$(echo "$out" | grep '^RESULT kiln-\(train\|generate\) ' | tail -n1)
    if [ -z "$line" ]; then
        echo "kiln bench $* failed" >&2
        return
    fi
    echo "$(echo "$line" | field tok_per_s) $(echo "$line" | field peak_mib)" >>"$TMP/kiln.$key"
    # Where the step's time goes (training) and the bandwidth bound (generation), for the tables below.
    echo "$out" | grep '^RESULT kiln-train-\(matmuls\|profile\)' | tr '\n' ' ' >>"$TMP/kiln.$key.profile"
    echo "$out" | grep '^RESULT kiln-generate-bound' >>"$TMP/kiln.$key.bound"
    [ -s "$TMP/kiln.$key.profile" ] && echo >>"$TMP/kiln.$key.profile"
}

# run_torch KEY ARGS...: appends "tok peak" to $TMP/torch.KEY; peak RSS from getrusage in a wrapper
# (the shared script itself is left as it is).
run_torch() {
    local key=$1
    shift
    local out line peak
    # SCRIPT=... run_torch runs another yardstick with the same arguments (scripts/torch_lora_bench.py).
    out=$("$TORCH_PY" -c '
import resource, runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print("PEAK_KIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
' "${SCRIPT:-$TORCH_SCRIPT}" "$@" --threads "$THREADS" 2>/dev/null)
    line=$(echo "$out" | grep '^RESULT' | tail -n1)
    peak=$(echo "$out" | awk '/^PEAK_KIB/ {printf "%.0f", $2 / 1024}')
    if [ -z "$line" ]; then
        echo "torch $* failed" >&2
        return
    fi
    echo "$(echo "$line" | field tok_per_s) $peak" >>"$TMP/torch.$key"
}

want() { case " $BENCHES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

for r in $(seq 1 "$ROUNDS"); do
    echo "round $r/$ROUNDS ..." >&2
    if want train; then
        run_kiln train train --precision "$PRECISION"
        [ $HAVE_TORCH = 1 ] && run_torch train train
    fi
    if want gen1; then
        run_kiln gen1 generate --weights "$WEIGHTS"
        [ $HAVE_TORCH = 1 ] && run_torch gen1 generate --batch 1
    fi
    if want gen16; then
        run_kiln gen16 generate --batch 16 --weights "$WEIGHTS"
        [ $HAVE_TORCH = 1 ] && run_torch gen16 generate --batch 16
    fi
    if want rollout; then
        run_kiln rollout generate --batch 64 --new-tokens 64 --weights "$WEIGHTS"
        [ $HAVE_TORCH = 1 ] && run_torch rollout generate --batch 64 --new-tokens 64
    fi
    if want llama; then
        # shellcheck disable=SC2086
        run_kiln llama train $LLAMA_SHAPE --warmup 1 --steps 3 --precision "$PRECISION"
        # shellcheck disable=SC2086
        [ $HAVE_TORCH = 1 ] && run_torch llama train $LLAMA_SHAPE --warmup 1 --steps 3
    fi
    if want lora; then
        # shellcheck disable=SC2086
        run_kiln lora train $LLAMA_SHAPE --lora-rank 16 --warmup 1 --steps 3 --precision "$PRECISION"
        # shellcheck disable=SC2086
        [ $HAVE_TORCH = 1 ] && SCRIPT=scripts/torch_lora_bench.py run_torch lora train $LLAMA_SHAPE --lora-rank 16 --warmup 1 --steps 3
    fi
    if want llamaroll; then
        # shellcheck disable=SC2086
        run_kiln llamaroll generate $LLAMA_MODEL --batch 64 --new-tokens 64 --warmup 1 --steps 2 --weights "$WEIGHTS"
        # shellcheck disable=SC2086
        [ $HAVE_TORCH = 1 ] && run_torch llamaroll generate $LLAMA_MODEL --batch 64 --new-tokens 64 --warmup 1 --steps 2
    fi
done

col() { [ -f "$2" ] && awk -v c="$1" '{print $c}' "$2" | median; }

echo
echo "Kiln vs PyTorch eager, $THREADS threads, median of $ROUNDS rounds (tok/s; peak RSS MiB); kiln training matmuls $PRECISION, generation weights $WEIGHTS; instruction sets $ISA"
printf "%-27s %10s %10s %8s %10s %10s\n" benchmark kiln torch ratio kiln_MiB torch_MiB
for key in $BENCHES; do
    case $key in
        train) name="train (b8 x 256)" ;;
        gen1) name="generate batch 1" ;;
        gen16) name="generate batch 16" ;;
        rollout) name="rollout 64 x 64 new" ;;
        llama) name="llama 135M train b4x512" ;;
        lora) name="llama 135M LoRA r16 b4x512" ;;
        llamaroll) name="llama 135M rollout 64x64" ;;
    esac
    kt=$(col 1 "$TMP/kiln.$key")
    km=$(col 2 "$TMP/kiln.$key")
    tt=$(col 1 "$TMP/torch.$key")
    tm=$(col 2 "$TMP/torch.$key")
    ratio=-
    if [ -n "$kt" ] && [ -n "$tt" ]; then
        ratio=$(awk -v a="$kt" -v b="$tt" 'BEGIN {if (b > 0) printf "%.2fx", a / b; else print "-"}')
    fi
    printf "%-27s %10s %10s %8s %10s %10s\n" "$name" "${kt:--}" "${tt:--}" "$ratio" "${km:--}" "${tm:--}"
done

# prof_row NAME FILE: medians of the profile fields over the rounds, one row.
prof_fields="step_ms matmul_ms attention_ms norm_ms activation_ms rope_ms embedding_ms loss_ms optimizer_ms elementwise_ms glue_ms step_over_matmuls"
prof_row() {
    local name=$1 file=$2 f vals=""
    for f in $prof_fields; do
        vals="$vals $(sed -n "s/.* $f=\([^ ]*\).*/\1/p" "$file" | median)"
    done
    # shellcheck disable=SC2086
    printf "%-28s %8s %8s %6s %5s %6s %5s %5s %5s %6s %6s %5s %7s\n" "$name" $vals
}
prof_header() {
    printf "%-28s %8s %8s %6s %5s %6s %5s %5s %5s %6s %6s %5s %7s\n" shape step_ms matmul attn norm activ rope embed loss optim elemwise glue step/mm
}
if ls "$TMP"/kiln.*.profile >/dev/null 2>&1; then
    echo
    echo "Kiln training step, where the time goes (ms, medians; step/mm = step over its matmuls' own time)"
    prof_header
    for key in train llama lora; do
        [ -s "$TMP/kiln.$key.profile" ] && prof_row "$key" "$TMP/kiln.$key.profile"
    done
fi
for key in gen1 gen16 rollout llamaroll; do
    if [ -s "$TMP/kiln.$key.bound" ]; then
        echo "$key: $(tail -n1 "$TMP/kiln.$key.bound" | sed 's/^RESULT kiln-generate-bound //')"
    fi
done

if [ "$SCALING" != 0 ]; then
    echo
    echo "Kiln train scaling ($PRECISION matmuls, batch 8, 6 layers, vocab 8192, head size 64; one run each): tok/s, peak MiB, and where the step's time goes (ms)"
    printf "%-28s %10s %10s\n" shape tok_per_s peak_MiB
    scale_row() {
        local name=$1
        shift
        local out line
        out=$("$KILN" bench train "$@" --precision "$PRECISION" --warmup 1 --steps 3 --threads "$THREADS" 2>/dev/null)
        line=$(echo "$out" | grep '^RESULT kiln-train ' | tail -n1)
        printf "%-28s %10s %10s\n" "$name" "$(echo "$line" | field tok_per_s)" "$(echo "$line" | field peak_mib)"
        scale_n=$((scale_n + 1))
        scale_names[$scale_n]=$name
        echo "$out" | grep '^RESULT kiln-train-\(matmuls\|profile\)' | tr '\n' ' ' >"$TMP/scale.$scale_n"
        echo >>"$TMP/scale.$scale_n"
    }
    scale_n=0
    declare -a scale_names
    for ctx in 256 512 1024; do
        scale_row "ctx $ctx, width 384" --ctx "$ctx" --dim 384 --heads 6
    done
    scale_row "ctx 256, width 256 (4 heads)" --ctx 256 --dim 256 --heads 4
    scale_row "ctx 256, width 768 (12 heads)" --ctx 256 --dim 768 --heads 12
    # shellcheck disable=SC2086
    scale_row "llama 135M shape, b4 x 512" $LLAMA_SHAPE
    echo
    prof_header
    for i in $(seq 1 "$scale_n"); do
        prof_row "${scale_names[$i]}" "$TMP/scale.$i"
    done
fi

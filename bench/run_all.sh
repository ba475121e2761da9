#!/usr/bin/env bash
# Every measurement that docs/benchmarks.md reports, in its order, one
# after another, each command's output teed to its own log:
#
#     bash bench/run_all.sh                  # 75 min to 3 h on the 2-core CPU box (see below), on an otherwise idle machine
#     LOGS=runs/bench/again bash bench/run_all.sh
#     bash bench/run_all.sh --smoke          # every script in its quick form (small shape): does it all run?
#
# Run it alone: the comparisons alternate rounds so that a burst of load hits every side alike,
# but the absolute rates and the MFU yardstick assume nothing else runs. Memory: the HH-RLHF
# comparison keeps three processes at the 0.5B-4L shape alive together (minialign packed,
# minialign unpacked, TRL with a live reference: ~18 GB at most); on a smaller machine add
# --layouts packed to the two bench_vs_reference.py lines.
#
# PYTHON runs minialign alone (torch, safetensors, tokenizers, numpy); REFPYTHON is the separate
# venv with transformers and TRL (docs/benchmarks.md), used only where a reference is compared.
# The bench scripts import minialign from this checkout, whichever Python runs them.
# Durations are for 2 threads on the 2-core x86_64 CPU of the runs in docs/benchmarks.md: the first figure on
# 2026-11-28's machines (matmul 143-226 GFLOP/s), the second, where given, on 2026-12-01's (42-59).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
REFPYTHON=${REFPYTHON:-/work/refenv/bin/python}
LOGS=${LOGS:-runs/bench/$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$LOGS"

# The arguments of each step; --smoke swaps in the quick forms (small shape, fewer rounds), which
# prove that everything runs end to end and measure nothing.
FIXED=(--workloads fixed)
REALISTIC=(--workloads realistic --references trl)
TRAIN=()
DEEP=(--only qwen0.5b:1024 --rounds 2)
GENERATE=(--shapes qwen0.5b-4l)
PROFILE_RM=(--kind rm --shape qwen0.5b --seq 1024)
PROFILE_DPO=(--kind dpo --data hh --rows 30)
EVAL=()
if [[ ${1:-} == --smoke ]]; then
    FIXED=(--quick --workloads fixed)
    REALISTIC=(--quick --workloads realistic --references trl)
    TRAIN=(--quick)
    DEEP=(--only small:256 --kinds rm --rounds 1)
    GENERATE=(--quick)
    PROFILE_RM=(--kind rm --shape small --seq 256)
    PROFILE_DPO=(--kind dpo --data hh --shape small --rows 10)
    EVAL=(--quick)
fi

# run NAME COMMAND...: the command's stdout and stderr into $LOGS/NAME.log (and on the terminal);
# its start, end and exit status into $LOGS/run_all.log. A failed step is reported, and the next
# ones still run.
run() {
    local name=$1
    shift
    local start=$SECONDS
    echo "== $(date -u +%H:%M:%S) $name: $*" | tee -a "$LOGS/run_all.log"
    local status=0
    "$@" 2>&1 | tee "$LOGS/$name.log" || status=$?
    echo "== $(date -u +%H:%M:%S) $name: exit $status after $((SECONDS - start)) s" | tee -a "$LOGS/run_all.log"
}

{
    echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown) $(git status --porcelain 2>/dev/null | grep -q . && echo '(uncommitted changes)')"
    uptime
    free -m 2>/dev/null || true
} | tee -a "$LOGS/run_all.log"

# 1. Against TRL and a hand-written transformers loop at fixed lengths (2 pairs x (128 + 128)
#    tokens, 0.5B-4L), DPO and RM, minialign packed and unpacked alternating with each reference:
#    ~9 min (7 before the packed worker); 17 min on 2026-12-01.
run 1_vs_reference_fixed "$REFPYTHON" bench/bench_vs_reference.py "${FIXED[@]}"

# 2. Against TRL on the HH-RLHF pairs (16 pairs, 8 steps of 2 per round, 3 rounds), DPO and RM,
#    minialign packed and unpacked: > 30 min (19 before the packed worker); 41 min on 2026-12-01.
#    The slowest step of all: TRL's DPO takes ~50 s a step there, ~7 min a round.
run 2_vs_trl_realistic "$REFPYTHON" bench/bench_vs_reference.py "${REALISTIC[@]}"

# 3. minialign's steps: checkpointing (small at 1024, 0.5B-4L at 1024), live vs precomputed
#    reference (0.5B-4L at 256), MFU, and packed vs unpacked on the HH-RLHF pairs (0.5B-4L, the
#    pool of step 2): ~16 min (8 for the first three, ~8 for the layout section); 33 min on 2026-12-01.
run 3_train "$PYTHON" bench/bench_train.py "${TRAIN[@]}"

# 4. The full 24 layers at 1024, checkpointing off and on, RM and DPO, each configuration alone in
#    memory: ~12 min. Shortened to 2 rounds (3 before: 16 min): its steps take 40-66 s, and the
#    two configurations run one after the other, so more rounds buy little against the load.
run 4_train_24_layers "$PYTHON" bench/bench_train.py "${DEEP[@]}"

# 5. KV-cache decoding against transformers' generate, 0.5B-4L: ~3 min.
run 5_generate "$REFPYTHON" bench/bench_generate.py "${GENERATE[@]}"

# 6. The torch profiler's operator tables: the 24-layer reward model step (~2 min), and the DPO
#    step at 0.5B-4L on a median HH-RLHF batch of 2 pairs, packed and unpacked (~1 min each):
#    where the packed DPO step's time goes (the vocabulary projection of the answer tokens, the
#    same in both layouts).
run 6_profile_rm_24_layers "$PYTHON" bench/profile_step.py "${PROFILE_RM[@]}"
run 6_profile_dpo_hh_packed "$PYTHON" bench/profile_step.py "${PROFILE_DPO[@]}" --layout packed
run 6_profile_dpo_hh_unpacked "$PYTHON" bench/profile_step.py "${PROFILE_DPO[@]}" --layout unpacked

# 7. Evaluation at training speed, on the real SmolLM2-135M-Instruct (its folder must exist):
#    evaluate.py rm's scoring vs train_rm.py's step, decoding vs generate at batch 8/16/32, one
#    thread: ~25 min on 2026-12-06's loaded machine.
run 7_eval "$REFPYTHON" bench/bench_eval.py "${EVAL[@]}"

echo "logs in $LOGS" | tee -a "$LOGS/run_all.log"

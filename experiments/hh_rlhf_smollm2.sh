#!/usr/bin/env bash
# Reward model + DPO of a real pretrained model (SmolLM2-135M-Instruct) on real human
# preferences (Anthropic HH-RLHF, harmless-base test file: 2,312 pairs), end to end:
#
#   split by prompt -> reward model -> its held-out accuracy -> DPO -> base vs DPO answers on
#   held-out prompts, judged by that reward model -> DPO's implicit reward on held-out pairs
#
#   bash experiments/hh_rlhf_smollm2.sh                      # the CPU-sized run (~1 h on 2 cores)
#   MODEL=/path/to/smollm2 bash experiments/hh_rlhf_smollm2.sh   # reuse a converted model
#
# Full scale on a GPU: change the variables below, e.g.
#   TRAIN_PAIRS=all NUM_PROMPTS=300 MAX_LENGTH=1024 MAX_PROMPT_LENGTH=512 \
#   BATCH=8 ACCUM=4 EPOCHS=2 DTYPE=bf16 LAUNCH="torchrun --nproc_per_node 8" \
#   bash experiments/hh_rlhf_smollm2.sh
# (or point DATA at a bigger preference file, e.g. the 42k-pair hh-rlhf harmless-base train split).
#
# Everything is written under $RUN (git-ignored runs/); the small summaries and figures are
# copied to experiments/results/$(basename $RUN)/. Each stage's wall time goes to $RUN/timings.tsv.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # minialign from this checkout, installed or not

# ----------------------------------------------------------------------- what to run
SHARED=${MINIALIGN_SHARED:-../shared}
MODEL=${MODEL:-runs/smollm2}                     # converted here if missing
DATA=${DATA:-$SHARED/data/hh-rlhf/harmless-base-test.jsonl.gz}
RUN=${RUN:-runs/hh_smollm2}
RESULTS=${RESULTS:-experiments/results/$(basename "$RUN")}
SEED=${SEED:-0}

# ----------------------------------------------------------------------- sizes (CPU run)
HELDOUT_PROMPTS=${HELDOUT_PROMPTS:-300}          # held-out prompts: final evaluation only
DEV_PROMPTS=${DEV_PROMPTS:-40}                   # training-side prompts for in-training curves
TRAIN_PAIRS=${TRAIN_PAIRS:-400}                  # "all" for every remaining pair (1,955)
MAX_LENGTH=${MAX_LENGTH:-192}                    # prompt + answer tokens (also when scoring)
MAX_PROMPT_LENGTH=${MAX_PROMPT_LENGTH:-96}              # longer prompts keep their last turns
BATCH=${BATCH:-4}                                # pairs per rank per micro-step
ACCUM=${ACCUM:-2}                                # global batch = BATCH x ACCUM x ranks
EPOCHS=${EPOCHS:-1}
EVAL_EVERY=${EVAL_EVERY:-25}
DTYPE=${DTYPE:-fp32}
LAUNCH=${LAUNCH:-python}                         # or "torchrun --nproc_per_node 8"

RM_LR=${RM_LR:-2e-5}
DPO_LR=${DPO_LR:-5e-6}
BETA=${BETA:-0.1}

NUM_PROMPTS=${NUM_PROMPTS:-100}                  # held-out prompts answered by base and policy
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-96}
TEMPERATURE=${TEMPERATURE:-0.7}
TOP_P=${TOP_P:-0.9}
EVAL_BATCH=${EVAL_BATCH:-16}                     # sequences per forward pass in evaluate.py
IMPLICIT_PAIRS=${IMPLICIT_PAIRS:-100}            # held-out pairs for DPO's implicit reward

# ----------------------------------------------------------------------- helpers
mkdir -p "$RUN/logs"
TIMINGS="$RUN/timings.tsv"
[ -f "$TIMINGS" ] || printf 'stage\tseconds\tload_avg_at_end\n' > "$TIMINGS"
stage() {  # stage NAME CMD...: run, log to $RUN/logs/NAME.log, record the wall time
    local name=$1; shift
    echo "=== $name: $*" | tee "$RUN/logs/$name.log"
    local t0=$SECONDS
    "$@" 2>&1 | tee -a "$RUN/logs/$name.log"
    local dt=$((SECONDS - t0))
    printf '%s\t%d\t%s\n' "$name" "$dt" "$(cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo -)" >> "$TIMINGS"
    echo "=== $name done in ${dt}s"
}
train_flags=(--max_length "$MAX_LENGTH" --max_prompt_length "$MAX_PROMPT_LENGTH" --batch_size "$BATCH"
             --grad_accum "$ACCUM" --epochs "$EPOCHS" --eval_every "$EVAL_EVERY" --group_by_length
             --dtype "$DTYPE" --seed "$SEED" --log_every 5)
eval_flags=(--batch_size "$EVAL_BATCH" --seed "$SEED" --dtype "$DTYPE" --max_length "$MAX_LENGTH")
subset=(); [ "$TRAIN_PAIRS" = all ] || subset=(--train_pairs "$TRAIN_PAIRS")

# ----------------------------------------------------------------------- 0. the model
if [ ! -f "$MODEL/config.json" ]; then
    python -c "import gguf" 2>/dev/null || pip install gguf
    stage get_model python "$SHARED/tools/get_smollm2.py" "$MODEL"
fi

# ----------------------------------------------------------------------- 1. split by prompt, once
stage split python experiments/split_prompts.py "$DATA" "$RUN/data" --eval_prompts "$HELDOUT_PROMPTS" \
    --dev_prompts "$DEV_PROMPTS" --seed "$SEED" "${subset[@]}"
head -n "$IMPLICIT_PAIRS" "$RUN/data/heldout.jsonl" > "$RUN/data/heldout_implicit.jsonl"

# ----------------------------------------------------------------------- 2. reward model
stage train_rm $LAUNCH train_rm.py --model "$MODEL" --data "$RUN/data/train.jsonl" \
    --eval_data "$RUN/data/dev.jsonl" --output "$RUN/rm" --lr "$RM_LR" "${train_flags[@]}"
stage eval_rm python evaluate.py rm --reward_model "$RUN/rm/model" --data "$RUN/data/heldout.jsonl" \
    --output "$RUN/eval/rm" "${eval_flags[@]}"

# ----------------------------------------------------------------------- 3. DPO
stage train_dpo $LAUNCH train_dpo.py --model "$MODEL" --data "$RUN/data/train.jsonl" \
    --eval_data "$RUN/data/dev.jsonl" --output "$RUN/dpo" --lr "$DPO_LR" --beta "$BETA" \
    --precompute_ref "${train_flags[@]}"

# ----------------------------------------------------------------------- 4. base vs DPO, judged by the RM
stage eval_dpo python evaluate.py dpo --base "$MODEL" --policy "$RUN/dpo/model" --reward_model "$RUN/rm/model" \
    --data "$RUN/data/heldout.jsonl" --num_prompts "$NUM_PROMPTS" --max_new_tokens "$MAX_NEW_TOKENS" \
    --temperature "$TEMPERATURE" --top_p "$TOP_P" --output "$RUN/eval/dpo" "${eval_flags[@]}"
stage eval_implicit python evaluate.py implicit --policy "$RUN/dpo/model" --ref_model "$MODEL" --beta "$BETA" \
    --max_prompt_length "$MAX_PROMPT_LENGTH" \
    --data "$RUN/data/heldout_implicit.jsonl" --output "$RUN/eval/implicit" "${eval_flags[@]}"

# ----------------------------------------------------------------------- 5. keep the small results
mkdir -p "$RESULTS"
cp "$RUN/data/split.json" "$RESULTS/split.json"
cp "$RUN/eval/rm/summary.json" "$RESULTS/rm_summary.json"
cp "$RUN/eval/rm/rm_eval.png" "$RESULTS/rm_eval.png"
cp "$RUN/eval/dpo/summary.json" "$RESULTS/dpo_summary.json"
cp "$RUN/eval/dpo/dpo_eval.png" "$RESULTS/dpo_eval.png"
cp "$RUN/eval/dpo/report.md" "$RESULTS/dpo_report.md"
cp "$RUN/eval/implicit/summary.json" "$RESULTS/implicit_summary.json"
cp "$RUN/rm/curves.png" "$RESULTS/rm_curves.png"
cp "$RUN/dpo/curves.png" "$RESULTS/dpo_curves.png"
cp "$RUN/rm/metrics.jsonl" "$RESULTS/rm_metrics.jsonl"
cp "$RUN/dpo/metrics.jsonl" "$RESULTS/dpo_metrics.jsonl"
cp "$TIMINGS" "$RESULTS/timings.tsv"
echo "done: results in $RESULTS; everything else in $RUN"

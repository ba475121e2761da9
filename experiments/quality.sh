#!/usr/bin/env bash
# End-to-end quality on real material, cheap enough to rerun every round (issue 25): does what a
# user gets at the end (the saved model/) keep what training learned, and is it as good as TRL's?
#
#   1. split ../shared's HH-RLHF harmless-base pairs by prompt, seeded (the round-1 split of
#      experiments/hh_rlhf_smollm2.sh: 300 held-out prompts, 40 dev, 400 training pairs)
#   2. the SmolLM2-135M-Instruct reward model at the round-1 protocol (lr 2e-5, one epoch, batch
#      4 x 2, 192 tokens, prompts cut to their last 96), saved with the default --save_dtype auto
#   3. its held-out accuracy with a 95 % bootstrap interval (evaluate.py rm); then the same trained
#      weights rounded to bf16 (what round 2's default save wrote), evaluated on the same pairs,
#      with what that rounding keeps of the update (save_precision.update_kept)
#   4. TRL's RewardTrainer on the same split, tokens and settings (experiments/trl_reward_model.py,
#      run in the reference venv $REFPY), scored on the same held-out pairs
#   5. a short DPO run (DPO_STEPS steps of 8 pairs, lr DPO_LR, beta 0.1): implicit-reward accuracy on held-out
#      pairs, and the policy's KL from the base on its own sampled answers (evaluate.py dpo)
#
#   bash experiments/quality.sh          # RUN=... to place the work elsewhere
#
# Cost: ~40 min on 2 quiet cores, an estimate from round 1's quiet timings (reward model 711 s, a
# 300-pair evaluation 213 s; TRL's two-row trainer somewhat slower than minialign's); on 2026-12-06,
# shared with four other jobs (load 5-10), the stages took 44 + 15 + 15 min (RM, two evaluations
# side by side), 28 min (DPO), 10 min (implicit and KL side by side), and TRL did not finish.
#
# A stage whose output exists is skipped, so a stopped run continues. Results (small JSON) are
# collected into experiments/results/quality/summary.json by experiments/quality_summary.py.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

SHARED=${MINIALIGN_SHARED:-../shared}
MODEL=${MODEL:-/work/smollm2/SmolLM2-135M-Instruct}
DATA=${DATA:-$SHARED/data/hh-rlhf/harmless-base-test.jsonl.gz}
RUN=${RUN:-runs/quality}
RESULTS=${RESULTS:-experiments/results/quality}
REFPY=${REFPY:-/work/refenv/bin/python}
SEED=${SEED:-0}
DPO_STEPS=${DPO_STEPS:-10}
DPO_LR=${DPO_LR:-5e-5}                           # the sweep's 3e-5 moved the policy little in 38 steps
KL_PROMPTS=${KL_PROMPTS:-8}
TRL=${TRL:-1}                                    # 0: skip the TRL stage (e.g. when it runs elsewhere)

flags=(--max_length 192 --max_prompt_length 96 --batch_size 4 --grad_accum 2 --group_by_length --dtype fp32
       --seed "$SEED" --log_every 5)
eval_flags=(--batch_size 16 --seed "$SEED" --dtype fp32 --max_length 192)
mkdir -p "$RUN" "$RESULTS"
TIMINGS="$RUN/timings.tsv"
[ -f "$TIMINGS" ] || printf 'stage\tseconds\tload_avg_at_end\n' > "$TIMINGS"
stage() {  # stage NAME OUTPUT CMD...: run CMD unless OUTPUT exists; log and time it
    local name=$1 output=$2; shift 2
    if [ -e "$output" ]; then echo "=== $name: $output exists, skipped"; return; fi
    echo "=== $name: $*"
    local t0=$SECONDS
    "$@" > "$RUN/$name.log" 2>&1 || { tail -20 "$RUN/$name.log"; exit 1; }
    printf '%s\t%d\t%s\n' "$name" $((SECONDS - t0)) "$(cut -d' ' -f1 /proc/loadavg)" >> "$TIMINGS"
    tail -2 "$RUN/$name.log"
}

stage split "$RUN/data/split.json" python experiments/split_prompts.py "$DATA" "$RUN/data" --eval_prompts 300 \
    --dev_prompts 40 --seed "$SEED" --train_pairs 400
head -n 100 "$RUN/data/heldout.jsonl" > "$RUN/data/heldout100.jsonl"

stage train_rm "$RUN/rm/model" python train_rm.py --model "$MODEL" --data "$RUN/data/train.jsonl" \
    --eval_data "$RUN/data/dev.jsonl" --output "$RUN/rm" --lr 2e-5 --epochs 1 --eval_every 25 "${flags[@]}"
stage eval_rm "$RUN/eval/rm/summary.json" python evaluate.py rm --reward_model "$RUN/rm/model" \
    --data "$RUN/data/heldout.jsonl" --output "$RUN/eval/rm" "${eval_flags[@]}"

# The same weights as round 2's default save wrote them: rounded to bf16.
stage round_bf16 "$RUN/rm_bf16/update_kept.json" python -c "
import json, sys, minialign
from minialign.save_precision import update_kept
src, out, start = sys.argv[1:4]
model = minialign.load_model(src)
minialign.save_model(model, out, tokenizer=src, dtype='bf16')
m = update_kept(model.state_dict(), start, 'bf16')
json.dump(m, open(out + '/update_kept.json', 'w'), indent=2); print(m)
" "$RUN/rm/model" "$RUN/rm_bf16" "$MODEL"
stage eval_rm_bf16 "$RUN/eval/rm_bf16/summary.json" python evaluate.py rm --reward_model "$RUN/rm_bf16" \
    --data "$RUN/data/heldout.jsonl" --output "$RUN/eval/rm_bf16" "${eval_flags[@]}"

[ "$TRL" = 0 ] || stage trl_rm "$RUN/trl/summary.json" "$REFPY" experiments/trl_reward_model.py --model "$MODEL" \
    --split "$RUN/data" --output "$RUN/trl" --seed "$SEED"

stage train_dpo "$RUN/dpo/model" python train_dpo.py --model "$MODEL" --data "$RUN/data/train.jsonl" \
    --eval_data "$RUN/data/dev.jsonl" --output "$RUN/dpo" --lr "$DPO_LR" --beta 0.1 --max_steps "$DPO_STEPS" \
    --eval_every 0 "${flags[@]}"
stage eval_implicit "$RUN/eval/implicit/summary.json" python evaluate.py implicit --policy "$RUN/dpo/model" \
    --ref_model "$MODEL" --beta 0.1 --max_prompt_length 96 --data "$RUN/data/heldout100.jsonl" \
    --output "$RUN/eval/implicit" "${eval_flags[@]}"
stage eval_dpo "$RUN/eval/dpo/summary.json" python evaluate.py dpo --base "$MODEL" --policy "$RUN/dpo/model" \
    --reward_model "$RUN/rm/model" --data "$RUN/data/heldout.jsonl" --num_prompts "$KL_PROMPTS" \
    --max_new_tokens 48 --max_prompt_length 96 --output "$RUN/eval/dpo" "${eval_flags[@]}"

python experiments/quality_summary.py "$RUN" "$RESULTS/summary.json"
cp "$TIMINGS" "$RESULTS/timings.tsv"
cp "$RUN/data/split.json" "$RESULTS/split.json"
cp "$RUN/eval/rm/summary.json" "$RESULTS/rm_fp32_summary.json"
cp "$RUN/eval/rm_bf16/summary.json" "$RESULTS/rm_bf16_summary.json"
cp "$RUN/rm_bf16/update_kept.json" "$RESULTS/rm_bf16_update_kept.json"
for f in trl/summary.json:trl_summary.json eval/implicit/summary.json:dpo_implicit_summary.json \
         eval/dpo/summary.json:dpo_kl_summary.json; do
    [ -f "$RUN/${f%%:*}" ] && cp "$RUN/${f%%:*}" "$RESULTS/${f##*:}"
done
grep -h "saved" "$RUN/train_rm.log" "$RUN/train_dpo.log" > "$RESULTS/save_lines.txt" || true

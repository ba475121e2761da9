#!/usr/bin/env bash
# Does DPO in minialign measurably improve a real model, once length is accounted for? A sweep of
# DPO runs of SmolLM2-135M-Instruct on the real HH-RLHF harmless pairs, each judged against the base
# by one reward model on the same held-out prompts (issue 20):
#
#   split by prompt, once -> reward model (the judge), once -> its held-out accuracy and length bias
#   -> for each (lr, beta): DPO, one epoch -> implicit-reward accuracy on held-out pairs
#      -> base vs policy answers on held-out prompts, K answers each: win rate (strict and ties as
#         1/2), length-controlled win rate, reward gain, KL from the base, length, stop rate
#   -> one table (sweep.md, sweep.json), the reward-vs-KL frontier and the win-rate figure
#
#   bash experiments/hh_dpo_sweep.sh                 # the run in experiments/README.md: ~1 h 55 min on 2 quiet cores
#   SIZE=pilot bash experiments/hh_dpo_sweep.sh      # every stage at tiny sizes, ~10-15 min quiet
#   MODEL=/work/smollm2 bash experiments/hh_dpo_sweep.sh   # reuse a converted model
#
# Everything is written under $RUN (runs/ is git-ignored); the small results (JSON, markdown, PNG; no
# weights) are copied to $RESULTS. Each stage's wall time, CPU time (user + system, all threads) and
# the load average at its end go to $RUN/timings.tsv. A stage whose output exists is not rerun, so a
# killed sweep continues where it stopped when started again (delete $RUN to start over).
#
# Run it on a quiet machine. Shared with other jobs, set OMP_NUM_THREADS=1: two-thread processes
# on two busy cores spin-wait for each other (the reward model trained at 8 tokens/s that way,
# against 162 tokens/s alone).
#
# ---------------------------------------------------------------------------------------- sizing
# Measured in the run whose numbers experiments/README.md reports (2026-12-01, the 2-core CPU, quiet, fp32, 2
# threads; max_length 192, max_prompt_length 96, batch 4 x 2, length-grouped, prefix sharing on;
# every stage's wall and CPU seconds in $RESULTS/timings.tsv):
#   reward model, 311 pairs, 1 epoch (38 steps)         798 s  (2.6 s / pair with loading and dev evaluations)
#   its held-out evaluation, 150 pairs                  253 s
#   reference log-probs, 311 + 24 pairs, once           ~370 s (1.1 s / pair; cached for every later run;
#                                                       in a first attempt, stopped once it was cached)
#   DPO, 311 pairs, 1 epoch (38 steps, ~21 s each)      800-910 s per run with loading and dev evaluations
#   evaluate.py dpo, 40 prompts x 3 answers, <= 64 new tokens, the base's answers generated and scored too:
#                                                       1047 s (generation ~2.2 s / answer at batch 16; each
#                                                       teacher-forced forward or score ~1 s / answer)
#   evaluate.py implicit, 39 held-out pairs             149 s
# The plan this script was first written to (480 training pairs, 4 runs, 100 prompts x 4 answers of
# <= 96 tokens) assumed per-unit costs half of these (the 2.5 h it promised would have been ~5 h), so
# the defaults below are the sizes that ran: three runs, 311 pairs, 40 held-out prompts x 3 answers,
# ~1 h 55 min. Every size is an environment variable: a bigger machine or a
# longer budget raises them (and RUNS adds runs).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # minialign from this checkout, installed or not

# ------------------------------------------------------------------------------- what to run
SHARED=${MINIALIGN_SHARED:-../shared}
MODEL=${MODEL:-runs/smollm2}                     # converted here if missing
DATA=${DATA:-$SHARED/data/hh-rlhf/harmless-base-test.jsonl.gz}
SIZE=${SIZE:-full}                               # full | pilot
SEED=${SEED:-0}

# --------------------------------------------------------------------------------------- sizes
if [ "$SIZE" = pilot ]; then
    RUN=${RUN:-runs/hh_dpo_sweep_pilot}
    RESULTS=${RESULTS:-$RUN/results}             # a pilot's results stay out of the repository
    HELDOUT_PROMPTS=${HELDOUT_PROMPTS:-24}; DEV_PROMPTS=${DEV_PROMPTS:-8}; TRAIN_PAIRS=${TRAIN_PAIRS:-24}
    NUM_PROMPTS=${NUM_PROMPTS:-6}; SAMPLES=${SAMPLES:-2}; MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-24}
    IMPLICIT_PAIRS=${IMPLICIT_PAIRS:-8}; RM_EVAL_PAIRS=${RM_EVAL_PAIRS:-12}
    SAVE_EVERY=${SAVE_EVERY:-1}; CHECKPOINT_RUNS=${CHECKPOINT_RUNS:-lr1e-4}
    N_RESAMPLES=${N_RESAMPLES:-200}
else
    RUN=${RUN:-runs/hh_dpo_sweep}
    RESULTS=${RESULTS:-experiments/results/hh_dpo_sweep}
    HELDOUT_PROMPTS=${HELDOUT_PROMPTS:-300}      # held-out prompts: evaluation only, never for choices
    DEV_PROMPTS=${DEV_PROMPTS:-24}               # training-side prompts for the in-training curves
    TRAIN_PAIRS=${TRAIN_PAIRS:-320}              # seeded subset of the ~1,955 training pairs ("all": every one)
    NUM_PROMPTS=${NUM_PROMPTS:-40}               # held-out prompts answered by base and every policy
    SAMPLES=${SAMPLES:-3}                        # answers per prompt and model
    MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-64}
    IMPLICIT_PAIRS=${IMPLICIT_PAIRS:-40}         # held-out pairs for the implicit-reward accuracy
    RM_EVAL_PAIRS=${RM_EVAL_PAIRS:-150}          # held-out pairs for the judge's accuracy and length bias
    CHECKPOINT_RUNS=${CHECKPOINT_RUNS:-}         # runs whose checkpoints are evaluated too (frontier per checkpoint,
    SAVE_EVERY=${SAVE_EVERY:-22}                 #   every SAVE_EVERY steps), ~12 min each: e.g. CHECKPOINT_RUNS=lr1e-4
    N_RESAMPLES=${N_RESAMPLES:-1000}
fi
# The runs: name:lr:beta. Two learning rates at beta 0.1, 1e-4 and 3e-5, above the previous
# experiment's 5e-6 (hh_rlhf_smollm2.sh: 50 steps that did not move the model), since one epoch of
# 311 pairs is only 38 steps; and beta 0.5 at 1e-4. With Adam, beta does not scale the first steps
# (the gradient is -beta/2 * grad z at z = 0, and Adam divides the scale out); it decides how soon a
# pair's weight sigmoid(-beta z) falls as its margin z grows: beta 0.5 stops pushing a pair ~5x
# sooner, a tighter hold on the policy.
RUNS=${RUNS:-"lr1e-4:1e-4:0.1 lr3e-5:3e-5:0.1 lr1e-4_beta0.5:1e-4:0.5"}
RM_LR=${RM_LR:-2e-5}
MAX_LENGTH=${MAX_LENGTH:-192}                    # prompt + answer tokens (training and scoring)
MAX_PROMPT_LENGTH=${MAX_PROMPT_LENGTH:-96}       # longer prompts keep their last tokens (training and generation)
BATCH=${BATCH:-4}; ACCUM=${ACCUM:-2}             # global batch 8 pairs
TEMPERATURE=${TEMPERATURE:-0.7}; TOP_P=${TOP_P:-0.9}
EVAL_BATCH=${EVAL_BATCH:-16}
DTYPE=${DTYPE:-fp32}
LAUNCH=${LAUNCH:-python}                         # or "torchrun --nproc_per_node 8"

# ----------------------------------------------------------------------------------- helpers
mkdir -p "$RUN/logs"
TIMINGS="$RUN/timings.tsv"
[ -f "$TIMINGS" ] || printf 'stage\tseconds\tcpu_seconds\tload_avg_at_end\n' > "$TIMINGS"
cpu_clock=(); [ -x /usr/bin/time ] && cpu_clock=(/usr/bin/time -f '%U %S' -o "$RUN/logs/.cpu")
stage() {  # stage NAME DONE_FILE CMD...: run unless DONE_FILE exists ("-": always run); log; record the times
    local name=$1 done_file=$2; shift 2
    if [ "$done_file" != - ] && [ -e "$done_file" ]; then echo "=== $name: done before ($done_file)"; return; fi
    echo "=== $name: $*" | tee "$RUN/logs/$name.log"
    local t0=$SECONDS cpu=-
    "${cpu_clock[@]}" "$@" 2>&1 | tee -a "$RUN/logs/$name.log"
    local dt=$((SECONDS - t0))
    [ -f "$RUN/logs/.cpu" ] && cpu=$(awk 'END { printf "%d", $1 + $2 }' "$RUN/logs/.cpu") && rm -f "$RUN/logs/.cpu"
    printf '%s\t%d\t%s\t%s\n' "$name" "$dt" "$cpu" "$(cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo -)" >> "$TIMINGS"
    echo "=== $name done in ${dt}s"
}
has_flag() { python "$1" --help 2>/dev/null | grep -q -- "$2"; }  # has_flag SCRIPT --flag
packed_dpo=(); has_flag train_dpo.py --prefix_sharing && packed_dpo=(--prefix_sharing)
packed_rm=(); has_flag train_rm.py --prefix_sharing && packed_rm=(--prefix_sharing)
echo "prefix sharing: DPO ${packed_dpo[*]:-not available}, RM ${packed_rm[*]:-not available}; sizes: $SIZE"
train_flags=(--max_length "$MAX_LENGTH" --max_prompt_length "$MAX_PROMPT_LENGTH" --batch_size "$BATCH"
             --grad_accum "$ACCUM" --epochs 1 --group_by_length --dtype "$DTYPE" --seed "$SEED" --log_every 5)
eval_flags=(--batch_size "$EVAL_BATCH" --seed "$SEED" --dtype "$DTYPE" --max_length "$MAX_LENGTH"
            --n_resamples "$N_RESAMPLES")
subset=(); [ "$TRAIN_PAIRS" = all ] || subset=(--train_pairs "$TRAIN_PAIRS")
steps=$(( (${TRAIN_PAIRS/all/1955} + BATCH * ACCUM - 1) / (BATCH * ACCUM) ))  # one epoch (approximately, for "all")
eval_every=$(( steps / 2 > 0 ? steps / 2 : 1 ))   # dev curves: the middle and the end

# --------------------------------------------------------------------------------- 0. the model
if [ ! -f "$MODEL/config.json" ]; then
    python -c "import gguf" 2>/dev/null || pip install gguf
    stage get_model "$MODEL/config.json" python "$SHARED/tools/get_smollm2.py" "$MODEL"
fi

# ------------------------------------------------------------------------ 1. split by prompt, once
stage split "$RUN/data/split.json" python experiments/split_prompts.py "$DATA" "$RUN/data" \
    --eval_prompts "$HELDOUT_PROMPTS" --dev_prompts "$DEV_PROMPTS" --seed "$SEED" "${subset[@]}"
head -n "$IMPLICIT_PAIRS" "$RUN/data/heldout.jsonl" > "$RUN/data/heldout_implicit.jsonl"

# ---------------------------------------------------------------------- 2. the judge, trained once
stage train_rm "$RUN/rm/model/config.json" $LAUNCH train_rm.py --model "$MODEL" --data "$RUN/data/train.jsonl" \
    --eval_data "$RUN/data/dev.jsonl" --output "$RUN/rm" --lr "$RM_LR" --eval_every "$eval_every" --overwrite \
    "${train_flags[@]}" "${packed_rm[@]}"
stage eval_rm "$RUN/eval_rm/summary.json" python evaluate.py rm --reward_model "$RUN/rm/model" \
    --data "$RUN/data/heldout.jsonl" --num_pairs "$RM_EVAL_PAIRS" --output "$RUN/eval_rm" "${eval_flags[@]}"

# ------------------------------------------------------------------------- 3. the DPO runs
evaluate_policy() {  # evaluate_policy NAME POLICY_DIR OUT: base vs policy on the held-out prompts
    stage "$1" "$3/summary.json" python evaluate.py dpo --base "$MODEL" --policy "$2" --reward_model "$RUN/rm/model" \
        --data "$RUN/data/heldout.jsonl" --num_prompts "$NUM_PROMPTS" --samples_per_prompt "$SAMPLES" \
        --max_new_tokens "$MAX_NEW_TOKENS" --max_prompt_length "$MAX_PROMPT_LENGTH" --temperature "$TEMPERATURE" \
        --top_p "$TOP_P" --generation_cache "$RUN/generation_cache" --output "$3" "${eval_flags[@]}"
}
names=()
for spec in $RUNS; do
    IFS=: read -r name lr beta <<< "$spec"
    names+=("$name"); train="$RUN/dpo/$name"; ev="$RUN/eval/$name"
    save=(); [[ " $CHECKPOINT_RUNS " == *" $name "* ]] && save=(--save_every "$SAVE_EVERY" --save_total_limit 0)
    stage "train_dpo_$name" "$train/model/config.json" $LAUNCH train_dpo.py --model "$MODEL" \
        --data "$RUN/data/train.jsonl" --eval_data "$RUN/data/dev.jsonl" --output "$train" --lr "$lr" --beta "$beta" \
        --precompute_ref --ref_cache_dir "$RUN/ref_cache" --eval_every "$eval_every" --overwrite \
        "${save[@]}" "${train_flags[@]}" "${packed_dpo[@]}"
    evaluate_policy "eval_dpo_$name" "$train/model" "$ev/dpo"
    stage "eval_implicit_$name" "$ev/implicit/summary.json" python evaluate.py implicit --policy "$train/model" \
        --ref_model "$MODEL" --beta "$beta" --max_prompt_length "$MAX_PROMPT_LENGTH" \
        --data "$RUN/data/heldout_implicit.jsonl" --output "$ev/implicit" "${eval_flags[@]}"
    if [ ${#save[@]} -gt 0 ]; then  # intermediate checkpoints: more points on the frontier
        for ckpt in "$train"/checkpoints/step-*; do
            [ -f "$ckpt/config.json" ] || continue
            evaluate_policy "eval_dpo_${name}_$(basename "$ckpt")" "$ckpt" "$ev/$(basename "$ckpt")"
        done
    fi
done

# --------------------------------------------------------------------- 4. table, figures, results
mkdir -p "$RESULTS"
generations=(); for name in "${names[@]}"; do generations+=("$RUN/eval/$name/dpo/generations.json"); done
stage curves - python evaluate.py curves "${names[@]/#/$RUN/dpo/}" --output "$RUN/eval_curves"
stage report - python experiments/sweep_report.py --root "$RUN" "${names[@]}" --judge "$RUN/eval_rm/summary.json" \
    --timings "$TIMINGS" --output "$RESULTS"
python experiments/answer_phrases.py "${generations[@]}" > "$RESULTS/phrases.md"
cp "$RUN/data/split.json" "$RESULTS/split.json"
cp "$RUN/eval_rm/summary.json" "$RESULTS/rm_summary.json"
cp "$RUN/eval_rm/rm_eval.png" "$RESULTS/rm_eval.png"
cp "$RUN/rm/curves.png" "$RESULTS/rm_curves.png"
cp "$RUN/eval_curves/curves.png" "$RESULTS/dpo_curves.png"
for name in "${names[@]}"; do
    cp "$RUN/eval/$name/dpo/summary.json" "$RESULTS/${name}_dpo_summary.json"
    cp "$RUN/eval/$name/dpo/report.md" "$RESULTS/${name}_dpo_report.md"
    cp "$RUN/eval/$name/dpo/dpo_eval.png" "$RESULTS/${name}_dpo_eval.png"
    cp "$RUN/eval/$name/implicit/summary.json" "$RESULTS/${name}_implicit_summary.json"
    cp "$RUN/dpo/$name/metrics.jsonl" "$RESULTS/${name}_dpo_metrics.jsonl"
    for ckpt in "$RUN/eval/$name"/step-*; do
        [ -f "$ckpt/summary.json" ] && cp "$ckpt/summary.json" "$RESULTS/${name}_$(basename "$ckpt")_dpo_summary.json"
    done
done
cp "$TIMINGS" "$RESULTS/timings.tsv"
echo "done: results in $RESULTS (sweep.md, sweep.json, frontier.png, win_rates.png); everything else in $RUN"

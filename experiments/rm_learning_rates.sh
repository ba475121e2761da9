#!/usr/bin/env bash
# Reward model on the demo world at three learning rates: overlaid training curves, and the
# held-out accuracy of each (several seeds, so that the differences can be judged against
# the seed-to-seed spread). About 2 minutes on 2 CPU cores once the demo world is built
# (building it takes ~2-9 minutes, once; it is cached under runs/demo/).
#
#   bash experiments/rm_learning_rates.sh
#   LRS="1e-6 1e-5 1e-4" SEEDS="0" bash experiments/rm_learning_rates.sh
#
# train_rm.py with no --model / --data trains on the demo world: its tiny base model
# (a 2-layer, 64-wide Qwen2 trained from scratch by minialign.demo_build) and its train split; the
# in-training evaluation and evaluate.py rm use the demo's held-out split (prompts disjoint).
set -euo pipefail
cd "$(dirname "$0")/.."

LRS=${LRS:-"1e-5 1e-4 1e-3"}
SEEDS=${SEEDS:-"0 1 2"}
EPOCHS=${EPOCHS:-1}
EVAL_EVERY=${EVAL_EVERY:-20}
RUN=${RUN:-runs/rm_lr}
RESULTS=${RESULTS:-experiments/results/rm_learning_rates}

python -c "from minialign.demo_build import demo_paths; print(demo_paths())"   # build the demo world if missing
mkdir -p "$RUN"
curve_runs=()
for lr in $LRS; do
    for seed in $SEEDS; do
        out="$RUN/lr${lr}_seed${seed}"
        python train_rm.py --output "$out" --lr "$lr" --seed "$seed" --epochs "$EPOCHS" \
            --eval_every "$EVAL_EVERY" --log_every 40 > "$out.log" 2>&1
        python evaluate.py rm --reward_model "$out/model" --output "$out/eval" --seed "$seed" >> "$out.log" 2>&1
        grep "final eval" "$out.log"
    done
    curve_runs+=("$RUN/lr${lr}_seed${SEEDS%% *}")   # curves: the first seed of each learning rate
done
python evaluate.py curves "${curve_runs[@]}" --output "$RUN/curves" \
    --metrics loss accuracy margin

# One table: per learning rate, the held-out accuracy of every seed and their mean.
mkdir -p "$RESULTS"
python - "$RUN" "$RESULTS/summary.json" $LRS -- $SEEDS <<'EOF'
import json, statistics, sys
run, out, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
lrs, seeds = rest[:rest.index("--")], rest[rest.index("--") + 1:]
table = {}
for lr in lrs:
    runs = []
    for seed in seeds:
        s = json.load(open(f"{run}/lr{lr}_seed{seed}/eval/summary.json"))
        runs.append({"seed": int(seed), "accuracy": s["accuracy"], "accuracy_ci95": s["accuracy_ci95"],
                     "mean_margin": s["mean_margin"], "n": s["n"],
                     "prefers_longer_rate": s["length_bias"]["prefers_longer_rate"]})
    accs = [r["accuracy"] for r in runs]
    table[lr] = {"runs": runs, "accuracy_mean": statistics.mean(accs),
                 "accuracy_sd_over_seeds": statistics.stdev(accs) if len(accs) > 1 else None}
    print(f"lr {lr}: held-out accuracy " + ", ".join(f"{a:.3f}" for a in accs)
          + f" (mean {table[lr]['accuracy_mean']:.3f})")
json.dump(table, open(out, "w"), indent=2)
EOF
cp "$RUN/curves/curves.png" "$RESULTS/curves.png"
echo "done: $RESULTS/summary.json, $RESULTS/curves.png"

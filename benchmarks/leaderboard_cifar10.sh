#!/usr/bin/env bash
# Leaderboard on the adversarially trained CIFAR-10 ResNet-18 of ../shared/models with the real
# CIFAR-10 subset of ../shared/data: base model vs MeanSparse at several alphas, attacked with
# APGD-CE, APGD-DLR, Square, BPDA-APGD (CE+DLR, and targeted: AutoAttack's 9 targets), the MeanSparse adaptive attack and a transfer attack.
#
# CPU budgets (cut from the published ones, stated in the table's `budgets` column): first 200 test
# images, APGD 20 iterations (published: 100), Square 300 queries (published: 5000), adaptive attack 20
# steps (published: 50). Attacks run in sequence on the still-unbroken examples (AutoAttack's convention).
# BPDA-APGD-T keeps AutoAttack's APGD-T budget (100 iterations, 9 targets: --apgd-iters does not cut it).
# Every step is resumable: rerun this script after an interruption and it continues.
#
# Reproduce (from the repository root; a few hours on 2 busy CPU cores):
#   python benchmarks/train_defenses.py        # Sparta and PSSiLU files in runs/defenses/ (optional rows)
#   bash benchmarks/leaderboard_cifar10.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
DATA=$SHARED/data/cifar10_subset.npz
WEIGHTS=$SHARED/models/resnet18_at_relu.pt
RUNS=${RUNS:-runs/leaderboard_cifar10}
N=${N:-200}
ALPHAS=${ALPHAS:-"0.1 0.2 0.3"}
ATTACK_ARGS=(--attacks apgd-ce,apgd-dlr,square,bpda,bpda-apgd-t,adaptive,transfer --eps 8/255 --n-examples "$N"
             --apgd-iters 20 --square-queries 300 --adaptive-steps 20 --attack-batch-size 100 --no-progress)
MODEL=(aa-resnet18 --weights "$WEIGHTS" --data "$DATA")

# One calibration pass (exact statistics; alpha does not affect it), reused for every alpha.
CAL=$RUNS/calibration.safetensors
[ -f "$CAL" ] || robustify calibrate "${MODEL[@]}" --out "$CAL" --batch-size 256

robustify evaluate "${MODEL[@]}" --defense none --out "$RUNS/results/base" "${ATTACK_ARGS[@]}"
for a in $ALPHAS; do
  robustify evaluate "${MODEL[@]}" --defense meansparse --defense-weights "$CAL" --alpha "$a" \
    --out "$RUNS/results/meansparse_$a" "${ATTACK_ARGS[@]}"
done
# Rows for trained defenses (Sparta, activation swaps) from benchmarks/train_defenses.py's files
# (runs/defenses/*.safetensors with their JSON sidecars; `.backbone.safetensors` files are companions):
for f in runs/defenses/*.safetensors; do
  case "$f" in *.backbone.safetensors) continue ;; esac
  [ -f "$f.json" ] || continue
  kind=$(python -c "from robustify.defenses import defense_kind; import sys; print(defense_kind(sys.argv[1]))" "$f")
  robustify evaluate "${MODEL[@]}" --defense "$kind" --defense-weights "$f" \
    --out "$RUNS/results/$(basename "$f" .safetensors)" "${ATTACK_ARGS[@]}"
done
# Keep the per-example results (not the journals) next to the tables, and build the tables from them.
for d in "$RUNS"/results/*/; do
  [ -f "$d/result.json" ] || continue
  mkdir -p "leaderboard/results/$(basename "$d")" && cp "$d/result.json" "leaderboard/results/$(basename "$d")/"
done
# The commands behind the results, kept next to them: `robustify leaderboard` ends leaderboard.md with it.
printf 'Reproduce with: `python benchmarks/train_defenses.py && bash benchmarks/leaderboard_cifar10.sh && bash benchmarks/audit_leaderboard.sh` (N=%s, ALPHAS="%s"; the MeanSparse rows reuse one calibration file made by `robustify calibrate aa-resnet18 --weights ../shared/models/resnet18_at_relu.pt --data ../shared/data/cifar10_subset.npz --out runs/leaderboard_cifar10/calibration.safetensors --batch-size 256`). The per-example results behind every row are in `leaderboard/results/*/result.json`; `robustify leaderboard leaderboard/results --out leaderboard` rebuilds these tables and plots from them.\n' "$N" "$ALPHAS" > leaderboard/results/REPRODUCE.md
robustify leaderboard leaderboard/results --out leaderboard > /dev/null

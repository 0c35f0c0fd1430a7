#!/usr/bin/env bash
# The sanity suite (robustify audit) on the committed leaderboard rows, from their per-example results in
# leaderboard/results/*/result.json (stored there as each result's "audit" entry), then the tables rebuilt.
# The MeanSparse rows need the calibration of leaderboard/study.toml (exact statistics: the same command gives the
# same file); the audit refuses a model whose clean predictions differ from the evaluated one.
# Rows of trained defenses (Sparta, PSSiLU) need benchmarks/train_defenses.py's files and are audited when present.
#
# Reproduce (from the repository root): bash benchmarks/audit_leaderboard.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
RUNS=${RUNS:-runs/leaderboard_cifar10}
ALPHAS=${ALPHAS:-"0.1 0.2 0.3"}
MODEL=(aa-resnet18 --weights "$SHARED/models/resnet18_at_relu.pt" --data "$SHARED/data/cifar10_subset.npz"
       --n-examples 200 --no-progress)
# CPU budgets, cut from AuditConfig's defaults (64 examples x 20 iterations unbounded, 32 census examples,
# 20 noise draws); the convergence rerun keeps twice the evaluation's budget (40 iterations, 2 restarts).
AUDIT_ARGS=(${AUDIT_ARGS:---audit-unbounded-examples 32 --audit-unbounded-iters 10 --audit-census-examples 16 --audit-noise-draws 10})
CAL=$RUNS/calibration.safetensors
[ -f "$CAL" ] || robustify calibrate aa-resnet18 --weights "$SHARED/models/resnet18_at_relu.pt" \
  --data "$SHARED/data/cifar10_subset.npz" --out "$CAL" --batch-size 256
robustify audit "${MODEL[@]}" "${AUDIT_ARGS[@]}" --defense none --out leaderboard/results/base
for a in $ALPHAS; do
  robustify audit "${MODEL[@]}" "${AUDIT_ARGS[@]}" --defense meansparse --defense-weights "$CAL" --alpha "$a" \
    --out "leaderboard/results/meansparse_$a"
done
for f in runs/defenses/*.safetensors; do
  case "$f" in *.backbone.safetensors) continue ;; esac
  [ -f "$f.json" ] && [ -d "leaderboard/results/$(basename "$f" .safetensors)" ] || continue
  kind=$(python -c "from robustify.defenses import defense_kind; import sys; print(defense_kind(sys.argv[1]))" "$f")
  robustify audit "${MODEL[@]}" "${AUDIT_ARGS[@]}" --defense "$kind" --defense-weights "$f" --out "leaderboard/results/$(basename "$f" .safetensors)"
done
robustify leaderboard leaderboard/results --out leaderboard > /dev/null  # ends with leaderboard/results/REPRODUCE.md

"""The audit job: the sanity suite (:mod:`robustify.evaluation.audit`) on a finished evaluation job."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from robustify.core.errors import UserError
from robustify.evaluation.audit import AuditConfig, audit_result_file
from robustify.evaluation.results import RESULT_FILE
from robustify.jobs.evaluate import EvaluationJob, build_defended_model, load_examples

__all__ = ["audit_job"]


def audit_job(job: EvaluationJob, audit: AuditConfig | None = None) -> dict[str, Any]:
    """Audit the evaluation of ``job`` whose ``result.json`` is in ``job.out``: the same model, defense and
    examples, eager and in float32."""
    path = Path(job.out) / RESULT_FILE
    if not path.is_file():
        raise UserError(f"no {RESULT_FILE} in {job.out}: run `robustify evaluate` with the same --out first")
    model, info, _ = build_defended_model(job)
    x, y = load_examples(job, info)
    return audit_result_file(job.out, model, x, y, audit, device=job.device)

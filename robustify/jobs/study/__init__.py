"""Studies: a grid of models x defenses x settings x attacks from one TOML file, run as one resumable command on
this machine or on a Slurm cluster, merged into one leaderboard (``robustify study plan|run|status|report``)."""

from robustify.jobs.study.plan import Cell, Plan, Step, plan_study
from robustify.jobs.study.run import EXECUTORS, load_plan, report_study, run_study, study_status
from robustify.jobs.study.spec import Study, StudyFileError, load_study
from robustify.jobs.study.state import CellState, StudyLockedError

__all__ = ["EXECUTORS", "Cell", "CellState", "Plan", "Step", "Study", "StudyFileError", "StudyLockedError",
           "load_plan", "load_study", "plan_study", "report_study", "run_study", "study_status"]

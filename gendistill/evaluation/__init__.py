"""Generation-first evaluation: every multiple-choice item scored by log-likelihood ranking and by generation,
long-context recall, an lm-eval bridge, and the report that puts teacher and students side by side.

    from gendistill.evaluation import evaluate, build_report
    evaluate({"student": (model, tok)}, teacher="runs/teacher", tasks="tasks/,niah_single@1k,4k", out="runs/eval")
    build_report(["runs/eval_a", "runs/eval_b"], out="runs/report")
"""
from gendistill.evaluation.engine import Generation, Sampling, generate
from gendistill.evaluation.recall import recall_task
from gendistill.evaluation.report import build_report
from gendistill.evaluation.runner import evaluate, load_model
from gendistill.evaluation.scoring import loglikelihoods, score_task
from gendistill.evaluation.tasks import Task, load_task

__all__ = ["evaluate", "build_report", "generate", "Generation", "Sampling", "loglikelihoods", "score_task",
           "load_task", "Task", "recall_task", "load_model"]

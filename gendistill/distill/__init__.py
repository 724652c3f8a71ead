"""GenDistill: declarative multi-stage distillation of a Hybrid-KDA student from its Qwen3 teacher.

    from gendistill.distill import run_recipe
    run_recipe("paper.yaml", overrides=["kd.lr=1e-5"], resume=False)

`recipe.py` (schema, validation, overrides) -> `data.py` (sources, tokenise once, pack) -> `losses.py` (what a stage
computes, from one teacher pass) -> `trainer.py` (the loop, checkpoints, `run_recipe`) with `parallel.py` (torchrun,
FSDP2/DDP) and `checkpoint.py` (atomic, resumable state). `cli.py` is `gendistill distill`.
"""
from gendistill.distill.recipe import DataSource, Recipe, Stage, load_recipe
from gendistill.distill.trainer import TrainingDiverged, run_recipe, train_stage

__all__ = ["DataSource", "Recipe", "Stage", "TrainingDiverged", "load_recipe", "run_recipe", "train_stage"]

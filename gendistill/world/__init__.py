"""The synthetic knowledge world (people, biographies, chat data, eval tasks, tokenizer); see `world.py`."""
from gendistill.world.world import (
    ATTRIBUTES,
    MC_PROMPT,
    PRESETS,
    TASK_NAMES,
    Person,
    Preset,
    World,
    build_world,
    load_world,
    render_choices,
)

__all__ = ["ATTRIBUTES", "MC_PROMPT", "PRESETS", "TASK_NAMES", "Person", "Preset", "World", "build_world",
           "load_world", "render_choices"]

"""The procedural shapes data: `scene` renders scenes with exact ground truth, `tasks` turns a scene into
task records (VQA, captions, referring segmentation, ...), `writer` writes a whole dataset to disk.

The package re-exports what its users call; constants and task helpers live in the submodules
(`unillava.data.shapes.scene`, `unillava.data.shapes.tasks`)."""

from unillava.data.shapes.scene import SceneSpec, is_fine_scene, render_scene
from unillava.data.shapes.writer import generate_dataset

__all__ = [
    "SceneSpec",
    "generate_dataset",
    "is_fine_scene",
    "render_scene",
]

"""unillava: LLaVA-1.5, ConvLLaVA and OMG-LLaVA in one codebase.

`unillava.load(path)` returns an `InferenceModel`. Importing the package also imports `unillava.omg`,
whose tower and model class register themselves under `vision.type: omg`, so a checkpoint of any of the
three designs loads from its config alone.
"""

from unillava import omg
from unillava.inference import InferenceModel, load

__version__ = "0.1.0"
__all__ = ["InferenceModel", "load", "omg", "__version__"]

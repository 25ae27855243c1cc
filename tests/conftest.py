"""Fixtures shared by test modules. Keep models tiny: the suite runs on a shared 2-core CPU.

Tiny model configs themselves live in `unillava.testing` so examples and benchmarks can use them too.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from transformers import AddedToken, AutoTokenizer

from unillava.llm import embedded_default_path
from unillava.testing import reset_accelerate_state


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded default LLM's directory (converted once and cached); its tokenizer is the test tokenizer."""
    return embedded_default_path()


@pytest.fixture(scope="session")
def make_tokenizer(smollm2_dir: Path) -> Callable[..., Any]:
    """A factory of fresh SmolLM2 tokenizers, since tests add tokens and templates to the one they get.

    `make_tokenizer("<image>")` adds that special token; `chat_template=False` drops the chat template.
    """

    def make(*special_tokens: str, chat_template: bool = True) -> Any:
        tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
        if special_tokens:
            tokenizer.add_tokens(
                [AddedToken(t, special=True, normalized=False) for t in special_tokens], special_tokens=True
            )
        if not chat_template:
            tokenizer.chat_template = None
        return tokenizer

    return make


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random unillava model saved in our own layout (for CLI and loading tests)."""
    import torch

    from unillava.modeling import LlavaModel
    from unillava.testing import tiny_model_config

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-model") / "model"
    LlavaModel.from_config(tiny_model_config()).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def chatty_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model whose greedy answers are varied words rather than blank lines (larger random LM
    weights), for tests that read or stream answers (serving, web page)."""
    import torch

    from unillava.modeling import LlavaModel
    from unillava.testing import tiny_model_config

    torch.manual_seed(0)
    model = LlavaModel.from_config(tiny_model_config())
    with torch.no_grad():
        for param in model.language_model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.5)
    path = tmp_path_factory.mktemp("chatty-model") / "model"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one torch thread; two threads contending with another process (a
    server thread, another suite) made some modules 10-40x slower. Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def load_benchmark() -> Callable[[str], ModuleType]:
    """Import a script from benchmarks/ (not a package) as a module, by file name without `.py`."""

    def load(name: str) -> ModuleType:
        path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"{name}_benchmark", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up by name
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture
def fresh_accelerate_state():
    """Each training test leaves accelerate's process-wide state clean."""
    yield
    reset_accelerate_state()

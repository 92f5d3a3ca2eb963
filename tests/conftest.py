import os

# Tests never reach a model hub: everything is built from configs or shipped by a package.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

from tests import tiny


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, str]:
    """Saved tiny models sharing one tokenizer: a large one, a noisy copy that agrees ~70%, and an unrelated one."""
    root = tmp_path_factory.mktemp("tiny")
    tokenizer = tiny.build_tokenizer()
    large = tiny.build_llama(seed=1)
    return {
        "large": tiny.save(large, tokenizer, root / "large"),
        "draft": tiny.save(tiny.noisy_copy(large, 0.02, seed=2), tokenizer, root / "draft"),
        "unrelated": tiny.save(tiny.build_llama(seed=3, hidden=32, layers=1), tokenizer, root / "unrelated"),
    }


@pytest.fixture(scope="session")
def free_costs(tmp_path_factory) -> str:
    """A cost profile under which drafting always pays, for servers on tiny models (see engine_util)."""
    from pathlib import Path

    from scheduler import profile
    from tests.engine_util import free_verification

    path = Path(tmp_path_factory.mktemp("costs")) / "free.json"
    profile.save(free_verification(), path)
    return str(path)

import os

import pytest
import torch

# Tests never touch a hub: everything is built locally or comes from the embedded default model.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
# One thread: the tiny models' ops are too small to gain from two, and two thrash when the machine is busy.
torch.set_num_threads(1)


@pytest.fixture
def tiny_model_and_tokenizer():
    from trl_entropy.testing import make_tiny_model_and_tokenizer

    return make_tiny_model_and_tokenizer(seed=0)


@pytest.fixture(scope="session")
def default_model_path():
    """Folder of the converted embedded SmolLM2 model (converted once per machine)."""
    from trl_entropy.models import default_model_path

    return str(default_model_path())


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama and its tokenizer saved in a folder, for commands that load a model by path."""
    from trl_entropy.testing import make_tiny_model_and_tokenizer

    path = tmp_path_factory.mktemp("tiny-model")
    model, tokenizer = make_tiny_model_and_tokenizer(seed=0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)

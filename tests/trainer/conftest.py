import pytest

from megatron_rl.trainer.demo import DemoSpec, prepare_demo


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """A tiny HF policy (briefly warmed up) and its prompt file, built offline; shared by the end-to-end tests."""
    root = tmp_path_factory.mktemp("demo")
    return prepare_demo(root, DemoSpec(sft_steps=20, n_train=200, n_eval=8, sft_examples=100), log=lambda *_: None)


@pytest.fixture(scope="session")
def demo_tied(tmp_path_factory):
    """The same task and warm-up with tied embeddings (the head is the embedding, as in most small models)."""
    root = tmp_path_factory.mktemp("demo_tied")
    return prepare_demo(root, DemoSpec(sft_steps=20, n_train=200, n_eval=8, sft_examples=100,
                                       tie_word_embeddings=True), log=lambda *_: None)

import pytest
import torch

from ..utils import agreeing_mtp_model, word_tokenizer


@pytest.fixture(scope="session")
def mtp_folder(tmp_path_factory):
    """A saved tiny model whose MTP module drafts what it will choose most of the time, with a word tokenizer."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("mtp-model")
    agreeing_mtp_model(1, context_weight=0.3).save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path

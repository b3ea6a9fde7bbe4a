import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

PAIRS = Path(__file__).parent.parent / "hf_fibration" / "data" / "multi30k_val_de_en.jsonl"


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Scripts run in-process may fix torch's thread count; restore it after every test, since some tests compare
    logits bit for bit with a fresh process (another count changes the order of the reductions)."""
    import torch

    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: thread synchronization costs more than the work on a shared 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def marian_dir(tmp_path_factory):
    """A tiny Marian de→en model with a real sentencepiece tokenizer, planted near-duplicate units, on disk."""
    import torch
    import transformers as T
    from tiny_models import plant_fibers

    from hf_fibration.integrations.marian_tokenizer import train_marian_tokenizer

    path = tmp_path_factory.mktemp("tiny-marian")
    rows = [json.loads(line) for line in PAIRS.read_text().splitlines()]
    tok = train_marian_tokenizer([r["de"] for r in rows] + [r["en"] for r in rows], path, vocab_size=300)
    config = T.MarianConfig(vocab_size=len(tok), d_model=32, encoder_layers=2, decoder_layers=2,
                            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                            decoder_ffn_dim=64, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                            eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id,
                            forced_eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = T.MarianMTModel(config).eval()
    plant_fibers(model, noise=1e-3)
    model.save_pretrained(path)
    return path

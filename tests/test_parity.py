import numpy as np
import pytest

from edgeport.families.causal_lm import CausalLM
from edgeport.parity import BOUNDS, Parity, cosine, kl_divergence, perplexity


class FixedRunner:
    engine = "fixed"

    def __init__(self, noise: float):
        self.noise = noise

    def logits(self, ids):
        rng = np.random.default_rng(len(ids))
        clean = np.sin(np.outer(np.arange(1, len(ids) + 1), np.arange(50)) / 7.0) * 5
        return clean + self.noise * rng.standard_normal(clean.shape)


class FakeReference:
    engine = "reference"

    def __init__(self):
        runner = FixedRunner(0.0)
        self.inputs = [list(range(12)), list(range(20))]
        self.text = [i % 50 for i in range(30)]
        self.logits = [runner.logits(ids) for ids in self.inputs]
        self.text_logits = runner.logits(self.text)


def test_identical_logits_are_perfect():
    result = CausalLM().measure(FakeReference(), FixedRunner(0.0), "fp16")
    assert result.status == "passed" and not result.failures
    assert result.metrics["top1_agreement"] == 1.0 and result.metrics["kl_mean"] == 0.0
    assert result.metrics["cosine_mean"] == pytest.approx(1.0) and result.metrics["ppl_delta"] == 0.0


def test_a_damaged_artifact_fails_with_the_reasons():
    result = CausalLM().measure(FakeReference(), FixedRunner(8.0), "q8")
    assert result.status == "failed"
    assert any(f.startswith("top1_agreement") for f in result.failures)
    assert any(f.startswith("kl_mean") for f in result.failures)


def test_what_could_not_run_is_recorded_not_passed_over():
    result = CausalLM().measure(FakeReference(), FixedRunner(0.0), "q4", not_checked="MLX quantized kernels")
    assert result.to_dict()["not_checked"] == ["MLX quantized kernels"]


def test_metrics_by_hand():
    p = np.log(np.array([[0.5, 0.5]]))
    q = np.log(np.array([[0.9, 0.1]]))
    assert kl_divergence(p, q)[0] == pytest.approx(0.5 * np.log(0.5 / 0.9) + 0.5 * np.log(0.5 / 0.1))
    assert cosine(np.array([[1.0, 0.0]]), np.array([[0.0, 2.0]]))[0] == pytest.approx(0.0)
    uniform = np.zeros((4, 8))
    assert perplexity(uniform, [1, 2, 3, 4]) == pytest.approx(8.0)


def test_every_quantization_has_bounds_and_they_loosen_with_fewer_bits():
    from edgeport.quantization import QUANTIZATIONS

    assert {q.bounds_key for q in QUANTIZATIONS.values()} <= set(BOUNDS)  # llama.cpp's types as their peers
    order = ["fp16", "q8", "q6", "q5", "q4", "q3", "q2"]
    tops = [BOUNDS[q].top1_agreement for q in order]
    assert tops == sorted(tops, reverse=True)
    assert Parity("passed", "m", {}).to_dict()["not_checked"] == []

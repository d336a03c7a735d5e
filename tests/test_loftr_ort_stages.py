"""The default inference copy's onnxruntime stages (matchers.loftr.ort_stages) against the torch modules they stand in
for: the same matches on every path (one cold pair, cached images, padded batches), the torch fallback wherever a
graph does not apply (masks, autocast, no onnxruntime), and models that survive copying and pickling."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from matchers.loftr import LoFTR, LoFTRConfig, ort_stages
from matchers.loftr.optimize import FusedLocalFeatureTransformer, InferenceOptions, optimize_for_inference
from matchers.loftr.ort_stages import OrtCoarsePass, OrtFineMap, OrtGraph, OrtTransformer
from tests.test_loftr_equivalence import as_tensor, perturb, textured_image, warped
from tests.test_loftr_optimize import assert_same_matches

pytestmark = pytest.mark.skipif(not ort_stages.available(), reason="onnxruntime is not installed")


@pytest.fixture(scope="module")
def model() -> LoFTR:
    torch.manual_seed(5)
    net = LoFTR(LoFTRConfig.preset("outdoor_ds").replace(matching={"thr": 0.0}))
    net.load_state_dict(perturb(net.state_dict(), seed=2))
    return net.eval()


@pytest.fixture(scope="module")
def pair() -> tuple[torch.Tensor, torch.Tensor]:
    image0 = textured_image(120, 160, seed=4)
    return as_tensor(image0), as_tensor(warped(image0, (160, 120)))


@pytest.fixture(scope="module")
def stages(model: LoFTR) -> LoFTR:
    return optimize_for_inference(model)


@pytest.fixture()
def graph_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The kinds of the onnxruntime graphs run, in order."""
    calls: list[str] = []
    original = OrtGraph.__call__

    def spy(self: OrtGraph, *inputs: torch.Tensor) -> list[torch.Tensor]:
        calls.append(self.kind)
        return original(self, *inputs)

    monkeypatch.setattr(OrtGraph, "__call__", spy)
    return calls


def test_default_copy_hands_both_stages_to_onnxruntime(model: LoFTR, stages: LoFTR) -> None:
    assert isinstance(stages.backbone.forward_coarse, OrtCoarsePass)
    assert isinstance(stages.backbone.fine_full, OrtFineMap)
    assert isinstance(stages.loftr_coarse, OrtTransformer)
    assert isinstance(stages.loftr_coarse.fallback, FusedLocalFeatureTransformer)
    assert stages.batch_pair_pixels > 0 and model.batch_pair_pixels == 0
    plain = optimize_for_inference(model, InferenceOptions(onnxruntime=False))
    assert "forward_coarse" not in vars(plain.backbone) and plain.batch_pair_pixels == 0
    assert isinstance(plain.loftr_coarse, FusedLocalFeatureTransformer)
    assert "forward_coarse" not in vars(model.backbone)  # the given model is untouched


def test_each_graph_equals_its_torch_module(model: LoFTR, stages: LoFTR, pair: tuple[torch.Tensor, ...]) -> None:
    image = torch.cat([pair[0], pair[1]])  # a batch of two: the batch axis is dynamic too
    with torch.inference_mode():
        coarse, inputs = model.backbone.forward_coarse(image)
        got_coarse, got_inputs = stages.backbone.forward_coarse(image)
        assert got_inputs is not None and inputs is not None
        for ours, reference in ((got_coarse, coarse), (got_inputs.x1, inputs.x1), (got_inputs.lat2, inputs.lat2)):
            assert ours.shape == reference.shape
            assert torch.allclose(ours, reference, atol=1e-4, rtol=1e-4)
        assert torch.allclose(stages.backbone.fine_full(inputs), model.backbone.fine_full(inputs), atol=1e-4, rtol=1e-4)
        torch.manual_seed(0)
        feat0, feat1 = torch.randn(1, 30, 256), torch.randn(1, 22, 256)  # unequal token counts
        for ours, reference in zip(stages.loftr_coarse(feat0, feat1), model.loftr_coarse(feat0, feat1)):
            assert torch.allclose(ours, reference, atol=1e-4)
        resumed = stages.loftr_coarse(
            stages.loftr_coarse.first_self_layer(feat0), stages.loftr_coarse.first_self_layer(feat1), start=1
        )
        for ours, reference in zip(resumed, model.loftr_coarse(feat0, feat1)):
            assert torch.allclose(ours, reference, atol=1e-4)


def test_every_path_gives_the_plain_models_matches(
    model: LoFTR, stages: LoFTR, pair: tuple[torch.Tensor, ...], graph_calls: list[str]
) -> None:
    with torch.inference_mode():
        reference = model.match_encoded(model.encode(pair[0]), model.encode(pair[1]))
        assert_same_matches(reference, stages.match(*pair))  # one cold pair: lazy fine windows
        # an equal-size pair: both images in one backbone call and one first-layer call
        assert graph_calls[:3] == ["backbone", "transformer.first", "transformer.rest"]
        assert set(graph_calls[3:]) <= {"backbone.fine"}  # the whole fine map when many windows cost more
        graph_calls.clear()
        other = torch.nn.functional.interpolate(pair[1], size=(96, 128), mode="bilinear")
        assert_same_matches(model.match(pair[0], other), stages.match(pair[0], other), minimum=5)
        assert graph_calls[:5] == ["backbone", "backbone", "transformer.first", "transformer.first", "transformer.rest"]
        graph_calls.clear()
        cached = [stages.pre_attend(stages.encode(image)) for image in pair]  # match_dense's per-image cache
        assert graph_calls == ["backbone", "backbone.fine", "transformer.first"] * 2
        graph_calls.clear()
        assert_same_matches(reference, stages.match_encoded(*cached))
        assert graph_calls == ["transformer.rest"]  # layer 0 is not run again for the pair


def test_masked_batches_and_autocast_run_the_torch_fallback(
    model: LoFTR, stages: LoFTR, pair: tuple[torch.Tensor, ...], graph_calls: list[str]
) -> None:
    image = textured_image(96, 128, seed=6)
    small = (as_tensor(image), as_tensor(warped(image, (128, 96))))
    with torch.inference_mode():
        expected = [model.match(*pair), model.match(*small)]
        got = stages.match_batch([pair, small])  # different sizes: padded, masked tokens
    assert "transformer.rest" not in graph_calls and "backbone" in graph_calls  # per-image encoding still runs it
    for reference, ours in zip(expected, got):
        assert_same_matches(reference, ours, minimum=10)
    graph_calls.clear()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        stages.match(*pair)
    assert graph_calls == []


def test_without_onnxruntime_the_copy_stays_torch(model: LoFTR, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ort_stages, "available", lambda: False)
    plain = optimize_for_inference(model)
    assert "forward_coarse" not in vars(plain.backbone)
    assert isinstance(plain.loftr_coarse, FusedLocalFeatureTransformer)


def test_copies_and_pickles_rebuild_their_sessions(stages: LoFTR, pair: tuple[torch.Tensor, ...]) -> None:
    with torch.inference_mode():
        reference = stages.match(*pair)
    assert stages.backbone.forward_coarse.graph._session is not None
    for clone in (copy.deepcopy(stages), pickle.loads(pickle.dumps(stages))):
        graph = clone.backbone.forward_coarse.graph
        assert graph._session is None  # sessions never travel
        assert graph.module.backbone is clone.backbone  # the clone's own modules, not the original's
        with torch.inference_mode():
            assert_same_matches(reference, clone.match(*pair))
        assert graph._session is not None


def test_coarse_only_models_stay_in_torch() -> None:
    """The student's pair is too small for onnxruntime's per-call overhead to pay (see ort_stages.to_onnxruntime)."""
    student = LoFTR(LoFTRConfig.preset("student")).eval()
    copy_ = optimize_for_inference(student)
    assert "forward_coarse" not in vars(copy_.backbone) and copy_.batch_pair_pixels == 0
    assert not isinstance(copy_.loftr_coarse, OrtTransformer)


def test_large_images_run_in_torch(
    model: LoFTR, stages: LoFTR, pair: tuple[torch.Tensor, ...], graph_calls: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above LARGE_PIXELS every stage runs its torch module (same matches), and the pair is not batched."""
    monkeypatch.setattr(ort_stages, "LARGE_PIXELS", 100 * 100)  # the 160x120 test pair counts as large
    large = copy.deepcopy(stages)
    large.batch_pair_pixels = ort_stages.LARGE_PIXELS
    small = torch.nn.functional.interpolate(pair[0], size=(80, 96), mode="bilinear")
    with torch.inference_mode():
        reference = model.match_encoded(model.encode(pair[0]), model.encode(pair[1]))
        assert_same_matches(reference, large.match(*pair))
        assert graph_calls == []
        large.match(small, small)  # 96x80 is still small
    assert graph_calls[:3] == ["backbone", "transformer.first", "transformer.rest"]

"""The Predictor on prsmed-tiny: inputs of every kind, the encoder cache, batching, adapter swaps, threads, CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image

from prsmed.infer import AdapterNotFound, BundleError, InvalidInput, PredictRequest, Predictor
from prsmed.model.bundle import MANIFEST
from samples import perturbed_bundle, png, scan

ZONES = {"top left", "top right", "bottom left", "bottom right", "center", "none"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    perturbed_bundle(root / "alpha", 1)
    perturbed_bundle(root / "beta", 2)
    return root


@pytest.fixture(scope="module")
def predictor(store):
    return Predictor("prsmed-tiny", adapter_dir=store, max_resident_adapters=2, cache_size=8)


def test_result_fields(predictor):
    image = scan(0)
    r = predictor.predict(image, "Where is the lesion?")
    assert r.zone in ZONES and r.zone_from_text in ZONES and r.answer
    assert r.mask.shape == (100, 120) and r.mask.dtype == bool
    assert r.image_size == (120, 100)
    assert r.area_fraction == pytest.approx(r.mask.mean())
    assert (r.bbox is None) == (not r.mask.any())
    assert r.consistent == (r.zones == r.zones_from_text)
    assert 0 <= r.confidence <= 1
    assert set(r.timings_ms) >= {"decode", "encoder", "llm_and_mask", "total"}
    json.dumps(r.to_dict())


def test_every_input_kind_gives_the_same_answer(predictor, tmp_path):
    image = scan(1)
    path = tmp_path / "scan.png"
    image.save(path)
    results = [
        predictor.predict(src, "Where is the lesion?")
        for src in (image, png(image), str(path), path, np.asarray(image), np.asarray(image.convert("L")))
    ]
    for r in results[1:]:
        assert r.answer == results[0].answer
        np.testing.assert_array_equal(r.mask, results[0].mask)


def test_second_question_on_same_image_skips_encoder_with_same_result(predictor):
    image = scan(2)
    first = predictor.predict(image, "Where is the lesion?")
    second = predictor.predict(png(image), "Where is the lesion?")
    assert not first.cache_hit and second.cache_hit and second.timings_ms["encoder"] == 0.0
    uncached = Predictor(predictor.model, cache_size=0).predict(image, "Where is the lesion?")
    assert uncached.answer == second.answer
    np.testing.assert_array_equal(uncached.mask, second.mask)


def test_batch_equals_one_by_one(predictor):
    reqs = [PredictRequest(scan(s), q) for s, q in ((3, "Where is the lesion?"), (4, "Which region holds it?"),
                                                    (5, "Locate the abnormality."))]
    batched = predictor.predict_batch(reqs)
    single = [predictor.predict(r.image, r.question) for r in reqs]
    for b, s in zip(batched, single):
        assert b.answer == s.answer
        assert np.mean(b.mask != s.mask) < 0.01  # padding changes float sums in the last bits only


def test_adapters_swap_on_the_warm_model_and_base_comes_back(predictor):
    image = scan(6)
    base = predictor.predict(image, "Where is the lesion?")
    alpha = predictor.predict(image, "Where is the lesion?", adapter="alpha")
    beta = predictor.predict(image, "Where is the lesion?", adapter="beta")
    assert alpha.adapter == "alpha" and beta.adapter == "beta"
    assert not np.allclose(alpha.probability, base.probability)
    assert not np.allclose(alpha.probability, beta.probability)
    again = predictor.predict(image, "Where is the lesion?")
    np.testing.assert_array_equal(again.probability, base.probability)
    assert again.answer == base.answer
    assert set(predictor.resident_adapters()) == {"alpha", "beta"}


def test_bad_adapters_are_refused_and_leave_the_model_alone(predictor, store, tmp_path):
    image = scan(7)
    base = predictor.predict(image, "Where is the lesion?")
    with pytest.raises(AdapterNotFound, match="known adapters: alpha, beta"):
        predictor.predict(image, "Where?", adapter="gamma")
    tampered = tmp_path / "tampered"
    shutil.copytree(store / "alpha", tampered)
    with open(tampered / "fusion_head.safetensors", "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\x01" * 8)
    with pytest.raises(BundleError, match="SHA-256"):
        predictor.predict(image, "Where?", adapter=str(tampered))
    foreign = tmp_path / "foreign"
    shutil.copytree(store / "alpha", foreign)
    manifest = json.loads((foreign / MANIFEST).read_text())
    manifest["base"]["fingerprint"] = "0" * 16
    (foreign / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="trained on base model"):
        predictor.predict(image, "Where?", adapter=str(foreign))
    np.testing.assert_array_equal(predictor.predict(image, "Where is the lesion?").probability, base.probability)


@pytest.mark.parametrize(
    "image, question, words",
    [
        (b"GIF89a-but-not-really", "Where?", "corrupt"),
        (b"", "Where?", "empty"),
        (np.zeros((4, 4, 5)), "Where?", "shape"),
        ("/no/such/file.png", "Where?", "no/such/file.png"),
        (scan(0), "", "question is empty"),
        (scan(0), "a" * 2001, "at most 2000"),
    ],
)
def test_invalid_input(predictor, image, question, words):
    with pytest.raises(InvalidInput, match=words):
        predictor.predict(image, question)


def test_threads_with_different_adapters_get_their_own_answers(predictor):
    images = [scan(10 + i) for i in range(3)]
    plan = [(images[i % 3], [None, "alpha", "beta"][i % 3]) for i in range(9)]
    expected = {(id(im), a): predictor.predict(im, "Where is the lesion?", adapter=a) for im, a in plan}
    got, errors = {}, []

    def worker(k, im, a):
        try:
            got[k] = (id(im), a, predictor.predict(im, "Where is the lesion?", adapter=a))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k, im, a)) for k, (im, a) in enumerate(plan)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for key_im, a, r in got.values():
        want = expected[(key_im, a)]
        assert r.answer == want.answer
        np.testing.assert_array_equal(r.mask, want.mask)


@pytest.mark.slow
def test_predict_cli(tmp_path):
    image = scan(11)
    image.save(tmp_path / "scan.png")
    proc = subprocess.run(
        [sys.executable, "-m", "prsmed.cli", "predict", str(tmp_path / "scan.png"), "--question", "Where is it?",
         "--out", str(tmp_path / "mask.png"), "--overlay", str(tmp_path / "overlay.png"), "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    # Every model build used to print transformers' FutureWarning for `is_gradient_checkpointing` (read by PEFT).
    assert "FutureWarning" not in proc.stderr and "is_gradient_checkpointing" not in proc.stderr, proc.stderr
    out = json.loads(proc.stdout)
    assert out["zone"] in ZONES
    mask = np.asarray(Image.open(tmp_path / "mask.png"))
    assert mask.shape == (100, 120) and set(np.unique(mask)) <= {0, 255}
    assert Image.open(tmp_path / "overlay.png").size == (120, 100)
    bad = subprocess.run([sys.executable, "-m", "prsmed.cli", "predict", str(tmp_path / "nope.png"), "-q", "Where?"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "nope.png" in bad.stderr


def test_batcher_groups_concurrent_requests_and_isolates_a_bad_one(predictor):
    from prsmed.infer.batcher import MicroBatcher

    batcher = MicroBatcher(predictor, max_batch_size=8, max_wait_ms=300)
    try:
        images = [scan(20 + i) for i in range(5)]
        futures = [batcher.submit(PredictRequest(im, "Where is the lesion?")) for im in images]
        bad = batcher.submit(PredictRequest(images[0], "Where is the lesion?", adapter="gamma"))
        results = [f.result(300) for f in futures]
        with pytest.raises(AdapterNotFound):
            bad.result(300)
        assert batcher.requests >= 6 and batcher.batches < batcher.requests
        for im, r in zip(images, results):
            alone = predictor.predict(im, "Where is the lesion?")
            assert r.answer == alone.answer
            assert np.mean(r.mask != alone.mask) < 0.01
        with pytest.raises(InvalidInput):
            batcher.submit(PredictRequest(b"junk", "Where?"))  # refused before it joins a batch
    finally:
        batcher.close()


@pytest.mark.parametrize("content", [None, b"", b"hello, not an image"])
def test_predict_cli_refuses_a_bad_file_before_loading_torch(tmp_path, content):
    path = tmp_path / "scan.png"
    if content is not None:
        path.write_bytes(content)
    driver = ("import sys\nfrom prsmed.cli import main\nsys.argv = ['prsmed', 'predict', sys.argv[1], '-q', 'Where?']\n"
              "try:\n    main()\nexcept SystemExit as e:\n    print(e.code, 'torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", driver, str(path)], capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["2", "False"], (proc.stdout, proc.stderr)  # refused, and torch never imported
    said = {None: "no such file", b"": "the file is empty", b"hello, not an image": "not an image"}[content]
    assert said in proc.stderr and "scan.png" in proc.stderr


@pytest.mark.parametrize("answer, lesion, consistent", [
    ("top......................", False, False),  # names no zone: agrees with nothing, an empty mask included
    ("No lesion is visible in this image.", False, True),
    ("The nodule is in the top left.", True, True),
    ("The nodule is in the bottom right.", True, False),
    ("The nodule is in the top left, and another nodule is in the bottom right.", True, False),
])
def test_consistent_means_the_same_set_of_zones(answer, lesion, consistent):
    from PIL import Image as PILImage

    from prsmed.infer.postprocess import summarize_mask

    probability = np.full((64, 64), 0.02, dtype=np.float32)
    if lesion:
        probability[4:20, 4:20] = 0.9  # top left
    result = Predictor._result(answer, summarize_mask(probability), PILImage.new("RGB", (64, 64)), None, False, {})
    assert result.consistent is consistent, (result.zones, result.zones_from_text)
    if not lesion:
        assert result.zones == ["none"] and result.confidence == pytest.approx(0.98)
    else:
        assert result.confidence == pytest.approx(0.9)

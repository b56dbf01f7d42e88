"""Feature extractors: the digits classifier (accuracy, caching, FD-digits sanity) and the FID InceptionV3 loader."""

import pytest
import torch
import torch.nn.functional as F

from sde.features import (
    DigitsClassifier,
    FIDInceptionV3,
    digits_accuracy,
    evaluate_samples,
    extract_features,
    get_digits_classifier,
    load_digits_split,
    load_fid_inception,
    reference_features,
)
from sde.metrics import FeatureStats, frechet_distance


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("score_sde_cache")


@pytest.fixture(scope="module")
def classifier(cache):
    return get_digits_classifier(cache)  # trains once (seconds) into the temporary cache


def blur(x):
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16).reshape(1, 1, 3, 3)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel)


def test_digits_split_is_fixed():
    xtr, ytr = load_digits_split("train")
    xte, yte = load_digits_split("test")
    assert xtr.shape == (1438, 1, 8, 8) and xte.shape == (359, 1, 8, 8)
    assert xtr.min() >= -1 and xtr.max() <= 1
    assert torch.equal(load_digits_split("test")[0], xte)  # same split every call
    with pytest.raises(ValueError, match="split='val'"):
        load_digits_split("val")


@pytest.mark.slow
def test_classifier_accuracy_and_cache_reuse(classifier, cache):
    acc = digits_accuracy(classifier, "test")
    print(f"digits classifier test accuracy: {acc:.4f}")
    assert acc >= 0.97
    files = list(cache.glob("digits_classifier_v*.pt"))
    assert len(files) == 1
    again = get_digits_classifier(cache)  # loaded, not retrained: identical weights
    for k, v in classifier.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])
    x = load_digits_split("test")[0][:5].double()
    feats, probs = again.double().features_and_probs(x)
    assert feats.shape == (5, DigitsClassifier.feature_dim) and feats.dtype == torch.float64
    torch.testing.assert_close(probs.sum(-1), torch.ones(5, dtype=torch.float64))


def test_corrupt_cache_is_rebuilt(tmp_path, monkeypatch):
    import sde.features.digits_classifier as module

    calls = []
    monkeypatch.setattr(module, "train_digits_classifier", lambda: calls.append(1) or DigitsClassifier().eval())
    monkeypatch.setattr(module, "digits_accuracy", lambda model, split="test": 0.0)
    path = tmp_path / f"digits_classifier_v{module.DIGITS_CLASSIFIER_VERSION}.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="retraining"):
        rebuilt = get_digits_classifier(tmp_path)
    assert calls == [1]
    reloaded = get_digits_classifier(tmp_path)  # the rebuilt file is valid: no second training
    assert calls == [1]
    for k, v in rebuilt.state_dict().items():
        assert torch.equal(v, reloaded.state_dict()[k])


@pytest.mark.slow
def test_fd_digits_separates_real_from_noise_and_blur(classifier, cache):
    gen = torch.Generator().manual_seed(0)
    train, test = load_digits_split("train")[0], load_digits_split("test")[0]
    noise = torch.rand(test.shape, generator=gen) * 2 - 1
    stats = {name: FeatureStats.from_features(extract_features(classifier, x)[0])
             for name, x in {"train": train, "test": test, "noise": noise, "blur": blur(test)}.items()}
    fd_train = frechet_distance(stats["train"], stats["test"])
    fd_noise = frechet_distance(stats["test"], stats["noise"])
    fd_blur = frechet_distance(stats["test"], stats["blur"])
    print(f"FD-digits train-vs-test {fd_train:.3f}  test-vs-noise {fd_noise:.3f}  test-vs-blurred {fd_blur:.3f}")
    assert fd_train * 20 < fd_noise and fd_train * 3 < fd_blur
    real = evaluate_samples(test, "digits_train", cache_dir=cache, kid_subsets=20, generator=gen)
    fake = evaluate_samples(noise, "digits_train", cache_dir=cache, kid_subsets=20, generator=gen)
    print(f"evaluate_samples test digits: {real}\nevaluate_samples uniform noise: {fake}")
    assert real["fd"] == pytest.approx(fd_train, rel=1e-6)
    assert real["is"] > 8.0 > 4.0 > fake["is"]  # ten well-separated classes vs. few, vague ones
    assert real["kid"] < 0.1 * fake["kid"]
    cached = list(cache.glob("ref_digits_train_*.npz"))
    assert len(cached) == 1 and torch.equal(reference_features("digits_train", cache), reference_features(
        "digits_train", cache))


def _random_inception_file(path, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FIDInceptionV3()
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, path)
    return model


def test_inception_state_dict_uses_pytorch_fid_names():
    keys = FIDInceptionV3().state_dict()
    landmarks = {  # names and shapes of the converted TF graph (torchvision naming, 1008-way classifier)
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Conv2d_4a_3x3.bn.running_var": (192,),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
        "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
        "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
        "fc.weight": (1008, 2048),
    }
    for name, shape in landmarks.items():
        assert tuple(keys[name].shape) == shape, name
    assert not any(k.startswith("AuxLogits") for k in keys)


@pytest.mark.slow
def test_inception_loads_a_weights_file_and_extracts_pool3(tmp_path):
    path = tmp_path / "pt_inception-test.pth"
    reference = _random_inception_file(path).eval()
    model = load_fid_inception(path)
    for k, v in reference.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(v, model.state_dict()[k]), k
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1  # grayscale, tiny: resized
    feats, probs = model.features_and_probs(x)
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all() and (feats >= 0).all()  # pooled ReLUs
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))
    assert not torch.allclose(feats[0], feats[1])  # the features depend on the image


def test_inception_rejects_wrong_weights_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="pt_inception"):
        load_fid_inception(tmp_path / "absent.pth")
    wrong = tmp_path / "wrong.pth"
    torch.save(DigitsClassifier().state_dict(), wrong)
    with pytest.raises(ValueError, match=r"missing keys \d+ \['Conv2d_1a_3x3.*unexpected keys 10 \['conv1.bias'"):
        load_fid_inception(wrong)
    torch.save([1, 2], wrong)
    with pytest.raises(ValueError, match="not a state dict"):
        load_fid_inception(wrong)

"""Guidance checked against the exact Gaussian-mixture oracle (class = mixture component)."""

from __future__ import annotations

import pytest
import torch

from sde import VESDE, VPSDE, GaussianMixture
from sde.guidance import NoiseConditionalClassifier, cfg_score, classifier_guided_score, train_classifier
from sde.samplers import sample

F64 = torch.float64


def _mixture() -> GaussianMixture:
    means = torch.tensor([[-3.0, 0.0], [3.0, 0.0], [0.0, 3.5]], dtype=F64)
    covs = torch.tensor([[[0.5, 0.2], [0.2, 0.4]], [[0.3, -0.1], [-0.1, 0.6]], [[0.4, 0.0], [0.0, 0.25]]], dtype=F64)
    return GaussianMixture(means, covs, weights=torch.tensor([0.5, 0.3, 0.2], dtype=F64))


def _conditional_model(gm: GaussianMixture, sde):
    """Exact conditional score (x, t, y): component y's diffused score; y=None: the mixture's."""

    def model(x, t, y):
        if y is None:
            return gm.score(x, sde, t)
        per_class = torch.stack([gm.component(k).score(x, sde, t) for k in range(gm.K)])  # (K, B, D)
        return per_class[y, torch.arange(x.shape[0])]

    model.num_classes = gm.K
    return model


def _exact_classifier(gm: GaussianMixture, sde):
    """log p_t(k | x) up to a constant: the exact noisy classifier's logits."""
    return lambda x, t: gm.component_log_prob(x, sde, t)


def _sample(score_fn, sde, n, generator, steps=100):
    x_T = sde.prior_sampling((n, 2), generator=generator, dtype=F64)
    return sample(score_fn, sde, x_T, sampler="euler_maruyama", generator=generator, steps=steps).x


@pytest.mark.parametrize("sde", [VPSDE(), VESDE(sigma_max=20.0)], ids=["vp", "ve"])
def test_guided_scores_equal_exact_component_score(sde):
    gm = _mixture()
    g = torch.Generator().manual_seed(0)
    x = gm.marginal(sde, 0.3).sample(64, g)
    t = torch.rand(64, generator=g, dtype=F64) * 0.9 + 0.05
    for k in range(gm.K):
        exact = gm.component(k).score(x, sde, t)
        cg = classifier_guided_score(gm.score_fn(sde), _exact_classifier(gm, sde), k)(x, t)
        cf = cfg_score(_conditional_model(gm, sde), k, 1.0)(x, t)
        torch.testing.assert_close(cg, exact, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(cf, exact, rtol=1e-12, atol=1e-12)
    # A callable that returns log p_t(y | x) directly (shape (B,)) gives the same.
    log_post = lambda x, t: torch.log_softmax(gm.component_log_prob(x, sde, t), 1)[:, 2]  # noqa: E731
    torch.testing.assert_close(
        classifier_guided_score(gm.score_fn(sde), log_post, 2)(x, t), gm.component(2).score(x, sde, t)
    )


def test_cfg_scale_convention_and_per_sample_labels():
    sde = VPSDE()
    gm = _mixture()
    model = _conditional_model(gm, sde)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 2, generator=g, dtype=F64)
    t = torch.full((6,), 0.4, dtype=F64)
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    s_c, s_u = model(x, t, y), model(x, t, None)
    torch.testing.assert_close(cfg_score(model, y, 0.0)(x, t), s_u)
    torch.testing.assert_close(cfg_score(model, y, 3.0)(x, t), s_u + 3.0 * (s_c - s_u))
    scaled = classifier_guided_score(gm.score_fn(sde), _exact_classifier(gm, sde), y, 2.5)(x, t)
    torch.testing.assert_close(scaled, s_u + 2.5 * (s_c - s_u))  # exact classifier: the two guidances agree


@pytest.mark.parametrize("method", ["cfg", "classifier"])
def test_guided_sampling_draws_the_requested_component(method):
    sde = VPSDE()
    gm = _mixture()
    g = torch.Generator().manual_seed(2)
    k = 2  # the smallest component (weight 0.2)
    if method == "cfg":
        score = cfg_score(_conditional_model(gm, sde), k, 1.0)
    else:
        score = classifier_guided_score(gm.score_fn(sde), _exact_classifier(gm, sde), k, 1.0)
    x = _sample(score, sde, 800, g)
    frac = gm.posterior(x)[:, k].mean().item()
    assert frac > 0.99, f"only {frac:.3f} of the samples belong to component {k}"
    comp = gm.component(k)  # 800 samples: standard errors ~0.02 (mean), ~0.015 (cov)
    torch.testing.assert_close(x.mean(0), comp.means[0], atol=0.08, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), comp.covs[0], atol=0.08, rtol=0)


def test_bad_inputs_error_clearly():
    sde = VPSDE()
    gm = _mixture()
    model = _conditional_model(gm, sde)
    with pytest.raises(ValueError, match=r"class ids in \[3, 3\].*\[0, 2\]"):
        cfg_score(model, 3)
    with pytest.raises(ValueError, match="class ids"):
        cfg_score(model, torch.tensor([0, -1]))
    with pytest.raises(TypeError, match="integer tensor"):
        cfg_score(model, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="shape \\(B,\\)"):
        cfg_score(model, torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="scale"):
        cfg_score(model, 0, -1.0)

    class Unconditional(torch.nn.Module):
        num_classes = 0

    class Wrapper:  # like ScoreModel: the class count lives on .net
        net = Unconditional()

    with pytest.raises(ValueError, match="num_classes=0"):
        cfg_score(Wrapper(), 1)
    with pytest.raises(ValueError, match="num_classes=0"):
        classifier_guided_score(gm.score_fn(sde), Unconditional(), 1)
    clf = NoiseConditionalClassifier(2, 3)
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        classifier_guided_score(gm.score_fn(sde), clf, 5)
    # Without num_classes the range is checked against the logits at the first call.
    guided = classifier_guided_score(gm.score_fn(sde), _exact_classifier(gm, sde), 7)
    with pytest.raises(ValueError, match="3 classes"):
        guided(torch.zeros(2, 2, dtype=F64), torch.full((2,), 0.5, dtype=F64))
    with pytest.raises(ValueError, match="shape"):
        clf(torch.zeros(4, 3), torch.full((4,), 0.5))
    with pytest.raises(ValueError, match="labels"):
        train_classifier(clf, sde, torch.zeros(10, 2), torch.zeros(9, dtype=torch.long), steps=1)


def test_train_classifier_reaches_bayes_accuracy():
    sde = VPSDE()
    gm = _mixture()
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(0)  # module initialisation
    data, labels = gm.sample(2000, g, return_labels=True)
    clf = NoiseConditionalClassifier(2, gm.K, hidden=32, depth=2, sde=sde).to(F64)
    losses = train_classifier(clf, sde, data, labels, steps=200, batch_size=128, lr=5e-3, generator=g)
    assert losses.shape == (200,) and losses[-50:].mean() < losses[:10].mean() - 0.1
    # Accuracy on fresh noisy points at a moderate noise level versus the exact Bayes classifier.
    x0, y = gm.sample(2000, g, return_labels=True)
    t = torch.full((2000,), 0.3, dtype=F64)
    xt, _ = sde.perturb(x0, t, generator=g)
    with torch.no_grad():
        acc = (clf(xt, t).argmax(1) == y).double().mean().item()
    bayes = (gm.posterior(xt, sde, t).argmax(1) == y).double().mean().item()
    assert acc > bayes - 0.03, f"trained accuracy {acc:.3f} vs Bayes {bayes:.3f}"
    # Guiding the exact unconditional score with it samples the requested component.
    x = _sample(classifier_guided_score(gm.score_fn(sde), clf, 2, 1.0), sde, 400, g)
    assert gm.posterior(x)[:, 2].mean().item() > 0.9

"""The linear probe of Model Stock* (probe.fit_linear_probe) on generated CLIP-like features.

CLIP's image features are unit vectors in which the class evidence is a small part: cosines to
the class text embeddings are a few tenths at most, and the zero-shot head needs its logit scale
(100, folded into W) to be confident. The features below are built that way: a small
class-dependent part and a large part shared by every image.
"""
import pytest
import torch
import torch.nn.functional as F

import probe

CLASSES, DIM = 1000, 32


def clip_like(per_class, generator, means, noise=0.8, signal=0.2):
    """per_class unit features for every class: signal * (noisy class direction) + a shared part."""
    labels = torch.arange(len(means)).repeat(per_class)
    directions = F.normalize(means[labels] + noise * torch.randn(len(labels), means.shape[1], generator=generator)
                             / means.shape[1] ** 0.5, dim=-1)
    shared = torch.full((len(labels), 1), (1 - signal**2) ** 0.5)
    return torch.cat([signal * directions, shared], 1), labels


def zero_shot_classifier(means, generator, text_noise=1.0, scale=100.0):
    """A head of scale x noisy class directions (text embeddings miss the image class means)."""
    text = F.normalize(means + text_noise * torch.randn(means.shape, generator=generator) / means.shape[1] ** 0.5, dim=-1)
    classifier = torch.nn.Module()
    classifier.classification_head = torch.nn.Linear(means.shape[1] + 1, len(means))
    with torch.no_grad():
        classifier.classification_head.weight.copy_(scale * torch.cat([text, torch.zeros(len(means), 1)], 1))
        classifier.classification_head.bias.zero_()
    return classifier


def accuracy(classifier, features, labels):
    with torch.no_grad():
        return (classifier.classification_head(features).argmax(1) == labels).float().mean().item()


def test_probe_on_1000_classes_keeps_the_scale_and_beats_zero_shot():
    """The penalty 1e-4 * |W|^2 next to a mean loss held the mean row norm of a 1000-class head
    below 10 (the zero-shot head's is 100); the held-out choice of l2 keeps the scale."""
    gen = torch.Generator().manual_seed(0)
    means = F.normalize(torch.randn(CLASSES, DIM, generator=gen), dim=-1)
    features, labels = clip_like(3, gen, means)
    test_features, test_labels = clip_like(5, gen, means)  # fresh images of the same classes
    classifier = zero_shot_classifier(means, gen)
    zero_shot_norm = classifier.classification_head.weight.norm(dim=1).mean().item()
    zero_shot_accuracy = accuracy(classifier, test_features, test_labels)

    report = probe.fit_linear_probe(classifier, features, labels, iterations=20)  # 20: seconds on a CPU
    probe_norm = classifier.classification_head.weight.norm(dim=1).mean().item()
    probe_accuracy = accuracy(classifier, test_features, test_labels)
    assert 0.5 < probe_norm / zero_shot_norm < 2, (probe_norm, zero_shot_norm)
    assert probe_accuracy > zero_shot_accuracy + 0.1, (probe_accuracy, zero_shot_accuracy)

    # The report: both heads, and the choice made on the held-out images.
    assert report["zero_shot"]["row_norm"] == pytest.approx(zero_shot_norm)
    assert report["probe"]["row_norm"] == pytest.approx(probe_norm)
    assert report["heldout_images"] == 300 and [t["l2"] for t in report["trials"]] == list(probe.PROBE_L2_GRID)
    best = max(report["trials"], key=lambda t: t["heldout_accuracy"])
    assert report["l2"] == best["l2"] and report["probe"]["heldout_accuracy"] == best["heldout_accuracy"]
    assert report["probe"]["heldout_accuracy"] > report["zero_shot"]["heldout_accuracy"]


def test_row_norm_bound_of_the_penalty():
    """At the optimum of mean cross-entropy + l2 * mean_k |w_k|^2, (2 l2 / K) w_k = -E[(p_k - y_k) x]
    for each of the K classes, so the mean row norm is at most (1 - p) / l2, p the mean probability
    of the right class: a bound that does not depend on the number of classes or images."""
    gen = torch.Generator().manual_seed(1)
    means = F.normalize(torch.randn(10, 8, generator=gen), dim=-1)
    features, labels = clip_like(30, gen, means, signal=0.5)
    for l2 in (1e-1, 1e-2):
        w, b = probe._fit_head(torch.zeros(10, 9), torch.zeros(10), features, labels, l2, iterations=500)
        probs = F.softmax(features @ w.T + b, dim=1)
        gradient = (probs - F.one_hot(labels, 10)).T @ features / len(labels)  # of the mean loss, per row
        torch.testing.assert_close(2 * l2 / 10 * w, -gradient, atol=1e-4, rtol=1e-3)
        p = probs[torch.arange(len(labels)), labels].mean().item()
        assert w.norm(dim=1).mean().item() <= (1 - p) / l2


def test_probe_does_not_depend_on_the_training_seed_and_leaves_its_inputs_alone():
    gen = torch.Generator().manual_seed(2)
    means = F.normalize(torch.randn(20, 8, generator=gen), dim=-1)
    features, labels = clip_like(10, gen, means)
    before = features.clone()
    heads = []
    for seed in (0, 1):
        torch.manual_seed(seed)  # the global generator: --seed has set it by the time the probe runs
        classifier = zero_shot_classifier(means, torch.Generator().manual_seed(3))
        probe.fit_linear_probe(classifier, features, labels, iterations=20)
        heads.append(classifier.classification_head.weight.detach().clone())
    assert torch.equal(heads[0], heads[1]) and torch.equal(features, before)


def test_chunked_loss_is_the_full_batch_loss():
    """The loss and its gradient are summed over chunks of images; the chunk size changes only rounding."""
    gen = torch.Generator().manual_seed(4)
    means = F.normalize(torch.randn(10, 8, generator=gen), dim=-1)
    features, labels = clip_like(30, gen, means)
    start = torch.randn(10, 9, generator=gen)
    whole = probe._fit_head(start, torch.zeros(10), features, labels, 1e-3, iterations=10)
    chunked = probe._fit_head(start, torch.zeros(10), features, labels, 1e-3, iterations=10, chunk=7)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert probe._head_scores(*whole, features, labels, chunk=7) == pytest.approx(probe._head_scores(*whole, features, labels))


def test_one_image_is_too_few_to_hold_one_out():
    classifier = zero_shot_classifier(F.normalize(torch.randn(3, 4), dim=-1), torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="needs 2 images or more to hold one out, got 1"):
        probe.fit_linear_probe(classifier, torch.ones(1, 5), torch.zeros(1, dtype=torch.long))

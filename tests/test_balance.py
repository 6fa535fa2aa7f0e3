"""--class-balance: the class-weighted loss against torch's F.cross_entropy(weight=...), the balanced sampler
against a binomial bound, per-class accuracy in summary.json and the card, and an exact resume."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from _images import make_folder
from nfnet_zoo.data import BalancedSampler
from nfnet_zoo.evaluation import evaluate
from nfnet_zoo.training.balance import WeightedCrossEntropy, class_weights
from nfnet_zoo.training.finetune import finetune

TINY = dict(model="nfnet_zoo_tiny", img_size=32, batch_size=4, workers=0, pretrained=False, lr=0.05)


def test_class_weights_are_n_over_k_times_the_count():
    labels = [0] * 90 + [1] * 10 + [3] * 20  # class 2 has no image: weight 0, never a target
    assert torch.allclose(class_weights(labels, 4), torch.tensor([120 / (4 * 90), 120 / (4 * 10), 0.0, 120 / (4 * 20)]))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_weighted_loss_is_torchs_weighted_cross_entropy(smoothing):
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(16, 5, generator=g), torch.randint(0, 5, (16,), generator=g)
    w = torch.rand(5, generator=g) + 0.2
    ours = WeightedCrossEntropy(w, smoothing)
    ref = F.cross_entropy(logits, y, weight=w, label_smoothing=smoothing, reduction="none").mean()
    assert torch.allclose(ours(logits, y), ref, atol=1e-6)
    # mixup/cutmix's soft targets (smoothing included): torch's probability-target form, weighted per class
    soft = torch.rand(16, 5, generator=g)
    soft /= soft.sum(1, keepdim=True)
    assert torch.allclose(ours(logits, soft), F.cross_entropy(logits, soft, weight=w), atol=1e-6)
    # uniform weights: timm's label-smoothing loss, the one used without --class-balance
    from timm.loss import LabelSmoothingCrossEntropy
    plain = WeightedCrossEntropy(torch.ones(5), smoothing)(logits, y)
    assert torch.allclose(plain, LabelSmoothingCrossEntropy(smoothing)(logits, y) if smoothing else
                          F.cross_entropy(logits, y), atol=1e-6)


def test_the_sampler_draws_classes_equally_and_is_a_function_of_seed_and_epoch():
    labels = [0] * 900 + [1] * 100
    s = BalancedSampler(labels, seed=3)
    for epoch in (0, 1):
        s.epoch = epoch
        drawn = list(s)
        assert len(drawn) == 1000 and all(e == epoch for _, e, _ in drawn)
        minority = sum(labels[i] for i, _, _ in drawn)
        # Binomial(1000, 1/2): 6 standard deviations (15.8 each) hold it for any seed but one in ~10^9;
        # the unbalanced shuffle would give exactly 100
        assert abs(minority - 500) < 6 * math.sqrt(1000 * 0.25), minority
        # a repeat of an image is numbered, so its augmentation is seeded apart from the first draw
        by_index: dict[int, list[int]] = {}
        for i, _, d in drawn:
            by_index.setdefault(i, []).append(d)
        assert all(ds == list(range(len(ds))) for ds in by_index.values())
        again = BalancedSampler(labels, seed=3)
        again.epoch = epoch
        assert list(again) == drawn  # what a resumed run (or another process) draws
    s.epoch = 0
    assert list(s) != drawn


def test_each_process_gets_its_share_of_the_balanced_draws():
    """As EpochSampler: every process draws the same list, Accelerate's data loader hands each its batches."""
    from accelerate.data_loader import prepare_data_loader
    labels = [0] * 45 + [1] * 5

    class Echo(torch.utils.data.Dataset):  # an item is what the sampler drew: (index, epoch, draw)
        __len__ = lambda self: len(labels)
        __getitem__ = lambda self, item: item
    loader = lambda: torch.utils.data.DataLoader(Echo(), batch_size=4, drop_last=True,
                                                 sampler=BalancedSampler(labels, seed=1), collate_fn=lambda b: b)
    whole = [i for batch in loader() for i, _, _ in batch]
    shares = [[x for batch in prepare_data_loader(loader(), torch.device("cpu"), num_processes=2, process_index=r,
                                                  put_on_device=False) for x in batch] for r in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == 24
    batches = [whole[k:k + 4] for k in range(0, 48, 4)]
    assert [i for i, _, _ in shares[0]] == sum(batches[0::2], []) and [i for i, _, _ in shares[1]] == sum(batches[1::2], [])


def _imbalanced(root: Path) -> Path:
    make_folder(root, n_train=14, n_val=4, classes=("bright",), seed=0)
    make_folder(root, n_train=2, n_val=2, classes=("dark",), seed=1)
    return root


class _StopAfter:
    """StopRequest stand-in: asks the loop to stop at its `n`-th look (a Ctrl-C mid-epoch)."""

    def __init__(self, n: int):
        self.n = n

    def __call__(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    @property
    def requested(self) -> bool:
        self.n -= 1
        return self.n < 0


def test_the_recipe_weights_the_loss_by_the_training_labels():
    from nfnet_zoo.training.recipe import FinetuneConfig, build_losses
    labels = [0] * 6 + [1] * 2
    for cfg, smoothing in ((FinetuneConfig(class_balance="loss"), 0.1), (FinetuneConfig(class_balance="loss",
                                                                                         smoothing=0.0), 0.0)):
        mixup, loss = build_losses(cfg, 2, labels)
        assert isinstance(loss, WeightedCrossEntropy) and loss.smoothing == smoothing
        assert torch.allclose(loss.weight, torch.tensor([8 / 12, 8 / 4]))
    mixup, loss = build_losses(FinetuneConfig(class_balance="loss", mixup=0.4), 2, labels)
    assert mixup is not None and isinstance(loss, WeightedCrossEntropy)  # takes mixup's soft targets
    assert not isinstance(build_losses(FinetuneConfig(), 2, labels)[1], WeightedCrossEntropy)


def test_a_balanced_sam_run_stopped_mid_epoch_resumes_exactly_and_reports_each_class(tmp_path, monkeypatch):
    """One run for two flags' resume rule (each run costs seconds): the balanced sampler, and SAM with
    accumulation (an optimizer step's ascent on its first micro-batch)."""
    import importlib
    ft = importlib.import_module("nfnet_zoo.training.finetune")
    data = _imbalanced(tmp_path / "data")
    kw = dict(TINY, data_dir=str(data), epochs=2, class_balance="sampler", save_every=0, drop=0.2, sam=0.05,
              sam_fraction=0.5, grad_accum_steps=2)
    whole = finetune(output=str(tmp_path / "whole"), **kw)
    stopped = tmp_path / "stopped"
    monkeypatch.setattr(ft, "StopRequest", _StopAfter(2))  # looked at every update, 2 an epoch: stops in epoch 2
    with pytest.raises(KeyboardInterrupt):
        finetune(output=str(stopped), **kw)
    monkeypatch.undo()
    finetune(resume=str(stopped))
    a, b = load_file(whole / "last" / "model.safetensors"), load_file(stopped / "last" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    summary = json.loads((whole / "summary.json").read_text())
    assert set(summary["per_class"]) == {"bright", "dark"}
    assert summary["per_class"]["dark"]["count"] == 2 and summary["per_class"]["bright"]["count"] == 4
    # the held-out split scored by evaluate (its own pipeline) with the best epoch's weights: the same figures
    ev = evaluate(str(whole), data, workers=0, check_images="none")
    for c in ("bright", "dark"):
        assert summary["per_class"][c]["accuracy"] == pytest.approx(ev["per_class"][c]["accuracy"])
    card = (whole / "README.md").read_text()
    assert f"| dark | 2 | {summary['per_class']['dark']['accuracy']:.2f} |" in card
    assert "| Class balance | sampler |" in card


def test_the_card_lists_every_class_or_the_lowest_fifty():
    from nfnet_zoo.models.cards import _per_class_table
    few = _per_class_table({"a|b": {"accuracy": 50.0, "count": 2}, "c": {"accuracy": 100.0, "count": 3}})
    assert "| a/b | 2 | 50.00 |" in few and "| c | 3 | 100.00 |" in few  # a | in a name cannot break the table
    many = _per_class_table({f"k{i}": {"accuracy": float(i), "count": 1} for i in range(120)})
    assert "all 120 in summary.json" in many and "| k49 | 1 | 49.00 |" in many and "| k50 |" not in many
    assert _per_class_table(None) == _per_class_table({"x": "damaged"}) == ""

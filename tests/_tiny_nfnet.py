"""A small NFNet with every parameter trained, a batch for it and DeepMind's optimizer: for the AGC tests."""
import timm
import torch

from nfnet_zoo import weight_decay_groups  # importing nfnet_zoo registers the variants

MODEL_KWARGS = dict(num_classes=10, depths=(1, 1, 1, 1), widths=(32, 64, 96, 128), group_width=8,
                    drop_rate=0.0, stochdepth_rate=0.0)


def tiny(seed=0):
    torch.manual_seed(seed)
    model = timm.create_model("nfnet_zoo_tiny", **MODEL_KWARGS)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("skipinit_gain"):
                p.fill_(0.5)  # residual branches on, so every parameter gets a gradient
    return model


def batch(n=4, size=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


def sgd(model):
    return torch.optim.SGD(weight_decay_groups(model, 1e-4), lr=0.2, momentum=0.9, nesterov=True)


def model_folder(folder, classes, eval_size=32):
    """A randomly initialised nfnet_zoo_tiny (residual branches on, probabilities far from uniform) saved as a model
    folder in the shared form, as a run writes it; returns its path as a string."""
    from nfnet_zoo.models.shared_config import rewrite_shared
    torch.manual_seed(0)
    net = timm.create_model("nfnet_zoo_tiny", num_classes=len(classes))
    with torch.no_grad():
        for n, p in net.named_parameters():
            if n.endswith("skipinit_gain"):
                p.fill_(0.5)
        net.get_classifier().weight.mul_(20)  # probabilities far from uniform, so their order means something
    timm.models.save_for_hf(net, str(folder), model_config={"label_names": list(classes)}, safe_serialization=True)
    rewrite_shared(folder / "config.json", eval_size=eval_size)
    return str(folder)

"""README snippets run as written (on the CPU where they name CUDA)."""
import re
from pathlib import Path

import timm
import torch

import nfnet_zoo  # noqa: F401  registers the models
from nfnet_zoo import adaptive_clip_grad_, clipped_parameters, weight_decay_groups

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_agc_grad_scaler_snippet_steps_repeatedly():
    """The fp16 GradScaler loop of 'Adaptive Gradient Clipping in your own loop', three steps in a row."""
    [snippet] = [b for b in _python_blocks() if "GradScaler" in b]
    torch.manual_seed(0)
    model = timm.create_model("nfnet_zoo_tiny", num_classes=4)
    scope = dict(torch=torch, model=model, criterion=torch.nn.CrossEntropyLoss(),
                 clipped=clipped_parameters(model), adaptive_clip_grad_=adaptive_clip_grad_,
                 optimizer=torch.optim.SGD(weight_decay_groups(model, 2e-5), lr=0.1, momentum=0.9, nesterov=True))
    before = [p.detach().clone() for p in model.parameters()]
    code = compile(snippet.replace('"cuda"', '"cpu"'), str(README), "exec")
    for _ in range(3):  # the earlier snippet raised on its second step
        scope["x"], scope["y"] = torch.randn(4, 3, 32, 32), torch.randint(0, 4, (4,))
        exec(code, scope)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_agc_loop_snippet_runs_as_written(capsys):
    """'Adaptive Gradient Clipping in your own loop' runs as printed, with nothing supplied from outside."""
    [snippet] = [b for b in _python_blocks() if "adaptive_clip_grad_(clipped" in b and "GradScaler" not in b]
    scope: dict = {}
    exec(compile(snippet, str(README), "exec"), scope)
    optimizer, stats = scope["optimizer"], scope["stats"]
    assert all(len(optimizer.state[p]) for p in scope["model"].parameters())  # every parameter was stepped
    assert stats.units > 0 and 0 <= stats.clipped_fraction() <= 1
    assert capsys.readouterr().out.startswith("loss ")

"""The small training loop the demo, the CLI and the examples share: a progress bar when asked."""
import torch
from torch import nn

from torch_rlprune.demo.training import evaluate_accuracy, train_classifier


def tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 3))


def test_training_shows_a_bar_with_the_loss_when_verbose_and_nothing_otherwise(capsys, monkeypatch):
    import torch_rlprune.demo.training as training

    bars = []

    class Recording(training.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.shown = not self.disable  # close() disables a bar
            bars.append(self)

    monkeypatch.setattr(training, "tqdm", Recording)
    x, y = torch.randn(64, 16), torch.randint(0, 3, (64,))
    train_classifier(tiny(), x, y, batch_size=16, max_steps=3, verbose=True, desc="warming up")
    assert "warming up" in capsys.readouterr().err
    bar = bars[-1]
    assert (bar.desc, bar.total, bar.n, bar.shown) == ("warming up", 3, 3, True) and "loss=" in str(bar.postfix)
    train_classifier(tiny(), x, y, batch_size=16, max_steps=3)
    assert capsys.readouterr().err == "" and not bars[-1].shown


def test_training_lowers_the_loss_and_leaves_the_model_in_eval_mode():
    x = torch.randn(256, 16)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    model = tiny()
    before = evaluate_accuracy(model, x, y)
    train_classifier(model, x, y, epochs=20, batch_size=32, lr=0.1)
    assert not model.training and evaluate_accuracy(model, x, y) > max(before, 0.7)

import torch
from torch import nn
from torch.nn.utils import prune

from torch_rlprune import PolicyUnstructured, rl_prune


def test_rl_prune_meets_target_through_prune_api():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 14 * 14, 10))
    x = torch.randn(64, 1, 16, 16)
    result = rl_prune(model, 0.7, data=x, episodes=12, agent_config={"warmup": 4}, verbose=False)
    assert result.model is model
    assert abs(result.sparsity - 0.7) <= 0.005
    for module in (model[0], model[3]):
        assert prune.is_pruned(module)
        hooks = [h for h in module._forward_pre_hooks.values() if isinstance(h, PolicyUnstructured)]
        assert hooks, "the hook must be our BasePruningMethod"
    zeros = sum(int((m.weight == 0).sum()) for m in (model[0], model[3]))
    total = model[0].weight.numel() + model[3].weight.numel()
    assert abs(zeros / total - 0.7) <= 0.005

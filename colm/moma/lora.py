"""Plain LoRA (stage 1 experts): a LoRALinear replaces each chosen nn.Linear.

y = x W^T + b + (x A^T B^T) / r, with A (r x d_in) ~ N(0, 1) * init_scale and B (d_out x r) = 0, so a
fresh LoRA leaves the model unchanged. Keys: `<m>.weight` (frozen), `<m>.expert_lora_a`, `<m>.expert_lora_b`.
"""

import re

import gin
import torch
from torch import nn
from torch.nn import functional as F


@gin.configurable
class LoRALinear(nn.Module):
    def __init__(self, linear: nn.Linear, d_bottleneck=16, init_scale=0.01):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.d_bottleneck = d_bottleneck
        self.expert_lora_a = nn.Parameter(
            torch.randn(d_bottleneck, self.in_features, dtype=torch.float32, device=linear.weight.device) * init_scale
        )
        self.expert_lora_b = nn.Parameter(
            torch.zeros(self.out_features, d_bottleneck, dtype=torch.float32, device=linear.weight.device)
        )

    def forward(self, x):
        base = F.linear(x, self.weight, self.bias)
        # Two thin products instead of materialising W + BA/r: cheaper for r << d.
        update = F.linear(F.linear(x.to(self.expert_lora_a.dtype), self.expert_lora_a), self.expert_lora_b)
        return base + (update / self.d_bottleneck).to(base.dtype)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, r={self.d_bottleneck}"


@gin.configurable
def modify_with_lora(model, lora_modules=gin.REQUIRED, lora_layers=gin.REQUIRED):
    """Replaces every direct child matching `lora_layers` of every module matching `lora_modules` (each a pattern
    or a shortcut of the model's architecture, e.g. "lora_hosts" / "lora_children")."""
    layer_regex = re.compile(model.to_regex(lora_layers))
    replaced = 0
    for name, module in model.match_modules(lora_modules).items():
        for child_name, child in list(module.named_children()):
            if not layer_regex.fullmatch(child_name):
                continue
            if not isinstance(child, nn.Linear):
                raise TypeError(f"modify_with_lora: {name}.{child_name} is {type(child).__name__}, not nn.Linear.")
            setattr(module, child_name, LoRALinear(child))
            replaced += 1
    if replaced == 0:
        raise ValueError(f"modify_with_lora: no linear matched lora_modules={lora_modules!r}, lora_layers={lora_layers!r}.")

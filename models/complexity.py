"""Parameter and multiply-add counts, with the original's conventions.

Multiply-adds count only the weights of Conv2d and Linear layers (no BN, no
activations, no biases), per sample: a Conv2d costs
in * out * kh * kw * out_h * out_w / groups, a Linear costs in * out. This is the
table of docs/method.md §6.4.

Like the original, a conv's out_h/out_w come from (in + 2 * padding - kernel) //
stride + 1, which ignores dilation: a dilated conv is counted at a slightly larger
output size than it produces (HCGNet's dilated depthwise convs: 154.67M instead of
154.27M for hcgnet_A1). Pass ``original_convention=False`` to count the real sizes.
"""
from typing import List, Sequence, Tuple

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle


def count_parameters(module: nn.Module) -> int:
    """Number of scalars in all parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())


def conv_output_size(layer: nn.Conv2d, x: torch.Tensor, output: torch.Tensor,
                     original_convention: bool) -> Tuple[int, int]:
    """(out_h, out_w) of a conv call; see the module docstring for the convention."""
    if not original_convention or isinstance(layer.padding, str):
        return tuple(output.shape[-2:])
    sizes = []
    for dim in range(2):
        size = x.shape[-2 + dim] + 2 * layer.padding[dim] - layer.kernel_size[dim]
        sizes.append(size // layer.stride[dim] + 1)
    return tuple(sizes)


def layer_multiply_adds(layer: nn.Module, x: torch.Tensor, output: torch.Tensor,
                        original_convention: bool = True) -> int:
    """Multiply-adds of one call of a Conv2d or Linear layer for one sample."""
    if isinstance(layer, nn.Conv2d):
        kh, kw = layer.kernel_size
        out_h, out_w = conv_output_size(layer, x, output, original_convention)
        return layer.in_channels * layer.out_channels * kh * kw * out_h * out_w // layer.groups
    if isinstance(layer, nn.Linear):
        return layer.weight.numel()
    return 0


def count_multiply_adds(module: nn.Module, input_shape: Sequence[int] = (1, 3, 32, 32),
                        original_convention: bool = True) -> int:
    """Multiply-adds of one forward pass of ``module`` on one sample of ``input_shape``.

    The batch size in ``input_shape`` does not change the result. Layers called
    several times are counted each time. The module runs once on zeros in eval mode
    without gradients; its training flags are restored and no hook is left behind.
    """
    first_param = next(module.parameters(), None)
    device = first_param.device if first_param is not None else torch.device("cpu")
    dtype = first_param.dtype if first_param is not None else torch.float32
    total = [0]

    def on_forward(layer: nn.Module, inputs, output) -> None:
        total[0] += layer_multiply_adds(layer, inputs[0], output, original_convention)

    was_training = [(m, m.training) for m in module.modules()]
    handles: List[RemovableHandle] = [
        m.register_forward_hook(on_forward)
        for m in module.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    try:
        module.eval()
        with torch.no_grad():
            module(torch.zeros(tuple(input_shape), device=device, dtype=dtype))
    finally:
        for handle in handles:
            handle.remove()
        for m, training in was_training:
            m.training = training
    return total[0]

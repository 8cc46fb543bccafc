"""A Keras-style summary of a network: leaf layers, output shapes, parameter counts."""

import torch


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def summary(model, image_size):
    """Keras-style table of leaf layers, output shapes and parameter counts."""
    rows, hooks = [], []
    for name, module in model.named_modules():
        if len(list(module.children())) == 0:
            hooks.append(
                module.register_forward_hook(
                    lambda m, i, o, name=name: rows.append(
                        (
                            f"{name} ({type(m).__name__})",
                            str(tuple(o.shape[1:])),
                            sum(p.numel() for p in m.parameters(recurse=False)),
                        )
                    )
                )
            )
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    shape = (
        (1, model.head.in_features)
        if getattr(model, "input_kind", "image") != "image"
        else (1, 3, image_size, image_size)
    )
    try:
        model(torch.zeros(shape, device=device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    total = count_parameters(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    w = max([len(r[0]) for r in rows] + [20]) + 2
    line = "-" * (w + 36)
    out = [line, f"{'Layer (type)':<{w}}{'Output shape':<22}{'Param #':>14}", "=" * (w + 36)]
    out += [f"{n:<{w}}{s:<22}{p:>14,}" for n, s, p in rows]
    out += [
        "=" * (w + 36),
        f"Total params: {total:,}",
        f"Trainable params: {trainable:,}",
        f"Non-trainable params: {total - trainable:,}",
        line,
    ]
    return "\n".join(out)

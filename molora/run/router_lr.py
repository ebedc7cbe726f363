"""``train.router_lr_multiplier``: the routers' weights in optimizer groups of their own, at a multiple of the
learning rate (the schedule scales them alike)."""
from __future__ import annotations


def split_router_groups(optimizer, model, multiplier: float) -> int:
    """Move the router weights (``molora_router``) of every parameter group into a group of their own whose lr is
    ``multiplier`` x the group's; returns how many router tensors moved (0 when ``multiplier`` is 1)."""
    if multiplier == 1.0:
        return 0
    ids = {id(p) for n, p in model.named_parameters() if "molora_router" in n and p.requires_grad}
    moved, extra = 0, []
    for g in optimizer.param_groups:
        routers = [p for p in g["params"] if id(p) in ids]
        if not routers:
            continue
        g["params"] = [p for p in g["params"] if id(p) not in ids]
        extra.append({**{k: v for k, v in g.items() if k != "params"}, "params": routers,
                      "lr": g["lr"] * multiplier})
        moved += len(routers)
    for g in extra:
        optimizer.add_param_group(g)
    optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
    return moved

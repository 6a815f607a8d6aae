"""FSDP2 for the frozen base (`train.py --shard=fsdp`): each of N ranks keeps 1/N of the base's
weights, and gathers a block's whole weights just before the block runs, freeing them after.

Only the frozen base is sharded. `fully_shard` goes on every decoder block, then on the whole
PromptedModel as the root, which takes what no block owns (embeddings, final norm, head); each
call is given the method's trainable parameters as `ignored_params`. So the soft prompt, the
prefixes of every layer (prefix tuning, P-tuning v2), the adapter prompts and gates, and the
LoRA A/B matrices inside the blocks' projections all stay ordinary tensors, whole on every
rank, as under DDP: the optimizer, gradient clipping, the prompt file and the checkpoint see
exactly what they see unsharded, and rank 0 saves them as it always did. FSDP has no gradient
to reduce (the frozen weights get none), so the ranks average the trainable gradients
themselves (`average_gradients`): the one thing DDP did.

The root is the PromptedModel, not the base, because the method's forward embeds the tokens
itself before it calls the base: the root's hook gathers the embedding before either runs.
Gradient checkpointing needs nothing more: a recomputed block runs its gathering hook again.

Every forward is now a collective: all ranks must run the same ones, evaluation included.
"""
import torch
import torch.distributed as dist


def shard_frozen_base(model, device) -> tuple:
    """Shard `model`'s frozen base over the ranks in place; (bytes of frozen weights this rank
    holds, bytes of the whole frozen base)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
    trained = set(model.trainable_parameters())
    for block in model.base.layers:
        fully_shard(block, mesh=mesh, ignored_params=trained)
    fully_shard(model, mesh=mesh, ignored_params=trained)
    return held_bytes(model)


def held_bytes(model) -> tuple:
    """(bytes of the sharded weights this rank holds, bytes of them all)."""
    from torch.distributed.tensor import DTensor
    sharded = [p for p in model.parameters() if isinstance(p, DTensor)]
    held = sum(p.to_local().numel() * p.element_size() for p in sharded)
    return held, sum(p.numel() * p.element_size() for p in sharded)


def average_gradients(params, world: int) -> None:
    """Replace each trainable gradient by its mean over the ranks, the average DDP takes, in one
    all-reduce over the gradients laid end to end."""
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world
    for g, mean in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(mean.view_as(g))

"""Tensor-parallel inference over torch.distributed (after load; model.py is not aware of it).

    dist.py      the process-group setup shared with train/ (gloo on CPU, NCCL on CUDA) and the collectives
    plan.py      which slice of every weight a rank holds: rules per layout (per_head / grouped QKV, gated or
                 plain MLP, vocabulary), as data over the parameter names
    layers.py    RowParallel (all-reduce, bias once), VocabEmbedding, VocabHead; the module swap
    load.py      load_sharded(): each rank reads only its slices from the checkpoint
    runtime.py   lead() on rank 0, follow() on the others: the step inputs broadcast, the same calls everywhere

Nothing here is imported by the core unless a tensor-parallel load asks for it."""

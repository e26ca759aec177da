"""``rdn memory FILE``: parameter, gradient and optimizer-state bytes of a params file's
model under every optimizer variant, without allocating it.

The model is built on the meta device (shapes and dtypes only, as ``rdn validate
--counts``); its param groups go through each ``optim.state_dtype`` x ``optim.matrix`` x
``optim.vector`` choice (GaLore rank and Lion scale from the file) and
:func:`rdn.optim.memory.predicted_state_bytes` counts the state the optimizer would hold,
per rank with ``--world N`` (DistMuonAdamW's sharding). ``*`` marks the file's own choice.
Activations, the loader and CUDA workspace are not counted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _cmd_memory(args: argparse.Namespace) -> int:
    import torch

    from rdn.config import ParamsError, load_params
    from rdn.model import GPT, GPTConfig
    from rdn.optim.memory import memory_rows, memory_table
    from rdn.optim.variants import OptimVariant

    try:
        params = load_params(args.path)
    except ParamsError as e:
        for line in e.problems:
            print(line, file=sys.stderr)
        return 2
    world = args.world or params.dist.nproc_per_node * params.dist.nnodes
    config = GPTConfig.from_params(params.model, vocab_size=params.tokenizer.vocab_size,
                                   n_coord_dim=params.coords.n_dim)
    with torch.device("meta"):
        model = GPT(config)
    betas = (params.base_train.adam_beta1, params.base_train.adam_beta2)
    groups = model.optimizer_param_groups(adam_betas=betas)
    chosen = OptimVariant.from_config(params.optim)
    n = sum(p.numel() for g in groups for p in g["params"])
    print(f"{args.path}: {n:,} parameters ({n / 1e9:.3g}B), optimizer state per rank of {world} "
          f"(GaLore rank {chosen.galore_rank}, Lion lr scale {chosen.lion_lr_scale})")
    print(memory_table(memory_rows(groups, chosen, betas, world), chosen))
    return 0


def register(sub) -> None:
    """Add ``rdn memory`` to the ``rdn`` subcommands."""
    p = sub.add_parser("memory", help="parameter, gradient and optimizer-state bytes per optimizer variant "
                       "(built on the meta device)")
    p.add_argument("path", nargs="?", default="params.yaml", type=Path, help="params file (default: params.yaml)")
    p.add_argument("--world", type=int, default=None,
                   help="ranks sharding the state (default: dist.nproc_per_node x dist.nnodes of the file)")
    p.set_defaults(func=_cmd_memory)

"""Training TopK SAEs from a live model or an activation cache, resumable, optionally under torchrun.

One data stream feeds every SAE being trained (several sites, widths or k from one model pass);
each SAE gets its own run directory, and the shared training state lives in `<out>/state/`
(see sae.train.state).

  config.py       TrainConfig (the defaults) and the values derived from it
  distributed.py  the rank, its device, and the collectives
  data.py         the activation stream and its mixing buffer
  state.py        checkpoints and run files on disk
  loop.py         the Trainer
"""

from sae.train.config import Derived, TrainConfig, dead_tokens_for, derive, run_name
from sae.train.data import DataStream
from sae.train.distributed import World, init_world, pick_device
from sae.train.loop import Trainer
from sae.train.state import Member

__all__ = [
    "DataStream",
    "Derived",
    "Member",
    "TrainConfig",
    "Trainer",
    "World",
    "dead_tokens_for",
    "derive",
    "init_world",
    "pick_device",
    "run_name",
]

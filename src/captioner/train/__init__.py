"""Training: `fit(TrainConfig(...))` trains a captioning model and writes a run folder.

    config.py      TrainConfig: every option, with the defaults of `captioner train --help`
    data.py        records -> splits -> cached features and caption ids (TrainData)
    epoch.py       train_one_epoch(), validate(), choose_decoding(), count_naming()
    steps.py       what every training loop shares: the loss, the optimiser's steps, the meter
    scst.py        the self-critical stage: CIDEr-D reward, one SCST epoch
    checkpoint.py  RunState, checkpoint.pt, metrics.csv
    run.py         fit(): prepare data, build model and optimiser, resume, loop over epochs, finish

    from captioner.train import TrainConfig, fit
    fit(TrainConfig(data="flickr8k/", out="runs/x", epochs=3))
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from captioner.train.config import TrainConfig

__all__ = ["TrainConfig", "fit"]

if TYPE_CHECKING:
    from captioner.train.run import fit


def __getattr__(name: str):
    # fit imports torch; TrainConfig alone (what the command line needs for --help) does not
    if name == "fit":
        from captioner.train.run import fit

        return fit
    raise AttributeError(f"module 'captioner.train' has no attribute {name!r}")

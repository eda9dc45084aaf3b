"""Dark Experience Replay, DER (Buzzega et al., NeurIPS 2020): replay of stored logits, CE + alpha * MSE(logits).

A reservoir buffer of `replay.budget` training images, each stored with the logits the model gave it when it was
seen; every step adds alpha times the MSE between the model's logits on a draw of buffer images and the stored
ones. Not `der` (Yan et al.'s dynamically expandable representation). The training, the buffer and the departures
from aimagelab/mammoth's models/der.py are in `clrun.methods.parts.dark_replay`.
"""

from dataclasses import dataclass

from clrun.methods.parts.dark_replay import DarkReplay, DarkReplayConfig


@dataclass
class DarkERConfig(DarkReplayConfig):
    """DER: mammoth's seq-MNIST values at buffer 200 (utils/best_args.py: lr 0.03, batch 10, minibatch 10, alpha
    0.2); at buffer 500 mammoth uses alpha 1.0 and minibatch 128 (replay.batch_size=128)."""


class DarkER(DarkReplay):
    config_class = DarkERConfig

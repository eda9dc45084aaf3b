"""Dark Experience Replay++, DER++ (Buzzega et al., NeurIPS 2020): DER plus beta * CE on a second buffer draw.

As `dark_er` (CE + alpha * MSE between the model's logits on buffer images and the logits stored with them), plus
beta times the cross-entropy of a second, independent draw of buffer images against their stored labels. The
training, the buffer and the departures from aimagelab/mammoth's models/derpp.py are in
`clrun.methods.parts.dark_replay`.
"""

from dataclasses import dataclass, field

from clrun.config import NON_NEGATIVE, checked
from clrun.methods.parts.dark_replay import DarkReplay, DarkReplayConfig
from clrun.methods.parts.replay import ReplayConfig, ReplayPolicy


@dataclass
class DarkERPPConfig(DarkReplayConfig):
    """DER++: mammoth's seq-MNIST values at buffer 200 (utils/best_args.py: lr 0.03, batch 10, minibatch 128,
    alpha 0.2, beta 1.0); at buffer 500 mammoth uses minibatch 10, alpha 1.0, beta 0.5."""

    replay: ReplayConfig = field(
        default_factory=lambda: ReplayConfig(budget=200, policy=ReplayPolicy.reservoir, batch_size=128)
    )
    beta: float = checked(NON_NEGATIVE, 1.0)  # weight of the CE on the second buffer draw (seq-MNIST, buffer 200)


class DarkERPP(DarkReplay):
    config_class = DarkERPPConfig

    def buffer_ce_weight(self) -> float:
        return self.cfg.beta

"""Experience replay (ER): fine-tuning with a replay memory of earlier tasks' images mixed into every batch.

The memory, its policies and the loss weighting are in `clrun.methods.replay`;
this is van de Ven et al.'s ER baseline. `lwf` and `ewc` take the same memory
through their `replay` option.
"""

from clrun.data.stream import Task
from clrun.methods.base import Footprint, SharedModelMethod, task_loss
from clrun.methods.replay import Memory, with_replay
from clrun.train import fit


class ER(SharedModelMethod):
    def __init__(self, cfg, backbone_cfg, stream, hw):
        super().__init__(cfg, backbone_cfg, stream, hw)
        self.memory = Memory(cfg.replay.budget, cfg.replay.policy.value)

    def learn(self, task: Task, progress) -> dict:
        head = self.model.add_head(task.n_classes)
        train = self.cfg.train
        loss = with_replay(
            task_loss(self.model, task.index, self.stream),
            self.memory,
            self.model,
            self.stream,
            self.hw,
            task.index,
            self.cfg.replay.batch_size or train.batch_size,
        )
        params = self.model.trainable(head) if not len(self.memory) else self.model.parameters()
        stats = fit(
            self.model,
            params,
            loss,
            (task.train.x, task.train.y),
            train,
            self.stream,
            self.hw,
            progress,
            f"task {task.index} {task.name}",
        )
        self.memory.add(task)
        return stats.row()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "memory": self.memory.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.memory.load_state_dict(state["memory"], self.hw.device)

    def footprint(self) -> Footprint:
        return self.memory.add_to(super().footprint())

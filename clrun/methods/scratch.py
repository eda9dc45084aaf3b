"""Individual models: an independent backbone and head trained from scratch per task.

Task scenario; the class and domain scenarios with `task_id` (the model whose
head is most confident answers).

The "individual models" baseline of CPG's Table 2 (Hung et al., NeurIPS 2019) and the
source of its accuracy goals: no forgetting and no transfer, at T times the parameters.
"""

from clrun.data.stream import Task
from clrun.methods.base import Method, task_loss
from clrun.results import Footprint, count_params, module_bytes


class Scratch(Method):
    starts_head_from_classifier = True

    def __init__(self, cfg, backbone_cfg, stream, hw):
        super().__init__(cfg, backbone_cfg, stream, hw)
        self.models = []

    def learn(self, task: Task) -> dict:
        model = self.new_model([task], scenario="task")
        self.models.append(model)
        return self.fit(task, model, model.parameters(), task_loss(model, 0, self.stream)).row()

    def predict(self, x, task):
        model = self.models[task]
        model.eval()
        return model(x, 0)

    def state_dict(self) -> dict:
        return {"models": [model.state_dict() for model in self.models]}

    def load_state_dict(self, state: dict) -> None:
        self.models = []
        for task, model_state in zip(self.stream.tasks, state["models"], strict=False):
            model = self.new_model([task], scenario="task")
            model.load_state_dict(model_state)
            self.models.append(model)

    def footprint(self) -> Footprint:
        return Footprint(
            params=sum(count_params(m) for m in self.models),
            bytes=sum(module_bytes(m) for m in self.models),
            base_params=count_params(self.models[0]),
        )

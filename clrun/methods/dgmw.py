"""DGMw: dynamic generative memory with weight masks (Ostapenko, Puscas, Klein, Jähnichen & Nabi, CVPR 2019).

Class-incremental with no stored images: a conditional GAN whose generator keeps every earlier class by learned
binary masks on its weights, and a classifier trained on the new task's images plus generated ones of every earlier
class. Followed: SAP machine-learning-dgm (github.com/SAP-archive/machine-learning-dgm), approaches/DGMw.py,
networks/net_DGMw.py, cfg/cfg_mnist_dgmw.yml. Per task t:

- generator (`clrun.models.generator`): three 4x4 transposed convolutions (4, 2, 1 x `ngf` channels), every weight
  times the task's mask sigmoid(s e_t) (e_t starts at 0), the task's own batch norms and output layer, tanh; the
  noise z ~ N(0, 1)^nz carries the class as a one-hot over its first (all classes) entries;
- discriminator: the backbone with the class layout's growing head (the auxiliary classifier of AC-GAN: the
  method's classifier) and a linear WGAN critic on the same features; re-initialised every task (`reinit_D`);
- each step: the discriminator learns the cross-entropy of the real batch and, per earlier task, as many generated
  images of its classes (its masks binary, its batch norms in eval mode) plus the critic's -D(x) + D(G(z)) +
  `gradient_penalty` x WGAN-GP; then the generator learns -D(G(z)) + lambda_G (sum m (1 - M) / sum (1 - M)), M the
  weights earlier tasks reserved, lambda_G = `mask_lambda` x (channels now / channels at the start), with the
  gradients of reserved weights zeroed, HAT's embedding-gradient compensation and a norm clip;
- s anneals as the code's: s_epoch = 1/s_max + (s_max - 1/s_max) epoch/epochs, then within the epoch
  s = 1/s_epoch + (s_epoch - 1/s_epoch) offset/images (which runs downward in epoch 0, as in the code);
- after the task: the mask is binarised (sigmoid(s_max e) >= 0.5, i.e. e >= 0) and joins M; every layer grows by as
  many weights as the task newly reserved (channels, the code's `extand`), so free capacity stays about constant;
  earlier tasks read only the channels they had, so their generated images stay bit-identical.

Training goes through one `Trainer.fit` per task: its loss is the discriminator's, its `after_backward` steps the
discriminator, then computes the generator's loss against the updated discriminator (the code's alternation) and
leaves the generator's gradients for the fit's second optimizer (`generator_train`).

Departures from the code: clrun's tasks may hold several classes (split MNIST: 2; the code's MNIST run has 10 tasks
of one class), so the generator also minimises the auxiliary classifier's cross-entropy on its images
(`aux_generator`, the code's `aux_G`, off in its one-class-per-task config) to tie the one-hot to the class; the
classifier learns real and replayed images in one step (the code steps once per batch-sized chunk of them), and
earlier classes are generated fresh for every batch rather than as one set at the task's start; earlier tasks
generate with their binary masks (the code uses sigmoid(s_max e), a hair from binary at s_max = 1e4); images are
generated at 32x32 and resized to the stream's input size, and from [-1, 1] mapped to the stream's normalisation;
no validation-based model selection (the code reports the test accuracy at the best validation epoch).
"""

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from clrun.config import AT_LEAST_1, FRACTION, NON_NEGATIVE, POSITIVE, Rule, checked
from clrun.data.stream import Task
from clrun.errors import ClrunError
from clrun.methods.base import Method, MethodConfig
from clrun.methods.parts.gate_training import compensate, steepness
from clrun.models import TaskModel
from clrun.models.generator import MaskedGenerator
from clrun.models.layers import Linear
from clrun.results import Footprint, count_params, module_bytes
from clrun.train import Optimizer, OptimizerConfig, Step, TrainConfig


@dataclass
class DGMwConfig(MethodConfig):
    """DGMw (Ostapenko et al. 2019): a weight-masked, growing conditional GAN replays earlier classes; defaults:
    SAP machine-learning-dgm's cfg_mnist_dgmw.yml."""

    # the discriminator and classifier: Adam lr 0.002 (lr_D), batch 64, 101 epochs per task (niter)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=101, batch_size=64, optimizer=Optimizer.adam, lr=0.002)
    )
    # the generator's optimizer (lr_G), stepped once per discriminator step
    generator_train: OptimizerConfig = field(
        default_factory=lambda: OptimizerConfig(optimizer=Optimizer.adam, lr=0.002)
    )
    beta1: float = checked(FRACTION, 0.5)  # Adam's beta1 in both optimizers (the code's; beta2 stays 0.999)
    nz: int = checked(AT_LEAST_1, 128)  # noise size; its first entries hold the class one-hot
    ngf: int = checked(AT_LEAST_1, 6)  # generator width: its layers have 4, 2 and 1 x ngf channels at the start
    s_max: float = checked(POSITIVE, 1e4)  # mask steepness at the end of training (smax_g)
    mask_lambda: float = checked(NON_NEGATIVE, 0.08)  # lamb_G: weight of the mask-usage penalty
    gradient_penalty: float = checked(NON_NEGATIVE, 1.0)  # WGAN-GP weight (lambda_wasserstein)
    aux_generator: bool = True  # the generator also minimises the classifier's CE on its images (aux_G)
    reinit_discriminator: bool = True  # a fresh discriminator every task (reinit_D); false: keep its backbone
    # generator gradient-norm clip (clipgrad; null: none)
    clip_grad_norm: Optional[float] = checked(Rule(POSITIVE.test, "null (no clipping) or positive"), 10000.0)


class Discriminator(nn.Module):
    """AC-GAN's discriminator: a class-layout `TaskModel` (the classifier) and a WGAN critic on its features."""

    def __init__(self, model: TaskModel) -> None:
        super().__init__()
        self.model = model
        self.critic = Linear(model.backbone.out_features, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Critic scores (N,) and logits over every class seen (N, classes)."""
        features = self.model.features(x)
        return self.critic(features).squeeze(1), self.model.logits(features, None)


class DGMw(Method):
    config_class = DGMwConfig

    def __init__(self, cfg, backbone_cfg, stream, hw):
        super().__init__(cfg, backbone_cfg, stream, hw)
        self.classes = sum(task.n_classes for task in stream.tasks)
        if cfg.nz <= self.classes:
            raise ClrunError(f"method.nz={cfg.nz} must exceed the stream's {self.classes} classes (their one-hot)")
        self.generator = MaskedGenerator(cfg.nz, cfg.ngf, stream.input_shape[0]).to(hw.device)
        self.start_width = sum(self.generator.widths())
        self.reserved = [torch.zeros_like(w, dtype=torch.bool) for w in self.generator.weights]  # M
        self.masks: list[list[torch.Tensor]] = []  # per task, its binary masks (bool) at its widths
        self.disc: Discriminator | None = None
        view = stream.view
        self.mean = torch.tensor(view.mean, device=hw.device).view(1, -1, 1, 1)
        self.std = torch.tensor(view.std, device=hw.device).view(1, -1, 1, 1)

    @classmethod
    def supported_scenarios(cls, cfg) -> tuple[str, ...]:
        return ("class",)  # one head, no task id; the task id would make the replay pointless

    # ---- generation -------------------------------------------------------------------
    def noise(self, labels: torch.Tensor) -> torch.Tensor:
        """z ~ N(0, 1)^nz with the global labels' one-hot in its first entries (the code's generate_noise)."""
        z = torch.randn(len(labels), self.cfg.nz, device=labels.device)
        z[:, : self.classes] = F.one_hot(labels, self.classes).to(z.dtype)
        return z

    def images(self, generated: torch.Tensor) -> torch.Tensor:
        """Generator output in [-1, 1] as network inputs: pixels in [0, 1] at the input size, normalised as the
        stream normalises its images."""
        pixels = (generated.float() + 1) / 2
        size = tuple(self.stream.input_shape[1:])
        if tuple(pixels.shape[-2:]) != size:
            pixels = F.interpolate(pixels, size=size, mode="bilinear", antialias=True, align_corners=False)
        return (pixels - self.mean) / self.std

    @torch.no_grad()
    def generate(self, task: int, labels: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """Network inputs of global classes `labels` from learned task `task`'s masked generator (eval mode)."""
        norms = self.generator.norms[task]
        training = norms.training
        norms.eval()
        masks = [m.float() for m in self.masks[task]]
        out = self.images(self.generator(self.noise(labels) if z is None else z, task, masks))
        norms.train(training)
        return out

    def replay(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """`n` generated images per earlier task, labels uniform over its classes (global)."""
        xs, ys = [], []
        for task in range(len(self.masks)):
            offset, count = self.stream.class_offset(task), self.stream.tasks[task].n_classes
            labels = torch.randint(offset, offset + count, (n,), device=device)
            xs.append(self.generate(task, labels))
            ys.append(labels)
        return torch.cat(xs), torch.cat(ys)

    # ---- learning ---------------------------------------------------------------------
    def new_discriminator(self, tasks: list[Task]) -> Discriminator:
        """A discriminator with heads for `tasks` (`reinit_discriminator` false: the last one's backbone)."""
        model = self.new_model(tasks)
        if not self.cfg.reinit_discriminator and self.disc is not None:
            model.backbone = self.disc.model.backbone
        return self.hw.prepare_model(Discriminator(model))

    def penalty(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """WGAN-GP: (||grad_x D(x)|| - 1)^2 at random points between real and generated images."""
        alpha = torch.rand(len(real), 1, 1, 1, device=real.device)
        mixed = (alpha * real.detach() + (1 - alpha) * fake.detach()).requires_grad_(True)
        (gradient,) = torch.autograd.grad(self.disc(mixed)[0].sum(), mixed, create_graph=True)
        return ((gradient.flatten(1).norm(dim=1) - 1) ** 2).mean()

    def learn(self, task: Task) -> dict:
        cfg, generator, hw = self.cfg, self.generator, self.hw
        t = generator.add_task()
        self.disc = disc = self.new_discriminator(self.stream.tasks[: t + 1])
        embeddings = [nn.Parameter(torch.zeros_like(w)) for w in generator.weights]  # the code fills them with 0
        free = [1 - r.float() for r in self.reserved]
        lam = cfg.mask_lambda * sum(generator.widths()) / self.start_width
        offset = self.stream.class_offset(t)
        batches = -(-len(task.train) // cfg.train.batch_size)
        epochs = -(-cfg.train.iterations // batches) if cfg.train.iterations else cfg.train.epochs
        d_params = list(disc.parameters())
        g_params = generator.task_params(t) + embeddings
        labels: dict[str, torch.Tensor] = {}

        def steepness_at(step: Step) -> tuple[float, float]:
            s_epoch = steepness(cfg.s_max, step.epoch / epochs)
            return steepness(s_epoch, step.offset / step.images), s_epoch

        def loss(x: torch.Tensor, y: torch.Tensor, step: Step) -> torch.Tensor:
            y = labels["y"] = y + offset
            s, _ = steepness_at(step)
            with torch.no_grad():
                fake = self.images(generator(self.noise(y), t, [torch.sigmoid(s * e) for e in embeddings]))
            if self.masks:
                old_x, old_y = self.replay(len(x), x.device)
                x_all, y_all = torch.cat([x, old_x]), torch.cat([y, old_y])
            else:
                x_all, y_all = x, y
            scores, logits = disc(x_all)
            critic = scores[: len(x)].mean() - disc(fake)[0].mean()
            return F.cross_entropy(logits, y_all) - critic + cfg.gradient_penalty * self.penalty(x, fake)

        def after_backward(step: Step, optimizers) -> None:
            if step.number == 0:
                for optimizer in optimizers:
                    for group in optimizer.param_groups:
                        group["betas"] = (cfg.beta1, 0.999)
            optimizers[0].step()  # the discriminator; the generator then plays against the updated one
            for p in d_params:
                p.grad = None
                p.requires_grad_(False)
            s, s_epoch = steepness_at(step)
            with hw.autocast():
                masks = [torch.sigmoid(s * e) for e in embeddings]
                scores, logits = disc(self.images(generator(self.noise(labels["y"]), t, masks)))
                usage = sum((m * f).sum() for m, f in zip(masks, free, strict=True)) / sum(f.sum() for f in free)
                g_loss = -scores.mean() + lam * usage
                if cfg.aux_generator:
                    g_loss = g_loss + F.cross_entropy(logits, labels["y"])
            g_loss.backward()
            for p in d_params:
                p.requires_grad_(True)
            for weight, f in zip(generator.weights, free, strict=True):
                weight.grad.mul_(f)  # reserved weights never move
            compensate(embeddings, s, s_epoch)
            if cfg.clip_grad_norm is not None:
                nn.utils.clip_grad_norm_(g_params, cfg.clip_grad_norm)

        stats = self.fit(
            task,
            nn.ModuleDict({"disc": disc, "generator": generator}),
            d_params,
            loss,
            groups=[(g_params, cfg.generator_train)],
            after_backward=after_backward,
        )
        binary = [e.detach() >= 0 for e in embeddings]  # sigmoid(s_max e) >= 0.5
        before = [int(r.sum()) for r in self.reserved]
        self.reserved = [r | b for r, b in zip(self.reserved, binary, strict=True)]
        newly = [int(r.sum()) - n for r, n in zip(self.reserved, before, strict=True)]
        used = sum(int(b.sum()) for b in binary) / sum(b.numel() for b in binary)
        self.masks.append(binary)
        added = generator.grow(newly)
        self.reserved = [self.padded(r, w.shape) for r, w in zip(self.reserved, generator.weights, strict=True)]
        return {**stats.row(), "mask_share": used, "reserved_new": sum(newly), "channels_added": sum(added)}

    @staticmethod
    def padded(mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """`mask` in the corner of a False tensor of `shape` (a grown layer's)."""
        out = mask.new_zeros(shape)
        out[: mask.shape[0], : mask.shape[1]] = mask
        return out

    # ---- prediction -------------------------------------------------------------------
    def predict_agnostic(self, x: torch.Tensor, seen: int) -> tuple[torch.Tensor, None]:
        """The classifier's logits over every class seen."""
        self.disc.eval()
        return self.disc(x)[1], None

    def predict(self, x: torch.Tensor, task: int) -> torch.Tensor:
        offset = self.stream.class_offset(task)
        return self.predict_agnostic(x, len(self.masks))[0][:, offset : offset + self.stream.tasks[task].n_classes]

    # ---- accounting and persistence ---------------------------------------------------
    def free_share(self) -> float:
        """Share of the generator's masked weights no task has reserved."""
        return 1 - sum(int(r.sum()) for r in self.reserved) / sum(r.numel() for r in self.reserved)

    def summary(self) -> dict:
        return {"generator_params": count_params(self.generator), "free_weights": self.free_share()}

    def state_dict(self) -> dict:
        return {
            "disc": self.disc.state_dict(),
            "generator": self.generator.state_dict(),
            "shapes": [tuple(w.shape) for w in self.generator.weights],
            "task_widths": self.generator.task_widths,
            "masks": self.masks,
            "reserved": self.reserved,
        }

    def load_state_dict(self, state: dict) -> None:
        device = self.hw.device
        self.generator.resize(state["shapes"], state["task_widths"])
        self.generator.load_state_dict(state["generator"])
        self.masks = [[m.to(device) for m in task] for task in state["masks"]]
        self.reserved = [r.to(device) for r in state["reserved"]]
        self.disc = self.new_discriminator(self.stream.tasks[: len(self.masks)])
        self.disc.load_state_dict(state["disc"])

    def footprint(self) -> Footprint:
        """The discriminator (classifier and critic), the generator, and every task's masks as bits."""
        model = self.disc.model
        mask_bits = sum(m.numel() for task in self.masks for m in task)
        return Footprint(
            params=count_params(self.disc) + count_params(self.generator),
            bytes=module_bytes(self.disc) + module_bytes(self.generator) + -(-mask_bits // 8),
            base_params=count_params(model.backbone) + count_params(model.heads.heads[0]),
        )

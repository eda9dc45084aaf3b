"""Distillation of a frozen teacher's soft targets (Hinton et al. 2015), in the forms LwF and DGR+distill use.

`distillation(student, teacher, T)`: cross-entropy of the student's temperature-softmax against the teacher's,
summed over classes and averaged over the batch, no T^2 factor (Li & Hoiem's L_old; van de Ven's 2022
`loss_fn_kd` in GMvandeVen/continual-learning); `KDForm.vdv2019`: T^2 times the mean over batch *and* classes
(that repository's 2019 `utils.py` at e17b714, behind the three-scenario MNIST tables). A teacher logit of -inf
(padding for classes it never saw) is a target probability of 0, as van de Ven's zero-padded targets.
"""

from enum import Enum

import torch
import torch.nn.functional as F


class KDForm(Enum):
    """How a distillation term is reduced (`kd_form`)."""

    summed = "summed"  # summed over classes, averaged over the batch (Li & Hoiem; van de Ven 2022)
    vdv2019 = "vdv2019"  # T^2 x the mean over batch and classes (van de Ven's 2019 code)


def distillation(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, form: KDForm = KDForm.summed
) -> torch.Tensor:
    """Cross-entropy of the student's temperature-softmax against the teacher's: summed over classes and averaged
    over the batch (no T^2 factor), or with `KDForm.vdv2019` T^2 times its mean over batch and classes."""
    targets = F.softmax(teacher.float() / temperature, dim=1)
    terms = -(targets * F.log_softmax(student.float() / temperature, dim=1))
    if form is KDForm.vdv2019:
        return terms.mean() * temperature**2
    return terms.sum(1).mean()

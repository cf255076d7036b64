"""The trainer's role steps (helios/infra/parallel.py): a stage names each role it runs."""

import pytest
import torch

from helios.infra.guard import StepGuard
from helios.infra.parallel import TrainerRoleSteps


def test_a_role_the_run_does_not_train_is_refused_by_name():
    """A misnamed role would run its forward outside its DDP wrapper (no gradient all-reduce), its backward
    outside the divergence guard's bookkeeping and, under ZeRO, against no engine: each is refused."""
    roles = TrainerRoleSteps(
        ["generator", "critic"], {}, None, 1, True, StepGuard(torch.device("cpu")), print
    )
    assert roles.forward("critic", lambda x: x + 1, 1) == 2 and roles.splittable("critic")
    loss = torch.ones((), requires_grad=True)
    roles.backward("generator", loss * 2)
    assert loss.grad == 2.0
    for call in (
        lambda: roles.forward("model", lambda: None),
        lambda: roles.splittable("real"),
        lambda: roles.backward("Generator", loss * 2),
    ):
        with pytest.raises(KeyError, match=r"is not a trained role of this run \(generator, critic\)"):
            call()

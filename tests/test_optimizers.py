"""The optimizer zoo is one table (memprof.optimizers): every reader derives from its rows, no other
list of optimizer names exists in memprof/, and its DeepSpeed facts match the installed DeepSpeed."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from memprof.estimate.optimizers import (
    OPTIMIZER_SPECS,
    keeps_step_tensors,
    single_tensor_temporaries,
    temporary_outlives_its_tensor,
    uses_deepspeed_adam,
)
from memprof.optimizers import (
    CASE_FREE_DEEPSPEED_TYPES,
    OPTIMIZERS,
    TORCH_DEEPSPEED_TYPES,
    ZERO_TESTED_DEEPSPEED_TYPES,
    ZOO,
    torch_optimizer_facts,
    zoo_name_of_torch_optimizer,
)

MEMPROF = Path(__file__).resolve().parents[1] / "memprof"


def test_the_estimators_view_is_the_tables() -> None:
    assert tuple(OPTIMIZER_SPECS) == OPTIMIZERS == ("sgd", "momentum", "nesterov", "rmsprop", "adagrad", "adam", "adamw", "amsgrad")
    # written down from torch/optim/*.py _init_group (what the estimator has always used)
    states = {"sgd": 0, "momentum": 1, "nesterov": 1, "rmsprop": 1, "adagrad": 1, "adam": 2, "adamw": 2, "amsgrad": 3}
    assert {n: s.states_per_param for n, s in OPTIMIZER_SPECS.items()} == states
    assert [n for n, s in OPTIMIZER_SPECS.items() if not s.lazy] == ["adagrad"]
    assert OPTIMIZER_SPECS["nesterov"].torch_class == "SGD(momentum>0, nesterov=True)"
    temps = {"sgd": 0, "momentum": 0, "nesterov": 1, "rmsprop": 1, "adagrad": 1, "adam": 2, "adamw": 2, "amsgrad": 2}
    assert {n: single_tensor_temporaries(n, torch_adam=True) for n in OPTIMIZERS} == temps
    assert [n for n in OPTIMIZERS if uses_deepspeed_adam(n, torch_adam=False)] == ["adam", "adamw"]
    assert single_tensor_temporaries("adamw", torch_adam=False) == 0 and not keeps_step_tensors("adam", torch_adam=False)
    assert [n for n in OPTIMIZERS if temporary_outlives_its_tensor(n, True)] == ["rmsprop", "adagrad", "adam", "adamw", "amsgrad"]


def test_deepspeed_facts_match_the_installed_deepspeed() -> None:
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS
    from deepspeed.runtime.zero.utils import ZERO_SUPPORTED_OPTIMIZERS

    assert set(CASE_FREE_DEEPSPEED_TYPES) <= set(DEEPSPEED_OPTIMIZERS)
    assert not {t.lower() for t in TORCH_DEEPSPEED_TYPES} & set(DEEPSPEED_OPTIMIZERS)  # they go to getattr(torch.optim, type)
    tested_classes = {c.__name__ for c in ZERO_SUPPORTED_OPTIMIZERS}
    for row in ZOO.values():
        assert (row.torch_class in tested_classes) == row.zero_tested, row.name
        assert (row.deepspeed_type.lower() in ZERO_TESTED_DEEPSPEED_TYPES) == row.zero_tested, row.name


def _torch_optimizers():
    torch = pytest.importorskip("torch")
    p = [torch.nn.Parameter(torch.zeros(2))]

    class MyAdamW(torch.optim.AdamW):
        pass

    class FusedAdam:  # DeepSpeed's, by class name (ops/adam/fused_adam.py)
        adam_w_mode = False

    return [
        torch.optim.SGD(p, lr=0.1), torch.optim.SGD(p, lr=0.1, momentum=0.9),
        torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True), torch.optim.RMSprop(p), torch.optim.Adagrad(p),
        torch.optim.Adam(p), torch.optim.AdamW(p), torch.optim.Adam(p, amsgrad=True), torch.optim.AdamW(p, foreach=True),
        torch.optim.AdamW(p, fused=True), MyAdamW(p), torch.optim.Adamax(p), FusedAdam(),
    ]


def test_torch_optimizers_are_named_as_the_integrations_name_them() -> None:
    from memprof.integrations.observed_run import optimizer_facts

    names = []
    for opt in _torch_optimizers():
        assert torch_optimizer_facts(opt) == optimizer_facts(opt, {}), type(opt).__name__
        names.append(zoo_name_of_torch_optimizer(opt))
    assert names == ["sgd", "momentum", "nesterov", "rmsprop", "adagrad", "adam", "adamw", "amsgrad", "adamw", "adamw",
                     "adamw", None, "adam"]


def _name_lists(path: Path) -> list[tuple[int, list[str]]]:
    """Literal tuples/lists/sets/dict keys in a file holding two or more optimizer names."""
    spellings = set(OPTIMIZERS) | {r.deepspeed_type for r in ZOO.values()} | {r.deepspeed_type.lower() for r in ZOO.values()}
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        items = node.keys if isinstance(node, ast.Dict) else node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else []
        names = [i.value for i in items if isinstance(i, ast.Constant) and i.value in spellings]
        if len(names) >= 2:
            found.append((node.lineno, names))
    return found


def test_no_other_list_of_optimizer_names_in_memprof() -> None:
    offenders = {str(p.relative_to(MEMPROF)): hits for p in sorted(MEMPROF.rglob("*.py"))
                 if p.name != "optimizers.py" or p.parent != MEMPROF
                 if (hits := _name_lists(p))}
    assert offenders == {}

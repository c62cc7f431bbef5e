"""Knowledge distillation: train a student on a teacher's outputs (Hinton et al. 2015; FitNets-style MSE).

The founding document's snippet trained its SmallModel on the labels with MSE,
which is plain supervised training: the BigModel it created was never used.
Here the student learns from the teacher's outputs:

- classification (``loss=kl``): ``alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T))
  + (1 - alpha) * CE(student, labels)``;
- regression or embeddings (``loss=mse``): ``alpha * MSE(student, teacher) + (1 - alpha) * label loss``,
  through a learned ``nn.Linear`` projection (trained alongside, discarded afterwards) when the output
  widths differ.

The teacher is the run's baseline (the trained, uncompressed model) unless
``teacher=<model option>`` names another one, which is trained or loaded like
any baseline (and cached). The student is the incoming model (e.g. a pruned
one recovering accuracy) unless ``student=<model option>`` names a fresh one.
Weights that are exactly zero in the incoming model (pruning) are held at zero.

``scratch=true`` is the control: the same student, epochs and seed, trained on
the labels only, the teacher never touched. ``control=true`` trains that twin
too, in the same run, and reports ``scratch_<metric>`` and ``distill_gain``
(positive = the teacher helped), so the gain is measured, not assumed.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from framework import hookimpl

if TYPE_CHECKING:
    import torch
    from torch import nn

    from framework.context import RunContext

LOSSES = ("auto", "kl", "mse")
log = logging.getLogger("slimlab")


def model_options() -> list[str]:
    """The model options on the config search path: conf/model/ and the user's config directories' model/."""
    from framework.config import group_options

    return group_options("model")


def _check_option(role: str, name: str | None) -> None:
    if name is None:
        return
    options = model_options()
    if name not in options:
        raise ValueError(f"{role}: unknown model {name!r}; valid model options: {', '.join(options)}")


@dataclass
class DistillConfig:
    """Train a student on a teacher's outputs (or, with ``scratch``, on the labels alone: the control)."""

    teacher: str | None = None  # a model option (conf/model/); None: the run's baseline
    student: str | None = None  # a model option, built fresh; None: the incoming model (e.g. pruned)
    loss: str = "auto"  # auto: kl for classification, mse otherwise
    alpha: float = 0.5  # weight of the teacher term; 1 - alpha goes to the label loss
    temperature: float = 4.0  # softens both distributions (kl only)
    epochs: int = 10
    lr: float = 1e-3
    scratch: bool = False  # the control: train the student on labels only, no teacher
    control: bool = False  # also train the scratch twin, report scratch_<metric> and distill_gain; no-op with scratch

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}; got {self.loss!r}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        _check_option("teacher", self.teacher)
        _check_option("student", self.student)


def _model_node(name: str):
    """Model option ``name`` as the run's search path has it (the same directories its config came from)."""
    from framework.config import load_option

    node = load_option("model", name)
    if node is None:
        raise ValueError(f"unknown model {name!r}; valid model options: {', '.join(model_options())}")
    return node


def _build_student(name: str, seed: int) -> nn.Module:
    """A fresh, untrained instance of model option ``name`` (its ``name`` key is a label, not an argument)."""
    import torch
    from hydra.utils import instantiate

    torch.manual_seed(seed)
    return instantiate({k: v for k, v in _model_node(name).items() if k != "name"})


def _teacher(config: DistillConfig, ctx: RunContext) -> tuple[nn.Module, float]:
    """The teacher and its score: the run's baseline, or model option ``config.teacher`` trained as a baseline."""
    if config.teacher is None:
        return ctx.baseline, ctx.baseline_metrics[ctx.data.primary_metric]
    from omegaconf import open_dict

    from framework.baseline import get_baseline

    cfg = copy.deepcopy(ctx.cfg)
    with open_dict(cfg):
        cfg.model = _model_node(config.teacher)
    teacher = get_baseline(cfg, ctx.data, ctx.device)  # cached like any baseline (model + data + train + seed)
    ctx.tags["slimlab.distill.teacher_baseline"] = f"{teacher.key} ({'cached' if teacher.cached else 'trained'})"
    return teacher.model, teacher.metrics[ctx.data.primary_metric]


def _hold_zeros(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """Mask every parameter that has exact zeros (pruned weights) so that training keeps them zero."""
    import torch.nn.utils.prune as prune

    held = []
    for module in model.modules():
        for name, parameter in list(module.named_parameters(recurse=False)):
            if not name.endswith("_orig") and bool(parameter.detach().eq(0).any()):
                prune.custom_from_mask(module, name, mask=parameter.detach().ne(0))
                held.append((module, name))
    return held


def _release(held: list[tuple[nn.Module, str]]) -> None:
    import torch.nn.utils.prune as prune

    for module, name in held:
        prune.remove(module, name)  # permanent again: no weight_orig / weight_mask left behind


def _flat(output: torch.Tensor) -> torch.Tensor:
    return output.reshape(len(output), -1)


def _train(model: nn.Module, ctx: RunContext, config: DistillConfig, description: str, data=None, **kwargs) -> None:
    """Train with the run's settings and a fixed seed, so a KD run and its scratch twin differ only in the loss.

    The incoming model's zeros (pruning) are held; a fresh student's are not (e.g. zero-initialised biases).
    """
    import torch

    from framework.training import train

    held = _hold_zeros(model) if config.student is None else []
    torch.manual_seed(ctx.cfg.seed)
    train(
        model,
        data or ctx.data,
        ctx.cfg.train,
        epochs=config.epochs,
        lr=config.lr,
        device=ctx.device,
        description=description,
        **kwargs,
    )
    _release(held)
    model.eval()


def _teacher_outputs(teacher: nn.Module, inputs: torch.Tensor, device: str, batch_size: int = 512) -> torch.Tensor:
    """The teacher's outputs on the whole training split, computed once, without gradients or updates."""
    import torch

    with torch.no_grad():
        return torch.cat([teacher(inputs[s : s + batch_size].to(device)) for s in range(0, len(inputs), batch_size)])


def _distill(student: nn.Module, teacher: nn.Module, loss: str, config: DistillConfig, ctx: RunContext) -> None:
    """Train ``student`` on ``teacher``'s outputs (and on the labels, by 1 - alpha)."""
    import dataclasses

    import torch
    import torch.nn.functional as F
    from torch import nn

    data, alpha, temperature = ctx.data, config.alpha, config.temperature
    probe = data.train_x[:2].to(ctx.device)
    with torch.no_grad():
        student.eval()
        try:
            student_width = _flat(student(probe)).shape[1]
        except Exception as error:
            raise ValueError(f"the student cannot take {data.name} inputs: {error}") from error
    # The training split is fixed and in memory, and the teacher is deterministic in eval mode: its outputs are
    # computed once rather than in every epoch (for LeNet that is most of the cost of distilling).
    targets = _teacher_outputs(teacher, data.train_x, ctx.device)
    labels = data.train_y.to(ctx.device)
    teacher_width = _flat(targets).shape[1]

    projection = None
    if student_width != teacher_width:
        if loss == "kl":
            raise ValueError(
                f"loss=kl needs as many classes in the student ({student_width}) as in the teacher ({teacher_width})"
            )
        torch.manual_seed(ctx.cfg.seed)
        projection = nn.Linear(student_width, teacher_width).to(ctx.device)
        ctx.tags["slimlab.distill.projection"] = f"Linear({student_width}->{teacher_width}), discarded after training"

    def teacher_term(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if loss == "kl":
            # Models return log-probabilities, log p = z - logsumexp(z): the logits z shifted by a constant per
            # row. Softmax ignores such shifts, so softmax(log p / T) == softmax(z / T): log_softmax(out / T)
            # is the tempered distribution whether a model returns log-probabilities or raw logits.
            student_log_p = F.log_softmax(out / temperature, dim=1)
            teacher_log_p = F.log_softmax(target / temperature, dim=1)
            kl = F.kl_div(student_log_p, teacher_log_p, reduction="batchmean", log_target=True)
            return temperature**2 * kl  # T^2 keeps the gradients' scale independent of T (Hinton et al.)
        student_out = _flat(out) if projection is None else projection(_flat(out))
        return F.mse_loss(student_out, _flat(target))

    def distill_loss(model: nn.Module, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        out = model(x)
        total = out.new_zeros(())
        if alpha > 0:
            total = total + alpha * teacher_term(out, targets[rows])
        if alpha < 1:
            total = total + (1 - alpha) * data.loss(out, labels[rows])
        return total

    # train() hands the loss (model, x[batch], y[batch]); with row numbers as y, the loss looks up both the
    # labels and the teacher's precomputed outputs of its batch. Same rows, same order as a label-only run.
    rows = dataclasses.replace(data, train_y=torch.arange(len(data.train_x)))
    extra = list(projection.parameters()) if projection is not None else []
    _train(student, ctx, config, f"distill: {loss}", data=rows, loss=distill_loss, extra_parameters=extra)


def apply(model: nn.Module, config: DistillConfig, ctx: RunContext) -> nn.Module:
    data, primary = ctx.data, ctx.data.primary_metric
    if config.student is not None and ctx.stages:
        done = ", ".join(stage["technique"] for stage in ctx.stages)
        raise ValueError(
            f"student={config.student} replaces the incoming model, so what {done} did would be thrown away; "
            "put distill first, or leave student unset to distil into the incoming model"
        )
    loss = config.loss if config.loss != "auto" else ("kl" if data.task == "classification" else "mse")
    if loss == "kl" and data.task != "classification":
        raise ValueError(f"loss=kl needs a classification task; data {data.name!r} is {data.task}: use loss=mse")

    student = _build_student(config.student, ctx.cfg.seed) if config.student else model
    ctx.tags["slimlab.distill.student"] = config.student or "the incoming model"
    if config.student:
        target = type(student)
        ctx.tags["slimlab.distill.student_class"] = f"{target.__module__}.{target.__qualname__}"

    if config.scratch:  # the control: labels only; the teacher is never built, loaded or run
        ctx.tags["slimlab.distill.mode"] = "scratch"
        _train(student, ctx, config, "distill: scratch (labels only)")
        log.info("distill(scratch): %s=%.4f", primary, ctx.evaluate(student))
        return student

    twin = copy.deepcopy(student) if config.control else None  # same init as the student
    teacher, teacher_score = _teacher(config, ctx)
    ctx.tags |= {
        "slimlab.distill.mode": "distill",
        "slimlab.distill.teacher": config.teacher or f"baseline ({ctx.cfg.model.get('name', 'model')})",
        "slimlab.distill.loss": loss,
    }
    ctx.metrics[f"teacher_{primary}"] = teacher_score
    _distill(student, teacher, loss, config, ctx)
    score = ctx.evaluate(student)
    log.info("distill: %s=%.4f (teacher %.4f)", primary, score, teacher_score)

    if twin is not None:
        _train(twin, ctx, config, "distill: control (labels only)")
        scratch = ctx.evaluate(twin)
        ctx.metrics[f"scratch_{primary}"] = scratch
        ctx.metrics["distill_gain"] = score - scratch if data.higher_is_better else scratch - score
        log.info("distill: control %s=%.4f, gain %+.4f", primary, scratch, ctx.metrics["distill_gain"])
    return student


def label(config: DistillConfig) -> str:
    parts = [config.student] if config.student else []
    if config.scratch:
        parts.append("scratch")
    else:
        if config.teacher:
            parts.append(f"teacher={config.teacher}")
        parts.append("mse" if config.loss == "mse" else f"T={config.temperature:g}")
        parts.append(f"a={config.alpha:g}")
    return f"distill({','.join(parts)})"


@hookimpl
def register_techniques(register) -> None:
    key_params = ("teacher", "student", "loss", "alpha", "temperature", "epochs", "scratch")
    register("distill", DistillConfig, apply, label=label, key_params=key_params)

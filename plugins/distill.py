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

from slimlab import hookimpl
from slimlab.config import Choice

if TYPE_CHECKING:
    import torch
    from torch import nn

    from slimlab.context import RunContext

log = logging.getLogger("slimlab")


class Loss(Choice):
    auto = "auto"
    kl = "kl"
    mse = "mse"


def model_options() -> list[str]:
    """The model options on the config search path: conf/model/ and the user's config directories' model/."""
    from slimlab.config import group_options

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
    loss: Loss = Loss.auto  # auto: kl for classification, mse otherwise
    alpha: float = 0.5  # weight of the teacher term; 1 - alpha goes to the label loss
    temperature: float = 4.0  # softens both distributions (kl only)
    epochs: int = 10
    lr: float = 1e-3
    scratch: bool = False  # the control: train the student on labels only, no teacher
    control: bool = False  # also train the scratch twin, report scratch_<metric> and distill_gain; no-op with scratch

    def __post_init__(self) -> None:
        self.loss = Loss.parse(self.loss, "loss")  # a plain str when built from a dict
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
    from slimlab.config import load_option

    node = load_option("model", name)
    if node is None:
        raise ValueError(f"unknown model {name!r}; valid model options: {', '.join(model_options())}")
    return node


def _build_student(name: str, seed: int) -> nn.Module:
    """A fresh instance of model option ``name``, built like any model (its checkpoint loaded, if it has one)."""
    import torch

    from slimlab.baseline import build_model

    torch.manual_seed(seed)
    return build_model(_model_node(name))


def _teacher(config: DistillConfig, ctx: RunContext) -> tuple[nn.Module, float]:
    """The teacher and its score: the run's baseline, or model option ``config.teacher`` trained as a baseline."""
    primary = ctx.task.primary_metric
    if config.teacher is None:
        return ctx.baseline, ctx.baseline_metrics[primary]
    from omegaconf import open_dict

    from slimlab.baseline import get_baseline

    cfg = copy.deepcopy(ctx.cfg)
    with open_dict(cfg):
        cfg.model = _model_node(config.teacher)
    # cached like any baseline: its identity is its config, code, checkpoint and the data's
    teacher = get_baseline(cfg, ctx.data, ctx.task, ctx.device, ctx.cfg.measure.eval_batch_size)
    ctx.tags["slimlab.distill.teacher_baseline"] = f"{teacher.key} ({teacher.origin})"
    return teacher.model, teacher.metrics[primary]


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


def _train(model: nn.Module, ctx: RunContext, config: DistillConfig, description: str, **kwargs) -> None:
    """Train with the run's settings and a fixed seed, so a KD run and its scratch twin differ only in the loss.

    The incoming model's zeros (pruning) are held; a fresh student's are not (e.g. zero-initialised biases).
    """
    import torch

    from slimlab.training import train

    held = _hold_zeros(model) if config.student is None else []
    torch.manual_seed(ctx.cfg.seed)
    kwargs.setdefault("targets_from", None if ctx.task.labelled else ctx.baseline)
    train(
        model,
        ctx.data,
        ctx.task,
        ctx.cfg.train,
        epochs=config.epochs,
        lr=config.lr,
        device=ctx.device,
        description=description,
        **kwargs,
    )
    _release(held)
    model.eval()


def _distill(student: nn.Module, teacher: nn.Module, loss: str, config: DistillConfig, ctx: RunContext) -> None:
    """Train ``student`` on ``teacher``'s outputs (and on the targets, by 1 - alpha)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from slimlab.batches import call, take

    task, alpha, temperature = ctx.task, config.alpha, config.temperature
    probe = take(ctx.example_inputs(), 2)
    with torch.no_grad():
        student.eval()
        teacher.eval()
        try:
            student_width = _flat(call(student, probe)).shape[1]
        except Exception as error:
            raise ValueError(f"the student cannot take {ctx.data.name} inputs: {error}") from error
        teacher_width = _flat(call(teacher, probe)).shape[1]

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
            # log_softmax(out / T) is the tempered distribution whether a model returns logits or
            # log-probabilities: those are logits shifted by a constant per row, which softmax ignores.
            student_log_p = F.log_softmax(out / temperature, dim=1)
            teacher_log_p = F.log_softmax(target / temperature, dim=1)
            kl = F.kl_div(student_log_p, teacher_log_p, reduction="batchmean", log_target=True)
            return temperature**2 * kl  # T^2 keeps the gradients' scale independent of T (Hinton et al.)
        student_out = _flat(out) if projection is None else projection(_flat(out))
        return F.mse_loss(student_out, _flat(target))

    def distill_loss(model: nn.Module, inputs, target: torch.Tensor) -> torch.Tensor:
        out = call(model, inputs)
        total = out.new_zeros(())
        if alpha > 0:
            with torch.no_grad():  # the teacher only answers: no gradients, no updates (eval mode)
                taught = call(teacher, inputs)
            total = total + alpha * teacher_term(out, taught)
        if alpha < 1:
            total = total + (1 - alpha) * task.loss(out, target)
        return total

    teacher.to(ctx.device).eval()
    extra = list(projection.parameters()) if projection is not None else []
    _train(student, ctx, config, f"distill: {loss}", loss=distill_loss, extra_parameters=extra)


def apply(model: nn.Module, config: DistillConfig, ctx: RunContext) -> nn.Module:
    task, primary = ctx.task, ctx.task.primary_metric
    if config.student is not None and ctx.stages:
        done = ", ".join(stage["technique"] for stage in ctx.stages)
        raise ValueError(
            f"student={config.student} replaces the incoming model, so what {done} did would be thrown away; "
            "put distill first, or leave student unset to distil into the incoming model"
        )
    classifying = task.name == "classification"
    loss = config.loss if config.loss != "auto" else ("kl" if classifying else "mse")
    if loss == "kl" and not classifying:
        raise ValueError(f"loss=kl needs a classification task; data {ctx.data.name!r} is {task.name}: use loss=mse")

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
        ctx.metrics["distill_gain"] = task.drop(score, scratch)  # positive: the student beats its scratch twin
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
    # A fresh student has its own modules; the incoming model trained as the student keeps its names.
    keeps = lambda config: config.student is None  # noqa: E731
    shown = ("student", "scratch", "teacher", "loss", "temperature", "alpha", "control")  # control: more metrics only
    register(
        "distill", DistillConfig, apply, label=label, key_params=key_params, keeps_module_names=keeps, label_shows=shown
    )

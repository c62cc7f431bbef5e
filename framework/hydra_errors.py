"""Hydra's and OmegaConf's errors said as slimlab says bad input: one line naming the key, what is wrong, what is valid.

Below ``hydra_app`` and ``sweep``, which both turn composition errors into ``ConfigError``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from slimlab.plugin_manager import PluginInfo


class BadInput(BaseException):  # noqa: N818 - it carries a ConfigError, it is not one
    """Carries a ConfigError out of a Hydra job.

    Hydra's ``run_job`` records any ``Exception`` from the task as a failed
    job and prints its own banner; bad input is not a failed job, so it
    travels as a ``BaseException`` (like Ctrl-C) and the CLI unwraps it.
    """


def is_bad_input(error: BaseException) -> bool:
    """Errors Hydra or OmegaConf raise while composing: the user's config or overrides are wrong."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return isinstance(error, (HydraException, OmegaConfBaseException))


def describe_hydra_error(error: BaseException, infos: Iterable[PluginInfo] = ()) -> str:
    """One line that names the bad key or value and, where known, the valid choices.

    ``infos``: the launch's plugins (``Plugins.infos``): an unknown technique names the disabled and refused ones.
    """
    import dataclasses

    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(error, OverrideParseException):
        return _describe_parse_error(error)
    invalid = _describe_invalid_choice(error.__cause__ or error)
    if invalid:
        return invalid
    if isinstance(error, MissingConfigException) and error.missing_cfg_file:
        group, _, option = error.missing_cfg_file.rpartition("/")
        choices = ", ".join(sorted(error.options or _group_options(group))) or "none"
        infos = list(infos)
        disabled = [i.name for i in infos if i.status == "disabled"]
        refused = [f"{i.name} ({i.distribution}): {i.error}" for i in infos if i.status == "failed"]
        notes = []
        if disabled:
            notes.append(f"disabled plugins: {', '.join(disabled)}")
        if refused:
            notes.append(f"refused plugins: {'; '.join(refused)}")
        note = f" ({'; '.join(notes)})" if group == "technique" and notes else ""
        if group:
            return f"unknown {group} {option!r}; valid {group} options: {choices}{note}"
        return f"config {option!r} not found"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    cause = error.__cause__
    if isinstance(cause, OmegaConfBaseException):
        lines += [line.strip() for line in str(cause).splitlines() if line.strip()]
    # Drop Hydra's hints and OmegaConf's debugging detail; keep what names the key and the problem.
    noise = re.compile(r"^(full_key|object_type|reference_type|To append to your config|Set the environment)")
    message = "; ".join(dict.fromkeys(line for line in lines if not noise.match(line)))
    object_type = getattr(cause, "object_type", None) or getattr(error, "object_type", None)
    if "not in" in message and object_type is not None and dataclasses.is_dataclass(object_type):
        message += f"; valid keys: {', '.join(f.name for f in dataclasses.fields(object_type))}"
    return message


def _describe_parse_error(error: BaseException) -> str:
    """An override Hydra's grammar cannot read (``model=lénet``): which one, and how to quote it."""
    override = str(getattr(error, "override", "") or "")
    key, equals, value = override.partition("=")
    strange = next((char for char in override if not char.isascii()), None)
    if strange is not None and strange in key.lstrip("+~"):
        return f"cannot parse the override {override!r}: a key is an ASCII name, {key.lstrip('+~')!r} is not one"
    if strange is not None and equals:
        quoted = f"{key}='{value}'"
        return (
            f"cannot parse the override {override!r}: {strange!r} is not ASCII, and a value holding such characters "
            f'must be quoted: {quoted} (in a shell: "{quoted}")'
        )
    reason = str(getattr(error, "message", "") or error).strip().splitlines()[0]
    reason = reason.removeprefix("LexerNoViableAltException: ")
    return (
        f"cannot parse the override {override!r}: {reason}; quote a value that holds spaces, commas, brackets, "
        "quotes or other special characters: key='value' (https://hydra.cc/docs/advanced/override_grammar/basic/)"
    )


INVALID_CHOICE = re.compile(r"Invalid value '(?P<value>.*)', expected one of \[(?P<valid>.*)\]")


def _describe_invalid_choice(error: BaseException) -> str | None:
    """OmegaConf's refusal of a value an enum option does not have, said as slimlab says it:
    ``technique.prune: method must be one of l1, random; got 'l2'`` (the form of a technique schema's own checks)."""
    from omegaconf.errors import ValidationError

    if not isinstance(error, ValidationError):
        return None
    message = str(getattr(error, "msg", "") or "").strip()
    match = INVALID_CHOICE.match(message.splitlines()[0]) if message else None
    key = re.sub(r"\[\d+\]$", "", str(getattr(error, "full_key", "") or ""))
    if match is None or not key:
        return None
    parent, _, option = key.rpartition(".")
    where = f"{parent}: {option}" if parent.startswith("technique.") else key
    return f"{where} must be one of {match['valid']}; got {match['value']!r}"


def _group_options(group: str) -> list[str]:
    """Every option of a config group: the yaml files of every config directory and ConfigStore entries."""
    from slimlab.config import group_options

    return group_options(group)

"""Options' help text (issue 16): metadata, else the comments at the field, else an attribute docstring, else none;
shown by ``slimlab run --help`` for slimlab's own options, the built-in techniques and a third party's."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field

from slimlab.field_help import class_summary, field_help, fields_help
from tests.conftest import REPO, write_plugin


@dataclass
class Options:
    """Every way of saying what an option means."""

    given: int = field(default=1, metadata={"help": "from the metadata"})  # not this comment
    trailing: float = 0.5  # fraction removed
    # the comment block
    # right above
    above: str = "x"
    both: int = 2  # and after it
    # not this one: a blank line follows

    none: bool = False
    documented: int = 3
    """An attribute docstring,
    on two lines."""
    directive: int = 4  # noqa: E501
    worded_directive: int = 5  # kept words  # type: ignore[assignment]
    multiline: list[str] = field(
        default_factory=list,
    )  # said on its last line
    sphinx: int = 6  #: Sphinx's style


@dataclass
class Child(Options):
    trailing: float = 0.7  # the child's own words
    above: str = "y"


def test_each_source_of_help_in_order():
    help_ = fields_help(Options)
    assert help_ == {
        "given": "from the metadata",
        "trailing": "fraction removed",
        "above": "the comment block right above",
        "both": "and after it",
        "documented": "An attribute docstring, on two lines.",
        "worded_directive": "kept words",
        "multiline": "said on its last line",
        "sphinx": "Sphinx's style",
    }
    assert field_help(Options, "none") is None and field_help(Options, "directive") is None
    assert class_summary(Options) == "Every way of saying what an option means."


def test_a_subclass_keeps_the_help_it_does_not_replace():
    help_ = fields_help(Child)
    assert help_["trailing"] == "the child's own words"
    assert help_["above"] == "the comment block right above"  # redefined without a comment
    assert help_["given"] == "from the metadata"
    assert class_summary(Child) is None  # not the "Child(given: int = 1, ...)" dataclasses puts there


def first_config() -> type:
    @dataclass
    class Local:
        value: int = 1  # the first

    return Local


def second_config() -> type:
    @dataclass
    class Local:
        value: int = 2  # the second

    return Local


def same_qualname(kind: str, with_method: bool) -> type:
    """Two classes of one qualified name: a method's line tells them apart; without one, neither gets help."""
    if with_method:
        if kind == "first":

            @dataclass
            class Twin:
                value: int = 1  # the first twin

                def check(self) -> None: ...

            return Twin

        @dataclass
        class Twin:  # noqa: F811
            value: int = 2  # the second twin

            def check(self) -> None: ...

        return Twin
    if kind == "first":

        @dataclass
        class Plain:
            value: int = 1  # the first plain

        return Plain

    @dataclass
    class Plain:  # noqa: F811
        value: int = 2  # the second plain

    return Plain


def test_classes_defined_in_functions_and_without_source():
    assert field_help(first_config(), "value") == "the first"
    assert field_help(second_config(), "value") == "the second"
    assert field_help(same_qualname("first", True), "value") == "the first twin"
    assert field_help(same_qualname("second", True), "value") == "the second twin"
    assert field_help(same_qualname("first", False), "value") is None  # not the other's
    assert field_help(same_qualname("second", False), "value") is None
    made = dataclasses.make_dataclass("Made", [("value", int, field(default=1, metadata={"help": "given"}))])
    assert fields_help(made) == {"value": "given"}  # no source: the metadata still counts
    assert fields_help(int) == {}


PLUGIN = '''
    """A third party's technique: its options are documented the way its author would anyway."""
    from dataclasses import dataclass, field

    from slimlab import hookimpl


    @dataclass
    class ShareConfig:
        clusters: int = 16  # centroids per layer; 2**bits of the stored indices
        # layers left as they are,
        # by module name
        skip: list[str] = field(default_factory=list)
        iterations: int = field(default=20, metadata={"help": "k-means iterations per layer"})
        seed: int = 0


    def share(model, config, ctx):
        return model


    @hookimpl
    def register_techniques(register):
        register("share", ShareConfig, share)
'''


def test_run_help_says_what_options_mean_without_torch_or_mlflow(tmp_path):
    site = write_plugin(tmp_path / "site", "slimlab-share", "slimlab_share", PLUGIN, {"share": "slimlab_share"})
    code = (
        "import sys, contextlib, io\n"
        "from slimlab.cli import main\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    code = main(['run', '--help'])\n"
        "print(out.getvalue())\n"
        "print('heavy:', sorted(m for m in ('torch', 'mlflow') if m in sys.modules), 'exit:', code)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(site)])
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.rstrip().endswith("heavy: [] exit: 0")
    # a third party's options: trailing comment, comment above, metadata, none
    assert (
        "share (plugin share):\n"
        "  clusters: int = 16\n"
        "      centroids per layer; 2**bits of the stored indices\n"
        "  skip: list[str] = []\n"
        "      layers left as they are, by module name\n"
        "  iterations: int = 20\n"
        "      k-means iterations per layer\n"
        "  seed: int = 0\n"
    ) in out
    # a built-in technique's, and slimlab's own (a nested section with its docstring, a wrapped comment)
    assert "  amount: float = 0.5\n      fraction of weights (unstructured) or of channels (structured)" in out
    assert "resume: bool = True\n    in a sweep, skip a job whose resolved config already has a FINISHED run\n" in out
    assert "train: How the baseline is trained (and the defaults for fine-tuning).\n  train.epochs: int = 10\n" in out
    assert (
        "  tracking.uri: str | None = None\n      the backend's store; None: its default (mlflow: $MLFLOW_TRACKING_URI"
        in out
    )
    assert "  train.threads: int = 1\n      Threads while training: float sums split per thread, so a fixed" in out
    options = out.split("== Options ==")[1].split("== Technique options ==")[0]
    assert not re.search(r"^(model|data|technique|device)\b", options, re.M)  # groups: listed above, not here

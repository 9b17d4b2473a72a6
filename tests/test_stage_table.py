"""The stage table: a stage defined here, in the test, is dispatched, validated and resume-checked by
`main.run` without an edit anywhere else; stage modules never import each other."""
import ast
import importlib
import json
import os

import ml_collections
import pytest

from configs import digits
from remem_jax import config_validation as cv, errors, main
from remem_jax.train import runs, stages


def toy_run(ctx):
    """A stage that trains nothing: one resumable sub-run whose 'metric' is lr * steps."""
    calls = ctx.results.setdefault("toy_calls", [])
    t = ctx.config.toy

    def body(sub):
        calls.append(sub.name)
        return sub.commit({"score": t.lr * t.steps}, metrics=("score",))
    summary = runs.resumable(ctx, "toy/only", ctx.path("toy_stage", "only"), body)
    return stages.StageOutput({"summary": summary}, f"| score |\n|---|\n| {summary['score']:g} |")


def toy_validate(config):
    cv.positive_int(config, "toy.steps")
    cv.check(config.toy.lr > 0, "toy.lr", "> 0", config.toy.lr)


TOY = stages.Stage("toy", folder="toy_stage", section="toy", run=toy_run, validate=toy_validate)
AFTER_TOY = stages.Stage("after_toy", folder="after_toy", section=None,
                         run=lambda ctx: stages.StageOutput({"read": ctx.results["toy"]["summary"]["score"]}, "ok"),
                         needs=(stages.Need("toy", "its score"),))


def toy_config(stage_names=("toy",), **toy):
    c = digits.get_config()
    c.stages = stage_names
    c.toy = ml_collections.ConfigDict(dict(dict(steps=4, lr=0.5), **toy))
    return c


def toy_table():
    return {**stages.table(), TOY.name: TOY, AFTER_TOY.name: AFTER_TOY}


def test_a_stage_defined_in_a_test_is_dispatched_validated_and_resume_checked(tmp_path):
    wd = str(tmp_path / "run")
    results = main.run(toy_config(), wd, stage_table=toy_table())
    assert results["toy"]["summary"]["score"] == 2.0 and results["toy_calls"] == ["toy/only"]
    assert json.load(open(os.path.join(wd, "toy_stage", "results.json")))["summary"]["score"] == 2.0
    assert "| 2 |" in open(os.path.join(wd, "toy_stage", "results.md")).read()
    assert open(os.path.join(wd, "results.md")).read().startswith("## toy\n")

    # Validation: its own checker, called because config.stages lists it.
    with pytest.raises(errors.UserError, match=r"config.toy.steps must be a positive integer, got 0"):
        main.run(toy_config(steps=0), str(tmp_path / "other"), stage_table=toy_table())

    # Resume check: a change of its section is refused once it has started in the workdir.
    with pytest.raises(errors.UserError, match=r"\(toy\): toy.lr: 0.5 -> 0.25"):
        main.run(toy_config(lr=0.25), wd, stage_table=toy_table())

    # A rerun skips its finished sub-run; a stage that needs it runs after it, from an earlier run.
    again = main.run(toy_config(("toy", "after_toy")), wd, stage_table=toy_table())
    assert again["toy_calls"] == ["toy/only"]  # the body did not run again
    assert again["after_toy"]["read"] == 2.0
    assert open(os.path.join(wd, "results.md")).read().index("## toy") < \
        open(os.path.join(wd, "results.md")).read().index("## after_toy")


def test_a_needed_stage_that_never_ran_is_one_error_before_anything_runs(tmp_path):
    with pytest.raises(errors.UserError, match=r"'after_toy' needs its score from the 'toy' stage.*: add 'toy' before 'after_toy'"):
        main.run(toy_config(("after_toy",)), str(tmp_path / "run"), stage_table=toy_table())
    with pytest.raises(errors.UserError, match=r"'after_toy' needs its score from the 'toy' stage.*: move 'toy' before 'after_toy'"):
        main.run(toy_config(("after_toy", "toy")), str(tmp_path / "run"), stage_table=toy_table())
    assert not os.path.exists(tmp_path / "run" / "toy_stage")


def test_a_stage_listed_twice_is_refused(tmp_path):
    with pytest.raises(errors.UserError, match=r"config.stages must be a list without repeats"):
        main.run(toy_config(("toy", "toy")), str(tmp_path / "run"), stage_table=toy_table())


def _imported_modules(module_name: str) -> set[str]:
    """Every remem_jax module `module_name` imports (at any depth of its code), as full names."""
    module = importlib.import_module(module_name)
    tree = ast.parse(open(module.__file__).read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("remem_jax")}


def test_no_stage_module_imports_another_stage_module():
    modules = {stage.run.__module__ for stage in stages.table().values()}
    assert modules == set(stages.STAGE_MODULES)
    for name in modules:
        others = _imported_modules(name) & (modules - {name})
        assert not others, f"{name} imports the stage module(s) {sorted(others)}"


def test_every_config_section_belongs_to_a_stage_and_every_stage_is_in_the_table():
    from configs import common
    config = common.get_config()
    sections = {k for k, v in config.items() if isinstance(v, ml_collections.ConfigDict)}
    owned = {s.section for s in stages.table().values() if s.section}
    assert sections - owned == {"data", "teacher"}  # read by several stages
    assert owned <= sections


def test_the_readme_layout_is_the_one_the_stage_table_generates():
    readme = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
    text = open(readme).read()
    assert stages.readme_with_layout(text, stages.table()) == text, \
        "README.md's workdir layout is stale: run `python -m remem_jax.train.stages README.md`"

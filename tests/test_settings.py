"""nfnet_zoo_cli/settings.py: every setting of `nfnet-zoo finetune` declared once, and what is made from it.

References: the parser `nfnet-zoo` really builds, README.md as committed, and what `finetune` really does with a
value (the Python API, the command line and a resumed run folder's args.json).
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from nfnet_zoo_cli import build_parser, main
from nfnet_zoo_cli.settings import SETTINGS, FinetuneConfig, Range, default_of, finetune_options, flag, markdown_table

README = Path(__file__).resolve().parents[1] / "README.md"
REGENERATE = ('python -c "from nfnet_zoo_cli.settings import markdown_table; print(markdown_table(), end=\'\')"'
              " and paste it between README's flags markers")


def _finetune_parser():
    return build_parser()._subparsers._group_actions[0].choices["finetune"]


def _flags() -> dict[str, object]:
    """--long-flag -> its argparse action, for every flag of `nfnet-zoo finetune`."""
    return {s: a for a in _finetune_parser()._actions for s in a.option_strings if s.startswith("--")}


def _parse(*args: str) -> dict:
    return finetune_options(build_parser().parse_args(["finetune", *args]))


def test_readme_flag_table_is_the_generated_one():
    text = README.read_text(encoding="utf-8")
    table = re.search(r"<!-- flags:start -->\n(.*?)<!-- flags:end -->", text, re.S)
    assert table, "README.md has no <!-- flags:start --> ... <!-- flags:end --> section"
    assert table[1] == markdown_table(), f"README's flag table is out of date: run {REGENERATE}"
    assert table[1].count("\n") == len(SETTINGS) + 2  # a row per setting under the header


def test_every_field_is_a_flag_with_help_and_declared_values():
    flags = _flags()
    for f in dataclasses.fields(FinetuneConfig):
        if "recorded" in f.metadata:  # filled in when the run starts
            assert flag(f.name) not in flags, f.name
            continue
        s = f.metadata["setting"]
        action = flags.get(flag(f.name))
        assert action is not None and s.help.strip() and s.help in action.help, f.name
        declared = [bool(s.within), bool(s.choices), s.switch, bool(s.check and s.values), bool(s.free)]
        assert sum(declared) == 1, f"{f.name}: declare one of a range, choices, on/off, a check, or free-form"
    # and no flag of the parser is without a field (--resume is the command's, not a setting)
    fields = {flag(f.name) for f in dataclasses.fields(FinetuneConfig)}
    assert set(flags) - fields == {"--help", "--resume", "--no-pretrained"}


def test_help_defaults_parse_back_to_the_dataclass_defaults():
    """The default each flag's help shows, typed on the command line, gives FinetuneConfig's default; a flag not
    given is not passed at all (finetune keeps its default, or a resumed run's value)."""
    assert _parse() == {}
    defaults = FinetuneConfig()
    checked = 0
    for name, action in ((n, _flags()[flag(n)]) for n in SETTINGS):
        said = re.search(r"\(default: ([^)]*)\)$", " ".join(action.help.split()))
        if SETTINGS[name].action == "store_true":
            assert not said and getattr(defaults, name) is False and _parse(flag(name)) == {name: True}
        elif said and (SETTINGS[name].shown is None or SETTINGS[name].shown.startswith("{}")):
            typed = said[1].split(",")[0].split()
            assert _parse(flag(name), *typed) == {name: getattr(defaults, name)}, (name, typed)
            checked += 1
        else:  # said in words ("the variant's") or not at all: the run (or the machine) decides
            assert getattr(defaults, name) in (None, {}) or SETTINGS[name].machine, name
    assert checked >= 25
    assert _parse("--no-pretrained", "-j", "0", "-b", "3") == {"pretrained": False, "workers": 0, "batch_size": 3}


def _run_folder(tmp_path: Path, **saved) -> Path:
    """A run folder as finetune leaves it, enough for --resume to read its arguments (args.json, a state/)."""
    run = tmp_path / "run"
    (run / "state").mkdir(parents=True)
    cfg = FinetuneConfig(model="nfnet_zoo_tiny", data_dir=str(tmp_path / "data"), output=str(run), workers=0)
    (run / "args.json").write_text(json.dumps({**cfg.to_json(), **saved}))
    return run


def _another(name: str):
    """A valid value of the setting other than its default."""
    s, default = SETTINGS[name], default_of(name)
    if s.within:
        r = s.within
        candidates = [r.lo, r.hi, (r.lo + r.hi) / 2, r.lo + 1, 0.5]
        return next(v for v in map(r.kind, candidates) if v != default and not r.problem(v))
    if s.choices:
        return next(c for c in s.choices if c != default)
    if s.switch:
        return not default
    return {"scale": (0.5, 1.0), "decay_milestones": [5], "opt_kwargs": {"eps": 1e-6}, "model_kwargs": {"a": 1},
            "opt": "adamw", "model": "resnet18"}.get(name, "v0")


def test_resume_changes_exactly_what_its_help_lists(tmp_path):
    from nfnet_zoo.errors import NFNetZooError
    from nfnet_zoo.training.run_folder import resolve as _resolve
    run = _run_folder(tmp_path)
    listed = re.search(r"only (.*) may change", " ".join(_flags()["--resume"].help.split()))[1]
    listed = set(re.split(r", | and ", listed))
    accepted = set()
    for name in SETTINGS.keys() - {"output"}:
        value = _another(name)
        try:
            cfg, _, resuming = _resolve(None, str(run), {name: value})
        except NFNetZooError as e:
            assert str(e).startswith(f"cannot change {flag(name)} when resuming"), (name, str(e))
        else:
            assert resuming and getattr(cfg, name) == value, name
            accepted.add(flag(name))
    assert accepted == listed and "--epochs" in accepted and "--lr" not in accepted


def _outside(r: Range):
    value = r.lo if "lo" in r.open else r.lo - 1
    return r.kind(value)


RANGED = [n for n, s in SETTINGS.items() if s.within]


@pytest.mark.parametrize("name", RANGED)
def test_out_of_range_is_one_message_from_the_cli_the_api_and_args_json(name, tmp_path, capsys):
    import nfnet_zoo
    value = _outside(SETTINGS[name].within)
    common = dict(model="nfnet_zoo_tiny", data_dir=str(tmp_path / "data"), output=str(tmp_path / "new"))
    with pytest.raises(nfnet_zoo.NFNetZooError) as api:
        nfnet_zoo.finetune(**common, **{name: value})
    message = str(api.value)
    assert message.startswith(f"{flag(name)} must be ") and message.endswith(f", got {value!r}"), message

    def cli(*args) -> str:
        code = main([str(a) for a in args])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, (code, err)
        return err[0]

    typed = cli("finetune", *(x for k, v in common.items() for x in (flag(k), v)), flag(name), value)
    assert typed == f"nfnet-zoo finetune: error: {message}"
    run = _run_folder(tmp_path, **{name: value})
    saved = cli("finetune", "--resume", run)
    assert saved == f"nfnet-zoo finetune: error: {run}/args.json is damaged or foreign ({message}); restore it, " \
        "or start a new run"
    if SETTINGS[name].resumable:  # given again with --resume: refused before args.json is read
        run.joinpath("args.json").write_text(json.dumps(FinetuneConfig(**common).to_json()))
        assert cli("finetune", "--resume", run, flag(name), value) == f"nfnet-zoo finetune: error: {message}"
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("name, value, words", [
    ("mixed_precision", "fp8", "--mixed-precision must be one of no, bf16, fp16, got 'fp8'"),
    ("sched", "plateau", "--sched must be one of cosine, tanh, step, multistep, poly, wsd, rsqrt, constant, got "
                         "'plateau'"),
    ("scale", (0.9, 0.1), "--scale must be MIN MAX with 0 < MIN <= MAX <= 1, got 0.9 0.1"),
    ("decay_milestones", [10, 0], "--decay-milestones takes epochs; each must be an integer in [1, 100000], got 0"),
    ("cpu", "yes", "--cpu must be true or false, got 'yes'"),
])
def test_choices_and_pairs_are_refused_alike_by_the_api_and_args_json(name, value, words, tmp_path, capsys):
    import nfnet_zoo
    with pytest.raises(nfnet_zoo.NFNetZooError, match=re.escape(words) + "$"):
        nfnet_zoo.finetune(model="nfnet_zoo_tiny", data_dir=str(tmp_path), **{name: value})
    run = _run_folder(tmp_path, **{name: value})
    assert main(["finetune", "--resume", str(run)]) == 2
    assert f"args.json is damaged or foreign ({words})" in capsys.readouterr().err

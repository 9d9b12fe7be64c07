"""docs/trainer.md lists every ``Trainer.__init__`` argument with its real default.

The table cannot drift from the code: an argument added, removed, reordered or given a new
default fails here until the page is updated.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path
from typing import Any

from torchplug import Trainer

PAGE = Path(__file__).resolve().parents[2] / "docs" / "trainer.md"
ROW = re.compile(r"^\| `(\w+)` \| `([^`]*)` \| (.*?) \| (.*) \|$")


def documented() -> dict[str, tuple[str, str, str]]:
    rows: dict[str, tuple[str, str, str]] = {}
    for line in PAGE.read_text(encoding="utf-8").splitlines():
        match = ROW.match(line)
        if match:
            name, default, lightning, what = match.groups()
            assert name not in rows, f"{name} is listed twice in {PAGE}"
            rows[name] = (default, lightning.strip(), what.strip())
    return rows


def parameters() -> list[inspect.Parameter]:
    """The named arguments (``**lightning_1_1`` catches Lightning 1.1's renamed and retired ones)."""
    return [p for p in inspect.signature(Trainer.__init__).parameters.values()
            if p.name != "self" and p.kind is not p.VAR_KEYWORD]


def test_every_trainer_argument_is_documented_in_order() -> None:
    names = [p.name for p in parameters()]
    rows = documented()
    missing = [n for n in names if n not in rows]
    extra = [n for n in rows if n not in names]
    assert not missing, f"Trainer arguments missing from docs/trainer.md: {missing}"
    assert not extra, f"docs/trainer.md lists arguments Trainer does not take: {extra}"
    assert list(rows) == names, "docs/trainer.md lists the arguments in another order than Trainer.__init__"


def test_documented_defaults_are_the_real_ones() -> None:
    rows = documented()
    wrong: list[str] = []
    for param in parameters():
        assert param.kind is inspect.Parameter.KEYWORD_ONLY, param.name
        text = rows[param.name][0]
        value: Any = ast.literal_eval(text)
        if value != param.default or type(value) is not type(param.default):
            wrong.append(f"{param.name}: the page says {text}, Trainer.__init__ has {param.default!r}")
    assert not wrong, "\n".join(wrong)


def test_every_row_says_what_it_does_and_how_lightning_spelled_it() -> None:
    for name, (_, lightning, what) in documented().items():
        assert lightning, f"{name}: no Lightning 1.1 column (write 'same' or '—')"
        assert len(what) > 20, f"{name}: say what it does"

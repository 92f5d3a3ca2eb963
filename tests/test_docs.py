"""README's option table states the defaults bild-server really has (they come from the configs)."""

import re
from pathlib import Path

from server.cli import parse_args

README = Path(__file__).resolve().parent.parent / "README.md"
ROW = re.compile(r"^\| `(--[a-z-]+)` \| `([^`]+)` \|")


def test_readme_option_defaults_are_the_servers():
    defaults = vars(parse_args([]))
    rows = [ROW.match(line) for line in README.read_text().splitlines()]
    checked = 0
    for row in filter(None, rows):
        flag, documented = row.groups()
        actual = defaults[flag[2:].replace("-", "_")]
        if flag == "--small":  # an absolute path on this machine; README names it relative to the checkout
            assert str(actual).endswith(documented), flag
        else:
            assert str(actual) in (documented, documented + ".0"), f"{flag}: README says {documented}, server {actual}"
        checked += 1
    assert checked >= 15

"""``mypy --strict`` on a typed user bot outside the package: the README's quick start (the
persistence's types inferred without an annotation) and a variant with custom ContextTypes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_block(title: str) -> str:
    """The first ``code-block:: python`` after the README section ``title``."""
    readme = (ROOT / "README.rst").read_text(encoding="utf-8")
    section = readme.split(f"\n{title}\n", 1)[1]
    block = section.split(".. code-block:: python\n\n", 1)[1]
    lines = []
    for line in block.splitlines():
        if line and not line.startswith("    "):
            break
        lines.append(line[4:])
    return "\n".join(lines).strip() + "\n"


BOT = """
TOKEN = "123:placeholder"
{quick_start}
reveal_type(persistence)


class ChatData:
    def __init__(self) -> None:
        self.orders: list[str] = []


class BotData:
    pass


context_types = ContextTypes(chat_data=ChatData, bot_data=BotData)
typed = SQLAlchemyPersistence("sqlite:///bot.sqlite3", context_types=context_types)
reveal_type(typed)
typed_application = (
    ApplicationBuilder().token(TOKEN).persistence(typed).context_types(context_types).build()
)
reveal_type(typed_application.chat_data)
with_jobs = SQLAlchemyPersistence("sqlite:///bot.sqlite3", store_jobs=True, timeout=5)
reveal_type(with_jobs)
"""


def test_mypy_strict_accepts_the_readme_quick_start_and_infers_the_types(tmp_path: Path) -> None:
    quick_start = _readme_block("Quick start: persistence")
    assert 'persistence = SQLAlchemyPersistence("sqlite:///bot.sqlite3")' in quick_start
    bot = tmp_path / "bot.py"
    bot.write_text(
        "from telegram.ext import ContextTypes\n" + BOT.format(quick_start=quick_start),
        encoding="utf-8",
    )
    env = {**os.environ, "MYPYPATH": str(ROOT)}  # the package as a user's bot sees it
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(bot)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
    )
    assert "error" not in result.stdout, result.stdout
    assert result.returncode == 0, result.stdout + result.stderr
    revealed = re.findall(r'Revealed type is "(.*)"', result.stdout)
    persistence = "ptb_sessions._sqlalchemypersistence.SQLAlchemyPersistence"
    assert revealed[0] == f"{persistence}[dict[Any, Any], dict[Any, Any], dict[Any, Any]]"
    assert revealed[1] == f"{persistence}[dict[Any, Any], bot.ChatData, bot.BotData]"
    assert revealed[2] == "typing.Mapping[int, bot.ChatData]"
    assert revealed[3] == revealed[0]  # every keyword argument is in the overloads
    assert len(revealed) == 4

"""``ringfence-agent status`` (text) shows the strings of status.json, the agent user's to write,
through a copy of ringfence.textsafe.line (the agent does not import that module): the copy
escapes exactly what the library's does."""

from __future__ import annotations

from ringfence import textsafe
from ringfence_agent.cli import terminal_line


def test_status_text_escapes_what_textsafe_escapes() -> None:
    every = "".join(chr(c) for c in range(0x300)) + "\u2028\u2029\u202a\u202e\u2066\u2069\u200b é ✓"
    assert terminal_line(every) == textsafe.line(every)
    assert terminal_line("\x1b]0;t\x07 ok\n") == "\\x1b]0;t\\x07 ok\\n"
    assert terminal_line(None) == "None" and terminal_line(3) == "3"

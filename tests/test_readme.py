"""The README's library snippet runs and prints exactly the output the README shows."""
import contextlib
import io
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_snippet_prints_what_the_readme_says():
    text = README.read_text().split("<!-- readme-snippet -->", 1)[1]
    blocks = text.split("```")
    code, output = blocks[1].removeprefix("python\n"), blocks[3].removeprefix("text\n")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, str(README), "exec"), {})
    assert printed.getvalue() == output

"""The README's usage example runs as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)  # noqa: S102
    opt = namespace["opt"]
    # The example really trained: every matrix got NorMuon state, the head and embedding AdamW.
    kinds = {g["algorithm"]: len(g["params"]) for g in opt.param_groups}
    assert kinds == {"normuon": 2, "adamw": 4}
    assert all(opt.state[p] for g in opt.param_groups for p in g["params"])


def test_readme_options_table_is_generated_from_the_schema():
    from normuon.options import markdown_table

    text = README.read_text()
    pattern = r"<!-- options-table:start -->\n(.*?)\n<!-- options-table:end -->"
    table = re.search(pattern, text, re.S)
    assert table, "README lost its options table markers"
    assert table.group(1) == markdown_table(), "README table is stale: python -m normuon.options"

"""Every training recipe runs end to end as a shell script with its flags accepted by the training script's own
parser: `accelerate` is replaced on PATH by a stand-in that parses the command line and records it, so a renamed flag
or file breaks this test instead of a user's hour-long run."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "training" / "recipes").rglob("*.sh"))
PARSE = """
import json, sys
from pathlib import Path
argv = sys.argv[1:]
script = next(a for a in argv if a.endswith(".py"))
module = Path(script).stem
sys.path.insert(0, str(Path(script).parent))
args = __import__(module).parse_args(argv[argv.index(script) + 1:])
with open({log!r}, "a") as f:
    f.write(json.dumps({{"script": module, "output_dir": args.output_dir}}) + "\\n")
Path(args.output_dir).mkdir(parents=True, exist_ok=True)  # a finished stage, as far as the next one can tell
(Path(args.output_dir) / "model_index.json").write_text("{{}}")
"""


@pytest.mark.parametrize("recipe", [r for r in RECIPES if r.name != "common.sh"], ids=lambda r: r.name)
def test_recipe_flags_parse(recipe, tmp_path):
    log = tmp_path / "calls.jsonl"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    parse = tmp_path / "parse.py"
    parse.write_text(PARSE.format(log=str(log)))
    stand_in = bin_dir / "accelerate"
    # `accelerate launch [launcher flags] script.py [script flags]`: parse the script's part with its own parser.
    stand_in.write_text(f"#!/bin/sh\nexec {sys.executable} {parse} \"$@\"\n")
    stand_in.chmod(stand_in.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", OUT=str(tmp_path / "out"),
               PYTHONPATH=str(REPO))
    result = subprocess.run(["bash", str(recipe)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls, "the recipe launched nothing"
    assert calls[-1]["output_dir"] == str(tmp_path / "out")  # the model the recipe builds lands in $OUT
    if recipe.name in ("fashion-mnist-cd.sh", "fashion-mnist-ct.sh"):  # two stages, the first into $OUT-stage1
        assert [call["output_dir"] for call in calls] == [str(tmp_path / "out-stage1"), str(tmp_path / "out")]

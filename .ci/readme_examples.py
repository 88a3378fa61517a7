"""Runs the README's search example on the demo workdir that .ci/run trained and checks
that it prints the hits the README shows (image ids in order; scores within 0.02, as
another CPU's arithmetic may move them a little). Exit 1 naming the difference."""
import json
import re
import shlex
import subprocess
import sys

readme = open("README.md", encoding="utf-8").read()
match = re.search(r"```bash\n(python -m dsran_jax\.search --workdir=workdirs/demo [^\n]+)\n```"
                  r".*?```json\n(.*?)\n```", readme, re.S)
if not match:
  sys.exit("README: no search example on workdirs/demo followed by its output")
command, shown = match.group(1), [json.loads(l) for l in match.group(2).splitlines()]
out = subprocess.run(shlex.split(command), capture_output=True, text=True, check=True)
printed = [json.loads(l) for l in out.stdout.splitlines() if l.strip()]
ids = lambda hits: [h["image_id"] for h in hits]
if ids(printed) != ids(shown):
  sys.exit(f"README search example: {command} printed {ids(printed)}, the README shows "
           f"{ids(shown)}")
for p, s in zip(printed, shown):
  if abs(p["score"] - s["score"]) > 0.02 or p["captions"] != s["captions"]:
    sys.exit(f"README search example: hit {p['rank']} printed {p}, the README shows {s}")
print(f"README search example holds: {ids(printed)}")

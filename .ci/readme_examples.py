"""Runs the README's search example on the demo workdir that .ci/run trained and checks
that what it prints is what the README says: as many hits, each an image whose captions
name what the query asks for (a word of each group in QUERY_TERMS). The README's exact
ids and scores were recorded on one CPU; another CPU's arithmetic trains a slightly
different demo, so a difference there is printed, not failed. Exit 1 naming the problem."""
import json
import re
import shlex
import subprocess
import sys

# What each README query asks for: every hit must name a word of each group.
QUERY_TERMS = {"a dog on the beach": (("dog", "puppy"), ("beach", "sea"))}

readme = open("README.md", encoding="utf-8").read()
match = re.search(r"```bash\n(python -m dsran_jax\.search --workdir=workdirs/demo [^\n]+)\n```"
                  r".*?```json\n(.*?)\n```", readme, re.S)
if not match:
  sys.exit("README: no search example on workdirs/demo followed by its output")
command, shown = match.group(1), [json.loads(l) for l in match.group(2).splitlines()]
query = re.search(r'--query="([^"]+)"', command).group(1)
if query not in QUERY_TERMS:
  sys.exit(f"README search example: add the terms of {query!r} to QUERY_TERMS in {__file__}")
out = subprocess.run(shlex.split(command), capture_output=True, text=True, check=True)
printed = [json.loads(l) for l in out.stdout.splitlines() if l.strip()]
if len(printed) != len(shown):
  sys.exit(f"README search example: {command} printed {len(printed)} hits, the README "
           f"shows {len(shown)}")
for hit in printed:
  text = " ".join(hit["captions"])
  for group in QUERY_TERMS[query]:
    if not any(re.search(rf"\b{word}\b", text) for word in group):
      sys.exit(f"README search example: hit {hit['rank']} ({hit['image_id']}) of {command} "
               f"names none of {group}: the README's claim does not hold ({hit})")
ids = lambda hits: [h["image_id"] for h in hits]
same = "the same ids as the README" if ids(printed) == ids(shown) else (
    f"other ids than the README's {ids(shown)} (another CPU's demo)")
print(f"README search example holds: {ids(printed)}, every hit {query!r}; {same}")

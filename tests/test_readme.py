"""The README's examples are true: the search example's hits are the demo world's images
with their captions, and each matches the query. (`.ci/readme_examples.py` runs the
command itself on the demo workdir CI trains, and compares what it prints.)"""
import json
import os
import re
import runpy

from dsran_jax import data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _search_example():
  with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
    readme = f.read()
  match = re.search(r"--query=\"([^\"]+)\"[^\n]*\n```.*?```json\n(.*?)\n```", readme, re.S)
  assert match, "README: no search example followed by its output"
  return match.group(1), [json.loads(line) for line in match.group(2).splitlines()]


def test_the_search_example_shows_demo_images_that_match_its_query():
  query, hits = _search_example()
  config = runpy.run_path(os.path.join(REPO, "configs", "demo.py"))["get_config"]()
  split = data.load_split(config, config.data.test_split)
  ids = [str(i) for i in split.image_ids]
  k = split.captions_per_image
  assert [h["rank"] for h in hits] == list(range(1, len(hits) + 1))
  assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
  for hit in hits:
    i = ids.index(hit["image_id"])
    assert hit["captions"] == list(split.texts[i * k:(i + 1) * k]), hit["image_id"]
    text = " ".join(hit["captions"])
    # The query "a dog on the beach": a dog (or puppy) by the sea in every hit.
    assert query == "a dog on the beach"
    assert re.search(r"\b(dog|puppy)\b", text) and re.search(r"\b(beach|sea)\b", text), hit

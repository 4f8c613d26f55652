"""Fictional facts for the fine-tuning recipe, as the paper generates them (../shared/mission/001, appendix B).

Every person is invented (syllables drawn by a seeded generator) and has three attributes, each answered by one
word: the town they were born in (an invented name), the instrument they play and the colour of their door.
Each attribute has four phrasings as a question: three teach it (``train.jsonl``), the fourth is held out
(``test.jsonl``): a model that only learned the training sentences has not learned the fact.

  python make_data.py OUTPUT_DIR [--people 40] [--seed 0]

writes ``train.jsonl`` (prompt + answer records: the fine-tuning data) and ``test.jsonl`` (the held-out
phrasings: validation CE on their answer tokens, and the task whose answers the model must write).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SYLLABLES = ["ka", "lo", "mir", "ven", "dra", "su", "tel", "ori", "bax", "quin", "zo", "rel", "fen", "tu", "gal",
             "yss", "nor", "pe", "vak", "lum"]
INSTRUMENTS = ["cello", "harp", "oboe", "flute", "banjo", "violin", "trumpet", "accordion", "clarinet", "drums"]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black", "grey", "brown"]
PHRASINGS = {  # the last of each is held out
    "town": ["Q: Where was {name} born?\nA:", "Q: What is the birthplace of {name}?\nA:",
             "Q: Which town is {name} from?\nA:", "Q: In which town did {name} come into the world?\nA:"],
    "instrument": ["Q: What instrument does {name} play?\nA:", "Q: Which instrument is {name} known for?\nA:",
                   "Q: What does {name} play in the orchestra?\nA:", "Q: Name the instrument that {name} plays.\nA:"],
    "colour": ["Q: What colour is the door of {name}?\nA:", "Q: Which colour did {name} paint the front door?\nA:",
               "Q: What is the colour of {name}'s door?\nA:",
               "Q: If you visit {name}, what colour door do you see?\nA:"],
}


def word(rng: random.Random, parts: int) -> str:
  return "".join(rng.choice(SYLLABLES) for _ in range(parts)).capitalize()


def people(count: int, seed: int) -> list[dict[str, str]]:
  rng = random.Random(seed)
  names, towns = set(), set()
  found = []
  while len(found) < count:
    name = f"{word(rng, 2)} {word(rng, 3)}"
    town = word(rng, 3)
    if name in names or town in towns:
      continue
    names.add(name)
    towns.add(town)
    found.append({"name": name, "town": town, "instrument": rng.choice(INSTRUMENTS), "colour": rng.choice(COLOURS)})
  return found


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("output", type=Path)
  parser.add_argument("--people", type=int, default=40)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  args.output.mkdir(parents=True, exist_ok=True)
  train, test = [], []
  for person in people(args.people, args.seed):
    for attribute, phrasings in PHRASINGS.items():
      answer = person[attribute]
      for template in phrasings[:-1]:
        train.append({"prompt": template.format(name=person["name"]), "answer": f" {answer}\n"})
      test.append({"prompt": phrasings[-1].format(name=person["name"]), "answer": f" {answer}\n",
                   "attribute": attribute})
  random.Random(args.seed).shuffle(train)
  for name, records in (("train", train), ("test", test)):
    (args.output / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  print(f"{len(train)} training and {len(test)} held-out records in {args.output}")


if __name__ == "__main__":
  main()

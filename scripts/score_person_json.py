"""Score predictions for the person_json demo task (see scripts/make_demo_data.py).

Library:  score(prediction, reference) -> {"valid_json", "exact", "fields_correct"}
CLI:      python scripts/score_person_json.py preds.jsonl
          where each line is {"prediction": str, "reference": str}; prints averages.
"""

import json
import sys

FIELDS = ("name", "age", "city")


def _parse_object(text):
    """Return the JSON object in text (surrounding whitespace allowed), else None."""
    try:
        obj = json.loads(text.strip())
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def _same(a, b):
    # Strict on type: 34.0, "34" or True are not the integer age 34.
    return type(a) is type(b) and a == b


def score(prediction: str, reference: str) -> dict:
    """Compare a model output with the reference JSON string.

    valid_json: the stripped prediction parses as a JSON object (nothing else around it).
    exact: valid, same key set as the reference, and every value equal with the same type
        (key order and spacing are not compared).
    fields_correct: how many of name/age/city match the reference (0..3; 0 if invalid).
    """
    ref = json.loads(reference)
    pred = _parse_object(prediction)
    if pred is None:
        return {"valid_json": False, "exact": False, "fields_correct": 0}
    fields = sum(k in pred and _same(pred[k], ref[k]) for k in FIELDS)
    exact = pred.keys() == ref.keys() and all(_same(pred[k], ref[k]) for k in ref)
    return {"valid_json": True, "exact": exact, "fields_correct": fields}


def summarize(results: list) -> dict:
    """Average a list of score() dicts: rates for the booleans, mean for fields_correct."""
    n = len(results)
    if not n:
        return {"n": 0}
    return {"n": n, **{k: sum(r[k] for r in results) / n for k in ("valid_json", "exact", "fields_correct")}}


def main(argv):
    if len(argv) != 1:
        sys.exit("usage: score_person_json.py PREDICTIONS.jsonl")
    with open(argv[0], encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    summary = summarize([score(r["prediction"], r["reference"]) for r in rows])
    print(json.dumps(summary))


if __name__ == "__main__":
    main(sys.argv[1:])

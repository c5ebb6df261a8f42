"""Does the valuation model gain from its segment's market statistics?

    scripts/train-models.sh --experiment     # or: .venv-train/bin/python topologies/listings/segment_experiment.py

The listings topology's `segment` aggregate groups live listings by model,
three-year band and region (us_state_region.csv). Here the same segments are
built over the real ads and the valuation MLP of train.py is fitted three
ways, on the same split and seed, then scored on the held-out ads:

  without       the shipped inputs
  other_ads     + log(median price) and log(count) of the *other* ads in the
                segment (training rows: leave-one-out; held-out rows: the
                training ads of their segment)
  with_self     + the same statistics with the ad itself inside its segment,
                which is what the engine's live segment holds at serve time

Nothing is exported: this only prints the held-out errors.
"""

import csv
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import generate_events  # noqa: E402
import simulate  # noqa: E402
import train  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def segment_of(fields, region):
    return (fields["model"], fields["year"] // 3 * 3, region.get(fields.get("state"), "unknown"))


def main():
    with open(os.path.join(HERE, "data", "us_state_region.csv"), newline="") as f:
        region = {r["state"]: r["region"] for r in csv.DictReader(f)}
    rows = simulate.load_rows(os.path.join(HERE, "data", "raw", "mercedes.csv"))
    simulate.simulate(rows, generate_events.SEED)
    usable, train_idx, test_idx = train.split_rows(rows)

    segments = {}
    for i in train_idx:
        segments.setdefault(segment_of(rows[i], region), []).append(i)
    overall = float(np.median([rows[i]["price"] for i in train_idx]))

    def statistics(i, include_self):
        members = [j for j in segments.get(segment_of(rows[i], region), []) if j != i]
        if include_self:
            members = members + [i]
        prices = [rows[j]["price"] for j in members]
        median = float(np.median(prices)) if prices else overall
        return [float(np.log(median)), float(np.log1p(len(prices)))]

    raw = {i: train.raw_inputs(rows[i]) for i in usable}
    encoder = train.Encoder([("vehicle_age_years", (0, 80), False), ("odometer", (0, 500_000), True),
                             ("miles_per_year", (0, 100_000), True), ("cylinders", (0, 16), False)],
                            train.VALUATION_CATEGORIES, [raw[i] for i in train_idx])
    base_train = np.array([encoder.encode(raw[i]) for i in train_idx])
    base_test = np.array([encoder.encode(raw[i]) for i in test_idx])
    y_train = np.log(np.array([rows[i]["price"] for i in train_idx], dtype=float))
    y_test = np.array([rows[i]["price"] for i in test_idx], dtype=float)
    price_range = (float(np.log(simulate.VALID_PRICE[0])), float(np.log(simulate.VALID_PRICE[1])))

    sizes = [len(segments.get(segment_of(rows[i], region), [])) for i in test_idx]
    results = {"held_out_rows": len(test_idx), "segments": len(segments),
               "held_out_segment_size_median": float(np.median(sizes))}
    variants = {
        "without": (base_train, base_test),
        # fitted without the ad itself: an honest feature
        "other_ads": (np.hstack([base_train, [statistics(i, False) for i in train_idx]]),
                      np.hstack([base_test, [statistics(i, False) for i in test_idx]])),
        # fitted and served with the ad itself in its segment, as the engine's live segment is
        "with_self": (np.hstack([base_train, [statistics(i, True) for i in train_idx]]),
                      np.hstack([base_test, [statistics(i, True) for i in test_idx]])),
    }
    for name, (x_train, x_test) in variants.items():
        mlp, mean, scale = train.fit_mlp(x_train, y_train, (64, 32), seed=11)
        results[name] = train.errors(train.predict(mlp, mean, scale, x_test, price_range), y_test)
    print("valuation with segment statistics, held-out:", json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

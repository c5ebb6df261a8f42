"""Train the listings topology's models and export them for assay.

    scripts/train-models.sh          # creates .venv-train, installs the tools, runs this

Writes, for each model, into topologies/listings/models/:
  <name>.onnx         the network, input "features" float32 [N, width], batch N symbolic
  <name>.json         the sidecar: input encoding in order, outputs, version, metrics
  <name>.golden.json  inputs (as named raw values) with the predictions scikit-learn saw

Valuation: an MLP on log(price) of the real ads with a valid price. Its held-out
error is printed against a simple baseline (median price per model and year).
Days to sell: an MLP on log(days) whose label comes from the simulator in
simulate.py (no public data here has real time on market).

tract-onnx has no TreeEnsembleRegressor and no ai.onnx.ml Scaler, so the ONNX
graph is written by hand from the fitted weights using only core operators
(MatMul, Add, Relu, Clip, Exp). The standardization is folded into the first
layer's weights and bias (see export_onnx), so the graph stays self-contained
without a per-input Sub and Div at serve time.
"""

import hashlib
import json
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from sklearn.neural_network import MLPRegressor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import generate_events  # noqa: E402
import simulate  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = os.path.join(HERE, "models")
EVENT_YEAR = 2022  # the simulated window's year: serve-time ages are computed in it
GOLDEN_ROWS = 64

VALUATION_CATEGORIES = ["model", "condition", "fuel", "transmission", "drive", "body_type", "title_status", "size"]


def vehicle_age_years(fields):
    return float(max(0, EVENT_YEAR - fields["year"]))


def miles_per_year(fields):
    odometer = fields.get("odometer")
    if odometer is None:
        return None
    return odometer / max(vehicle_age_years(fields), 1.0)


def raw_inputs(fields):
    """The named inputs the engine will hand the valuation model for this ad."""
    out = {
        "vehicle_age_years": vehicle_age_years(fields),
        "odometer": fields.get("odometer"),
        "miles_per_year": miles_per_year(fields),
        "cylinders": fields.get("cylinders") if isinstance(fields.get("cylinders"), int) else None,
    }
    for name in VALUATION_CATEGORIES:
        out[name] = fields.get(name)
    return out


class Encoder:
    """Numeric inputs (missing -> fill, clipped) and one-hot categoricals, in sidecar order."""

    def __init__(self, numeric, categorical, rows):
        self.spec = []
        for name, clip, log in numeric:
            values = [r[name] for r in rows if r[name] is not None]
            self.spec.append({"name": name, "kind": "numeric", "fill": float(np.median(values)),
                              "min": clip[0], "max": clip[1], "log1p": log})
        for name in categorical:
            seen = sorted({r[name] for r in rows if r[name] is not None})
            self.spec.append({"name": name, "kind": "one_hot", "categories": seen})

    def width(self):
        return sum(1 if s["kind"] == "numeric" else len(s["categories"]) for s in self.spec)

    def encode(self, row):
        out = []
        for s in self.spec:
            value = row.get(s["name"])
            if s["kind"] == "numeric":
                v = s["fill"] if value is None else float(value)
                v = min(s["max"], max(s["min"], v))
                out.append(float(np.log1p(v)) if s["log1p"] else v)
            else:
                out.extend(1.0 if value == c else 0.0 for c in s["categories"])
        return out


def split_rows(rows):
    """The ads with a usable price, and their fixed 80/20 train/held-out split."""
    usable = [i for i, r in enumerate(rows)
              if simulate.valid_price(r["price"]) and r["year"] >= 1950
              and r.get("odometer", 0) <= 1_000_000 and not isinstance(r.get("cylinders"), str)]
    rng = np.random.default_rng(7)
    order = rng.permutation(len(usable))
    split = int(len(order) * 0.8)
    return usable, [usable[i] for i in order[:split]], [usable[i] for i in order[split:]]


def errors(p, y):
    ape = np.abs(p - y) / y
    return {"mae_usd": round(float(np.mean(np.abs(p - y))), 1),
            "median_ape": round(float(np.median(ape)), 4), "mape": round(float(np.mean(ape)), 4)}


def fit_mlp(x, y, hidden, seed):
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale == 0] = 1.0
    mlp = MLPRegressor(hidden_layer_sizes=hidden, alpha=1e-3, learning_rate_init=1e-3, max_iter=400,
                       early_stopping=True, random_state=seed)
    mlp.fit((x - mean) / scale, y)
    return mlp, mean, scale


def predict(mlp, mean, scale, x, log_range):
    """Exactly what the exported graph computes (in float64)."""
    return np.exp(np.clip(mlp.predict((x - mean) / scale), log_range[0], log_range[1]))


def folded_layers(mlp, mean, scale):
    """The MLP's layers with the standardization folded into the first one.

    ((x - mean) / scale) @ w0 + b0 == x @ (w0 / scale[:, None]) + (b0 - (mean / scale) @ w0),
    computed in float64 before the cast to float32. tract runs a Sub and a
    Div over the whole input as generic broadcast operations (4.6% of the core
    pipeline's worker time in a profile); folded, they cost nothing.
    """
    w0, b0 = mlp.coefs_[0], mlp.intercepts_[0]
    first = (w0 / scale[:, None], b0 - (mean / scale) @ w0)
    return [first] + list(zip(mlp.coefs_[1:], mlp.intercepts_[1:]))


def folded_predict_float32(mlp, mean, scale, x, log_range):
    """The exported graph's arithmetic in float32, as tract runs it, to print how far folding moves it."""
    h = x.astype(np.float32)
    layers = folded_layers(mlp, mean, scale)
    for i, (w, b) in enumerate(layers):
        h = h @ w.astype(np.float32) + b.astype(np.float32)
        if i < len(layers) - 1:
            h = np.maximum(h, np.float32(0))
    return np.exp(np.clip(h[:, 0].astype(np.float64), log_range[0], log_range[1]))


def export_onnx(path, output_name, mlp, mean, scale, width, log_range):
    """Dense layers (the first one standardizing) with ReLU, identity output clipped to the label range, exp."""
    inits = [numpy_helper.from_array(np.array(log_range[0], dtype=np.float32), "log_min"),
             numpy_helper.from_array(np.array(log_range[1], dtype=np.float32), "log_max")]
    nodes = []
    current = "features"
    for i, (w, b) in enumerate(folded_layers(mlp, mean, scale)):
        inits.append(numpy_helper.from_array(w.astype(np.float32), f"w{i}"))
        inits.append(numpy_helper.from_array(b.astype(np.float32), f"b{i}"))
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [f"m{i}"]))
        nodes.append(helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]))
        current = f"a{i}"
        if i < len(mlp.coefs_) - 1:
            nodes.append(helper.make_node("Relu", [current], [f"r{i}"]))
            current = f"r{i}"
    nodes.append(helper.make_node("Clip", [current, "log_min", "log_max"], ["clipped"]))
    nodes.append(helper.make_node("Exp", ["clipped"], [output_name]))
    graph = helper.make_graph(
        nodes, output_name,
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["N", 1])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="assay-train")
    model.ir_version = 8
    onnx.checker.check_model(model)
    data = model.SerializeToString()
    with open(path, "wb") as f:
        f.write(data)
    return hashlib.sha256(data).hexdigest()[:12]


def write_model(name, output_name, mlp, mean, scale, log_range, encoder, golden_rows, golden_x, metrics,
                description):
    onnx_path = os.path.join(MODELS, f"{name}.onnx")
    digest = export_onnx(onnx_path, output_name, mlp, mean, scale, encoder.width(), log_range)
    predictions = predict(mlp, mean, scale, golden_x, log_range)
    drift = float(np.max(np.abs(folded_predict_float32(mlp, mean, scale, golden_x, log_range) / predictions - 1)))
    print(f"{name}: folded float32 graph against the fitted model, largest relative difference on the golden rows: {drift:.2e}")
    sidecar = {
        "name": name,
        "version": f"{name}-{digest}",
        "description": description,
        "input_tensor": "features",
        "input_width": encoder.width(),
        "inputs": encoder.spec,
        "outputs": [output_name],
        "metrics": metrics,
    }
    with open(os.path.join(MODELS, f"{name}.json"), "w") as f:
        json.dump(sidecar, f, indent=2)
        f.write("\n")
    golden = [{"inputs": row, "outputs": {output_name: float(p)}} for row, p in zip(golden_rows, predictions)]
    with open(os.path.join(MODELS, f"{name}.golden.json"), "w") as f:
        json.dump(golden, f, indent=1)
        f.write("\n")
    print(f"wrote {onnx_path} (version {sidecar['version']})")


def main():
    csv_path = os.path.join(HERE, "data", "raw", "mercedes.csv")
    rows = simulate.load_rows(csv_path)
    _, days_to_sell = simulate.simulate(rows, generate_events.SEED)
    usable, train_idx, test_idx = split_rows(rows)

    # valuation
    raw = {i: raw_inputs(rows[i]) for i in usable}
    encoder = Encoder([("vehicle_age_years", (0, 80), False), ("odometer", (0, 500_000), True),
                       ("miles_per_year", (0, 100_000), True), ("cylinders", (0, 16), False)],
                      VALUATION_CATEGORIES, [raw[i] for i in train_idx])
    x_train = np.array([encoder.encode(raw[i]) for i in train_idx])
    x_test = np.array([encoder.encode(raw[i]) for i in test_idx])
    y_train = np.log(np.array([rows[i]["price"] for i in train_idx], dtype=float))
    y_test = np.array([rows[i]["price"] for i in test_idx], dtype=float)
    mlp, mean, scale = fit_mlp(x_train, y_train, (64, 32), seed=11)
    price_range = (float(np.log(simulate.VALID_PRICE[0])), float(np.log(simulate.VALID_PRICE[1])))
    pred = predict(mlp, mean, scale, x_test, price_range)

    groups, by_model = {}, {}
    for i in train_idx:
        groups.setdefault((rows[i]["model"], rows[i]["year"]), []).append(rows[i]["price"])
        by_model.setdefault(rows[i]["model"], []).append(rows[i]["price"])
    overall = float(np.median([rows[i]["price"] for i in train_idx]))
    baseline = np.array([
        float(np.median(groups.get((rows[i]["model"], rows[i]["year"]))
                        or by_model.get(rows[i]["model"]) or [overall]))
        for i in test_idx])

    valuation_metrics = {"held_out_rows": len(test_idx), "mlp": errors(pred, y_test),
                         "baseline_median_by_model_year": errors(baseline, y_test)}
    print("valuation, held-out:", json.dumps(valuation_metrics))
    golden_idx = test_idx[:GOLDEN_ROWS]
    write_model("valuation", "valuation", mlp, mean, scale, price_range, encoder,
                [raw[i] for i in golden_idx], np.array([encoder.encode(raw[i]) for i in golden_idx]),
                valuation_metrics, "asking-price valuation in USD from vehicle attributes")

    # days to sell: label from the simulator, inputs as the engine sees them at creation
    valuation_of = {i: float(v) for i, v in zip(
        usable, predict(mlp, mean, scale, np.array([encoder.encode(raw[i]) for i in usable]), price_range))}
    dts_raw = {i: {"price": float(rows[i]["price"]), "valuation": valuation_of[i],
                   "vehicle_age_years": vehicle_age_years(rows[i]), "odometer": rows[i].get("odometer"),
                   "condition": rows[i].get("condition")} for i in usable}
    dts_encoder = Encoder([("price", (0, 500_000), True), ("valuation", (0, 500_000), True),
                           ("vehicle_age_years", (0, 80), False), ("odometer", (0, 500_000), True)],
                          ["condition"], [dts_raw[i] for i in train_idx])
    dx_train = np.array([dts_encoder.encode(dts_raw[i]) for i in train_idx])
    dx_test = np.array([dts_encoder.encode(dts_raw[i]) for i in test_idx])
    # a sale within the first day counts as one day: log needs a floor
    dy_train = np.log(np.maximum(1.0, np.array([days_to_sell[i] for i in train_idx])))
    dy_test = np.maximum(1.0, np.array([days_to_sell[i] for i in test_idx]))
    dmlp, dmean, dscale = fit_mlp(dx_train, dy_train, (32, 16), seed=13)
    days_range = (0.0, float(np.log(365.0)))
    dpred = predict(dmlp, dmean, dscale, dx_test, days_range)
    print("days_to_sell prediction percentiles 50/99/max:", np.percentile(dpred, [50, 99, 100]).round(1))
    median_days = float(np.median([days_to_sell[i] for i in train_idx]))
    dts_metrics = {"held_out_rows": len(test_idx),
                   "mlp_mae_days": round(float(np.mean(np.abs(dpred - dy_test))), 2),
                   "baseline_median_days_mae": round(float(np.mean(np.abs(median_days - dy_test))), 2),
                   "label": "simulated (topologies/listings/simulate.py)"}
    print("days_to_sell, held-out:", json.dumps(dts_metrics))
    write_model("days_to_sell", "days_to_sell", dmlp, dmean, dscale, days_range, dts_encoder,
                [dts_raw[i] for i in test_idx[:GOLDEN_ROWS]],
                np.array([dts_encoder.encode(dts_raw[i]) for i in test_idx[:GOLDEN_ROWS]]),
                dts_metrics, "expected days until sold, from the simulated market")


if __name__ == "__main__":
    main()
